"""A browser session's way into its sandbox: the id in the session and the URL, and its hold.

A browser reload starts a new Streamlit session with empty state; the id in the URL
(?sandbox=…) brings the learner back to their sandbox. A fresh visit gets a new random id, so
two learners never share a sandbox unless one hands the other the URL.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, MutableMapping
from typing import Any, Optional

from classroom.runtime import Lab, Runtime, get_runtime
from classroom.sandboxes.sandbox import SANDBOX_ID_PATTERN, new_sandbox_id

SANDBOX_STATE_KEY = "qulab_sandbox_id"
SANDBOX_HOLDER_KEY = "qulab_sandbox_holder"
SANDBOX_URL_PARAMETER = "sandbox"
LAST_SANDBOX_COOKIE = "qulab_last_sandbox"  # the browser's last sandbox, offered on a bare URL
LAST_SANDBOX_COOKIE_SECONDS = 30 * 24 * 3600


class BrowserSessionHold:
    """A browser session's hold on its sandbox, released when Streamlit says the session ended.

    app.py keeps one per session in `st.cache_resource(scope="session", on_release=...)`.
    Streamlit clears a session's session-scoped resources, calling on_release, the moment its
    websocket disconnects (AppSession.clear_session_caches, from disconnect_session and from
    shutdown), and builds the resource again on the session's next run if it reconnects. We
    chose it over a heartbeat fragment (browser-timed, so it only stops when the tab is gone,
    and costs a rerun per tick per learner) and over polling Streamlit's session manager
    (internal API): it is the hook the maintainers point to (streamlit #8545, #13482). A
    reconnect or reload within the grace period finds the sandbox still awake.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.holder = f"browser:{uuid.uuid4().hex}"

    def release(self) -> None:
        """Called by Streamlit (on its own thread) when the session's websocket goes."""
        self.runtime.release_holder(self.holder)


def lab_for_browser_session(
    state: MutableMapping[str, Any],
    url_parameters: Optional[MutableMapping[str, Any]] = None,
    *,
    hold: Optional[BrowserSessionHold] = None,
) -> Lab:
    """The Lab of one browser session: its sandbox id lives in the session state and in the URL.

    A browser reload starts a new Streamlit session with empty state; the id in the URL
    (?sandbox=…) brings the learner back to their sandbox. A fresh visit gets a new random id,
    so two learners never share a sandbox unless one hands the other the URL. The session's
    hold (from app.py) keeps the sandbox active while the browser is connected.
    """
    sandbox_id = state.get(SANDBOX_STATE_KEY)
    if not isinstance(sandbox_id, str) or not SANDBOX_ID_PATTERN.fullmatch(sandbox_id):
        from_url = url_parameters.get(SANDBOX_URL_PARAMETER) if url_parameters is not None else None
        valid = isinstance(from_url, str) and SANDBOX_ID_PATTERN.fullmatch(from_url)
        sandbox_id = from_url if valid else new_sandbox_id()
        state[SANDBOX_STATE_KEY] = sandbox_id
    if url_parameters is not None and url_parameters.get(SANDBOX_URL_PARAMETER) != sandbox_id:
        url_parameters[SANDBOX_URL_PARAMETER] = sandbox_id
    if hold is not None:
        state[SANDBOX_HOLDER_KEY] = hold.holder
    holder = state.get(SANDBOX_HOLDER_KEY)
    return Lab(get_runtime(), sandbox_id, holder=holder if isinstance(holder, str) else None)


def switch_to_new_sandbox(
    state: MutableMapping[str, Any], url_parameters: MutableMapping[str, Any]
) -> str:
    """Give this browser session a fresh sandbox id; the old one stays reachable by its link."""
    sandbox_id = new_sandbox_id()
    state[SANDBOX_STATE_KEY] = sandbox_id
    url_parameters[SANDBOX_URL_PARAMETER] = sandbox_id
    return sandbox_id


def remembered_sandbox(
    state: Mapping[str, Any], url_parameters: Mapping[str, Any], cookies: Mapping[str, str]
) -> Optional[str]:
    """The sandbox this browser used last, to offer when a visit brings none of its own.

    None when the session or the URL already names a sandbox, or the browser remembers none.
    """
    if state.get(SANDBOX_STATE_KEY) or url_parameters.get(SANDBOX_URL_PARAMETER):
        return None
    remembered = cookies.get(LAST_SANDBOX_COOKIE)
    return (
        remembered
        if isinstance(remembered, str) and SANDBOX_ID_PATTERN.fullmatch(remembered)
        else None
    )


def choose_sandbox(
    state: MutableMapping[str, Any], url_parameters: MutableMapping[str, Any], sandbox_id: str
) -> None:
    """This browser session goes on in the sandbox with this id (a checked one)."""
    if not SANDBOX_ID_PATTERN.fullmatch(sandbox_id):
        raise ValueError("malformed sandbox id")
    state[SANDBOX_STATE_KEY] = sandbox_id
    url_parameters[SANDBOX_URL_PARAMETER] = sandbox_id


def remember_sandbox_script(sandbox_id: str) -> str:
    """A script that makes the browser remember its sandbox (a first-party cookie, 30 days)."""
    if not SANDBOX_ID_PATTERN.fullmatch(sandbox_id):
        raise ValueError("malformed sandbox id")
    return (
        f"document.cookie = '{LAST_SANDBOX_COOKIE}={sandbox_id}; path=/; "
        f"max-age={LAST_SANDBOX_COOKIE_SECONDS}; SameSite=Lax';"
    )
