"""Section 4: a read-through Redis cache in front of user profiles and latest AIRScores."""

import altair as alt
import pandas as pd
import streamlit as st

import source
from pages import CHART_PADDING, kept_outcome, open_page, run_and_keep, run_or_report, show_code, show_section_progress

lab = open_page()
LAST_RESULT, EXPERIMENT = "cache_last_result", "cache_trials"


def act(what: str, operation, *, keep_as: str = LAST_RESULT, **kwargs) -> None:
    """Run an operation, keep its outcome (or its error) and rerun, so the sidebar and tables show its effect."""
    run_and_keep(lab, keep_as, f"{what} failed.", operation, **kwargs)
    st.rerun()


def button(label: str, operation, *, where=st, **kwargs) -> None:
    """A button whose operation runs in its on_click callback, before the page draws (so one rerun shows its effect)."""
    where.button(label, type="primary" if label.startswith("Fetch") else "secondary", on_click=run_and_keep,
                 args=(lab, LAST_RESULT, f"{label} failed.", operation), kwargs=kwargs)


def render_redis(status: source.CacheStatus) -> None:
    """Which Redis answers, and whether it answers now: the breaker follows the server."""
    if status.redis_mode == "fakeredis":
        st.info("No Redis server is configured, so QuLab runs **fakeredis**: Redis written in Python, in this process, "
                "answering the same commands; every figure below is measured.")
    elif status.breaker_state == "closed" and not status.degraded:
        st.info(f"Reads go to a real Redis server ({status.redis_reason}).")
    st.caption(f"Redis breaker: {status.breaker}.")
    if status.breaker_state != "closed":
        st.warning(f"Redis is not answering ({status.redis_reason}): reads go to the database, writes are remembered.")


def render_read(read: source.CacheRead) -> None:
    """The last read: its outcome, cost, the exact Redis commands, and the value."""
    st.markdown(f"**Last read:** {'user profile' if read.kind == 'user' else 'latest AIRScore'}")
    shown = {"Outcome": read.outcome, "Time taken": f"{read.total_ms:.3f} ms", "Database statements": read.database_statements}
    for column, (label, value) in zip(st.columns(3), shown.items()):
        column.metric(label, value)
    if read.outcome == source.CACHE_FALLBACK:
        st.warning("Redis did not answer, so the database did. The read still succeeded; it counts as a cache error.")
    st.markdown("Redis commands this read sent:")
    st.code("\n".join(f"{c.command}\n  -> {c.reply} ({c.duration_ms:.3f} ms)" for c in read.redis_commands), language=None, wrap_lines=True)
    if read.note:
        st.caption(read.note)
    if read.value is None:
        st.caption("This user has no AIRScore yet; that answer is cached too (as JSON null).")
    else:
        st.json(read.value, expanded=False)


def render_result(result) -> None:
    """What the last button did."""
    if isinstance(result, source.CacheRead):
        render_read(result)
    elif isinstance(result, source.CacheInvalidation) and result.applied:
        st.success(f"Sent DEL for the user's two keys; Redis deleted {result.deleted}. The next fetch misses.")
    elif isinstance(result, source.CacheInvalidation):
        st.warning("Redis did not answer; the cache moves to a new epoch before it is read again.")
    elif isinstance(result, source.User):
        st.success("Renamed and committed. Fetch the user again: it misses once, then shows the new name.")
    elif isinstance(result, source.AIRScore):
        st.success(f"New AIRScore committed ({result.air_score:g}). Fetch the latest AIRScore again to see it.")


def render_metrics(metrics: source.CacheMetrics) -> None:
    """H and T_avg, measured."""
    st.subheader("Cache metrics (measured)")
    for row in source.cache_metric_rows(metrics):
        for column, (label, value) in zip(st.columns(len(row)), row.items()):
            column.metric(label, value)
    st.caption("Counted in your sandbox since it was last initialized. The formula leaves out the SET a miss sends, "
               "so the measured average sits a little above the prediction.")


def render_experiment(trials) -> None:
    """The experiment's table and the formula against the clock."""
    st.table(pd.DataFrame([source.cache_trial_row(trial) for trial in trials]))
    points = pd.DataFrame([source.cache_trial_point(trial) for trial in trials])
    base = alt.Chart(points).encode(x=alt.X("measured H:Q", title="hit ratio H", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")))
    st.altair_chart(alt.layer(base.mark_line().encode(y=alt.Y("T_avg predicted (ms):Q", title="T_avg (ms)")),
                              base.mark_circle(size=90, color="#ef6c00").encode(y="T_avg measured (ms):Q"), padding=CHART_PADDING), width="stretch")
    st.caption("T_avg against H, measured just now: the line is the formula, the dots the clock.")


st.title("4. Caching with Redis")
st.markdown("""
Profiles and latest scores are read far more often than they change, so Alex puts Redis in front of the
database with a **read-through** cache: ask Redis first; on a **hit**, answer from memory; on a **miss**,
read the database, answer, and keep a copy in Redis (as JSON, for a few minutes) for the next reader:""")
st.latex(r"H = \frac{\text{cache hits}}{\text{requests}} \qquad "
         r"T_{\text{avg}} = H \cdot T_{\text{cache}} + (1 - H) \cdot (T_{\text{cache}} + T_{\text{database}})")
demo = run_or_report(lab, "The cache demo could not start.", source.prepare_cache_demo)
if demo is None or (status := run_or_report(lab, "The cache status is unavailable.", source.cache_status)) is None:
    st.stop()
render_redis(status)

st.subheader("Interactive caching demonstration")
st.caption("Alex Smith when your sandbox has him, else Jane Doe, else a Cache Demo User created for this page.")
for column, (label, value) in zip(st.columns(2), {"User ID": demo.user_id, "Latest AIRScore ID": demo.latest_airscore_id}.items()):
    column.markdown(f"**{label}**")
    column.code(value, language=None)
st.table(pd.DataFrame([{"demo user": demo.user_name}]))
BUTTONS = {"Fetch User (Cached)": source.fetch_user_cached, "Fetch Latest AIRScore (Cached)": source.fetch_latest_airscore_cached,
           "Invalidate Cache for this User": source.invalidate_user_cache}
for column, (label, operation) in zip(st.columns(3), BUTTONS.items()):
    button(label, operation, where=column, user_id=demo.user_id)
render_result(kept_outcome(LAST_RESULT, keep=True))
render_metrics(status.metrics)

st.subheader("Write, and watch the cache let go")
st.markdown("A write commits first, then deletes the keys it made stale (a bulk write moves the whole cache to a new "
            "epoch), so the next read misses and sees the new data, in this process or any other.")
with st.form("rename_demo_user"):
    new_name = st.text_input("New name for the demo user", max_chars=source.MAX_NAME_LENGTH)
    if st.form_submit_button("Rename User"):
        act("Renaming", source.rename_user, user_id=demo.user_id, name=new_name)
button("Add a New AIRScore", source.add_demo_airscore, user_id=demo.user_id)
if status.recent_invalidations:
    st.markdown("Recent invalidations (newest first):")
    st.table(pd.DataFrame([source.invalidation_row(invalidation) for invalidation in status.recent_invalidations]))

st.subheader("When Redis goes away")
st.markdown("The switch cuts only your sandbox off from Redis: reads keep working from the database and count as "
            "errors; writes made meanwhile are remembered and settled first when Redis is back.")
if status.cut_off:
    st.warning(f"Redis is cut off for your sandbox. Writes waiting to be settled: {status.pending_invalidations}.")
    button("Reconnect Redis", source.set_redis_outage, cut=False)
else:
    button("Cut Redis for My Sandbox", source.set_redis_outage, cut=True)

st.subheader("Experiment: hit ratio against average time")
st.caption("R reads of the demo user per chosen H, evicting (untimed) before the reads meant to miss; own counters.")
with st.form("cache_experiment"):
    reads = st.slider("Reads per trial (R)", 10, 500, 100, step=10)
    chosen = st.multiselect("Hit ratios to try", [step / 10 for step in range(11)], default=[0.0, 0.5, 0.8, 1.0],
                            format_func=lambda ratio: f"{ratio:.0%}")
    if st.form_submit_button("Run Cache Experiment"):
        act("The experiment", source.run_cache_experiment, keep_as=EXPERIMENT, user_id=demo.user_id, reads=reads,
            hit_ratios=tuple(sorted(chosen)))
if trials := kept_outcome(EXPERIMENT, keep=True):
    render_experiment(trials)

show_code(source.ReadThroughCache.read, source.CachedUserRepository.get_user, label="The read-through cache, as it runs")
show_code(*source.CACHE_HARDENING, label="How this survives faults")
show_section_progress(lab, section=4)
