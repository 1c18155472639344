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

from classroom.browser import SANDBOX_URL_PARAMETER

sys.path.insert(1, str(PROJECT_ROOT / "tests"))  # after the project: tests/ holds no classroom
sys.path.insert(2, str(PROJECT_ROOT / "tests" / "e2e"))
from streamlit_socket import RunOutcome, StreamlitTab  # noqa: E402  (tests/streamlit_socket.py)

INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
CREATE_USER = "Create User"
FETCH_USER = "Fetch User (Cached)"
STORE_SCORE = "Calculate & Store AIRScore (Creates Pending Event)"
COMPARE_STRATEGIES = "Compare Loading Strategies"
RUN_POOL_EXPERIMENT = "Run Pooling Experiment"
RUN_CACHE_EXPERIMENT = "Run Cache Experiment"
STORE_BURST = "Store Burst of AIRScores"
BURST_SIZE = "Scores in the burst"
SERVER_START_SECONDS = 60.0
# The long experiments a heavy learner repeats, each at its maximum (see experiment_until).
HEAVY_KINDS = ("strategies", "pool", "cache", "burst")


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
    initialized: bool = False  # its Initialize click finished (the sample users are expected)
    # (connection lost at, back at) in time.monotonic(): each time its server went away and it
    # reconnected and saw its page again, as a browser tab does
    recoveries: list[tuple[float, float]] = field(default_factory=list)
    interrupted: int = 0  # clicks whose answer never came (the server died under them)


RECONNECT_SECONDS = 60.0  # how long a tab keeps trying to reach the app again
RECONNECT_PAUSE_SECONDS = 0.5  # between two tries


class SimulatedLearner(StreamlitTab):
    """A tab of the class: the guide's path or a heavy experiment, with what it saw recorded.

    With reconnects=True it behaves as a browser tab when its server goes away (behind a load
    balancer that sends it to another): it notices the closed websocket at once, even between
    clicks, connects again and reruns its page (same ?sandbox=), and a click whose answer never
    came is answered by that page instead (RunOutcome.interrupted).
    """

    def __init__(self, number: int, replica: Replica, *, reconnects: bool = False) -> None:
        super().__init__(replica.port)
        self.report = LearnerReport(number)
        self.replica = replica
        self.reconnects = reconnects
        self.closing = False
        self.recovery: Optional[asyncio.Task[RunOutcome]] = None
        self.watcher: Optional[asyncio.Task[None]] = None

    async def connect(self, replica: Optional[Replica] = None) -> None:  # type: ignore[override]
        """Open the websocket, to this replica or to another one (a learner moved)."""
        if replica is not None:
            self.replica = replica
        await super().connect(self.replica.port)
        if self.reconnects:
            self.watcher = asyncio.create_task(self._notice_loss(self.socket))

    async def close(self) -> None:
        """Close the tab (no reconnect)."""
        self.closing = True
        await super().close()

    async def _notice_loss(self, socket: Any) -> None:
        """As the frontend does: a websocket that closes under the tab starts a reconnect."""
        await socket.wait_closed()
        if socket is self.socket and not self.closing and self.recovery is None:
            self.recovery = asyncio.create_task(self._recover(time.monotonic()))

    async def _recover(self, lost_at: float) -> RunOutcome:
        """Connect again (bounded, with a pause between tries) and rerun the current page."""
        deadline = lost_at + RECONNECT_SECONDS
        while True:
            try:
                self.socket = None
                await self.connect()
                outcome = await StreamlitTab.rerun(self)
                self.report.recoveries.append((lost_at, time.monotonic()))
                return outcome
            except (TimeoutError, OSError, websockets.WebSocketException) as error:
                if time.monotonic() > deadline:
                    self.report.errors.append(f"never reconnected: {type(error).__name__}")
                    raise
                await asyncio.sleep(RECONNECT_PAUSE_SECONDS)

    async def rerun(
        self, widget_states: tuple[tuple[str, str, Any], ...] = (), *, fragment_id: str = ""
    ) -> RunOutcome:
        """A rerun whose errors go into the learner's report (after a reconnect, if one runs)."""
        if self.recovery is not None:
            await self._recovered()
        try:
            outcome = await super().rerun(widget_states, fragment_id=fragment_id)
        except (OSError, websockets.ConnectionClosed):
            if not self.reconnects or self.closing:
                raise
            if self.recovery is None:
                self.recovery = asyncio.create_task(self._recover(time.monotonic()))
            outcome = await self._recovered()
            outcome.interrupted = True
            self.report.interrupted += 1
        self.report.errors.extend(outcome.errors)
        return outcome

    async def _recovered(self) -> RunOutcome:
        assert self.recovery is not None
        try:
            return await self.recovery
        finally:
            self.recovery = None

    async def open(self) -> RunOutcome:
        """Load the app as a new tab does (no ?sandbox=, or the one it has on a reload)."""
        outcome = await super().open()
        self.report.sandbox_id = dict(
            part.split("=", 1) for part in self.query_string.split("&") if "=" in part
        ).get(SANDBOX_URL_PARAMETER, "")
        if any(  # app.py's render_class_full
            "place on this server is taken" in text for text in outcome.texts + outcome.errors
        ):
            self.report.turned_away = True
        return outcome

    async def go_to(self, url_path: str) -> RunOutcome:
        outcome = await super().go_to(url_path)
        if not outcome.interrupted:
            self.report.clicks.append(outcome.seconds)
        return outcome

    async def press(  # type: ignore[override]
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
        outcome = await super().press(page, label, tuple(states))
        if not outcome.interrupted:  # a click lost with its server is counted in recoveries
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
            before = len(self.report.errors)
            initialized = await self.press(page, INITIALIZE)
            self.report.initialized = (
                not initialized.interrupted and len(self.report.errors) == before
            )
            await think()
            page = await self.go_to("data_models")
            await think()
            self.report.email = f"learner{self.report.number}.{self.report.sandbox_id}@example.com"
            created = await self.press(
                page,
                CREATE_USER,
                {"Email": self.report.email, "Name": f"Learner {self.report.number}"},
            )
            if created.interrupted:  # it never saw the user created: nothing promised
                self.report.email = ""
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
            stored = await self.press(page, STORE_SCORE)
            self.report.stores += len(self.report.errors) == before and not stored.interrupted
            await think()
            await self.go_to("")
        except (TimeoutError, OSError, websockets.WebSocketException, KeyError) as error:
            self.report.errors.append(f"{type(error).__name__}: {error}")
        finally:
            await self.close()

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
            initialized = await self.press(page, INITIALIZE)
            self.report.initialized = not (initialized.interrupted or self.report.errors)
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
            await self.close()


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
                    report.initialized = True
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
