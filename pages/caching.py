"""Section 4: a read-through Redis cache in front of user profiles and latest AIRScores."""

import altair as alt
import pandas as pd
import streamlit as st

import source
from classroom import validation
from classroom.cache.breaker import CircuitBreaker
from classroom.cache.coherence import CacheCoherence
from classroom.cache.coherent import CoherentCache, invalidate_cached_changes
from classroom.cache.link import RedisLink
from classroom.cache.single_flight import SingleFlight
from classroom.demos import caching
from pages.common import (
    CHART_PADDING,
    kept_outcome,
    open_page,
    plain_text,
    run_and_keep,
    run_or_report,
    show_code,
)
from pages.common.formatting import (
    cache_metric_rows,
    cache_trial_point,
    cache_trial_row,
    invalidation_row,
    markdown_table,
)
from pages.common.progress import demo_fragment, show_section_progress
from pages.common.sidebar import redis_as_the_sidebar_says
from pages.common.words import BREAKER, EPOCH, FENCE

lab = open_page()
READ, INVALIDATED, RENAMED, SCORED = (
    "cache_read",
    "cache_invalidated",
    "cache_renamed",
    "cache_scored",
)
EXPERIMENT, DEMO_CREATED, SWITCHED = "cache_trials", "cache_demo_created", "cache_switched"
NEW_NAME_KEY, FORGETS_KEY = "cache_new_name", "cache_forgets_open"
MESSAGES = (INVALIDATED, RENAMED, SCORED)  # what the last write or invalidation did
READS = (
    ("Fetch User (Cached)", READ, caching.fetch_user_cached),
    ("Fetch Latest AIRScore (Cached)", READ, caching.fetch_latest_airscore_cached),
    ("Invalidate Cache for this User", INVALIDATED, caching.invalidate_user_cache),
)
# What the page lists under "How this survives faults": each unit on its own, each short.
HARDENING = (
    CoherentCache.get,
    CoherentCache.set,
    CacheCoherence.invalidate,
    SingleFlight.load,
    invalidate_cached_changes,
    RedisLink._guarded,
    CircuitBreaker.record_failure,
)


def button(label: str, key: str, operation, *, where=st, primary: bool = False, **kwargs) -> None:
    """A button whose operation runs in its on_click callback, before the page draws; its
    result replaces what the demo's other buttons last showed (the last read stays)."""
    where.button(
        label,
        type="primary" if primary else "secondary",
        on_click=run_and_keep,
        args=(lab, key, f"{label} failed.", operation),
        kwargs={"clears": tuple(other for other in MESSAGES if other != key), **kwargs},
    )


def render_redis(status: caching.CacheStatus) -> None:
    """Which Redis answers, and whether it answers now (read as the sidebar reads it)."""
    answers, breaker = redis_as_the_sidebar_says(status.answers, status.breaker)
    if status.redis_mode == "fakeredis":
        st.info(
            "No Redis server is configured, so QuLab runs **fakeredis**: Redis written in Python, "
            "in this process, answering the same commands; every figure below is measured."
        )
    elif answers:
        st.info(f"Reads go to a real Redis server ({status.redis_reason}).")
    if not answers:
        st.warning(
            "Redis is not answering right now: reads go to the database, and writes are "
            "remembered and settled when it is back."
        )
    st.caption(f"Breaker: {breaker}.", help=BREAKER)


def render_read(fetch: caching.CachedFetch) -> None:
    """The last read: its outcome, cost, the exact Redis commands, and the value."""
    read = fetch.read
    what = "user profile" if fetch.kind == "user" else "latest AIRScore"
    shown = {
        "Outcome": read.outcome,
        "Time taken": f"{read.total_ms:.3f} ms",
        "Database statements": str(read.database_statements),
    }
    st.markdown(f"**Last read:** {what}\n\n{markdown_table([shown])}")
    if read.outcome == source.FALLBACK:
        st.warning("Redis did not answer, so the database did. The read still succeeded.")
    commands = "\n".join(
        f"{c.command}\n  -> {c.reply} ({c.duration_ms:.3f} ms)" for c in read.redis_commands
    )
    notes = [read.note] if read.note else []
    if read.value is None:
        notes.append("This user has no AIRScore yet; that answer is cached too (as JSON null).")
    st.code(commands, language=None, wrap_lines=True)
    if notes:
        st.caption(" ".join(notes))
    if read.value is not None:
        st.json(read.value, expanded=False)


def render_metrics(metrics: source.CacheMetrics) -> None:
    """H and T_avg, measured: one Markdown element (a click redraws it)."""
    counts, times = cache_metric_rows(metrics)
    st.markdown(
        "#### Cache metrics (measured)\n\n"
        f"{markdown_table([counts])}\n\n{markdown_table([times])}\n\n"
        "Counted in your sandbox since it was last initialized. The formula leaves out the SET a "
        "miss sends, so the measured average sits a little above the prediction."
    )


def render_invalidations() -> None:
    """The cache's recent invalidations, read and drawn only while the expander is open."""
    forgets = st.expander(
        "What the cache was told to forget, newest first", key=FORGETS_KEY, on_change="rerun"
    )
    if not forgets.open:
        return
    recent = run_or_report(lab, "The invalidations are unavailable.", caching.recent_invalidations)
    with forgets:
        st.caption(
            "Each write sends one MULTI: DEL of the keys it changed, and a new fence; a bulk "
            "write (an initialize) also starts a new epoch.",
            help=f"{EPOCH}\n\n{FENCE}",
        )
        if recent:
            st.markdown(markdown_table([invalidation_row(entry) for entry in recent]))
        elif recent is not None:
            st.caption("Nothing yet.")


@demo_fragment(lab)
def cache_reads(user_id: str) -> None:
    """The three buttons and what the last one did: a click reruns this part of the page only.

    What it draws is what a click changes (the last read, the counters); the demo user and
    Redis's state are drawn around it, with the whole page.
    """
    row = st.container(horizontal=True)
    for label, key, operation in READS:
        button(label, key, operation, where=row, primary=key == READ, user_id=user_id)
    if invalidation := kept_outcome(INVALIDATED, keep=True):
        if invalidation.applied:
            st.success(
                f"Sent DEL for the user's two keys; Redis deleted {invalidation.deleted}. "
                "The next fetch misses."
            )
        else:
            st.warning("Redis did not answer; the cache starts afresh before it is read again.")
    fetch = st.session_state.get(READ)
    if fetch is not None and fetch.result is not None and fetch.result.user_id != user_id:
        st.session_state.pop(READ)  # a read of a user deleted since: it describes nothing now
    if fetch := kept_outcome(READ, keep=True):
        render_read(fetch)
    if metrics := run_or_report(lab, "The cache metrics are unavailable.", caching.cache_metrics):
        render_metrics(metrics)
    render_invalidations()


def cache_demo(panel: caching.CachePanel) -> None:
    """The demo user, the reads (a fragment), then the writes, which redraw the page."""
    render_redis(panel.status)
    st.subheader("Interactive caching demonstration")
    demo = panel.demo
    if demo is None:
        st.session_state.pop(READ, None)  # a kept read would describe rows that are gone
        st.info(
            "Your sandbox has none of the users this demo reads (Alex Smith, Jane Doe, or a "
            "Cache Demo User). Initialize the sample users in section 2, or create one here."
        )
        operation = caching.create_cache_demo_user
        button("Create the Cache Demo User", DEMO_CREATED, operation, primary=True)
        kept_outcome(DEMO_CREATED)
        return
    st.caption(
        f"The demo user: **{plain_text(demo.user_name)}** (Alex Smith when your sandbox has him, "
        "else Jane Doe, else the Cache Demo User)."
    )
    ids = {"User ID": demo.user_id, "Latest AIRScore ID": demo.latest_airscore_id or "none yet"}
    for column, (label, value) in zip(st.columns(2), ids.items(), strict=True):
        column.markdown(f"**{label}**")
        column.code(value, language=None)
    cache_reads(demo.user_id)
    render_writes(demo)


def render_writes(demo: caching.CacheDemo) -> None:
    """A rename or a new score commits; the commit makes the cache let go of what it changed.

    Not a fragment: a write changes the demo user's name or latest score, drawn above.
    """
    st.subheader("Write, and watch the cache let go")
    st.markdown(
        "A write commits first, then deletes the keys it made stale (a bulk write starts the "
        "cache afresh), so the next read misses and sees the new data, in any process."
    )
    with st.form("rename_demo_user"):
        st.text_input(
            "New name for the demo user", max_chars=validation.MAX_NAME_LENGTH, key=NEW_NAME_KEY
        )
        st.form_submit_button("Rename User", on_click=rename_demo_user, args=(demo.user_id,))
    if kept_outcome(RENAMED, keep=True) is not None:
        st.success("Renamed and committed. Fetch the user again: it misses, then shows the name.")
    button("Add a New AIRScore", SCORED, caching.add_demo_airscore, user_id=demo.user_id)
    if score := kept_outcome(SCORED, keep=True):
        st.success(f"New AIRScore committed ({score.air_score:g}). Fetch the latest again.")


def rename_demo_user(user_id: str) -> None:
    """The rename form's callback: runs before the page draws, so the page shows the new name."""
    name = st.session_state.get(NEW_NAME_KEY, "")
    run_and_keep(
        lab,
        RENAMED,
        "Renaming failed.",
        caching.rename_user,
        clears=(INVALIDATED, SCORED),
        user_id=user_id,
        name=name,
    )


def outage_switch(status: caching.CacheStatus) -> None:
    """Cut this sandbox off from Redis, or reconnect it; the whole page (and sidebar) redraws."""
    st.subheader("When Redis goes away")
    st.markdown(
        "The switch cuts only your sandbox off from Redis: reads keep working from the database "
        "and count as errors; writes made meanwhile are remembered and settled first when Redis "
        "is back."
    )
    if status.cut_off:
        st.warning(
            f"Redis is cut off for your sandbox. Writes waiting to be settled: "
            f"{status.pending_invalidations}."
        )
    label = "Reconnect Redis" if status.cut_off else "Cut Redis for My Sandbox"
    # The switch sets what its label says, whatever another tab did meanwhile.
    st.button(label, on_click=switch_redis, kwargs={"cut": not status.cut_off})
    kept_outcome(SWITCHED)


def switch_redis(*, cut: bool) -> None:
    run_and_keep(lab, SWITCHED, "The switch failed.", caching.set_redis_outage, cut=cut)


def render_experiment(trials: list[caching.CacheTrial]) -> None:
    """The experiment's table and the formula against the clock."""
    st.table(pd.DataFrame([cache_trial_row(trial) for trial in trials]))
    points = pd.DataFrame([cache_trial_point(trial) for trial in trials])
    hit_ratio = alt.X(
        "measured H:Q",
        title="hit ratio H",
        scale=alt.Scale(domain=[0, 1]),
        axis=alt.Axis(format="%"),
    )
    base = alt.Chart(points).encode(x=hit_ratio)
    line = base.mark_line().encode(y=alt.Y("T_avg predicted (ms):Q", title="T_avg (ms)"))
    dots = base.mark_circle(size=90, color="#ef6c00").encode(y="T_avg measured (ms):Q")
    st.altair_chart(alt.layer(line, dots, padding=CHART_PADDING), width="stretch")
    st.caption("T_avg against H, measured just now: the line is the formula, the dots the clock.")


@demo_fragment(lab)
def cache_experiment(demo: caching.CacheDemo) -> None:
    """The experiment's form and result: a click reruns this part of the page only."""
    st.subheader("Experiment: hit ratio against average time")
    st.caption(
        "R reads of the demo user per chosen H, evicting (untimed) before those meant to miss."
    )
    with st.form("cache_experiment"):
        reads_per_trial = st.slider("Reads per trial (R)", 10, 500, 100, step=10)
        chosen = st.multiselect(
            "Hit ratios to try",
            [step / 10 for step in range(11)],
            default=[0.0, 0.5, 0.8, 1.0],
            format_func=lambda ratio: f"{ratio:.0%}",
        )
        submitted = st.form_submit_button("Run Cache Experiment")
    if submitted:
        run_and_keep(
            lab,
            EXPERIMENT,
            "The experiment failed.",
            caching.run_cache_experiment,
            user_id=demo.user_id,
            reads=reads_per_trial,
            hit_ratios=tuple(sorted(chosen)),
        )
    if trials := kept_outcome(EXPERIMENT, keep=True):
        render_experiment(trials)


st.title("4. Caching with Redis")
st.markdown("""
Profiles and latest scores are read far more often than they change, so Alex puts Redis in
front of the database with a **read-through** cache: ask Redis first; on a **hit**, answer from
memory; on a **miss**, read the database, answer, and keep a copy in Redis (as JSON, for a few
minutes) for the next reader:""")
st.latex(
    r"H = \frac{\text{cache hits}}{\text{requests}} \qquad "
    r"T_{\text{avg}} = H \cdot T_{\text{cache}} "
    r"+ (1 - H) \cdot (T_{\text{cache}} + T_{\text{database}})"
)
show_code(source.ReadThroughCache.read, label="The read-through pattern")
if panel := run_or_report(lab, "The cache demo is unavailable.", caching.cache_panel):
    cache_demo(panel)
    outage_switch(panel.status)
    if panel.demo is not None:
        cache_experiment(panel.demo)
show_code(
    source.CachedUserRepository.get_user,
    source.ReadThroughCache.get,
    source.ReadThroughCache.set,
    label="The repository the buttons call",
)
show_code(*HARDENING, label="How it survives faults")
show_section_progress(lab, section=4)
