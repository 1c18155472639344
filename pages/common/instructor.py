"""The instructor's key, and what a learner's page shows of the instructor (only with a key set).

- `instructor_key()`: QULAB_INSTRUCTOR_KEY, else `instructor_key` in .streamlit/secrets.toml
  (st.secrets raises without a secrets file: that means no key). Without a key there is no
  instructor, and a learner's page draws nothing of this.
- `render_class_message(key)`: the instructor's message on every learner page, in a small fragment
  that looks every MESSAGE_SECONDS (the process's copy of the message is at most 2 s old, so a
  post shows within 5 s), as plain text, with "Dismiss" (per session; a new message shows again).
- `render_instructor_sees(lab, key)`: the sidebar's collapsed "What your instructor sees", drawn
  only while open: the display-name form and exactly what the instructor sees of this learner.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import streamlit as st

from classroom.instructor.broadcast import ClassMessage
from classroom.instructor.overview import LearnerView, learner_view
from classroom.instructor.roster import set_display_name
from classroom.runtime import Lab, get_runtime
from pages.common import plain_text, run_or_report

logger = logging.getLogger("qulab")
MESSAGE_SECONDS = 3
DISMISSED_KEY = "qulab_class_message_dismissed"
SEES_KEY = "qulab_instructor_sees"


def instructor_key() -> Optional[str]:
    """The configured instructor key, or None when none is set."""
    key = os.environ.get("QULAB_INSTRUCTOR_KEY", "").strip()
    if key:
        return key
    try:
        secret = st.secrets.get("instructor_key")
    except Exception:  # no secrets file (Streamlit raises), or one it cannot parse: no key
        return None
    text = str(secret).strip() if secret is not None else ""
    return text or None


def current_class_message() -> Optional[ClassMessage]:
    """The class's message now, from this process's copy (a read of the store when stale)."""
    board = get_runtime().instructor.board
    fresh, message = board.fresh_copy()
    if fresh:  # no hop to the runtime's loop: most looks end here
        return message
    try:
        return get_runtime().run(board.current(), timeout=10)
    except Exception:  # the next look tries again; a learner's page never fails for this
        logger.warning("could not read the class's message", exc_info=True)
        return None


def render_class_message(key: Optional[str]) -> None:
    """The instructor's message, on every learner page: only when an instructor key is set."""
    if key is not None:
        _class_message()


def _dismiss(message_id: str) -> None:
    st.session_state[DISMISSED_KEY] = message_id


@st.fragment(run_every=MESSAGE_SECONDS)
def _class_message() -> None:
    message = current_class_message()
    if message is None or st.session_state.get(DISMISSED_KEY) == message.id:
        return
    st.info(f"**From your instructor:** {plain_text(message.text)}")
    st.button("Dismiss", key="qulab_dismiss_class_message", on_click=_dismiss, args=(message.id,))


def render_instructor_sees(lab: Lab, key: Optional[str]) -> None:
    """The sidebar's "What your instructor sees" (with a key set), drawn only while open."""
    if key is None:
        return
    sees = st.sidebar.expander("What your instructor sees", key=SEES_KEY, on_change="rerun")
    if not sees.open:
        return
    with sees:
        with st.form("qulab_display_name_form", border=False):
            typed = st.text_input("Display name", placeholder="optional, up to 40 characters")
            saved = st.form_submit_button("Save name")
        if saved:
            run_or_report(lab, "Your name was not saved.", set_display_name, name=typed)
        view = run_or_report(lab, "Unavailable right now.", learner_view)
        if view is not None:
            st.markdown(what_the_instructor_sees(view))


def what_the_instructor_sees(view: LearnerView) -> str:
    """The learner's line on the instructor's page, as Markdown lines (names as plain text)."""
    line = view.line
    name = plain_text(line.display_name) + ("" if view.named else " (the default name)")
    steps = ", ".join(f"{title} ({seen:%H:%M} UTC)" for title, seen in line.completed)
    next_step = (
        f"{line.next_step}, since {line.on_it_since:%H:%M} UTC"
        if line.next_step and line.on_it_since
        else "none left"
        if line.completed
        else "not read yet"
    )
    return "  \n".join(
        [
            f"**Name:** {name}",
            f"**State:** {line.state}",
            f"**Next step:** {next_step}",
            f"**Steps done:** {steps or 'none yet'}",
            "Nothing else: none of your users, scores or events.",
        ]
    )
