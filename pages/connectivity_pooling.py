"""Section 2: initialize the sandbox database, inspect the engine's pool, and measure pooling."""

import altair as alt
import pandas as pd
import streamlit as st

import source
from classroom.demos import pooling
from classroom.sandboxes.admission import MAX_POOL_EXPERIMENT_CONCURRENCY
from classroom.sandboxes.reset import initialize_sandbox
from pages.common import CHART_PADDING, FULL_LABELS, open_page, run_or_report, show_code
from pages.common.formatting import pool_trial_row
from pages.common.progress import show_section_progress

lab = open_page()

st.title("2. DB Connectivity & Pooling")
st.markdown(
    """
A request that waits on the database should not hold up every other request. With SQLAlchemy's
**async engine**, the event loop serves other work while a query is in flight. A **connection
pool** keeps a few connections open and lends them out, so a request skips the cost of opening
one (a new thread and file handle for SQLite; a TCP handshake, authentication and a server
process for PostgreSQL). What this buys is throughput:
"""
)
st.latex(r"\Theta = \frac{\text{number of requests}}{\text{total time}}")
st.markdown(
    """
Each request runs in a transaction with the **ACID** guarantees: it happens completely or not at
all (*atomicity*), leaves every constraint satisfied (*consistency*), does not see other requests'
half-done work (*isolation*), and survives a crash once committed (*durability*).
"""
)

st.subheader("Initialize your sandbox database")
st.caption(
    "Creates the tables if needed, deletes everything in your sandbox (and only yours), then adds "
    "the sample users Alex Smith and Jane Doe, all in one transaction."
)
# The guide's label says in-memory SQLite; say what the button really works on here.
if (
    backend := run_or_report(
        lab, "Could not read where your sandbox lives.", pooling.describe_engine
    )
) is not None:
    st.caption(
        "Not in memory on this server: your sandbox is "
        + (
            f"its own SQLite file ({backend.location})."
            if backend.backend == "sqlite"
            else f"its own schema ({backend.location}) in the shared PostgreSQL database."
        )
    )
if st.button("Initialize In-Memory SQLite Database & Create Sample Users", type="primary"):
    try:
        sample_users = lab.run(initialize_sandbox)
    except source.QuLabError as error:
        st.error(f"Initialization failed; nothing was changed. {error}")
    else:
        st.success(f"Schema ready, sandbox cleared, {len(sample_users)} sample users created.")
        st.table(
            pd.DataFrame([{"name": u.name, "email": u.email, "id": u.id} for u in sample_users])
        )

st.subheader("Your engine and its pool, live")
try:
    report = lab.run(pooling.describe_engine)
except source.QuLabError as error:
    st.error(f"Could not read the engine's state. {error}")
    st.stop()
st.code(report.url, language=None)
pool = report.pool
st.markdown(
    f"**Pool class:** `{pool['pool_class']}`"
)  # a long name: a metric tile would cut it off
columns = st.columns(3)
columns[0].metric("Pool size", pool.get("size", "n/a"))
columns[1].metric("Checked out now", pool.get("checkedout", "n/a"))
columns[2].metric("Overflow in use", max(0, pool.get("overflow", 0)))
st.caption(
    f"Configured: pool_size={report.configured_pool_size}, "
    f"max_overflow={report.configured_max_overflow}, "
    f"pool_timeout={report.pool_timeout_seconds:g} s, pool_pre_ping={report.pool_pre_ping}. "
    + (
        "Your sandbox is its own SQLite file in WAL mode with a busy timeout, so concurrent "
        "writers queue instead of losing rows."
        if report.backend == "sqlite"
        else "All sandboxes share this PostgreSQL pool; yours is a schema of its own."
    )
)
show_code(source.create_engine, source.get_session, label="The engine and session code")

st.subheader("Experiment: pooled connections against a new connection per query")
st.markdown(
    "Run the same R queries, C at a time, twice: through a pool of P connections, then through "
    "`NullPool`, which opens and closes a connection for every query. Both use fresh engines on "
    "your sandbox's database; the pool is warmed first, as a running application's would be. "
    "Every learner's experiment draws from this server's one connection budget: when others are "
    "using it, yours waits its turn (it does not fail), and the wait is shown below."
)
with st.form("pool_experiment"):
    left, middle, right = st.columns(3)
    requests = left.slider("Requests (R)", 10, pooling.MAX_POOL_EXPERIMENT_REQUESTS, 300, step=10)
    concurrency = middle.slider("In flight at once (C)", 1, MAX_POOL_EXPERIMENT_CONCURRENCY, 20)
    pool_size = right.slider("Pool size (P)", 1, MAX_POOL_EXPERIMENT_CONCURRENCY, 5)
    if st.form_submit_button("Run Pooling Experiment"):
        try:
            with st.spinner(
                "Running in QuLab's experiment process, one learner's experiment at a time; "
                "if others are ahead of yours or hold the connection budget, waiting for them…"
            ):
                st.session_state["pool_experiment_result"] = lab.run(
                    pooling.run_pool_experiment,
                    requests=requests,
                    concurrency=concurrency,
                    pool_size=pool_size,
                )
        except source.QuLabError as error:
            st.error(f"The experiment did not run. {error}")

experiment = st.session_state.get("pool_experiment_result")
if experiment is not None:
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
    st.altair_chart(
        alt.Chart(throughput, padding=CHART_PADDING)
        .mark_bar()
        .encode(
            x=alt.X("throughput (req/s):Q", axis=FULL_LABELS),
            y=alt.Y("pool:N", axis=FULL_LABELS, title=None, sort=None),
        )
    )
    st.caption(
        "Measured just now on this server; a busy machine moves both numbers, the ratio less."
    )
    show_code(source.compare_pooling, source.time_queries, label="The experiment's code")
    if experiment.waited_seconds >= 0.05:
        st.info(
            f"Your experiment waited {experiment.waited_seconds:.1f} s for other learners' "
            "experiments (their turn in the experiment process, or their connections)."
        )
    if experiment.capped_by_budget:
        st.info(
            f"This server's connection budget allows {pooled.concurrency} connections for one "
            "experiment, so C and P were lowered to that."
        )

show_section_progress(lab, section=2)
