"""Where the learner is: the sidebar's progress line, each section's steps, "Download my sandbox".

app.py draws the sidebar's line before the page; a click inside a section's demo reruns only
that demo (a fragment), which calls refresh_after_click at its end: when the click changed the
learner's step count, the whole app is drawn again once, so the sidebar counts it. What a step
asks the learner to do, with the guide's button labels, is written here (HOW); whether it is
done is classroom.progress's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

import source
from classroom.export import export_file_name, export_sandbox
from classroom.progress.steps import LearnerProgress, StepStatus, learner_progress
from classroom.runtime import Lab
from pages.common import STEPS_AFTER_CLICK, plain_text

_READ_THIS_RUN = "qulab_progress_read_this_run"
P = ParamSpec("P")
STEPS_DRAWN = "qulab_steps_drawn"  # the step count the sidebar shows now

HOW = {
    "create_user": 'Enter an email and a name, then click "Create User".',
    "initialize": 'Click "Initialize In-Memory SQLite Database & Create Sample Users".',
    "pool_experiment": 'Click "Run Pooling Experiment": a pool against a new connection per query.',
    "add_scores": 'Enter a user id, then click "Add 3 Sample Scores for User".',
    "fetch_n_plus_one": 'Click "Fetch User & Scores (Simulated N+1)" for a user with scores.',
    "fetch_eager": 'Click "Fetch User & Scores (Eager Loading)" for the same user.',
    "compare_fetches": "Fetch the same user both ways and compare the counts.",
    "scale_up": 'Click "Compare Loading Strategies".',
    "user_miss_then_hit": 'Click "Fetch User (Cached)" twice.',
    "score_miss_then_hit": 'Click "Fetch Latest AIRScore (Cached)" twice.',
    "metrics_move": "Read the cache metrics after a few reads.",
    "invalidate_then_miss": 'Click "Invalidate Cache for this User", then fetch again.',
    "redis_outage": "Cut Redis off, fetch (the database answers), reconnect, fetch again.",
    "store_airscore": 'Click "Calculate & Store AIRScore (Creates Pending Event)".',
    "start_publisher": 'Click "Start Event Publisher (Background)".',
    "event_published": "With the publisher running, store a score: it turns published with no "
    'click ("Refresh Event Status Now").',
    "stop_publisher": 'Click "Stop Event Publisher".',
    "broker_outage": "Cut the broker off, store a score, reconnect: it is still published.",
}
# Once a section's required steps are done: one line on what the learner saw.
RECAPS = {
    1: "{create_user} Its email is unique whatever its letter case.",
    2: "{initialize}",
    3: "{compare_fetches}",
    4: "Read-through: a miss stores, the next read hits, an invalidation makes it miss again. "
    "{metrics_move}",
    5: "Score and event committed in one transaction; then, with no click: {event_published}",
}


def show_section_progress(lab: Lab, *, section: int) -> None:
    """This section's steps, done or not yet, the next one, and a recap once it is complete.

    Read afresh (the page's own widgets may have done a step since the sidebar was drawn): if
    the step count moved, the whole app is drawn again once, so the sidebar counts it too.
    """
    try:
        progress = lab.run(learner_progress)
    except source.QuLabError as error:
        st.caption(f"Your progress is unavailable right now. {error}")
        return
    drawn = st.session_state.get(STEPS_DRAWN)
    if drawn is not None and _steps_done(progress) != drawn:
        st.rerun(scope="app")
    _section_panel(progress, section)


def render_progress(lab: Lab) -> None:
    """The sidebar's progress line ("7 of 14 steps"), the next step, and the download button."""
    try:
        progress = _progress_this_run(lab)
    except source.QuLabError as error:
        st.sidebar.caption(f"Your progress is unavailable right now. {error}")
        return
    _sidebar(lab, progress)


def demo_fragment(lab: Lab) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """st.fragment for a demo: a click reruns the demo only, unless it moved the step count.

    A click whose operation ran in its button's callback (run_and_keep) already knows the count:
    then the whole app is drawn at once, instead of the fragment and then the app, and the count
    is not read again. An operation the body runs itself is checked at the end
    (refresh_after_click).
    """

    def wrap(body: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(body)
        def demo(*args: P.args, **kwargs: P.kwargs) -> None:
            after = st.session_state.pop(STEPS_AFTER_CLICK, None)
            drawn = st.session_state.get(STEPS_DRAWN)
            if after is not None and drawn is not None and after != drawn:
                st.rerun(scope="app")
            body(*args, **kwargs)
            during = st.session_state.pop(STEPS_AFTER_CLICK, None)  # run_and_keep in the body
            if during is not None:
                if drawn is not None and during != drawn:
                    st.rerun(scope="app")
            elif after is None:  # else the callback's operation was checked already
                refresh_after_click(lab)

        return st.fragment(demo)

    return wrap


def refresh_after_click(lab: Lab) -> None:
    """At the end of a demo: if the learner's step count moved, draw the whole app again once."""
    drawn = st.session_state.get(STEPS_DRAWN)
    try:
        progress = lab.run(learner_progress)
    except source.QuLabError:
        return  # the next full render says so
    if drawn is not None and _steps_done(progress) != drawn:
        st.rerun(scope="app")


def _steps_done(progress: LearnerProgress) -> int:
    return sum(status.done for status in progress.required)


def _progress_this_run(lab: Lab) -> LearnerProgress:
    """One journal read per script run: the page's panel and the sidebar share it.

    Each run gets a new `cursors` dict; keeping the one a read belongs to tells this run's read
    from an earlier run's (the dict is held, so its identity cannot be reused meanwhile).
    """
    context = get_script_run_ctx()
    kept = st.session_state.get(_READ_THIS_RUN)
    if context is not None and kept is not None and kept[0] is context.cursors:
        return kept[1]
    progress = lab.run(learner_progress)
    if context is not None:
        st.session_state[_READ_THIS_RUN] = (context.cursors, progress)
    return progress


def _sidebar(lab: Lab, progress: LearnerProgress) -> None:
    sidebar = st.sidebar
    required, optional = progress.required, progress.optional
    done = _steps_done(progress)
    st.session_state[STEPS_DRAWN] = done
    st.session_state.pop(STEPS_AFTER_CLICK, None)  # this run draws the count it left
    sidebar.progress(
        done / len(required), text=f"**Your progress:** {done} of {len(required)} steps"
    )
    next_step = progress.next_step()
    if next_step is None:
        where = "Every step of the guide is done."
    else:
        where = f"Next: section {next_step.step.section}, {next_step.step.title.lower()}."
    extra = sum(status.done for status in optional)
    sidebar.caption(where, help=f"Beyond the guide: {extra} of {len(optional)} optional steps.")
    file_name, mime = export_file_name(
        backend=lab.runtime.sandboxes.backend, sandbox_id=lab.sandbox_id
    )
    sidebar.download_button(
        "Download my sandbox",
        data=lambda: lab.run(export_sandbox).content,  # built only when clicked
        file_name=file_name,
        mime=mime,
        on_click="ignore",
        help="Your sandbox's tables as of the click: the SQLite file, or one CSV per table.",
    )


def _section_panel(progress: LearnerProgress, section: int) -> None:
    # Plain Markdown, no alerts: a page's own messages stay the only alerts on it.
    statuses = progress.in_section(section)
    required = [status for status in statuses if not status.step.optional]
    done = sum(status.done for status in required)
    complete = progress.section_complete(section)
    st.subheader("Your progress in this section")
    if complete:
        evidence = {status.step.key: status.evidence or "" for status in statuses}
        st.markdown(
            f"✅ **Section {section} complete.** {plain_text(RECAPS[section].format(**evidence))}"
        )
    with st.expander(f"{done} of {len(required)} steps done", expanded=not complete):
        st.markdown("\n".join(_step_line(status) for status in statuses))
        next_step = progress.next_step(section)
        if next_step is not None:
            st.markdown(f"**Next:** {next_step.step.title}. {plain_text(HOW[next_step.step.key])}")


def _step_line(status: StepStatus) -> str:
    step = status.step
    label = f"**{step.title}**" + (" (optional)" if step.optional else "")
    if status.done and status.rows_gone:
        return (
            f"- ✅ {label}: done, but what it showed was deleted since (an initialize or a reset "
            f"starts your sandbox afresh). To see it again: {plain_text(HOW[step.key])}"
        )
    if status.done:
        return f"- ✅ {label}: done. {plain_text(status.evidence)}"
    return f"- ⬜ {label}: not yet. {plain_text(HOW[step.key])}"
