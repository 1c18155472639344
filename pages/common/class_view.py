"""What the instructor's page draws: the key form, the message board, the class at a glance.

The class is drawn in a fragment that refreshes itself every REFRESH_SECONDS while the page is
open. Once STOP_AFTER_UNCHANGED refreshes in a row saw the same class (a minute), it slows to one
refresh every QUIET_REFRESH_SECONDS, never to none: a learner becomes stuck precisely while
nothing changes, and only a refresh can see it. The page says so and offers "Resume live view";
a slow refresh that sees a change goes live again by itself. Everything drawn comes from one
ClassOverview (one SELECT of the roster): names, steps, times and states, nothing else.
"""

from __future__ import annotations

import hashlib

import altair as alt
import pandas as pd
import streamlit as st

import source
from classroom.instructor.access import try_instructor_key
from classroom.instructor.overview import ClassOverview, class_overview, progress_csv
from classroom.runtime import get_runtime
from pages.common import CHART_PADDING, FULL_LABELS, plain_text

REFRESH_SECONDS = 5
STOP_AFTER_UNCHANGED = 12  # refreshes: a minute
QUIET_REFRESH_SECONDS = 60  # once nothing changes: who is stuck is still seen within a minute
SIGNED_IN_KEY = "qulab_instructor_signed_in"  # a digest of the key the session entered
TRIES_KEY = "qulab_instructor_tries"
LIVE_KEY = "qulab_class_live"
UNCHANGED_KEY = "qulab_class_unchanged"  # (the version last seen, refreshes that saw it)
STUCK_MINUTES_KEY = "qulab_stuck_minutes"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def signed_in(key: str) -> bool:
    """True while this session has entered this key (a new key signs everybody out)."""
    return st.session_state.get(SIGNED_IN_KEY) == _digest(key)


def render_how_to_set_a_key() -> None:
    """No key configured: say how to set one, show nothing of the class."""
    st.info("The instructor's view needs a key, and none is set. Set one either way, then restart:")
    st.code("QULAB_INSTRUCTOR_KEY='a long random phrase' streamlit run app.py", language="bash")
    st.markdown("or, in `.streamlit/secrets.toml` beside app.py:")
    st.code('instructor_key = "a long random phrase"', language="toml")


def render_key_form(key: str) -> None:
    """The key, typed in a password field: five tries a minute for this browser session."""
    with st.form("qulab_instructor_key_form", clear_on_submit=True):
        typed = st.text_input("Instructor key", type="password")
        entered = st.form_submit_button("Enter")
    if entered:
        check = try_instructor_key(
            typed, configured=key, tries=st.session_state.setdefault(TRIES_KEY, [])
        )
        if check.accepted:
            st.session_state[SIGNED_IN_KEY] = _digest(key)
            st.rerun()
        st.error(check.message)


def _leave() -> None:
    for key in (SIGNED_IN_KEY, LIVE_KEY, UNCHANGED_KEY):
        st.session_state.pop(key, None)


def render_leave_button() -> None:
    """Out of the instructor's view (the key is asked again)."""
    st.button("Leave the instructor view", on_click=_leave)


def render_message_board() -> None:
    """The message the class sees, a form to post one (plain text, 280 characters at most),
    and a button to take it down."""
    board = get_runtime().instructor.board
    st.subheader("A word to the class")
    with st.form("qulab_class_message_form", clear_on_submit=True):
        typed = st.text_area("Message to the class", placeholder="A hint, or: break until 11:00")
        posted = st.form_submit_button("Post to the class")
    if posted:
        try:
            get_runtime().run(board.post(typed), timeout=30)
        except source.QuLabError as error:
            st.error(f"Nothing was posted. {error}")
    try:
        if st.button("Clear the message"):
            get_runtime().run(board.clear(), timeout=30)
        message = get_runtime().run(board.current(), timeout=30)
    except Exception as error:  # the class's tables are out of reach for now
        why = error if isinstance(error, source.QuLabError) else f"({type(error).__name__})"
        st.error(f"The message board cannot be read right now. {why}")
        return
    if message is None:
        st.caption("No message is shown to the class.")
    else:
        st.caption(f"Shown to the class since {message.posted_at:%H:%M:%S} UTC:")
        st.text(message.text)


def _resume() -> None:
    st.session_state[LIVE_KEY] = True
    st.session_state.pop(UNCHANGED_KEY, None)


def render_class() -> None:
    """The class at a glance: live (refreshing itself every few seconds), once a minute after a
    minute of no change."""
    live = st.session_state.setdefault(LIVE_KEY, True)
    if not live:
        st.info(
            "The live view slowed down: nothing changed for a minute, so the class is read "
            "once a minute until something does."
        )
        st.button("Resume live view", on_click=_resume)
    st.fragment(run_every=REFRESH_SECONDS if live else QUIET_REFRESH_SECONDS)(_class_at_a_glance)()


def _class_at_a_glance() -> None:
    runtime = get_runtime()
    minutes = st.number_input(
        "Stuck after (minutes on one step)",
        min_value=0.01,
        value=float(runtime.settings.stuck_minutes),
        key=STUCK_MINUTES_KEY,
    )
    try:
        overview = runtime.run(
            class_overview(runtime.instructor, stuck_after_minutes=minutes), timeout=30
        )
    except Exception as error:  # shown briefly; the next refresh tries again
        st.error(f"The class could not be read right now ({type(error).__name__}).")
        return
    seen, times = st.session_state.get(UNCHANGED_KEY, ("", 0))
    times = times + 1 if seen == overview.version else 1
    st.session_state[UNCHANGED_KEY] = (overview.version, times)
    live = st.session_state.get(LIVE_KEY)
    if live and times >= STOP_AFTER_UNCHANGED:
        st.session_state[LIVE_KEY] = False
        st.rerun(scope="app")  # drawn again with the slow run_every
    if not live and times == 1:  # a slow refresh saw a change: live again
        _resume()
        st.rerun(scope="app")
    draw_overview(overview)


def draw_overview(overview: ClassOverview) -> None:
    """States, servers and capacity, the funnel, the median times, who is stuck, the CSV."""
    if overview.every_server:
        st.caption(f"Every server's learners: {len(overview.servers)} servers share this class.")
    else:
        st.caption(
            "This server process's learners only: on SQLite each process keeps its own class "
            "(with DATABASE_URL on PostgreSQL, this page shows every replica's)."
        )
    active, idle, dormant = st.columns(3)
    active.metric("Active", overview.states["active"])
    idle.metric("Idle", overview.states["idle"])
    dormant.metric("Dormant", overview.states["dormant"])
    st.markdown("  \n".join(_server_lines(overview)))

    st.subheader("Where the class is")
    funnel = pd.DataFrame(
        {
            "section": [line.section for line in overview.funnel],
            "step": [
                line.title + (" (optional)" if line.optional else "") for line in overview.funnel
            ],
            "learners": [line.completed for line in overview.funnel],
            "median time": [_duration(line.median_seconds) for line in overview.funnel],
        }
    )
    chart = (
        alt.Chart(
            funnel.assign(step=funnel["section"].astype(str) + ". " + funnel["step"]),
            padding=CHART_PADDING,
        )
        .mark_bar()
        .encode(
            x=alt.X("learners:Q", axis=alt.Axis(labelLimit=0, titleLimit=0, tickMinStep=1)),
            y=alt.Y("step:N", sort=None, axis=FULL_LABELS, title=None),
        )
    )
    st.altair_chart(chart, width="stretch")
    st.table(funnel.rename(columns={"learners": "learners who completed it"}))

    st.subheader("Who is stuck")
    st.caption(f"Active, and on the same step for over {overview.stuck_after_minutes:g} minutes.")
    if overview.stuck:
        st.table(
            pd.DataFrame(
                [
                    {
                        "learner": plain_text(who.display_name),  # st.table renders Markdown
                        "step": who.step,
                        "for": _duration(who.seconds),
                    }
                    for who in overview.stuck
                ]
            )
        )
    else:
        st.caption("Nobody right now.")
    st.download_button(
        "Download the class's progress (CSV)",
        data=lambda: progress_csv(overview),  # written when clicked, not on every refresh
        file_name="class-progress.csv",
        mime="text/csv",
        on_click="ignore",
    )
    st.caption(
        "Shown here: display names, steps, times and states. Never a learner's users, scores, "
        f"events or sandbox link. Read at {overview.read_at:%H:%M:%S} UTC."
    )


def _server_lines(overview: ClassOverview) -> list[str]:
    lines = [f"**Room for {overview.capacity} learners at once** on the servers answering."]
    for number, server in enumerate(overview.servers, start=1):
        heard = (
            f"heard from {server.heard_seconds_ago:.0f} s ago"
            if server.answering
            else "quiet: no learner connected there, or it stopped"
        )
        lines.append(
            f"Server {number}: room for {server.capacity} (set by "
            f"{plain_text(server.limited_by)}), {heard}."
        )
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
