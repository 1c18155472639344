"""Section 4: a read-through Redis cache in front of user profiles and latest AIRScores."""

import altair as alt
import pandas as pd
import streamlit as st

import source
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
    run_and_keep,
    run_or_report,
    show_code,
)
from pages.common.formatting import (
    cache_metric_rows,
    cache_trial_point,
    cache_trial_row,
    invalidation_row,
)
from pages.common.progress import show_section_progress

lab = open_page()
READ, INVALIDATED, RENAMED, SCORED = (
    "cache_read",
    "cache_invalidated",
    "cache_renamed",
    "cache_scored",
)
EXPERIMENT, DEMO_CREATED = "cache_trials", "cache_demo_created"
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
    """A button whose operation runs in its on_click callback, before the page draws."""
    where.button(
        label,
        type="primary" if primary else "secondary",
        on_click=run_and_keep,
        args=(lab, key, f"{label} failed.", operation),
        kwargs=kwargs,
    )


def render_redis(status: caching.CacheStatus) -> None:
    """Which Redis answers, and whether it answers now: the breaker follows the server."""
    if status.redis_mode == "fakeredis":
        st.info(
            "No Redis server is configured, so QuLab runs **fakeredis**: Redis written in Python, "
            "in this process, answering the same commands; every figure below is measured."
        )
    elif status.breaker_state == "closed" and not status.degraded:
        st.info(f"Reads go to a real Redis server ({status.redis_reason}).")
    st.caption(f"Redis breaker: {status.breaker}.")
    if status.breaker_state != "closed":
        st.warning(
            f"Redis is not answering ({status.redis_reason}): reads go to the database, "
            "writes are remembered."
        )


def render_read(fetch: caching.CachedFetch) -> None:
    """The last read: its outcome, cost, the exact Redis commands, and the value."""
    read = fetch.read
    st.markdown(f"**Last read:** {'user profile' if fetch.kind == 'user' else 'latest AIRScore'}")
    shown = {
        "Outcome": read.outcome,
        "Time taken": f"{read.total_ms:.3f} ms",
        "Database statements": read.database_statements,
    }
    for column, (label, value) in zip(st.columns(3), shown.items(), strict=True):
        column.metric(label, value)
    if read.outcome == source.FALLBACK:
        st.warning("Redis did not answer, so the database did. The read still succeeded.")
    st.markdown("Redis commands this read sent:")
    commands = "\n".join(
        f"{c.command}\n  -> {c.reply} ({c.duration_ms:.3f} ms)" for c in read.redis_commands
    )
    st.code(commands, language=None, wrap_lines=True)
    if read.note:
        st.caption(read.note)
    if read.value is None:
        st.caption("This user has no AIRScore yet; that answer is cached too (as JSON null).")
    else:
        st.json(read.value, expanded=False)


def render_metrics(metrics: source.CacheMetrics) -> None:
    """H and T_avg, measured."""
    st.subheader("Cache metrics (measured)")
    for row in cache_metric_rows(metrics):
        for column, (label, value) in zip(st.columns(len(row)), row.items(), strict=True):
            column.metric(label, value)
    st.caption(
        "Counted in your sandbox since it was last initialized. The formula leaves out the SET a "
        "miss sends, so the measured average sits a little above the prediction."
    )


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
status = run_or_report(lab, "The cache status is unavailable.", caching.cache_status)
demo = run_or_report(lab, "Could not look for the demo user.", caching.find_cache_demo)
if status is None:
    st.stop()
render_redis(status)

st.subheader("Interactive caching demonstration")
if demo is None:
    st.info(
        "Your sandbox has none of the users this demo reads (Alex Smith, Jane Doe, or a Cache "
        "Demo User). Initialize the sample users in section 2, or create the demo user here."
    )
    button("Create the Cache Demo User", DEMO_CREATED, caching.create_cache_demo_user, primary=True)
    kept_outcome(DEMO_CREATED)
    st.stop()
st.caption("Alex Smith when your sandbox has him, else Jane Doe, else the Cache Demo User.")
ids = {"User ID": demo.user_id, "Latest AIRScore ID": demo.latest_airscore_id or "none yet"}
for column, (label, value) in zip(st.columns(2), ids.items(), strict=True):
    column.markdown(f"**{label}**")
    column.code(value, language=None)
st.table(pd.DataFrame([{"demo user": demo.user_name}]))
reads = (
    ("Fetch User (Cached)", READ, caching.fetch_user_cached),
    ("Fetch Latest AIRScore (Cached)", READ, caching.fetch_latest_airscore_cached),
    ("Invalidate Cache for this User", INVALIDATED, caching.invalidate_user_cache),
)
for column, (label, key, operation) in zip(st.columns(3), reads, strict=True):
    button(label, key, operation, where=column, primary=key == READ, user_id=demo.user_id)
if invalidation := kept_outcome(INVALIDATED):
    if invalidation.applied:
        st.success(
            f"Sent DEL for the user's two keys; Redis deleted {invalidation.deleted}. "
            "The next fetch misses."
        )
    else:
        st.warning("Redis did not answer; the cache moves to a new epoch before it is read again.")
if fetch := kept_outcome(READ, keep=True):
    render_read(fetch)
render_metrics(status.metrics)

st.subheader("Write, and watch the cache let go")
st.markdown(
    "A write commits first, then deletes the keys it made stale (a bulk write moves the whole "
    "cache to a new epoch), so the next read misses and sees the new data, in any process."
)
with st.form("rename_demo_user"):
    new_name = st.text_input("New name for the demo user", max_chars=source.MAX_NAME_LENGTH)
    if st.form_submit_button("Rename User"):
        rename = caching.rename_user
        run_and_keep(lab, RENAMED, "Renaming failed.", rename, user_id=demo.user_id, name=new_name)
        st.rerun()  # the metrics and invalidations above are drawn again with its effect
if kept_outcome(RENAMED) is not None:
    st.success(
        "Renamed and committed. Fetch the user again: it misses once, then shows the new name."
    )
button("Add a New AIRScore", SCORED, caching.add_demo_airscore, user_id=demo.user_id)
if score := kept_outcome(SCORED):
    st.success(f"New AIRScore committed ({score.air_score:g}). Fetch the latest AIRScore again.")
if status.recent_invalidations:
    st.markdown("Recent invalidations (newest first):")
    st.table(pd.DataFrame([invalidation_row(entry) for entry in status.recent_invalidations]))

st.subheader("When Redis goes away")
st.markdown(
    "The switch cuts only your sandbox off from Redis: reads keep working from the database and "
    "count as errors; writes made meanwhile are remembered and settled first when Redis is back."
)
if status.cut_off:
    st.warning(
        f"Redis is cut off for your sandbox. Writes waiting to be settled: "
        f"{status.pending_invalidations}."
    )
    button("Reconnect Redis", "cache_outage", caching.set_redis_outage, cut=False)
else:
    button("Cut Redis for My Sandbox", "cache_outage", caching.set_redis_outage, cut=True)
kept_outcome("cache_outage")

st.subheader("Experiment: hit ratio against average time")
st.caption(
    "R reads of the demo user per chosen H, evicting (untimed) before the reads meant to miss."
)
with st.form("cache_experiment"):
    reads_per_trial = st.slider("Reads per trial (R)", 10, 500, 100, step=10)
    chosen = st.multiselect(
        "Hit ratios to try",
        [step / 10 for step in range(11)],
        default=[0.0, 0.5, 0.8, 1.0],
        format_func=lambda ratio: f"{ratio:.0%}",
    )
    if st.form_submit_button("Run Cache Experiment"):
        run_and_keep(
            lab,
            EXPERIMENT,
            "The experiment failed.",
            caching.run_cache_experiment,
            user_id=demo.user_id,
            reads=reads_per_trial,
            hit_ratios=tuple(sorted(chosen)),
        )
        st.rerun()
if trials := kept_outcome(EXPERIMENT, keep=True):
    render_experiment(trials)

show_code(
    source.CachedUserRepository.get_user,
    source.ReadThroughCache.get,
    source.ReadThroughCache.set,
    label="The repository the buttons call",
)
show_code(*HARDENING, label="How it survives faults")
show_section_progress(lab, section=4)
