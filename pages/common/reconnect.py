"""A tab that reconnects to another process (or a restarted one) keeps working.

When a process behind HAProxy dies, a learner's tab reconnects through HAProxy to another
process, which opens a new Streamlit session for it. The tab does not know: it keeps showing its
page, and its next click inside a demo asks the new session to rerun that demo's fragment. The new
session has never drawn the page, so it holds no fragments, and Streamlit drops the request
("The fragment … does not exist anymore"): the click does nothing, and so do the next ones inside
demos, until a link or a reload runs the whole page.

`rerun_whole_page_for_a_new_session()` changes that one case: a fragment rerun asked of a session
that holds no fragment at all (it has not drawn a page since it connected) first draws the whole
page, pressing nothing, and once that run has finished, runs the click in the fragment the page
drew, as the tab asked. Every other request, including a fragment rerun that a full run has just
made obsolete (Streamlit's reason for dropping those), is handled as before.

It patches a private method (AppSession.request_rerun), once per process: requirements.txt pins
Streamlit's minor version, and tests/test_streamlit_switch.py checks the attributes used here.
pages/common (which every page and app.py import) installs it when first imported in a process;
deploy/serve.py draws one page in each process at start, so a process behind HAProxy has it
before any learner is sent there.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from streamlit.runtime.app_session import AppSession
from streamlit.runtime.scriptrunner import ScriptRunnerEvent

logger = logging.getLogger("qulab")


def holds_no_fragment(session: AppSession) -> bool:
    """True when the session has registered no fragment (it has drawn no page with one)."""
    return not session._fragment_storage._fragments  # noqa: SLF001 (pinned Streamlit)


def rerun_whole_page_for_a_new_session() -> None:
    """Install the patch (idempotent)."""
    if getattr(AppSession.request_rerun, "qulab_patched", False):
        return
    request_rerun = AppSession.request_rerun
    handle_event = AppSession._handle_scriptrunner_event_on_event_loop  # noqa: SLF001

    @functools.wraps(request_rerun)
    def request_rerun_patched(self: AppSession, client_state: Any) -> None:
        fragment_id = client_state.fragment_id if client_state else ""
        if fragment_id and not self.has_fragment(fragment_id) and holds_no_fragment(self):
            logger.info("a reconnected tab's click: its page is drawn first, then the click runs")
            self._qulab_click_after_page = client_state  # type: ignore[attr-defined]
            client_state = _page_without_clicks(client_state)
        request_rerun(self, client_state)

    @functools.wraps(handle_event)
    def handle_event_patched(self: AppSession, sender: Any, event: Any, *args, **kwargs) -> None:
        handle_event(self, sender, event, *args, **kwargs)
        click = getattr(self, "_qulab_click_after_page", None)
        if click is not None and event == ScriptRunnerEvent.SCRIPT_STOPPED_WITH_SUCCESS:
            self._qulab_click_after_page = None  # type: ignore[attr-defined]
            request_rerun(self, click)  # the page drew the fragment: now the click runs in it
        elif click is not None and event == ScriptRunnerEvent.SCRIPT_STOPPED_WITH_COMPILE_ERROR:
            self._qulab_click_after_page = None  # type: ignore[attr-defined]

    request_rerun_patched.qulab_patched = True  # type: ignore[attr-defined]
    AppSession.request_rerun = request_rerun_patched  # type: ignore[method-assign]
    AppSession._handle_scriptrunner_event_on_event_loop = handle_event_patched  # type: ignore[method-assign]  # noqa: SLF001


def _page_without_clicks(client_state: Any) -> Any:
    """The same request as a whole-page run that presses nothing: the click waits for its page."""
    page = type(client_state)()
    page.CopyFrom(client_state)
    page.ClearField("fragment_id")
    kept = [
        widget
        for widget in client_state.widget_states.widgets
        if widget.WhichOneof("value") not in ("trigger_value", "string_trigger_value")
    ]
    del page.widget_states.widgets[:]
    page.widget_states.widgets.extend(kept)
    return page
