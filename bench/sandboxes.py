"""What one sandbox costs awake and dormant, and whether one learner's experiment stalls others.

Measured in this process, on the backend DATABASE_URL names (embedded SQLite by default):

- RSS and threads per sandbox: N learners (Labs) initialize their sandboxes and read once; then
  they close their Labs and the lifecycle puts every sandbox to sleep. Per sandbox =
  (value with N − value with 0) ÷ N, after a full garbage collection, and for threads once the
  shared SQLite workers the sleeps started have ended (their idle time, 30 s); how many the
  sleeps started is reported beside it.
- The WAL a 500-write burst leaves in RAM (/dev/shm), and what is left once the sandbox went
  dormant (its checkpoint truncates the WAL).
- pool_pre_ping on a SQLite sandbox: one checkout + SELECT 1 with pre-ping ÷ without.
- Fairness: one learner's list_users p95 during another's pool experiment at its maximum ÷ the
  same p95 with nobody else busy, over interleaved rounds; on PostgreSQL also with NullPool's
  connections opened all at once (as before), a control with no QuLab code, and what opening
  them one at a time costs NullPool's throughput. bench/classroom.py --fairness measures every
  long experiment through the real app.

    python3 bench/sandboxes.py [--learners 50] [--fairness]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from benchtools import print_table, result, spread_result

import classroom.sqlite
import source
from classroom.config import Settings
from classroom.demos import eventing
from classroom.demos.pooling import (
    MAX_POOL_EXPERIMENT_REQUESTS,
    POSTGRESQL_OPENS_AT_ONCE,
    compare_pooling_on,
)
from classroom.engines import open_engine
from classroom.experiments import run_experiment_elsewhere
from classroom.runtime import Runtime
from classroom.sandboxes.lifecycle import still_going_dormant
from classroom.sandboxes.reset import initialize_sandbox
from classroom.sandboxes.sandbox import Sandbox, new_sandbox_id
from classroom.worker import NICENESS

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident memory of this process, in MB (from /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE / 1e6


def settled() -> tuple[float, int]:
    """(RSS MB, threads) once collections and closing driver threads have settled."""
    for _ in range(3):
        gc.collect()
        time.sleep(0.2)
    return rss_mb(), threading.active_count()


def wait_until(condition: Any, *, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def footprint(runtime: Runtime, learners: int) -> list[dict[str, Any]]:
    warm = runtime.lab(new_sandbox_id())  # imports, compiled statements, caches: not per sandbox
    warm.run(initialize_sandbox)
    warm.run(source.list_users)
    rss_0, threads_0 = settled()
    workers = classroom.sqlite.shared_workers()
    workers_at_rest = workers.threads
    labs = [runtime.lab(new_sandbox_id()) for _ in range(learners)]
    for lab in labs:
        lab.run(initialize_sandbox)
        lab.run(source.list_users)
    rss_awake, threads_awake = settled()
    workers_before, workers.peak_threads = workers.threads, workers.threads
    for lab in labs:
        lab.close()  # the class leaves together: one sweep sends every sandbox to sleep
    registry = runtime.sandboxes
    wait_until(lambda: all(not registry.get_existing(lab.sandbox_id).awake for lab in labs))
    workers_started = workers.peak_threads - workers_before
    # At rest: shared SQLite workers started meanwhile end after their idle time.
    wait_until(lambda: workers.threads <= workers_at_rest, seconds=workers.idle_seconds + 10)
    rss_dormant, threads_dormant = settled()
    backend = registry.backend
    awake_mb, dormant_mb = (rss_awake - rss_0) / learners, (rss_dormant - rss_0) / learners
    awake_threads = (threads_awake - threads_0) / learners
    dormant_threads = (threads_dormant - threads_0) / learners
    return [
        result("sandboxes", f"RSS per awake sandbox ({learners}, {backend})", awake_mb, unit="MB"),
        result("sandboxes", f"threads per awake sandbox ({backend})", awake_threads, unit=""),
        result(
            "sandboxes", f"RSS per dormant sandbox ({learners}, {backend})", dormant_mb,
            unit="MB", target="≤ 1 MB", met=dormant_mb <= 1,
        ),
        result(
            "sandboxes", f"threads per dormant sandbox, at rest ({backend})", dormant_threads,
            unit="", target="0", met=threads_dormant <= threads_0,
        ),
        result(
            "sandboxes", f"shared SQLite workers started while {learners} went to sleep at once",
            workers_started, unit="",
        ),
    ]  # fmt: skip


def wal_after_burst(runtime: Runtime) -> list[dict[str, Any]]:
    """Section 5's burst of 500 scores with the publisher on, as a connected learner makes it:
    the sandbox's files in RAM once every event is delivered and one lifecycle pass ran (the
    learner is still there, so the sandbox stays awake), then once it went dormant."""
    if runtime.sandboxes.backend != "sqlite":
        return []
    lab = runtime.lab(new_sandbox_id())
    lab.run(initialize_sandbox)
    lab.run(eventing.start_event_publisher)
    lab.run(eventing.store_airscore_burst, count=500, timeout=600)
    wait_until(lambda: lab.run(eventing.outbox_status).delivered >= 500, seconds=120)
    location = runtime.sandboxes.get_existing(lab.sandbox_id).location

    def files_mb(suffixes: tuple[str, ...] = ("", "-wal", "-shm")) -> float:
        paths = [Path(location + suffix) for suffix in suffixes]
        return sum(path.stat().st_size for path in paths if path.exists()) / 1e6

    before_pass_mb, wal_before_mb = files_mb(), files_mb(("-wal",))
    runtime.run(runtime.sandboxes.sweep())  # the runtime's lifecycle pass, every 15 s or less
    awake_mb = files_mb()
    lab.close()
    sandbox = runtime.sandboxes.get_existing(lab.sandbox_id)
    wait_until(lambda: not sandbox.awake and not still_going_dormant(sandbox), seconds=120)
    dormant_mb = files_mb()
    return [
        result(
            "sandboxes",
            "files of an awake sandbox after a 500-write burst with the publisher on, "
            f"before the next lifecycle pass (WAL {wal_before_mb:.2f} MB)",
            before_pass_mb,
            unit="MB",
        ),
        result(
            "sandboxes",
            "the same after the lifecycle pass (it trims the WAL of a sandbox at rest)",
            awake_mb,
            unit="MB",
            target="≤ 1 MB",
            met=awake_mb <= 1,
        ),
        result(
            "sandboxes",
            "the same once dormant (checkpointed)",
            dormant_mb,
            unit="MB",
            target="≤ 1 MB",
            met=dormant_mb <= 1,
        ),
    ]


def pre_ping_cost(runtime: Runtime) -> list[dict[str, Any]]:
    if runtime.sandboxes.backend != "sqlite":
        return []
    lab = runtime.lab(new_sandbox_id())

    async def checkouts(sandbox: Sandbox, *, pre_ping: bool) -> float:
        engine = open_engine(sandbox.engine.url, sandbox.settings, pre_ping=pre_ping)
        try:
            async with engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")
            started = time.perf_counter()
            for _ in range(1000):
                async with engine.connect() as connection:
                    await connection.exec_driver_sql("SELECT 1")
            return time.perf_counter() - started
        finally:
            await engine.dispose()

    without = lab.run(checkouts, pre_ping=False)
    with_ping = lab.run(checkouts, pre_ping=True)
    return [result("sandboxes", "SQLite checkout + SELECT 1: pre-ping ÷ none", with_ping / without)]


FAIRNESS_ROUNDS = 5


def fairness(runtime: Runtime, rounds: int = FAIRNESS_ROUNDS) -> list[dict[str, Any]]:
    """Another learner's list_users p95 during one pool experiment at its maximum ÷ quiet.

    Each round, in turn (the order reversed every other round): a quiet window; QuLab's
    experiment as the page runs it; and on PostgreSQL two more, the experiment with NullPool's
    connections opened all at once (as before the gate) and a control with no QuLab code (bare
    asyncpg, at the experiment process's nice level, the same queries, one connection opened at
    a time). The walker clicks during the whole of each run.
    """
    walker, heavy = runtime.lab(new_sandbox_id()), runtime.lab(new_sandbox_id())
    walker.run(initialize_sandbox)
    heavy.run(initialize_sandbox)
    maximum = {"requests": MAX_POOL_EXPERIMENT_REQUESTS, "concurrency": 50, "pool_size": 50}

    async def where(sandbox: Sandbox) -> tuple[str, Any, str]:
        return sandbox.backend, sandbox.engine.url, sandbox.location

    backend, heavy_url, heavy_schema = heavy.run(where)
    postgresql = backend == "postgresql"

    def walker_p95(busy: Optional[threading.Thread] = None, seconds: float = 3.0) -> float:
        """The walker's p95 while `busy` runs (at least 2 s of it), else over `seconds`."""
        latencies = []
        started_all = time.monotonic()
        if busy is not None:
            busy.start()
        while True:
            elapsed = time.monotonic() - started_all
            if busy is None and elapsed >= seconds:
                break
            if busy is not None and not busy.is_alive() and elapsed >= 2.0:
                break
            started = time.perf_counter()
            walker.run(source.list_users)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)  # a learner's pause between clicks: the load, not a wait
        if busy is not None:
            busy.join()
        return statistics.quantiles(latencies, n=20)[-1]

    throughput: dict[str, list[float]] = {"gated": [], "all at once": []}

    def experiment(opens_at_once: Optional[int], kind: str) -> threading.Thread:
        async def run(sandbox: Sandbox) -> None:
            translate = sandbox.engine.get_execution_options().get("schema_translate_map")
            (trials, _), _ = await run_experiment_elsewhere(
                compare_pooling_on, url=sandbox.engine.url, settings=sandbox.settings,
                translate=translate, opens_at_once=opens_at_once, **maximum,
            )  # fmt: skip
            throughput[kind].append(trials[1].throughput)

        return threading.Thread(target=heavy.run, args=(run,))

    def control() -> threading.Thread:
        def run() -> None:
            dsn = heavy_url.set(drivername="postgresql").render_as_string(hide_password=False)
            environment = {**os.environ, "QULAB_BENCH_DSN": dsn, "QULAB_BENCH_SCHEMA": heavy_schema}
            command = ["nice", "-n", str(NICENESS), sys.executable, __file__, "--bare-pool"]
            subprocess.run(command, env=environment, check=True)

        return threading.Thread(target=run)

    variants: dict[str, Callable[[], Optional[threading.Thread]]] = {
        "quiet": lambda: None,
        "QuLab": lambda: experiment(POSTGRESQL_OPENS_AT_ONCE, "gated"),
    }
    if postgresql:
        variants["all at once"] = lambda: experiment(None, "all at once")
        variants["control"] = control
    p95s: dict[str, list[float]] = {name: [] for name in variants}
    for round_number in range(rounds):
        order = list(variants) if round_number % 2 == 0 else list(reversed(variants))
        for name in order:
            p95s[name].append(walker_p95(variants[name]()))

    def over_quiet(name: str) -> list[float]:
        return [busy / calm for busy, calm in zip(p95s[name], p95s["quiet"], strict=True)]

    quiet = statistics.median(p95s["quiet"])
    rows = [
        result("sandboxes", "list_users p95 quiet (median of rounds)", quiet * 1000, unit="ms"),
        spread_result(
            "sandboxes", "list_users p95 during a max pool experiment ÷ quiet",
            over_quiet("QuLab"), target=2,
        ),
    ]  # fmt: skip
    if postgresql:
        rows += [
            spread_result(
                "sandboxes", "same, NullPool's connections opened all at once (before) ÷ quiet",
                over_quiet("all at once"),
            ),
            spread_result(
                "sandboxes", "control: bare asyncpg, same queries, nice 10, no QuLab code ÷ quiet",
                over_quiet("control"),
            ),
            spread_result(
                "sandboxes", "QuLab's experiment ÷ the control (QuLab's part of that p95)",
                [ours / bare for ours, bare in zip(p95s["QuLab"], p95s["control"], strict=True)],
            ),
            spread_result(
                "sandboxes", "NullPool throughput, one connection opened at a time ÷ all at once",
                [one / free for one, free in zip(*throughput.values(), strict=True)],
            ),
        ]  # fmt: skip
    return rows


def bare_pool_workload() -> None:
    """The control: the experiment's queries on bare asyncpg (DSN, schema in the environment)."""
    import asyncpg

    dsn, schema = os.environ["QULAB_BENCH_DSN"], os.environ["QULAB_BENCH_SCHEMA"]
    query = f'SELECT count(*) FROM "{schema}".users'
    requests, concurrency = MAX_POOL_EXPERIMENT_REQUESTS, 50

    async def workload() -> None:
        pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)

        async def pooled() -> None:
            async with pool.acquire() as connection:
                await connection.fetchval(query)

        await asyncio.gather(*(pooled() for _ in range(requests)))
        await pool.close()
        in_flight, opening = asyncio.Semaphore(concurrency), asyncio.Semaphore(1)

        async def unpooled() -> None:
            async with in_flight:
                async with opening:
                    connection = await asyncpg.connect(dsn)
                try:
                    await connection.fetchval(query)
                finally:
                    await connection.close()

        await asyncio.gather(*(unpooled() for _ in range(requests)))

    asyncio.run(workload())


def main(learners: int = 50) -> list[dict[str, Any]]:
    """For bench/run_all.py: footprint, WAL, pre-ping and fairness on the configured backend."""
    settings = Settings.from_environment()
    most = max(200, learners + 10)
    settings = Settings(**{**settings.__dict__, "sandbox_grace_seconds": 0, "max_sandboxes": most})
    runtime = Runtime(settings)
    try:
        rows = (
            footprint(runtime, learners)
            + wal_after_burst(runtime)
            + pre_ping_cost(runtime)
            + fairness(runtime)
        )
    finally:
        runtime.close()
    load = os.getloadavg()[0]
    rows.append(result("sandboxes", "machine load (1-min average) during the run", load, unit=""))
    print_table(rows)
    return rows


def fairness_only() -> list[dict[str, Any]]:
    """--fairness: the fairness rounds alone."""
    settings = Settings.from_environment()
    runtime = Runtime(Settings(**{**settings.__dict__, "sandbox_grace_seconds": 0}))
    try:
        rows = fairness(runtime)
    finally:
        runtime.close()
    print_table(rows)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--learners", type=int, default=50)
    parser.add_argument("--fairness", action="store_true", help="the fairness rounds alone")
    parser.add_argument("--bare-pool", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.bare_pool:
        bare_pool_workload()
    elif arguments.fairness:
        fairness_only()
    else:
        main(arguments.learners)
