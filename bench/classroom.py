"""A class in a box: N learners walk the codelab at once against a real `streamlit run app.py`.

Each simulated learner (bench/learners.py) speaks Streamlit's own websocket protocol
(`/_stcore/stream`, the `BackMsg` / `ForwardMsg` protobuf classes that ship with Streamlit), as a
browser tab does: it opens the app, changes pages by their script hash, and presses the real
buttons by the widget ids the server sent, with a think time between clicks. Its walk follows
the user guide:

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
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from benchtools import (  # puts the project first on sys.path
    PROJECT_ROOT,
    import_bench_module,
    print_table,
    python_speed_ms,
    result,
)
from learners import (
    HEAVY_KINDS,
    LearnerReport,
    Replica,
    SimulatedLearner,
    browser_walk,
    start_replica,
    stop_replica,
)
from rows_lost import rows_lost

from classroom.config import resolve_database_target

sys.path.insert(0, str(PROJECT_ROOT / "deploy"))
from serve import SERVER_COOKIE, serve_class  # noqa: E402  (deploy/serve.py)

rerun_cost = import_bench_module("rerun_cost")
CLICK_KINDS = ("demo click", "navigation", "first render")
PRE_CLASS_SANDBOXES = 30  # the walks measured before the class open about 22 sandboxes

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
    # ms of server CPU per kind for one learner alone before the class, and a trivial rerun's
    click_costs: dict[str, float] = field(default_factory=dict)
    # --kill-at: the learners on the killed process, and each one's seconds from the kill until
    # it saw its page again (None: never)
    killed_learners: int = 0
    recovery_seconds: tuple[Optional[float], ...] = ()

    def percentile(self, values: list[float], share: float) -> Optional[float]:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]

    def walking_click_p95(self) -> Optional[float]:
        """p95 click round trip of the learners walking the guide (the heavy ones left out)."""
        return self.percentile(
            [c for r in self.reports if r.number >= 0 and not r.heavy for c in r.clicks], 0.95
        )

    def rows(self, label: str) -> list[dict[str, Any]]:
        simulated = [r for r in self.reports if r.number >= 0 and not r.heavy]
        clicks = [c for r in simulated for c in r.clicks]
        every_click = (
            len(clicks)
            + sum(len(r.clicks) + 1 for r in self.reports if r.number < 0)
            + len(simulated)
        )
        renders = [r.first_render for r in simulated if r.first_render is not None]
        errors = sum(len(r.errors) for r in self.reports if not r.turned_away)
        turned_away = sum(r.turned_away for r in self.reports)
        admitted = max(1, len(self.reports) - turned_away)
        browsers = [r for r in self.reports if r.number < 0]
        bench = "classroom"
        cpu_per_click_ms = 1000 * self.server_cpu_seconds / max(1, every_click)
        speeds = " → ".join(f"{v:.0f}" for v in self.python_speed_ms)
        rss_per_learner_mb = (self.rss_after_kb - self.rss_before_kb) / 1024 / admitted
        rows = [
            result(bench, f"{label}: click p50", self.percentile(clicks, 0.5) or 0, unit="s"),
            result(bench, f"{label}: click p95", self.percentile(clicks, 0.95) or 0, unit="s",
                   target="≤ 0.25 s: 200 on one process; ≤ 1 s: 400 on two"),
            result(bench, f"{label}: first render p95", self.percentile(renders, 0.95) or 0,
                   unit="s", target="≤ 1 s: 200 on one process; ≤ 2 s: 400 on two"),
            result(bench, f"{label}: errors (connected learners)", errors, unit="", target="0",
                   met=errors == 0),
            result(bench, f"{label}: rows lost", self.lost, unit="", target="0",
                   met=self.lost == 0),
            result(bench, f"{label}: turned away (class full)", turned_away, unit=""),
            result(bench, f"{label}: server CPU per click", cpu_per_click_ms, unit="ms"),
            result(bench, f"{label}: this machine's speed, a fixed Python workload before → after "
                   "(ms of CPU)", max(self.python_speed_ms), unit=f"ms ({speeds})"),
            result(bench, f"{label}: server CPU share of one core",
                   self.server_cpu_seconds / self.seconds, unit="cores"),
            result(bench, f"{label}: load generator CPU share",
                   self.client_cpu_seconds / self.seconds, unit="cores"),
            result(bench, f"{label}: RSS per admitted learner", rss_per_learner_mb, unit="MB"),
            result(bench, f"{label}: server threads before → peak", self.threads_peak,
                   unit=f"(from {self.threads_before})"),
        ]  # fmt: skip
        trivial = self.click_costs.get("trivial")
        for kind in CLICK_KINDS if trivial else ():
            rows.append(result(
                bench, f"{label}: {kind}, one learner alone before the class: server CPU "
                f"({self.click_costs[kind]:.1f} ms) ÷ a trivial page's rerun ({trivial:.1f} ms)",
                self.click_costs[kind] / trivial,
            ))  # fmt: skip
        if self.killed_learners:
            back = [seconds for seconds in self.recovery_seconds if seconds is not None]
            slowest = max(back) if len(back) == self.killed_learners else float("inf")
            interrupted = sum(r.interrupted for r in self.reports)
            rows += [
                result(bench, f"{label}: learners of the killed process back on their page",
                       len(back), unit=f"of {self.killed_learners}",
                       met=len(back) == self.killed_learners),
                result(bench, f"{label}: slowest of them back, seconds after the kill", slowest,
                       unit="s", target="≤ 10 s", met=slowest <= 10),
                result(bench, f"{label}: clicks whose answer died with the process", interrupted,
                       unit=""),
            ]  # fmt: skip
        if browsers:
            ok = sum(not r.errors for r in browsers)
            rows.append(result(bench, f"{label}: Chromium learners with no error", ok,
                               unit=f"of {len(browsers)}", met=ok == len(browsers)))  # fmt: skip
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
    front: Optional[Replica] = None,
    kill: Optional[tuple[float, Any]] = None,
) -> ClassReport:
    """One class. Learners open `replicas` in turn, or all open `front` (HAProxy) when given;
    kill = (seconds after the start, a callable that kills the first process) kills it then."""
    rng = random.Random(seed)
    for (
        replica
    ) in replicas:  # one learner first, not counted: imports and first compiles are not per learner
        await SimulatedLearner(-100, replica).walk(
            think_seconds=0.0, other_replica=None, rng=random.Random(seed)
        )
    speed_before = python_speed_ms()
    before = [replica.proc_status() for replica in replicas]
    last_seen = list(before)  # a killed process keeps its last reading
    peak_threads = [status["threads"] for status in before]

    def status_of(index: int) -> dict[str, float]:
        try:
            last_seen[index] = replicas[index].proc_status()
        except (OSError, ValueError, KeyError):
            pass
        return last_seen[index]

    client_before = resource.getrusage(resource.RUSAGE_SELF)
    stop_sampling = asyncio.Event()

    async def sample_threads() -> None:
        while not stop_sampling.is_set():
            for index in range(len(replicas)):
                peak_threads[index] = max(peak_threads[index], status_of(index)["threads"])
            await asyncio.sleep(1)

    simulated = [
        SimulatedLearner(number, front, reconnects=True)
        if front is not None
        else SimulatedLearner(number, replicas[number % len(replicas)])
        for number in range(learners)
    ]
    victims: list[SimulatedLearner] = []
    killed_at: list[float] = []

    async def kill_one_process() -> None:
        assert kill is not None
        await asyncio.sleep(kill[0])
        victims.extend(
            learner
            for learner in simulated
            if learner.socket is not None
            and not learner.closing
            and learner.cookies.get(SERVER_COOKIE) == "app1"
        )
        killed_at.append(time.monotonic())
        await asyncio.to_thread(kill[1])

    browser_reports: list[LearnerReport] = []
    browser_thread = threading.Thread(
        target=browser_walk, args=(replicas[0], browsers, browser_reports), daemon=True
    )
    started = time.perf_counter()
    sampler = asyncio.create_task(sample_threads())
    killer = asyncio.create_task(kill_one_process()) if kill is not None else None
    if browsers:
        browser_thread.start()

    async def start(learner: SimulatedLearner, delay: float) -> None:
        await asyncio.sleep(delay)
        moves = len(replicas) > 1 and rng.random() < move_share
        other = replicas[(learner.report.number + 1) % len(replicas)] if moves else None
        await learner.walk(
            think_seconds=think_seconds, other_replica=other, rng=random.Random(rng.random())
        )

    walks_done = asyncio.Event()
    heavy_learners = [SimulatedLearner(learners + number, replicas[0]) for number in range(heavy)]
    experiments = [
        asyncio.create_task(learner.experiment_until(walks_done, heavy_kind))
        for learner in heavy_learners
    ]
    await asyncio.gather(
        *(
            start(learner, ramp_seconds * i / max(1, learners))
            for i, learner in enumerate(simulated)
        )
    )
    walks_done.set()
    await asyncio.gather(*experiments)
    simulated += heavy_learners
    if browsers:
        await asyncio.to_thread(browser_thread.join, 600)
    seconds = time.perf_counter() - started
    stop_sampling.set()
    await sampler
    if killer is not None:
        killer.cancel()
    after = [status_of(index) for index in range(len(replicas))]
    client_after = resource.getrusage(resource.RUSAGE_SELF)
    speed_after = python_speed_ms()
    reports = [learner.report for learner in simulated] + browser_reports
    lost = 0
    for report in reports:
        lost += await asyncio.to_thread(
            rows_lost, report, database_url=database_url, sandbox_directory=sandbox_directory
        )
    return ClassReport(
        learners=learners,
        replicas=len(replicas),
        reports=reports,
        lost=lost,
        seconds=seconds,
        server_cpu_seconds=sum(
            a["cpu_seconds"] - b["cpu_seconds"] for a, b in zip(after, before, strict=True)
        ),
        client_cpu_seconds=(client_after.ru_utime + client_after.ru_stime)
        - (client_before.ru_utime + client_before.ru_stime),
        rss_before_kb=sum(status["rss_kb"] for status in before),
        rss_after_kb=sum(status["rss_kb"] for status in after),
        threads_before=sum(status["threads"] for status in before),
        threads_peak=sum(peak_threads),
        python_speed_ms=(speed_before, speed_after),
        killed_learners=len(victims),
        recovery_seconds=tuple(_back_after(learner, killed_at[0]) for learner in victims),
    )


def _back_after(learner: SimulatedLearner, killed_at: float) -> Optional[float]:
    """Seconds from the kill until the learner saw its page again (None if it never did)."""
    back = [at for lost, at in learner.report.recoveries if lost >= killed_at]
    return min(back) - killed_at if back else None


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
    haproxy: bool = False,
    kill_at: Optional[float] = None,
) -> ClassReport:
    """Start the app (N replicas, behind HAProxy with haproxy=True), run one class through it,
    stop it; return the report. kill_at: SIGKILL the first process that many seconds in."""
    workspace = Path(tempfile.mkdtemp(prefix="qulab-classroom-"))
    environment = dict(os.environ, **(extra_environment or {}))
    # Room for every learner and the walks measured before the class (their sessions stay
    # held until Streamlit lets go of the closed tabs): the class measures speed, not admission
    # (QULAB_MAX_SANDBOXES=10 with more learners measures that).
    environment.setdefault("QULAB_MAX_SANDBOXES", str(learners + PRE_CLASS_SANDBOXES))
    database_url = environment.get("DATABASE_URL", "").strip() or None
    sandbox_directory = Path(
        environment.setdefault("QULAB_SANDBOX_DIR", str(workspace / "sandboxes"))
    )
    shared = resolve_database_target(database_url).kind == "postgresql"
    if move_share and replicas > 1 and not shared:
        raise SystemExit(
            "only PostgreSQL replicas share sandboxes, so --move needs DATABASE_URL (and REDIS_URL)"
        )
    if kill_at is not None and not haproxy:
        raise SystemExit("--kill-at kills a process behind HAProxy: add --haproxy")
    options: dict[str, Any] = dict(
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
    try:
        if haproxy:
            with serve_class(replicas, environment=environment) as servers:
                apps = [
                    Replica(port, process, servers.workspace / f"app{number}.log")
                    for number, (port, process) in enumerate(
                        zip(servers.app_ports, servers.apps, strict=True), start=1
                    )
                ]
                front = Replica(servers.port, servers.haproxy, servers.workspace / "haproxy.log")
                kill = (kill_at, lambda: servers.kill_app(1)) if kill_at is not None else None
                costs = click_costs(apps[0], workspace, environment)
                report = asyncio.run(run_class(apps, front=front, kill=kill, **options))
                report.click_costs = costs
                return report
        started: list[Replica] = []
        try:
            for _ in range(replicas):
                started.append(start_replica(environment, workspace, list(streamlit_flags)))
            costs = click_costs(started[0], workspace, environment)
            report = asyncio.run(run_class(started, **options))
            report.click_costs = costs
            return report
        finally:
            for replica in started:
                stop_replica(replica)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def click_costs(replica: Replica, workspace: Path, environment: dict[str, str]) -> dict[str, float]:
    """Before the class: server CPU (ms) per kind of interaction for one learner walking the guide
    alone (bench/rerun_cost.py's walk: demo click, navigation, first render; medians), and a
    trivial 3-line page's bare rerun in a server of its own, measured right after."""
    asyncio.run(rerun_cost._walk_costs(replica))  # warm: the first walk compiles and imports
    walk = asyncio.run(rerun_cost._walk_costs(replica))
    trivial = rerun_cost._serve_script(rerun_cost.TRIVIAL_PAGE, "trivial", workspace, environment)
    try:
        trivial_seconds = asyncio.run(rerun_cost._measure_static(trivial, 30))[0]
    finally:
        stop_replica(trivial)
    costs = {kind: statistics.median(walk[kind].values()) * 1000 for kind in CLICK_KINDS}
    return {**costs, "trivial": trivial_seconds * 1000}


def fairness(
    *,
    learners: int = 10,
    heavy: int = 1,
    kinds: tuple[str, ...] = HEAVY_KINDS,
    think_seconds: float = 5.0,
    extra_environment: Optional[dict[str, str]] = None,
    label: str = "",
) -> list[dict[str, Any]]:
    """Walking learners' click p95 with `heavy` learners repeating a long experiment ÷ without.

    One quiet class first, then one class per kind of heavy experiment, all in this run: one row
    per kind (the ratio), with the quiet p95, each loaded p95 and the machine's load beside it.
    """
    options: dict[str, Any] = dict(
        learners=learners, think_seconds=think_seconds, extra_environment=extra_environment
    )
    quiet = measure(**options).walking_click_p95() or 0.0
    rows = [
        result(
            "classroom",
            f"fairness{label}: {learners} learners' click p95, quiet",
            quiet * 1000,
            unit="ms",
        )
    ]
    for kind in kinds:
        loaded_report = measure(heavy=heavy, heavy_kind=kind, **options)
        loaded = loaded_report.walking_click_p95() or 0.0
        heavy_clicks = [c for r in loaded_report.reports if r.heavy for c in r.clicks]
        heavy_errors = sum(len(r.errors) for r in loaded_report.reports if r.heavy)
        ratio = loaded / quiet if quiet else float("inf")
        rows.append(result(
            "classroom", f"fairness{label}: click p95 beside {heavy} × {kind} ÷ quiet", ratio,
            target="≤ 2×", met=bool(quiet) and loaded / quiet <= 2,
        ))  # fmt: skip
        rows.append(result(
            "classroom", f"fairness{label}: {kind}: loaded p95 · heavy clicks · heavy errors",
            loaded * 1000, unit=f"ms · {len(heavy_clicks)} · {heavy_errors}",
        ))  # fmt: skip
    rows.append(
        result(
            "classroom",
            "fairness: machine load (1-min average) at the end",
            os.getloadavg()[0],
            unit="",
        )
    )
    return rows


def main() -> list[dict[str, Any]]:
    """For bench/run_all.py: 30 and 100 learners on one process; two replicas on PostgreSQL."""
    rows: list[dict[str, Any]] = []
    for learners in (30, 100):
        rows += measure(learners=learners, browsers=2 if learners == 30 else 0).rows(
            f"{learners} learners"
        )
    rows += fairness()
    if (
        resolve_database_target(os.environ.get("DATABASE_URL", "").strip() or None).kind
        == "postgresql"
    ):
        rows += measure(learners=60, replicas=2, move_share=0.3).rows(
            "60 learners, 2 replicas, 30% moved"
        )
    print_table(rows)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--learners", type=int, default=30)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument(
        "--think", type=float, default=5.0, help="mean seconds between a learner's clicks"
    )
    parser.add_argument(
        "--ramp", type=float, default=None, help="seconds over which learners arrive (default N/10)"
    )
    parser.add_argument(
        "--move", type=float, default=0.0, help="share of learners moved to the other replica"
    )
    parser.add_argument(
        "--browsers", type=int, default=0, help="real Chromium learners walking at the same time"
    )
    parser.add_argument(
        "--heavy", type=int, default=0, help="learners running the long experiments meanwhile"
    )
    parser.add_argument(
        "--fairness",
        action="store_true",
        help="measure walking learners' p95 with and without --heavy",
    )
    parser.add_argument(
        "--kind",
        action="append",
        choices=HEAVY_KINDS,
        default=[],
        help="heavy experiment(s) for --heavy / --fairness (repeatable; --fairness: all by "
        "default)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="--fairness: repeat the whole measurement with these environment variables "
        "(repeatable)",
    )
    parser.add_argument(
        "--haproxy",
        action="store_true",
        help="put the --replicas processes behind HAProxy (deploy/serve.py); learners open it",
    )
    parser.add_argument(
        "--kill-at",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --haproxy: SIGKILL the first process this long after the class starts",
    )
    parser.add_argument(
        "--flag",
        action="append",
        default=[],
        help="extra `streamlit run` flag, e.g. --flag=--runner.postScriptGC=true",
    )
    arguments = parser.parse_args()
    if arguments.fairness:
        kinds = tuple(arguments.kind) or HEAVY_KINDS
        print(f"load average before: {os.getloadavg()}")
        rows = []
        # Each --env: a whole fairness run with that setting, in this run.
        for variant in arguments.env or [""]:
            environment = dict(pair.split("=", 1) for pair in variant.split(",") if pair)
            rows += fairness(
                learners=arguments.learners,
                heavy=max(1, arguments.heavy),
                kinds=kinds,
                think_seconds=arguments.think,
                extra_environment=environment,
                label=f" ({variant})" if variant else "",
            )
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
        haproxy=arguments.haproxy,
        kill_at=arguments.kill_at,
    )
    print_table(report.rows(f"{arguments.learners} learners"))
    for learner in report.reports:
        for error in learner.errors[:3]:
            print(f"learner {learner.number} ({learner.sandbox_id}): {error[:300]}")
