"""What every codelab page shares. (A folder: Streamlit never lists it as a page.)

- `open_page()` first, on every page: it returns this browser session's Lab (its sandbox).
- `run_or_report(lab, what, operation, **kwargs)` runs one operation and, if it fails, shows
  "what + the error" instead of a traceback; `run_and_keep` / `kept_outcome` do the same for a
  button's on_click callback, which runs before the page draws.
- `show_code(...)` shows the lesson's code that a click ran, read from source.py as it runs.
- `plain_text(...)` escapes text a learner typed, so Markdown never renders it.

Why open_page exists: Streamlit serves a folder named pages/ the old "v1" way until the first
st.navigation call in the process. A deep link opened before that (say /caching, right after a
restart) runs pages/caching.py on its own, without app.py. open_page() notices, leaves that
mode and reruns, so app.py draws the frame and routes to the same page. The switch it flips is
private to Streamlit, so requirements.txt pins Streamlit's minor version and
tests/test_streamlit_switch.py fails with a clear message if an upgrade drops it.
"""

from __future__ import annotations

import functools
import inspect
import re
import string
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

import altair as alt
import streamlit as st

import source
from classroom.browser import SANDBOX_STATE_KEY, BrowserSessionHold, lab_for_browser_session
from classroom.progress.steps import learner_progress
from classroom.runtime import Lab, get_runtime
from pages.common.reconnect import rerun_whole_page_for_a_new_session
from pages.common.theme_message import build_theme_once

try:  # Streamlit's switch for the v1 mode; if a later version drops it, there is no v1 mode.
    from streamlit.runtime.pages_manager import PagesManager
except ImportError:  # pragma: no cover
    PagesManager = None

rerun_whole_page_for_a_new_session()  # once per process: a reconnected tab's clicks work
build_theme_once()  # once per process: the theme is read from the configuration once
T = TypeVar("T")
WORD_JOINER = "\u2060"  # zero width, no break: keeps Streamlit from making a link (plain_text)
STEPS_AFTER_CLICK = "qulab_steps_after_click"  # set by run_and_keep; pages.common.progress reads it
# A chart axis that shows its labels and title whole (Vega-Lite cuts long ones otherwise).
FULL_LABELS = alt.Axis(labelLimit=0, titleLimit=0)
# Room inside a chart for what Vega-Lite draws past its plot.
CHART_PADDING = {"left": 12, "right": 20, "top": 10, "bottom": 5}


def open_page() -> Lab:
    """Make sure app.py framed this page, then return this browser session's Lab (its sandbox)."""
    if PagesManager is not None and getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        # app.py gives every session it frames a sandbox id. A session without one is on its
        # first page load (no click to lose), so rerunning through app.py is safe.
        if SANDBOX_STATE_KEY not in st.session_state:
            st.rerun()
    return lab_for_browser_session(st.session_state)


@st.cache_resource(scope="session", on_release=BrowserSessionHold.release, show_spinner=False)
def browser_session_hold(session_key: str) -> BrowserSessionHold:
    """This browser session's hold on its sandbox: Streamlit releases it when the websocket goes.

    Defined here, not in app.py: app.py runs again on every rerun, and a cached function defined
    there is wrapped anew each time. Keyed by a token in session_state as well, because AppTest
    runs every test "browser" under one Streamlit session id.
    """
    return BrowserSessionHold(get_runtime())


def run_or_report(
    lab: Lab,
    what: str,
    operation: Callable[..., Awaitable[T]],
    /,
    *,
    where: Any = st,
    **kwargs: Any,
) -> Optional[T]:
    """Run `operation(sandbox, **kwargs)`; on a QuLabError show f"{what} {error}", return None."""
    try:
        return lab.run(operation, **kwargs)
    except source.QuLabError as error:
        where.error(f"{what} {error}")
        return None


@dataclass(frozen=True)
class Outcome:
    """What a kept operation gave: its result, or the message saying why it failed."""

    result: Any = None
    error: Optional[str] = None


def run_and_keep(
    lab: Lab,
    key: str,
    what: str,
    operation: Callable[..., Awaitable[Any]],
    /,
    *,
    clears: tuple[str, ...] = (),
    **kwargs: Any,
) -> None:
    """Run an operation from a button's on_click callback and keep its Outcome under `key`.

    A callback runs before the page draws, so it cannot place a message; the page calls
    kept_outcome(key, keep=True) where the result belongs, and it stays there across reruns
    (a click that completes a step redraws the whole app) until the next click replaces it.
    `clears` names the results of the same demo's other buttons, which this click replaces.
    """
    for other in clears:
        st.session_state.pop(other, None)
    try:
        st.session_state[key] = Outcome(result=lab.run(operation, **kwargs))
    except source.QuLabError as error:
        st.session_state[key] = Outcome(error=f"{what} {error}")
    try:  # the step count after the click: its fragment redraws the whole app, not itself, if moved
        progress = lab.run(learner_progress)
        st.session_state[STEPS_AFTER_CLICK] = sum(status.done for status in progress.required)
    except source.QuLabError:
        pass


def kept_outcome(key: str, *, where: Any = st, keep: bool = False) -> Any:
    """The result kept under `key` (None if none or it failed, after showing the failure).

    Pops it so it shows once, unless keep=True (a result that stays until the next click).
    """
    outcome = st.session_state.get(key) if keep else st.session_state.pop(key, None)
    if outcome is None:
        return None
    if outcome.error is not None:
        where.error(outcome.error)
        return None
    return outcome.result


_source_code_lock = threading.Lock()


@functools.cache
def source_code(code_object: Any) -> str:
    """The source of a class or function, read once, one thread at a time.

    inspect.getsource parses the whole module for a class, and on Python 3.11 two threads
    parsing at once can fail ("AST constructor recursion depth mismatch", CPython gh-106905).
    """
    with _source_code_lock:
        return inspect.getsource(code_object)


def show_code(*code_objects: Any, label: str = "The code this ran", where: Any = st) -> None:
    """Show the functions or classes a click ran (file and line), read from source.py as it runs.

    Like show_code in Streamlit's hello demos: the listing is the code that executed, so it
    can never drift from it. Drawn only while the expander is open: every element costs server
    CPU on every rerun of every learner, and most reruns never look at the code.
    """
    listing = where.expander(label, key=listing_key(label), on_change="rerun")
    if not listing.open:
        return
    with listing:
        for code_object in code_objects:
            text = source_code(code_object)
            st.caption(f"{_location(code_object)} · {text.count(chr(10))} lines")
            st.code(text, language="python")


def listing_key(label: str) -> str:
    """The session-state key of a show_code expander (True while it is open)."""
    return "qulab_listing_" + "".join(c if c.isalnum() else "_" for c in label.lower())


@functools.cache
def _location(code_object: Any) -> str:
    """'source.py, line N' for a function, method or class."""
    function = inspect.unwrap(getattr(code_object, "__func__", code_object))
    code = getattr(function, "__code__", None)
    if code is not None:
        return f"{Path(code.co_filename).name}, line {code.co_firstlineno}"
    module_file = Path(inspect.getsourcefile(code_object) or "source.py")
    header = f"class {code_object.__name__}"
    for number, line in enumerate(module_file.read_text().splitlines(), start=1):
        if line.startswith(header) and line[len(header)] in "(:":
            return f"{module_file.name}, line {number}"
    return module_file.name


def plain_text(text: Optional[str]) -> str:
    """Text a learner typed (or a server wrote), for st.markdown: nothing in it renders.

    User text is never rendered as Markdown: a name such as `_x_` would turn italic, `<b>`
    bold. CommonMark lets any ASCII punctuation be backslash-escaped, so every one is. Streamlit
    also turns anything that looks like an email, `www.` or `scheme://` into a link, escaped or
    not (and so do st.table's cells); an invisible WORD JOINER (U+2060) before the `@`, the `.`
    after `www` and the `://` keeps them text, shown exactly as typed.
    """
    escaped = "".join(f"\\{c}" if c in string.punctuation else c for c in text or "")
    escaped = escaped.replace("\\@", WORD_JOINER + "\\@").replace(
        "\\:\\/\\/", WORD_JOINER + "\\:\\/\\/"
    )
    return re.sub(r"(?i)(www)(\\\.)", "\\1" + WORD_JOINER + "\\2", escaped)


SEEN_USER_IDS = "qulab_seen_user_ids"  # users this session was shown: a later miss means removed
