"""Where the learner is: the sidebar's progress line, each section's steps, and "Download my sandbox".

Each reads source.learner_progress after the page's actions have run, so a step done by this very
click is already counted: app.py calls render_progress after navigation.run(), and each section
page calls show_section_progress at its end.
(A folder, not pages/progress.py: Streamlit would list a .py file in pages/ as a page of its own.)
"""

from __future__ import annotations

from typing import Optional

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

import source
from pages import plain_text as _plain

_READ_THIS_RUN = "qulab_progress_read_this_run"


def show_section_progress(lab: source.Lab, *, section: int) -> None:
    """This section's steps, done or not yet, the next one, and a recap once the section is complete."""
    try:
        progress = _progress_this_run(lab)
    except source.QuLabError as error:
        st.caption(f"Your progress is unavailable right now. {error}")
        return
    _section_panel(progress, section)


def render_progress(lab: source.Lab) -> None:
    """The sidebar's progress line ("7 of 14 steps"), the next step, and the download button."""
    try:
        progress = _progress_this_run(lab)
    except source.QuLabError as error:
        st.sidebar.caption(f"Your progress is unavailable right now. {error}")
        return
    _sidebar(lab, progress)


def _progress_this_run(lab: source.Lab) -> source.LearnerProgress:
    """One journal read per script run: the page's panel (at its end) and the sidebar (after it) share it.

    Each run gets a new `cursors` dict; keeping the one a read belongs to tells this run's read from an
    earlier run's (the dict is held, so its identity cannot be reused meanwhile).
    """
    context = get_script_run_ctx()
    kept = st.session_state.get(_READ_THIS_RUN)
    if context is not None and kept is not None and kept[0] is context.cursors:
        return kept[1]
    progress = lab.run(source.learner_progress)
    if context is not None:
        st.session_state[_READ_THIS_RUN] = (context.cursors, progress)
    return progress


def _sidebar(lab: source.Lab, progress: source.LearnerProgress) -> None:
    sidebar = st.sidebar
    required, optional = progress.required, progress.optional
    done = sum(status.done for status in required)
    sidebar.progress(done / len(required), text=f"**Your progress:** {done} of {len(required)} steps")
    next_step = progress.next_step()
    extra = sum(status.done for status in optional)
    sidebar.caption(
        ("Every step of the guide is done." if next_step is None
         else f"Next: section {next_step.step.section}, {next_step.step.title.lower()}.")
        + f"  \nBeyond the guide: {extra} of {len(optional)} optional steps."
    )  # fmt: skip
    file_name, mime = source.export_file_name(backend=lab.runtime.sandboxes.backend, sandbox_id=lab.sandbox_id)
    sidebar.download_button(
        "Download my sandbox",
        data=lambda: lab.run(source.export_sandbox).content,  # built only when clicked
        file_name=file_name,
        mime=mime,
        on_click="ignore",
        help="Your sandbox's tables as of the click: the SQLite file, or one CSV per table (PostgreSQL).",
    )


def _section_panel(progress: source.LearnerProgress, section: int) -> None:
    # Plain Markdown, no alerts: a page's own success and error messages stay the only alerts on it.
    statuses = progress.in_section(section)
    required = [status for status in statuses if not status.step.optional]
    done = sum(status.done for status in required)
    recap = progress.recap(section)
    st.subheader("Your progress in this section")
    if recap is not None:
        st.markdown(f"✅ **Section {section} complete.** {_plain(recap)}")
    with st.expander(f"{done} of {len(required)} steps done", expanded=recap is None):
        st.markdown("\n".join(_step_line(status) for status in statuses))
        next_step = progress.next_step(section)
        if next_step is not None:
            st.markdown(f"**Next:** {next_step.step.title}. {_plain(next_step.step.how)}")


def _step_line(status: source.StepStatus) -> str:
    step = status.step
    label = f"**{step.title}**" + (" (optional)" if step.optional else "")
    if status.done:
        return f"- ✅ {label}: done. {_plain(status.evidence)}"
    return f"- ⬜ {label}: not yet. {_plain(step.how)}"


