"""Streamlit's theme, read from its configuration once per process instead of on every run.

Every script run, a click's fragment rerun included, starts with a new-session message that
carries the app's theme. Streamlit builds it from scratch each time: six theme sections, each
a walk over all of its ~370 configuration options under a lock. That is a tenth of a demo
click's server time in a profile (py-spy, bench/rerun_cost.py's guide walk), for a theme that
does not change while the process runs.

`build_theme_once()` keeps each section's built message and copies it into the next. A
configuration parsed again (Streamlit's file watcher, when one is on) builds them afresh.

It patches a private function (streamlit.runtime.app_session._populate_theme_msg), once per
process: requirements.txt pins Streamlit's minor version, and tests/test_streamlit_switch.py
checks that the patched message is the one Streamlit builds.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from streamlit import config
from streamlit.runtime import app_session


def build_theme_once() -> None:
    """Install the patch (idempotent)."""
    build = app_session._populate_theme_msg  # noqa: SLF001 (pinned Streamlit)
    if getattr(build, "qulab_built_once", False):
        return
    built: dict[str, Any] = {}
    lock = threading.Lock()

    @functools.wraps(build)
    def build_once(msg: Any, section: str = "theme") -> None:
        with lock:
            section_message = built.get(section)
            if section_message is None:
                section_message = type(msg)()
                build(section_message, section)
                built[section] = section_message
        if section_message.ListFields():  # merging nothing would still mark the section set
            msg.MergeFrom(section_message)

    def forget() -> None:
        with lock:
            built.clear()

    build_once.qulab_built_once = True  # type: ignore[attr-defined]
    config.on_config_parsed(forget, force_connect=True)
    app_session._populate_theme_msg = build_once  # noqa: SLF001
