"""Section 2: initialize the sandbox database, inspect the engine's pool, and measure pooling."""

import altair as alt
import pandas as pd
import streamlit as st

import source
from classroom.demos import pooling
from classroom.sandboxes.admission import MAX_POOL_EXPERIMENT_CONCURRENCY
from classroom.sandboxes.reset import initialize_sandbox
from pages.common import (
    CHART_PADDING,
    FULL_LABELS,
    kept_outcome,
    open_page,
    plain_text,
    run_and_keep,
    run_or_report,
    show_code,
)
from pages.common.formatting import pool_trial_row
from pages.common.progress import demo_fragment, show_section_progress
from pages.common.words import PRE_PING

lab = open_page()
EXPERIMENT, INITIALIZED = "pool_experiment_result", "initialize_outcome"


@demo_fragment(lab)
def initialize_demo(engine: pooling.EngineReport) -> None:
    """The initialize button and what it created: a click reruns this part of the page only."""
    st.subheader("Initialize your sandbox database")
    # The guide's label says in-memory SQLite; say what the button really works on here.
    where = (
        f"its own SQLite file ({engine.location})"
        if engine.backend == "sqlite"
        else f"its own schema ({engine.location}) in the shared PostgreSQL database"
    )
    st.caption(
        "Creates the tables if needed, deletes everything in your sandbox (and only yours), then "
        "adds the sample users Alex Smith and Jane Doe, all in one transaction. Not in memory on "
        f"this server: your sandbox is {where}."
    )
    st.button(
        "Initialize In-Memory SQLite Database & Create Sample Users",
        type="primary",
        on_click=run_and_keep,
        args=(lab, INITIALIZED, "Initialization failed; nothing was changed.", initialize_sandbox),
    )
    if (sample_users := kept_outcome(INITIALIZED, keep=True)) is not None:
        still_there = {user.id for user in run_or_report(lab, "", source.list_users) or []}
        if {user.id for user in sample_users} <= still_there:
            st.success(f"Schema ready, sandbox cleared, {len(sample_users)} sample users created.")
            rows = [  # st.table renders Markdown, and would make each email a link
                {"name": plain_text(u.name), "email": plain_text(u.email), "id": u.id}
                for u in sample_users
            ]
            st.table(pd.DataFrame(rows))
        else:  # describes rows that are gone: drop it
            st.session_state.pop(INITIALIZED, None)
    show_code(source.init_db, label="The code Initialize runs")


def render_engine(engine: pooling.EngineReport) -> None:
    """The sandbox's engine and its pool's counters, as they are now."""
    st.subheader("Your engine and its pool, live")
    st.code(engine.url, language=None)
    pool = engine.pool
    st.markdown(f"**Pool class:** `{pool['pool_class']}`")  # a long name: no metric tile
    columns = st.columns(3)
    columns[0].metric("Pool size", pool.get("size", "n/a"))
    columns[1].metric("Checked out now", pool.get("checkedout", "n/a"))
    columns[2].metric("Overflow in use", max(0, pool.get("overflow", 0)))
    kind = (
        "Your sandbox is its own SQLite file in WAL mode with a busy timeout, so concurrent "
        "writers queue instead of losing rows."
        if engine.backend == "sqlite"
        else "All sandboxes share this PostgreSQL pool; yours is a schema of its own."
    )
    st.caption(
        f"Configured: pool_size={engine.configured_pool_size}, "
        f"max_overflow={engine.configured_max_overflow}, "
        f"pool_timeout={engine.pool_timeout_seconds:g} s, "
        f"pool_pre_ping={engine.pool_pre_ping}. {kind}",
        help=PRE_PING,
    )
    show_code(source.create_engine, source.get_session, label="The engine and session code")


@demo_fragment(lab)
def pool_experiment() -> None:
    """The experiment's form and results: a click reruns this part of the page only."""
    st.subheader("Experiment: pooled connections against a new connection per query")
    st.markdown(
        "Run the same R queries, C at a time, twice: through a pool of P connections, then "
        "through `NullPool`, which opens and closes a connection for every query. Both use fresh "
        "engines on your sandbox's database; the pool is warmed first, as a running "
        "application's would be. Every learner's experiment draws from this server's one "
        "connection budget: when others are using it, yours waits its turn (it does not fail), "
        "and the wait is shown below."
    )
    with st.form("pool_experiment"):
        left, middle, right = st.columns(3)
        most = MAX_POOL_EXPERIMENT_CONCURRENCY
        requests = left.slider(
            "Requests (R)", 10, pooling.MAX_POOL_EXPERIMENT_REQUESTS, 300, step=10
        )
        concurrency = middle.slider("In flight at once (C)", 1, most, 20)
        pool_size = right.slider("Pool size (P)", 1, most, 5)
        submitted = st.form_submit_button("Run Pooling Experiment")
    if submitted:
        with st.spinner("Running in QuLab's experiment process, one learner at a time…"):
            st.session_state[EXPERIMENT] = run_or_report(
                lab,
                "The experiment did not run.",
                pooling.run_pool_experiment,
                requests=requests,
                concurrency=concurrency,
                pool_size=pool_size,
            )
    if (experiment := st.session_state.get(EXPERIMENT)) is not None:
        render_experiment(experiment)


def render_experiment(experiment: pooling.PoolExperiment) -> None:
    """Both trials: throughput side by side, the table, a chart."""
    pooled, unpooled = experiment.pooled, experiment.unpooled
    left, middle, right = st.columns(3)
    left.metric("Pooled throughput", f"{pooled.throughput:,.0f} req/s")
    middle.metric("NullPool throughput", f"{unpooled.throughput:,.0f} req/s")
    right.metric("Pooled ÷ NullPool", f"{experiment.speedup:.2f}×")
    st.table(pd.DataFrame([pool_trial_row(trial) for trial in experiment.trials]))
    throughput = pd.DataFrame(
        [
            {"pool": trial.label, "throughput (req/s)": trial.throughput}
            for trial in experiment.trials
        ]
    )
    chart = (
        alt.Chart(throughput, padding=CHART_PADDING)
        .mark_bar()
        .encode(
            x=alt.X("throughput (req/s):Q", axis=FULL_LABELS),
            y=alt.Y("pool:N", axis=FULL_LABELS, title=None, sort=None),
        )
    )
    st.altair_chart(chart)
    st.caption(
        "Measured just now on this server; a busy machine moves both numbers, the ratio less."
    )
    if experiment.waited_seconds >= 0.05:
        st.info(
            f"Your experiment waited {experiment.waited_seconds:.1f} s for other learners' "
            "experiments (their turn in the experiment process, or their connections)."
        )
    if experiment.opened_at_once is not None:
        st.caption(
            "On PostgreSQL, QuLab opens NullPool's connections one at a time (in this run, at "
            f"most {experiment.opened_at_once} at once): each new connection starts a server "
            "process, and starting many at once would take the server's CPU from the rest of "
            "the class. NullPool's figure is for connections opened one after another."
        )
    if experiment.capped_by_budget:
        st.info(
            f"This server's connection budget allows {pooled.concurrency} connections for one "
            "experiment, so C and P were lowered to that."
        )
    show_code(source.compare_pooling, source.time_queries, label="The experiment's code")


st.title("2. DB Connectivity & Pooling")
st.markdown("""
A request that waits on the database should not hold up every other request. With SQLAlchemy's
**async engine**, the event loop serves other work while a query is in flight. A **connection
pool** keeps a few connections open and lends them out, so a request skips the cost of opening
one (a new thread and file handle for SQLite; a TCP handshake, authentication and a server
process for PostgreSQL). What this buys is throughput:
""")
st.latex(r"\Theta = \frac{\text{number of requests}}{\text{total time}}")
st.markdown("""
Each request runs in a transaction with the **ACID** guarantees: it happens completely or not
at all (*atomicity*), leaves every constraint satisfied (*consistency*), does not see other
requests' half-done work (*isolation*), and survives a crash once committed (*durability*).
""")
engine = run_or_report(lab, "Could not read your sandbox's engine.", pooling.describe_engine)
if engine is None:
    st.stop()
initialize_demo(engine)
render_engine(engine)
pool_experiment()
show_section_progress(lab, section=2)
