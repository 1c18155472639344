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
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from benchtools import print_table, python_speed_ms, result  # puts the project first on sys.path
from learners import (
    HEAVY_KINDS,
    LearnerReport,
    Replica,
    SimulatedLearner,
    browser_walk,
    start_replica,
    stop_replica,
)

from classroom.config import DatabaseTarget, resolve_database_target

# --------------------------------------------------------------------------------------------
# What each learner must find in its sandbox afterwards
# --------------------------------------------------------------------------------------------


def rows_lost(
    report: LearnerReport, *, database_url: Optional[str], sandbox_directory: Path
) -> int:
    """Rows this learner made that its sandbox no longer has (0 when everything is there)."""
    if not report.sandbox_id or report.turned_away:
        return 0
    queries = {
        "users": "SELECT email FROM {schema}users",
        "airscores": "SELECT count(*) FROM {schema}air_scores",
        "events": (
            "SELECT count(*) FROM {schema}domain_events WHERE event_type = 'AIRScoreCalculated'"
        ),
    }
    target = resolve_database_target(database_url)
    try:
        if target.kind == "postgresql":
            found = _query_postgres_each(target, report.sandbox_id, queries)
        else:
            directory = (
                sandbox_directory if target.kind == "embedded" else Path(target.url.database).parent
            )
            files = [
                path
                for path in directory.glob(f"*{report.sandbox_id}*")
                if path.suffix in {".sqlite3", ".db"}
            ]
            if not files:
                return len(_expected_users(report)) + 2 * report.stores
            with sqlite3.connect(f"file:{files[0]}?mode=ro", uri=True) as connection:
                found = {
                    name: connection.execute(sql.format(schema="")).fetchall()
                    for name, sql in queries.items()
                }
    except Exception as error:  # a missing table is data lost too
        report.errors.append(f"checking rows: {type(error).__name__}: {error}")
        return len(_expected_users(report)) + 2 * report.stores
    emails = {row[0].lower() for row in found["users"]}
    lost = len({email.lower() for email in _expected_users(report)} - emails)
    lost += max(0, report.stores - found["airscores"][0][0]) + max(
        0, report.stores - found["events"][0][0]
    )
    return lost


def _expected_users(report: LearnerReport) -> list[str]:
    sample = ["alex.smith@innovateai.example", "jane.doe@innovateai.example"]
    return sample + (
        [report.email]
        if report.email and not any("Create User" in e for e in report.errors)
        else []
    )


def _query_postgres_each(
    target: DatabaseTarget, sandbox_id: str, queries: dict[str, str]
) -> dict[str, list]:
    import asyncpg

    dsn = target.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def fetch() -> dict[str, list]:
        connection = await asyncpg.connect(dsn)
        try:
            schema = f'"qulab_{sandbox_id}".'
            return {
                name: [tuple(r) for r in await connection.fetch(sql.format(schema=schema))]
                for name, sql in queries.items()
            }
        finally:
            await connection.close()

    return asyncio.run(fetch())


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
                   target="≤ 0.25 s at 100 learners"),
            result(bench, f"{label}: first render p95", self.percentile(renders, 0.95) or 0,
                   unit="s", target="≤ 1 s at 100 learners"),
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
) -> ClassReport:
    rng = random.Random(seed)
    for (
        replica
    ) in replicas:  # one learner first, not counted: imports and first compiles are not per learner
        await SimulatedLearner(-100, replica).walk(
            think_seconds=0.0, other_replica=None, rng=random.Random(seed)
        )
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

    simulated = [
        SimulatedLearner(number, replicas[number % len(replicas)]) for number in range(learners)
    ]
    browser_reports: list[LearnerReport] = []
    browser_thread = threading.Thread(
        target=browser_walk, args=(replicas[0], browsers, browser_reports), daemon=True
    )
    started = time.perf_counter()
    sampler = asyncio.create_task(sample_threads())
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
    after = [replica.proc_status() for replica in replicas]
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
    sandbox_directory = Path(
        environment.setdefault("QULAB_SANDBOX_DIR", str(workspace / "sandboxes"))
    )
    if move_share and replicas > 1 and resolve_database_target(database_url).kind != "postgresql":
        raise SystemExit(
            "only PostgreSQL replicas share sandboxes, so --move needs DATABASE_URL (and REDIS_URL)"
        )
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
    )
    print_table(report.rows(f"{arguments.learners} learners"))
    for learner in report.reports:
        for error in learner.errors[:3]:
            print(f"learner {learner.number} ({learner.sandbox_id}): {error[:300]}")
