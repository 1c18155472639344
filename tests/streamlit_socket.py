"""A browser tab reduced to Streamlit's websocket: what page tests and the benchmarks speak.

A tab opens `ws://HOST:PORT/_stcore/stream` (subprotocol "streamlit"), sends BackMsg reruns (the
page's script hash, the query string, widget states) and reads ForwardMsg deltas until the script
finishes. A button drawn inside an st.fragment is pressed as the browser presses it: with the
fragment's id, so the server reruns that fragment only (NOTES: a load generator that sends full
reruns for such buttons measures the wrong thing).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

CLICK_TIMEOUT_SECONDS = 60.0
DONE = (
    ForwardMsg.FINISHED_SUCCESSFULLY,
    ForwardMsg.FINISHED_WITH_COMPILE_ERROR,
    ForwardMsg.FINISHED_FRAGMENT_RUN_SUCCESSFULLY,
)


@dataclass
class RunOutcome:
    """What one script run (a page load or a click) showed."""

    seconds: float
    buttons: dict[str, str] = field(default_factory=dict)  # label -> widget id
    # widget id -> the id of the fragment it was drawn in: the browser presses such a button
    # by rerunning that fragment only (rerun_script.fragment_id)
    fragment_of: dict[str, str] = field(default_factory=dict)
    elements: int = 0  # elements the server sent in this run
    elements_outside_fragments: int = 0  # of those, drawn outside any fragment
    fragment_run: bool = False  # the server ran a fragment only
    interrupted: bool = False  # the server went away first: this is the page seen after reconnect
    codes: list[str] = field(default_factory=list)  # the text of each code block drawn
    text_inputs: dict[str, str] = field(default_factory=dict)  # label -> widget id
    sliders: dict[str, float] = field(default_factory=dict)  # widget id -> its maximum
    number_inputs: dict[str, tuple[str, float]] = field(
        default_factory=dict
    )  # label -> (widget id, its maximum)
    errors: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


class StreamlitTab:
    """One tab: its socket, the app's pages, the page it shows and its query string."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socket: Any = None
        self.pages: dict[str, str] = {}  # url path ('' for the default page) -> script hash
        self.page_hash = ""
        self.query_string = ""
        self.cookies: dict[str, str] = {}  # as a browser keeps them: a load balancer's stickiness

    async def connect(self, port: Optional[int] = None) -> None:
        """Open the websocket (again, to another server when a port is given)."""
        if self.socket is not None:
            await self.socket.close()
        self.port = port or self.port
        cookie = "; ".join(f"{name}={value}" for name, value in self.cookies.items())
        self.socket = await websockets.connect(
            f"ws://127.0.0.1:{self.port}/_stcore/stream",
            subprotocols=["streamlit"],
            max_size=None,
            open_timeout=30,
            additional_headers={"Cookie": cookie} if cookie else None,
        )
        for header in self.socket.response.headers.get_all("Set-Cookie"):
            name, _, value = header.split(";", 1)[0].partition("=")
            self.cookies[name.strip()] = value.strip()

    async def close(self) -> None:
        """Close the websocket: the browser tab goes."""
        if self.socket is not None:
            await self.socket.close()
            self.socket = None

    async def rerun(
        self, widget_states: tuple[tuple[str, str, Any], ...] = (), *, fragment_id: str = ""
    ) -> RunOutcome:
        """Send one rerun (the current page, these widget states) and read until it ends.

        With a fragment_id, as the browser does for a widget drawn inside a fragment: the
        server reruns that fragment only.
        """
        message = BackMsg()
        message.rerun_script.query_string = self.query_string
        message.rerun_script.page_script_hash = self.page_hash
        if fragment_id:
            message.rerun_script.fragment_id = fragment_id
        for widget_id, kind, value in widget_states:
            state = message.rerun_script.widget_states.widgets.add()
            state.id = widget_id
            if kind == "double_array_value":
                state.double_array_value.data.extend(value)
            else:
                setattr(state, kind, value)
        started = time.perf_counter()
        await self.socket.send(message.SerializeToString())
        outcome = RunOutcome(seconds=0.0)
        async with asyncio.timeout(CLICK_TIMEOUT_SECONDS):
            while True:
                forward = ForwardMsg()
                forward.ParseFromString(await self.socket.recv())
                if self._read(forward, outcome):
                    break
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _read(self, forward: Any, outcome: RunOutcome) -> bool:
        """Take one ForwardMsg into the outcome; True once the run has finished."""
        kind = forward.WhichOneof("type")
        if kind == "navigation":
            pages = forward.navigation.app_pages
            self.pages = {page.url_pathname: page.page_script_hash for page in pages}
            self.page_hash = forward.navigation.page_script_hash or self.page_hash
        elif kind == "new_session" and forward.new_session.page_script_hash:
            self.page_hash = self.page_hash or forward.new_session.page_script_hash
        elif kind == "page_info_changed":
            self.query_string = forward.page_info_changed.query_string
        elif kind == "delta" and forward.delta.WhichOneof("type") == "new_element":
            fragment = forward.delta.fragment_id
            outcome.elements += 1
            outcome.elements_outside_fragments += not fragment
            read_element(forward.delta.new_element, outcome, fragment)
        elif kind == "script_finished" and forward.script_finished in DONE:
            fragment_done = ForwardMsg.FINISHED_FRAGMENT_RUN_SUCCESSFULLY
            outcome.fragment_run = forward.script_finished == fragment_done
            return True
        return False

    async def open(self) -> RunOutcome:
        """Load the app as a new tab does (no ?sandbox=, or the one it has on a reload)."""
        await self.connect()
        self.page_hash = ""
        return await self.rerun()

    async def go_to(self, url_path: str) -> RunOutcome:
        """Change page (a sidebar link)."""
        self.page_hash = self.pages[url_path]
        return await self.rerun()

    async def press(
        self, page: RunOutcome, label: str, states: tuple[tuple[str, str, Any], ...] = ()
    ) -> RunOutcome:
        """Press the button with this label (in its fragment, if it was drawn in one)."""
        button_id = page.buttons[label]
        pressed = (*states, (button_id, "trigger_value", True))
        return await self.rerun(pressed, fragment_id=page.fragment_of.get(button_id, ""))


def read_element(element: Any, outcome: RunOutcome, fragment_id: str = "") -> None:
    kind = element.WhichOneof("type")
    if kind == "button":  # form submit buttons too (is_form_submitter)
        outcome.buttons[element.button.label] = element.button.id
        if fragment_id:
            outcome.fragment_of[element.button.id] = fragment_id
    elif kind == "text_input":
        outcome.text_inputs[element.text_input.label] = element.text_input.id
    elif kind == "slider":
        outcome.sliders[element.slider.id] = element.slider.max
    elif kind == "number_input":
        outcome.number_inputs[element.number_input.label] = (
            element.number_input.id,
            element.number_input.max,
        )
    elif kind == "exception":
        outcome.errors.append(f"exception: {element.exception.type}: {element.exception.message}")
    elif kind == "alert":
        if element.alert.format == element.alert.ERROR:
            outcome.errors.append(f"error: {element.alert.body}")
        outcome.texts.append(element.alert.body)
    elif kind == "markdown":
        outcome.texts.append(element.markdown.body)
    elif kind == "metric":
        outcome.texts.append(f"{element.metric.label}: {element.metric.body}")
    elif kind == "progress":
        outcome.texts.append(element.progress.text)
    elif kind == "code":
        outcome.codes.append(element.code.code_text)
