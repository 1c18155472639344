"""A class in a box: N learners walk the codelab at once against a real `streamlit run app.py`.

Each simulated learner speaks Streamlit's own websocket protocol (`/_stcore/stream`, the
`BackMsg` / `ForwardMsg` protobuf classes that ship with Streamlit), as a browser tab does: it
opens the app, changes pages by their script hash, and presses the real buttons by the widget
ids the server sent, with a think time between clicks. Its walk follows the user guide:

    open the app -> 2. Initialize (the guide's button) -> 1. Create User (a form)
    -> 4. Fetch User (Cached) twice (a miss, then a hit) -> 5. Calculate & Store AIRScore
    -> back to the introduction

At the end every learner checks, in its own sandbox's database, that what it made is there:
the two sample users, the user it created, and one AIRScore with its event per store click.
Two real Chromium learners (Playwright, Debian's /usr/bin/chromium) can walk at the same time
as ground truth (--browsers 2).

Reported: click round trip p50/p95 (press to the run's end, reruns included), first render
p50/p95 (connect to the first page's end), errors (error alerts, exceptions, timeouts), learners
turned away ("class is full"), rows lost, and the server's CPU per click, RSS and threads
(from /proc), with the load generator's own CPU beside them: it runs on the same 2 cores.

    python3 bench/classroom.py --learners 30                  # embedded defaults
    DATABASE_URL=… REDIS_URL=… python3 bench/classroom.py --learners 30 --replicas 2 --move 0.3

With --replicas 2 learners are spread over two app processes (one per core). On the embedded
default each process keeps its own sandboxes, so every learner stays on the process it opened,
as behind a load balancer with sticky sessions. On PostgreSQL + Redis they share DATABASE_URL and
REDIS_URL, and --move sends that share of learners to the other replica mid-walk (a
reload there with their ?sandbox=), as when a load balancer moves them. Every run is bounded:
the walk has a fixed number of clicks and every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from benchtools import PROJECT_ROOT, print_table, process_cpu_seconds, python_speed_ms, result

sys.path.insert(0, str(PROJECT_ROOT / "tests"))
sys.path.insert(0, str(PROJECT_ROOT / "tests" / "e2e"))

import source  # noqa: E402

INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
CREATE_USER = "Create User"
FETCH_USER = "Fetch User (Cached)"
STORE_SCORE = "Calculate & Store AIRScore (Creates Pending Event)"
COMPARE_STRATEGIES = "Compare Loading Strategies"
RUN_POOL_EXPERIMENT = "Run Pooling Experiment"
RUN_CACHE_EXPERIMENT = "Run Cache Experiment"
STORE_BURST = "Store Burst of AIRScores"
BURST_SIZE = "Scores in the burst"
# The long experiments a heavy learner repeats, each at its maximum: page, button, how to set its inputs.
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
    environment: dict[str, str], workspace: Path, extra_flags: list[str], *, app: Path = PROJECT_ROOT / "app.py"
) -> Replica:
    """Start the app as a learner's server runs it (README command), on a free loopback port.

    `app` names another script to serve instead (bench/rerun_cost.py's trivial page); it runs from
    its own folder, so it reads that folder's .streamlit/config.toml.
    """
    port = _free_port()
    log_path = workspace / f"streamlit-{port}.log"
    command = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port), *extra_flags,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=app.parent, env=environment, stdout=log, stderr=subprocess.STDOUT)
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
    number_inputs: dict[str, tuple[str, float]] = field(default_factory=dict)  # label -> (widget id, its maximum)
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
            f"ws://127.0.0.1:{replica.port}/_stcore/stream", subprotocols=["streamlit"], max_size=None, open_timeout=30
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
                    self.pages = {page.url_pathname: page.page_script_hash for page in forward.navigation.app_pages}
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
        ).get(source.SANDBOX_URL_PARAMETER, "")
        if any("full" in text.lower() and "class" in text.lower() for text in outcome.texts + outcome.errors):
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
            (page.text_inputs[name], "string_value", value) for name, value in (inputs or {}).items()
        ]
        if sliders_at_maximum:
            states += [(widget_id, "double_array_value", [maximum]) for widget_id, maximum in page.sliders.items()]
        if numbers_at_maximum:
            states += [(widget_id, "int_value", int(maximum)) for widget_id, maximum in page.number_inputs.values()]
        states.append((page.buttons[label], "trigger_value", True))
        outcome = await self.rerun(tuple(states))
        self.report.clicks.append(outcome.seconds)
        return outcome

    async def walk(self, *, think_seconds: float, other_replica: Optional[Replica], rng: random.Random) -> None:
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
            await self.press(page, CREATE_USER, {"Email": self.report.email, "Name": f"Learner {self.report.number}"})
            if other_replica is not None:  # a reload that lands on the other replica, with ?sandbox=
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
        """The heavy learner: one long experiment (a HEAVY_KINDS entry) at its maximum, back to back.

        strategies: section 3's comparison at its default N (10, 100, 1,000 users); pool: section
        2's experiment with every slider at its maximum; cache: section 4's experiment, 500 reads
        per hit ratio; burst: section 5's burst of 2,000 score writes.
        """
        self.report.heavy = True
        page_of = {"strategies": "repository_n_plus_one", "pool": "connectivity_pooling", "cache": "caching",
                   "burst": "eventing_outbox"}  # fmt: skip
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
        outcome.number_inputs[element.number_input.label] = (element.number_input.id, element.number_input.max)
    elif kind == "exception":
        outcome.errors.append(f"exception: {element.exception.type}: {element.exception.message}")
    elif kind == "alert":
        if element.alert.format == element.alert.ERROR:
            outcome.errors.append(f"error: {element.alert.body}")
        outcome.texts.append(element.alert.body)
    elif kind == "markdown":
        outcome.texts.append(element.markdown.body)


# --------------------------------------------------------------------------------------------
# What each learner must find in its sandbox afterwards
# --------------------------------------------------------------------------------------------


def rows_lost(report: LearnerReport, *, database_url: Optional[str], sandbox_directory: Path) -> int:
    """Rows this learner made that its sandbox no longer has (0 when everything is there)."""
    if not report.sandbox_id or report.turned_away:
        return 0
    queries = {
        "users": "SELECT email FROM {schema}users",
        "airscores": "SELECT count(*) FROM {schema}air_scores",
        "events": "SELECT count(*) FROM {schema}domain_events WHERE event_type = 'AIRScoreCalculated'",
    }
    target = source.resolve_database_target(database_url)
    try:
        if target.kind == "postgresql":
            found = _query_postgres_each(target, report.sandbox_id, queries)
        else:
            directory = sandbox_directory if target.kind == "embedded" else Path(target.url.database).parent
            files = [path for path in directory.glob(f"*{report.sandbox_id}*") if path.suffix in {".sqlite3", ".db"}]
            if not files:
                return len(_expected_users(report)) + 2 * report.stores
            with sqlite3.connect(f"file:{files[0]}?mode=ro", uri=True) as connection:
                found = {name: connection.execute(sql.format(schema="")).fetchall() for name, sql in queries.items()}
    except Exception as error:  # a missing table is data lost too
        report.errors.append(f"checking rows: {type(error).__name__}: {error}")
        return len(_expected_users(report)) + 2 * report.stores
    emails = {row[0].lower() for row in found["users"]}
    lost = len({email.lower() for email in _expected_users(report)} - emails)
    lost += max(0, report.stores - found["airscores"][0][0]) + max(0, report.stores - found["events"][0][0])
    return lost


def _expected_users(report: LearnerReport) -> list[str]:
    sample = ["alex.smith@innovateai.example", "jane.doe@innovateai.example"]
    return sample + ([report.email] if report.email and not any("Create User" in e for e in report.errors) else [])


def _query_postgres_each(target: source.DatabaseTarget, sandbox_id: str, queries: dict[str, str]) -> dict[str, list]:
    import asyncpg

    dsn = target.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def fetch() -> dict[str, list]:
        connection = await asyncpg.connect(dsn)
        try:
            schema = f'"qulab_{sandbox_id}".'
            return {name: [tuple(r) for r in await connection.fetch(sql.format(schema=schema))] for name, sql in queries.items()}
        finally:
            await connection.close()

    return asyncio.run(fetch())


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


# --------------------------------------------------------------------------------------------
# A class
# --------------------------------------------------------------------------------------------


@dataclass
class ClassReport:
    learners: int
    replicas: int
    reports: list[LearnerReport]
    lost: int
    seconds: float
    server_cpu_seconds: float
    client_cpu_seconds: float
    rss_before_kb: int
    rss_after_kb: int
    threads_before: int
    threads_peak: int
    python_speed_ms: tuple[float, float]  # benchtools.python_speed_ms before and after the class

    def percentile(self, values: list[float], share: float) -> Optional[float]:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]

    def walking_click_p95(self) -> Optional[float]:
        """p95 click round trip of the learners walking the guide (the heavy ones left out)."""
        return self.percentile([c for r in self.reports if r.number >= 0 and not r.heavy for c in r.clicks], 0.95)

    def rows(self, label: str) -> list[dict[str, Any]]:
        simulated = [r for r in self.reports if r.number >= 0 and not r.heavy]
        clicks = [c for r in simulated for c in r.clicks]
        every_click = len(clicks) + sum(len(r.clicks) + 1 for r in self.reports if r.number < 0) + len(simulated)
        renders = [r.first_render for r in simulated if r.first_render is not None]
        errors = sum(len(r.errors) for r in self.reports if not r.turned_away)
        turned_away = sum(r.turned_away for r in self.reports)
        admitted = max(1, len(self.reports) - turned_away)
        browsers = [r for r in self.reports if r.number < 0]
        bench = "classroom"
        rows = [
            result(bench, f"{label}: click p50", self.percentile(clicks, 0.5) or 0, unit="s"),
            result(bench, f"{label}: click p95", self.percentile(clicks, 0.95) or 0, unit="s",
                   target="≤ 0.25 s at 100 learners"),
            result(bench, f"{label}: first render p95", self.percentile(renders, 0.95) or 0, unit="s",
                   target="≤ 1 s at 100 learners"),
            result(bench, f"{label}: errors (connected learners)", errors, unit="", target="0", met=errors == 0),
            result(bench, f"{label}: rows lost", self.lost, unit="", target="0", met=self.lost == 0),
            result(bench, f"{label}: turned away (class full)", turned_away, unit=""),
            result(bench, f"{label}: server CPU per click", 1000 * self.server_cpu_seconds / max(1, every_click), unit="ms"),
            result(bench, f"{label}: this machine's speed, a fixed Python workload before → after (ms of CPU)",
                   max(self.python_speed_ms), unit="ms (" + " → ".join(f"{v:.0f}" for v in self.python_speed_ms) + ")"),
            result(bench, f"{label}: server CPU share of one core", self.server_cpu_seconds / self.seconds, unit="cores"),
            result(bench, f"{label}: load generator CPU share", self.client_cpu_seconds / self.seconds, unit="cores"),
            result(bench, f"{label}: RSS per admitted learner", (self.rss_after_kb - self.rss_before_kb) / 1024 / admitted,
                   unit="MB"),
            result(bench, f"{label}: server threads before → peak", self.threads_peak, unit=f"(from {self.threads_before})"),
        ]  # fmt: skip
        if browsers:
            ok = sum(not r.errors for r in browsers)
            rows.append(result(bench, f"{label}: Chromium learners with no error", ok, unit=f"of {len(browsers)}",
                               met=ok == len(browsers)))  # fmt: skip
        return rows


async def run_class(
    replicas: list[Replica],
    *,
    learners: int,
    think_seconds: float,
    ramp_seconds: float,
    move_share: float,
    browsers: int,
    heavy: int,
    database_url: Optional[str],
    sandbox_directory: Path,
    heavy_kind: str = "strategies",
    seed: int = 7,
) -> ClassReport:
    rng = random.Random(seed)
    for replica in replicas:  # one learner first, not counted: imports and first compiles are not per learner
        await SimulatedLearner(-100, replica).walk(think_seconds=0.0, other_replica=None, rng=random.Random(seed))
    speed_before = python_speed_ms()
    before = [replica.proc_status() for replica in replicas]
    peak_threads = [status["threads"] for status in before]
    client_before = resource.getrusage(resource.RUSAGE_SELF)
    stop_sampling = asyncio.Event()

    async def sample_threads() -> None:
        while not stop_sampling.is_set():
            for index, replica in enumerate(replicas):
                peak_threads[index] = max(peak_threads[index], replica.proc_status()["threads"])
            await asyncio.sleep(1)

    simulated = [SimulatedLearner(number, replicas[number % len(replicas)]) for number in range(learners)]
    browser_reports: list[LearnerReport] = []
    browser_thread = threading.Thread(target=browser_walk, args=(replicas[0], browsers, browser_reports), daemon=True)
    started = time.perf_counter()
    sampler = asyncio.create_task(sample_threads())
    if browsers:
        browser_thread.start()

    async def start(learner: SimulatedLearner, delay: float) -> None:
        await asyncio.sleep(delay)
        moves = len(replicas) > 1 and rng.random() < move_share
        other = replicas[(learner.report.number + 1) % len(replicas)] if moves else None
        await learner.walk(think_seconds=think_seconds, other_replica=other, rng=random.Random(rng.random()))

    walks_done = asyncio.Event()
    heavy_learners = [SimulatedLearner(learners + number, replicas[0]) for number in range(heavy)]
    experiments = [asyncio.create_task(learner.experiment_until(walks_done, heavy_kind)) for learner in heavy_learners]
    await asyncio.gather(*(start(learner, ramp_seconds * i / max(1, learners)) for i, learner in enumerate(simulated)))
    walks_done.set()
    await asyncio.gather(*experiments)
    simulated += heavy_learners
    if browsers:
        await asyncio.to_thread(browser_thread.join, 600)
    seconds = time.perf_counter() - started
    stop_sampling.set()
    await sampler
    after = [replica.proc_status() for replica in replicas]
    client_after = resource.getrusage(resource.RUSAGE_SELF)
    speed_after = python_speed_ms()
    reports = [learner.report for learner in simulated] + browser_reports
    lost = 0
    for report in reports:
        lost += await asyncio.to_thread(rows_lost, report, database_url=database_url, sandbox_directory=sandbox_directory)
    return ClassReport(
        learners=learners,
        replicas=len(replicas),
        reports=reports,
        lost=lost,
        seconds=seconds,
        server_cpu_seconds=sum(a["cpu_seconds"] - b["cpu_seconds"] for a, b in zip(after, before)),
        client_cpu_seconds=(client_after.ru_utime + client_after.ru_stime)
        - (client_before.ru_utime + client_before.ru_stime),
        rss_before_kb=sum(status["rss_kb"] for status in before),
        rss_after_kb=sum(status["rss_kb"] for status in after),
        threads_before=sum(status["threads"] for status in before),
        threads_peak=sum(peak_threads),
        python_speed_ms=(speed_before, speed_after),
    )


def measure(
    *,
    learners: int,
    replicas: int = 1,
    think_seconds: float = 5.0,
    ramp_seconds: Optional[float] = None,
    move_share: float = 0.0,
    browsers: int = 0,
    heavy: int = 0,
    heavy_kind: str = "strategies",
    streamlit_flags: tuple[str, ...] = (),
    extra_environment: Optional[dict[str, str]] = None,
) -> ClassReport:
    """Start the app (1 or 2 replicas), run one class through it, stop it; return the report."""
    workspace = Path(tempfile.mkdtemp(prefix="qulab-classroom-"))
    environment = dict(os.environ, **(extra_environment or {}))
    database_url = environment.get("DATABASE_URL", "").strip() or None
    sandbox_directory = Path(environment.setdefault("QULAB_SANDBOX_DIR", str(workspace / "sandboxes")))
    if move_share and replicas > 1 and source.resolve_database_target(database_url).kind != "postgresql":
        raise SystemExit("only PostgreSQL replicas share sandboxes, so --move needs DATABASE_URL (and REDIS_URL)")
    started: list[Replica] = []
    try:
        for _ in range(replicas):
            started.append(start_replica(environment, workspace, list(streamlit_flags)))
        return asyncio.run(
            run_class(
                started,
                learners=learners,
                think_seconds=think_seconds,
                ramp_seconds=learners / 10 if ramp_seconds is None else ramp_seconds,
                move_share=move_share,
                browsers=browsers,
                heavy=heavy,
                heavy_kind=heavy_kind,
                database_url=database_url,
                sandbox_directory=sandbox_directory,
            )
        )
    finally:
        for replica in started:
            stop_replica(replica)
        shutil.rmtree(workspace, ignore_errors=True)


def fairness(
    *,
    learners: int = 10,
    heavy: int = 1,
    kinds: tuple[str, ...] = HEAVY_KINDS,
    think_seconds: float = 5.0,
    extra_environment: Optional[dict[str, str]] = None,
    label: str = "",
) -> list[dict[str, Any]]:
    """Walking learners' click p95 with `heavy` learners repeating one long experiment ÷ without them.

    One quiet class first, then one class per kind of heavy experiment, all in this run: one row
    per kind (the ratio), with the quiet p95, each loaded p95 and the machine's load beside it.
    """
    options: dict[str, Any] = dict(learners=learners, think_seconds=think_seconds, extra_environment=extra_environment)
    quiet = measure(**options).walking_click_p95() or 0.0
    rows = [result("classroom", f"fairness{label}: {learners} learners' click p95, quiet", quiet * 1000, unit="ms")]
    for kind in kinds:
        loaded_report = measure(heavy=heavy, heavy_kind=kind, **options)
        loaded = loaded_report.walking_click_p95() or 0.0
        heavy_clicks = [c for r in loaded_report.reports if r.heavy for c in r.clicks]
        heavy_errors = sum(len(r.errors) for r in loaded_report.reports if r.heavy)
        rows.append(result(
            "classroom", f"fairness{label}: click p95 beside {heavy} × {kind} ÷ quiet", loaded / quiet if quiet else float("inf"),
            target="≤ 2×", met=bool(quiet) and loaded / quiet <= 2,
        ))  # fmt: skip
        rows.append(result(
            "classroom", f"fairness{label}: {kind}: loaded p95 · heavy clicks · heavy errors", loaded * 1000,
            unit=f"ms · {len(heavy_clicks)} · {heavy_errors}",
        ))  # fmt: skip
    rows.append(result("classroom", "fairness: machine load (1-min average) at the end", os.getloadavg()[0], unit=""))
    return rows


def main() -> list[dict[str, Any]]:
    """For bench/run_all.py: 30 and 100 learners on one process; two replicas on PostgreSQL."""
    rows: list[dict[str, Any]] = []
    for learners in (30, 100):
        rows += measure(learners=learners, browsers=2 if learners == 30 else 0).rows(f"{learners} learners")
    rows += fairness()
    if source.resolve_database_target(os.environ.get("DATABASE_URL", "").strip() or None).kind == "postgresql":
        rows += measure(learners=60, replicas=2, move_share=0.3).rows("60 learners, 2 replicas, 30% moved")
    print_table(rows)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--learners", type=int, default=30)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--think", type=float, default=5.0, help="mean seconds between a learner's clicks")
    parser.add_argument("--ramp", type=float, default=None, help="seconds over which learners arrive (default N/10)")
    parser.add_argument("--move", type=float, default=0.0, help="share of learners moved to the other replica")
    parser.add_argument("--browsers", type=int, default=0, help="real Chromium learners walking at the same time")
    parser.add_argument("--heavy", type=int, default=0, help="learners running the long experiments meanwhile")
    parser.add_argument("--fairness", action="store_true", help="measure walking learners' p95 with and without --heavy")
    parser.add_argument("--kind", action="append", choices=HEAVY_KINDS, default=[],
                        help="heavy experiment(s) for --heavy / --fairness (repeatable; --fairness: all by default)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V[,K=V]",
                        help="--fairness: repeat the whole measurement with these environment variables (repeatable)")
    parser.add_argument("--flag", action="append", default=[], help="extra `streamlit run` flag, e.g. --flag=--runner.postScriptGC=true")
    arguments = parser.parse_args()
    if arguments.fairness:
        kinds = tuple(arguments.kind) or HEAVY_KINDS
        print(f"load average before: {os.getloadavg()}")
        rows = []
        for variant in arguments.env or [""]:  # each --env: a whole fairness run with that setting, in this run
            environment = dict(pair.split("=", 1) for pair in variant.split(",") if pair)
            rows += fairness(learners=arguments.learners, heavy=max(1, arguments.heavy), kinds=kinds,
                             think_seconds=arguments.think, extra_environment=environment,
                             label=f" ({variant})" if variant else "")  # fmt: skip
        print_table(rows)
        raise SystemExit(0)
    report = measure(
        learners=arguments.learners,
        replicas=arguments.replicas,
        think_seconds=arguments.think,
        ramp_seconds=arguments.ramp,
        move_share=arguments.move,
        browsers=arguments.browsers,
        heavy=arguments.heavy,
        heavy_kind=(arguments.kind or ["strategies"])[0],
        streamlit_flags=tuple(arguments.flag),
    )
    print_table(report.rows(f"{arguments.learners} learners"))
    for learner in report.reports:
        for error in learner.errors[:3]:
            print(f"learner {learner.number} ({learner.sandbox_id}): {error[:300]}")
