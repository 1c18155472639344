"""Section 4: a read-through Redis cache in front of user profiles and latest AIRScores."""

import altair as alt
import pandas as pd
import streamlit as st

import source
from pages import open_page, show_section_progress

lab = open_page()
LAST_READ, LAST_ACTION, LAST_ERROR = "cache_last_read", "cache_last_action", "cache_last_error"
EXPERIMENT = "cache_trials"


def act(what: str, operation, **kwargs) -> None:
    """Run one button's operation, keep its outcome for the next rerun, and rerun so the sidebar is current."""
    st.session_state.pop(LAST_ERROR, None)
    st.session_state.pop(LAST_ACTION, None)
    try:
        result = lab.run(operation, **kwargs)
    except source.QuLabError as error:
        st.session_state[LAST_ERROR] = f"{what} failed. {error}"
    else:
        key = LAST_READ if isinstance(result, source.CacheRead) else LAST_ACTION
        st.session_state[key] = result
    st.rerun()


def milliseconds(value):
    return "n/a" if value is None else f"{value:.3f} ms"


def rounded(value):
    return None if value is None else round(value, 3)


st.title("4. Caching with Redis")
st.markdown(
    """
Profiles and latest scores are read far more often than they change, so Alex puts Redis in front
of the database with a **read-through** cache: ask Redis first; on a **hit**, answer from memory;
on a **miss**, read the database, answer, and keep a copy in Redis (as JSON, for a few minutes)
for the next reader. Two numbers say how well that works, the hit ratio and the average time a
read takes:
"""
)
st.latex(r"H = \frac{\text{cache hits}}{\text{requests}}")
st.latex(r"T_{\text{avg}} = H \cdot T_{\text{cache}} + (1 - H) \cdot (T_{\text{cache}} + T_{\text{database}})")

try:
    demo = lab.run(source.prepare_cache_demo)
    status = lab.run(source.cache_status)
except source.QuLabError as error:
    st.error(f"The cache demo could not start. {error}")
    st.stop()

if status.redis_mode == "redis":
    st.info(f"Reads go to a real Redis server ({status.redis_reason}).")
else:
    st.info(
        "No Redis server is configured, so QuLab runs **fakeredis**. The guide calls this fallback a mock; it "
        "is not one: fakeredis is Redis written in Python, running inside this process. It stores keys, "
        "expires them and answers the same commands with the same replies. There is no network hop; each "
        "command is Python work in this process. Every hit, miss and time below was measured as you clicked."
    )

st.subheader("Interactive caching demonstration")
st.caption(
    "Alex Smith when your sandbox has him, else Jane Doe, else a Cache Demo User created for this page; "
    "a first AIRScore is added when the user has none."
)
left, right = st.columns(2)
left.markdown("**User ID**")
left.code(demo.user_id, language=None)
right.markdown("**Latest AIRScore ID**")
right.code(demo.latest_airscore_id, language=None)
st.table(pd.DataFrame([{"demo user": demo.user_name}]))
if demo.created:
    st.caption(f"Just created for this demo: {' and '.join(demo.created)}.")

columns = st.columns(3)
if columns[0].button("Fetch User (Cached)", type="primary"):
    act("Fetching the user", source.fetch_user_cached, user_id=demo.user_id)
if columns[1].button("Fetch Latest AIRScore (Cached)", type="primary"):
    act("Fetching the latest AIRScore", source.fetch_latest_airscore_cached, user_id=demo.user_id)
if columns[2].button("Invalidate Cache for this User"):
    act("Invalidating", source.invalidate_user_cache, user_id=demo.user_id)

if LAST_ERROR in st.session_state:
    st.error(st.session_state[LAST_ERROR])
invalidation = st.session_state.get(LAST_ACTION)
if isinstance(invalidation, source.CacheInvalidation):
    if invalidation.applied:
        deleted = invalidation.redis_commands[-1].reply
        st.success(f"Sent DEL for the user's two keys; Redis deleted {deleted}. The next fetch misses.")
    else:
        st.warning("Redis did not answer; the keys will be deleted before the cache is read again.")
read = st.session_state.get(LAST_READ)
if read is not None:
    st.markdown(f"**Last read:** {'user profile' if read.kind == 'user' else 'latest AIRScore'}")
    left, middle, right = st.columns(3)
    left.metric("Outcome", read.outcome)
    middle.metric("Time taken", f"{read.total_ms:.3f} ms")
    right.metric("Database statements", read.database_statements)
    if read.outcome == source.CACHE_FALLBACK:
        st.warning("Redis did not answer, so the database did. The read still succeeded; it counts as a cache error.")
    st.markdown("Redis commands this read sent:")
    lines = [f"{sent.command}\n  -> {sent.reply} ({sent.duration_ms:.3f} ms)" for sent in read.redis_commands]
    st.code("\n".join(lines), language=None)
    if read.note:
        st.caption(read.note)
    if read.value is None:
        st.caption("This user has no AIRScore yet; that answer is cached too (as JSON null).")
    else:
        st.json(read.value, expanded=False)

st.subheader("Cache metrics (measured)")
metrics = status.metrics


row = st.columns(4)
row[0].metric("Hits", metrics.hits)
row[1].metric("Misses", metrics.misses)
row[2].metric("Errors", metrics.errors)
row[3].metric("Hit ratio H", "n/a" if metrics.hit_ratio is None else f"{metrics.hit_ratio:.1%}")
row = st.columns(4)
row[0].metric("T_cache (mean)", milliseconds(metrics.mean_cache_ms))
row[1].metric("T_db (mean)", milliseconds(metrics.mean_database_ms))
row[2].metric("T_avg predicted", milliseconds(metrics.predicted_average_ms))
row[3].metric("T_avg measured", milliseconds(metrics.measured_average_ms))
st.caption(
    "Counted in your sandbox since it was last initialized. The formula leaves out the SET a miss sends "
    "after reading the database, so the measured average sits a little above the prediction."
)

st.subheader("Write, and watch the cache let go")
st.markdown(
    "A write through the repositories commits first, then deletes the keys it made stale, so the next "
    "read misses and sees the new data. A read that was already at the database when the write landed "
    "does not put its old copy back."
)
with st.form("rename_demo_user"):
    new_name = st.text_input("New name for the demo user", max_chars=source.MAX_NAME_LENGTH)
    if st.form_submit_button("Rename User"):
        act("Renaming", source.rename_user, user_id=demo.user_id, name=new_name)
if st.button("Add a New AIRScore"):
    act("Adding a score", source.add_demo_airscore, user_id=demo.user_id)
action = st.session_state.get(LAST_ACTION)
if isinstance(action, source.User):
    st.success("Renamed and committed. Fetch the user again: it misses once, then shows the new name.")
elif isinstance(action, source.AIRScore):
    st.success(f"New AIRScore committed ({action.air_score:g}). Fetch the latest AIRScore again to see it.")
if status.recent_invalidations:
    st.markdown("Recent invalidations (newest first):")
    st.table(
        pd.DataFrame(
            [
                {
                    "why": invalidation.reason,
                    "commands": "; ".join(f"{c.command} -> {c.reply}" for c in invalidation.redis_commands),
                    "applied": "yes" if invalidation.applied else "no: Redis failed; kept as pending",
                }
                for invalidation in status.recent_invalidations
            ]
        )
    )

st.subheader("When Redis goes away")
st.markdown(
    "The switch below cuts only your sandbox off from Redis: its client is replaced by one whose "
    "connections really fail. Reads keep working from the database and count as errors; the sidebar "
    "shows the cache as degraded. Writes made meanwhile leave their invalidations pending, and those are "
    "sent first when Redis is back, so no stale copy is served."
)
if status.cut_off:
    st.warning(f"Redis is cut off for your sandbox. Pending invalidations: {status.pending_invalidations}.")
    if st.button("Reconnect Redis"):
        act("Reconnecting", source.set_redis_outage, cut=False)
else:
    if status.degraded:
        st.warning(f"The last Redis call failed ({status.last_error}).")
    if st.button("Cut Redis for My Sandbox"):
        act("Cutting Redis", source.set_redis_outage, cut=True)

st.subheader("Experiment: hit ratio against average time")
st.markdown(
    "For each hit ratio you pick, QuLab reads the demo user's profile R times through the cache, evicting "
    "the key (untimed) before the reads that should miss. Each trial keeps its own counters; the metrics "
    "above do not change."
)
with st.form("cache_experiment"):
    reads = st.slider("Reads per trial (R)", 10, 500, 100, step=10)
    ratio_options = [step / 10 for step in range(11)]
    chosen = st.multiselect(
        "Hit ratios to try", ratio_options, default=[0.0, 0.5, 0.8, 1.0], format_func=lambda ratio: f"{ratio:.0%}"
    )
    if st.form_submit_button("Run Cache Experiment"):
        if not chosen:
            st.session_state[LAST_ERROR] = "Choose at least one hit ratio."
            st.rerun()
        st.session_state.pop(EXPERIMENT, None)
        try:
            st.session_state[EXPERIMENT] = lab.run(
                source.run_cache_experiment, user_id=demo.user_id, reads=reads, hit_ratios=tuple(sorted(chosen))
            )
        except source.QuLabError as error:
            st.error(f"The experiment did not run. {error}")

trials = st.session_state.get(EXPERIMENT)
if trials:
    table = pd.DataFrame(
        [
            {
                "target H": f"{trial.target_hit_ratio:.0%}",
                "hits": trial.metrics.hits,
                "misses": trial.metrics.misses,
                "errors": trial.metrics.errors,
                "measured H": round(trial.metrics.hit_ratio, 3),
                "T_cache (ms)": rounded(trial.metrics.mean_cache_ms),
                "T_db (ms)": rounded(trial.metrics.mean_database_ms),
                "T_avg predicted (ms)": rounded(trial.metrics.predicted_average_ms),
                "T_avg measured (ms)": rounded(trial.metrics.measured_average_ms),
            }
            for trial in trials
        ]
    )
    st.table(table)
    latencies = pd.DataFrame(
        [
            {"read": index, "milliseconds": latency, "outcome": outcome, "target H": f"{trial.target_hit_ratio:.0%}"}
            for index, (trial, latency, outcome) in enumerate(
                ((trial, *pair) for trial in trials for pair in zip(trial.latencies_ms, trial.outcomes)), start=1
            )
        ]
    )
    outcome_colors = alt.Scale(domain=["HIT", "MISS", "FALLBACK"], range=["#2e7d32", "#ef6c00", "#c62828"])
    st.markdown("Every read, in order (trials one after another, time on a log scale): misses pay for the database.")
    st.altair_chart(
        alt.Chart(latencies)
        .mark_circle(size=18)
        .encode(
            x=alt.X("read:Q", title="read number"),
            y=alt.Y("milliseconds:Q", scale=alt.Scale(type="log"), title="time of the read (ms)"),
            color=alt.Color("outcome:N", scale=outcome_colors),
            tooltip=["target H", "outcome", alt.Tooltip("milliseconds:Q", format=".3f")],
        ),
        width="stretch",
    )
    st.markdown("Average time per read against the hit ratio: the line is the formula, the dots the clock.")
    by_ratio = table.rename(columns={"T_avg predicted (ms)": "predicted", "T_avg measured (ms)": "measured"})
    base = alt.Chart(by_ratio).encode(x=alt.X("measured H:Q", title="hit ratio H", scale=alt.Scale(domain=[0, 1])))
    st.altair_chart(
        base.mark_line(point=False).encode(y=alt.Y("predicted:Q", title="T_avg (ms)"))
        + base.mark_circle(size=90, color="#ef6c00").encode(
            y="measured:Q", tooltip=["target H", "measured", "predicted"]
        ),
        width="stretch",
    )
    st.caption("Measured just now on this server; compare trials with each other, not with another run.")

with st.expander("The cache code, as it runs"):
    st.code(source.source_code(source.CachedUserRepository), language="python")
    st.code(source.source_code(source.CacheMetrics), language="python")

show_section_progress(lab, section=4)
