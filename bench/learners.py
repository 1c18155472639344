"""One simulated learner: a browser tab reduced to Streamlit's websocket (and real Chromium ones).

SimulatedLearner speaks Streamlit's own protocol (`/_stcore/stream`, the `BackMsg` /
`ForwardMsg` protobuf classes that ship with Streamlit), as a browser tab does: it opens the app,
changes pages by their script hash, and presses the real buttons by the widget ids the server
sent. bench/classroom.py runs a class of them against `streamlit run app.py` (start_replica);
bench/rerun_cost.py times one learner's bare reruns. browser_walk sends real Chromium learners
(Playwright, Debian's /usr/bin/chromium) along the same path.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import websockets
from benchtools import PROJECT_ROOT, process_cpu_seconds  # puts the project first on sys.path
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from classroom.browser import SANDBOX_URL_PARAMETER

sys.path.insert(1, str(PROJECT_ROOT / "tests"))  # after the project: tests/ holds no classroom
sys.path.insert(2, str(PROJECT_ROOT / "tests" / "e2e"))

INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
CREATE_USER = "Create User"
FETCH_USER = "Fetch User (Cached)"
STORE_SCORE = "Calculate & Store AIRScore (Creates Pending Event)"
COMPARE_STRATEGIES = "Compare Loading Strategies"
RUN_POOL_EXPERIMENT = "Run Pooling Experiment"
RUN_CACHE_EXPERIMENT = "Run Cache Experiment"
STORE_BURST = "Store Burst of AIRScores"
BURST_SIZE = "Scores in the burst"
# The long experiments a heavy learner repeats, each at its maximum (see experiment_until).
HEAVY_KINDS = ("strategies", "pool", "cache", "burst")
CLICK_TIMEOUT_SECONDS = 60.0
SERVER_START_SECONDS = 60.0
_DONE = (ForwardMsg.FINISHED_SUCCESSFULLY, ForwardMsg.FINISHED_WITH_COMPILE_ERROR)


# --------------------------------------------------------------------------------------------
# The app under test
# --------------------------------------------------------------------------------------------


@dataclass
class Replica:
    """One `streamlit run app.py` process."""

    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def proc_status(self) -> dict[str, float]:
        """RSS (kB), threads and CPU seconds of the server process, from /proc."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "rss_kb": int(fields["VmRSS"].split()[0]),
            "threads": int(fields["Threads"]),
            "cpu_seconds": process_cpu_seconds(self.process.pid),
        }


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_replica(
    environment: dict[str, str],
    workspace: Path,
    extra_flags: list[str],
    *,
    app: Path = PROJECT_ROOT / "app.py",
) -> Replica:
    """Start the app as a learner's server runs it (README command), on a free loopback port.

    `app` names another script to serve instead (bench/rerun_cost.py's trivial page); it runs from
    its own folder, so it reads that folder's .streamlit/config.toml.
    """
    port = _free_port()
    log_path = workspace / f"streamlit-{port}.log"
    command = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.headless", "true", "--server.address", "127.0.0.1",
        "--server.port", str(port), *extra_flags,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=app.parent, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    replica = Replica(port, process, log_path)
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{replica.url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return replica
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()[-2000:]}")


def stop_replica(replica: Replica) -> None:
    replica.process.terminate()
    try:
        replica.process.wait(30)
    except subprocess.TimeoutExpired:
        replica.process.kill()
        replica.process.wait(10)


# --------------------------------------------------------------------------------------------
# One simulated learner
# --------------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    """What one script run (a page load or a click) showed."""

    seconds: float
    buttons: dict[str, str] = field(default_factory=dict)  # label -> widget id
    text_inputs: dict[str, str] = field(default_factory=dict)  # label -> widget id
    sliders: dict[str, float] = field(default_factory=dict)  # widget id -> its maximum
    number_inputs: dict[str, tuple[str, float]] = field(
        default_factory=dict
    )  # label -> (widget id, its maximum)
    errors: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


@dataclass
class LearnerReport:
    number: int
    sandbox_id: str = ""
    first_render: Optional[float] = None
    clicks: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    turned_away: bool = False
    stores: int = 0
    email: str = ""
    moved: bool = False
    heavy: bool = False  # runs the long experiments over and over instead of walking the guide


class SimulatedLearner:
    """A browser tab reduced to its websocket: reruns with widget states, reads ForwardMsgs."""

    def __init__(self, number: int, replica: Replica) -> None:
        self.report = LearnerReport(number)
        self.replica = replica
        self.socket: Any = None
        self.pages: dict[str, str] = {}  # url path ('' for the default page) -> page script hash
        self.page_hash = ""
        self.query_string = ""

    async def connect(self, replica: Replica) -> None:
        if self.socket is not None:
            await self.socket.close()
        self.replica = replica
        self.socket = await websockets.connect(
            f"ws://127.0.0.1:{replica.port}/_stcore/stream",
            subprotocols=["streamlit"],
            max_size=None,
            open_timeout=30,
        )

    async def rerun(self, widget_states: tuple[tuple[str, str, Any], ...] = ()) -> RunOutcome:
        """Send one rerun (the current page, these widget states) and read until its script ends."""
        message = BackMsg()
        message.rerun_script.query_string = self.query_string
        message.rerun_script.page_script_hash = self.page_hash
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
                kind = forward.WhichOneof("type")
                if kind == "navigation":
                    self.pages = {
                        page.url_pathname: page.page_script_hash
                        for page in forward.navigation.app_pages
                    }
                    self.page_hash = forward.navigation.page_script_hash or self.page_hash
                elif kind == "new_session" and forward.new_session.page_script_hash:
                    self.page_hash = self.page_hash or forward.new_session.page_script_hash
                elif kind == "page_info_changed":
                    self.query_string = forward.page_info_changed.query_string
                elif kind == "delta" and forward.delta.WhichOneof("type") == "new_element":
                    _read_element(forward.delta.new_element, outcome)
                elif kind == "script_finished" and forward.script_finished in _DONE:
                    break
        outcome.seconds = time.perf_counter() - started
        self.report.errors.extend(outcome.errors)
        return outcome

    async def open(self) -> RunOutcome:
        """Load the app as a new tab does (no ?sandbox=, or the one it has on a reload)."""
        await self.connect(self.replica)
        self.page_hash = ""
        outcome = await self.rerun()
        self.report.sandbox_id = dict(
            part.split("=", 1) for part in self.query_string.split("&") if "=" in part
        ).get(SANDBOX_URL_PARAMETER, "")
        if any(
            "full" in text.lower() and "class" in text.lower()
            for text in outcome.texts + outcome.errors
        ):
            self.report.turned_away = True
        return outcome

    async def go_to(self, url_path: str) -> RunOutcome:
        self.page_hash = self.pages[url_path]
        outcome = await self.rerun()
        self.report.clicks.append(outcome.seconds)
        return outcome

    async def press(
        self,
        page: RunOutcome,
        label: str,
        inputs: Optional[dict[str, str]] = None,
        *,
        sliders_at_maximum: bool = False,
        numbers_at_maximum: bool = False,
    ) -> RunOutcome:
        if label not in page.buttons:
            self.report.errors.append(f"no button {label!r} on the page")
            return page
        states: list[tuple[str, str, Any]] = [
            (page.text_inputs[name], "string_value", value)
            for name, value in (inputs or {}).items()
        ]
        if sliders_at_maximum:
            states += [
                (widget_id, "double_array_value", [maximum])
                for widget_id, maximum in page.sliders.items()
            ]
        if numbers_at_maximum:
            states += [
                (widget_id, "int_value", int(maximum))
                for widget_id, maximum in page.number_inputs.values()
            ]
        states.append((page.buttons[label], "trigger_value", True))
        outcome = await self.rerun(tuple(states))
        self.report.clicks.append(outcome.seconds)
        return outcome

    async def walk(
        self, *, think_seconds: float, other_replica: Optional[Replica], rng: random.Random
    ) -> None:
        """The guide's path, with a think time between clicks; errors are recorded, not raised."""

        async def think() -> None:
            await asyncio.sleep(think_seconds * rng.uniform(0.6, 1.4))

        try:
            first = await self.open()
            self.report.first_render = first.seconds
            if self.report.turned_away or not self.report.sandbox_id:
                return
            await think()
            page = await self.go_to("connectivity_pooling")
            await think()
            await self.press(page, INITIALIZE)
            await think()
            page = await self.go_to("data_models")
            await think()
            self.report.email = f"learner{self.report.number}.{self.report.sandbox_id}@example.com"
            await self.press(
                page,
                CREATE_USER,
                {"Email": self.report.email, "Name": f"Learner {self.report.number}"},
            )
            if (
                other_replica is not None
            ):  # a reload that lands on the other replica, with ?sandbox=
                self.report.moved = True
                await self.connect(other_replica)
                self.page_hash = ""
                await self.rerun()
            await think()
            page = await self.go_to("caching")
            for _ in range(2):
                await think()
                page = await self.press(page, FETCH_USER)
            await think()
            page = await self.go_to("eventing_outbox")
            await think()
            before = len(self.report.errors)
            await self.press(page, STORE_SCORE)
            self.report.stores += len(self.report.errors) == before
            await think()
            await self.go_to("")
        except (TimeoutError, OSError, websockets.WebSocketException, KeyError) as error:
            self.report.errors.append(f"{type(error).__name__}: {error}")
        finally:
            if self.socket is not None:
                await self.socket.close()

    async def experiment_until(self, done: asyncio.Event, kind: str = "strategies") -> None:
        """The heavy learner: one long experiment (of HEAVY_KINDS) at its maximum, back to back.

        strategies: section 3's comparison at its default N (10, 100, 1,000 users); pool: section
        2's experiment with every slider at its maximum; cache: section 4's experiment, 500 reads
        per hit ratio; burst: section 5's burst of 2,000 score writes.
        """
        self.report.heavy = True
        page_of = {
            "strategies": "repository_n_plus_one",
            "pool": "connectivity_pooling",
            "cache": "caching",
            "burst": "eventing_outbox",
        }
        try:
            await self.open()
            page = await self.go_to("connectivity_pooling")
            await self.press(page, INITIALIZE)
            while not done.is_set():
                page = await self.go_to(page_of[kind])
                if kind == "strategies":
                    await self.press(page, COMPARE_STRATEGIES)
                elif kind == "pool":
                    await self.press(page, RUN_POOL_EXPERIMENT, sliders_at_maximum=True)
                elif kind == "cache":
                    await self.press(page, RUN_CACHE_EXPERIMENT, sliders_at_maximum=True)
                else:
                    await self.press(page, STORE_BURST, numbers_at_maximum=True)
        except (TimeoutError, OSError, websockets.WebSocketException, KeyError) as error:
            self.report.errors.append(f"{type(error).__name__}: {error}")
        finally:
            if self.socket is not None:
                await self.socket.close()


def _read_element(element: Any, outcome: RunOutcome) -> None:
    kind = element.WhichOneof("type")
    if kind == "button":
        outcome.buttons[element.button.label] = element.button.id
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


# --------------------------------------------------------------------------------------------
# Real browsers beside the simulated ones
# --------------------------------------------------------------------------------------------


def browser_walk(replica: Replica, count: int, reports: list[LearnerReport]) -> None:
    """`count` Chromium learners walk the same path (ground truth for the simulated ones)."""
    import browsertools as bt

    server = bt.AppServer(replica.url, replica.process, replica.log_path, None, None)
    with bt.chromium() as browser:
        for number in range(count):
            report = LearnerReport(number=-(number + 1))
            reports.append(report)
            try:
                with bt.fresh_visitor(browser) as page:
                    started = time.perf_counter()
                    bt.open_page(page, server)
                    report.first_render = time.perf_counter() - started
                    report.sandbox_id = page.url.split("sandbox=", 1)[1].split("&", 1)[0]
                    for step in (
                        lambda: bt.go_to_section(page, "2. DB Connectivity & Pooling"),
                        lambda: bt.click(page, INITIALIZE),
                        lambda: bt.go_to_section(page, "1. Data Models"),
                    ):
                        started = time.perf_counter()
                        step()
                        report.clicks.append(time.perf_counter() - started)
                    report.email = f"browser{number}.{report.sandbox_id}@example.com"
                    bt.fill(page, "Email", report.email)
                    bt.fill(page, "Name", f"Browser Learner {number}")
                    for step in (
                        lambda: bt.click(page, CREATE_USER),
                        lambda: bt.go_to_section(page, "4. Caching with Redis"),
                        lambda: bt.click(page, FETCH_USER),
                        lambda: bt.click(page, FETCH_USER),
                        lambda: bt.go_to_section(page, "5. Eventing (Outbox Pattern)"),
                        lambda: bt.click(page, STORE_SCORE),
                    ):
                        started = time.perf_counter()
                        step()
                        report.clicks.append(time.perf_counter() - started)
                    report.stores = 1
                    report.errors.extend(bt.alerts(page, "error"))
            except Exception as error:
                report.errors.append(f"browser: {type(error).__name__}: {str(error)[:200]}")
