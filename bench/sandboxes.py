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
- Fairness: one learner's list_users p95 while another runs the pool experiment at its maximum,
  ÷ the same p95 with nobody else busy; once with the trials in the experiment process (as QuLab
  runs them), once on the shared loop (as before), in the same run. bench/classroom.py --fairness
  measures every long experiment through the real app.

    python3 bench/sandboxes.py [--learners 50]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from benchtools import print_table, result

import classroom.sqlite
import source
from classroom.config import Settings
from classroom.demos import eventing
from classroom.demos.pooling import (
    MAX_POOL_EXPERIMENT_REQUESTS,
    compare_pooling_on,
    run_pool_experiment,
)
from classroom.engines import open_engine
from classroom.runtime import Runtime
from classroom.sandboxes.lifecycle import still_going_dormant
from classroom.sandboxes.reset import initialize_sandbox
from classroom.sandboxes.sandbox import Sandbox, new_sandbox_id

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


def fairness(runtime: Runtime) -> list[dict[str, Any]]:
    walker, heavy = runtime.lab(new_sandbox_id()), runtime.lab(new_sandbox_id())
    walker.run(initialize_sandbox)
    heavy.run(initialize_sandbox)
    maximum = {"requests": MAX_POOL_EXPERIMENT_REQUESTS, "concurrency": 50, "pool_size": 50}

    def walker_p95(seconds: float) -> float:
        latencies = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            walker.run(source.list_users)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        return statistics.quantiles(latencies, n=20)[-1]

    async def trials_on_the_shared_loop(sandbox: Sandbox) -> None:  # how it ran before
        translate = sandbox.engine.get_execution_options().get("schema_translate_map")
        url, settings = sandbox.engine.url, sandbox.settings
        await compare_pooling_on(url=url, settings=settings, translate=translate, **maximum)

    def while_running(experiment: Any, **kwargs: Any) -> float:
        done = threading.Event()

        def loop() -> None:
            while not done.is_set():
                heavy.run(experiment, **kwargs)

        worker = threading.Thread(target=loop)
        worker.start()
        try:
            time.sleep(0.5)
            return walker_p95(8.0)
        finally:
            done.set()
            worker.join()

    quiet = walker_p95(5.0)
    own_loop = while_running(run_pool_experiment, **maximum)
    shared = while_running(trials_on_the_shared_loop)
    return [
        result("sandboxes", "list_users p95 quiet", quiet * 1000, unit="ms"),
        result(
            "sandboxes", "list_users p95 beside a max pool experiment ÷ quiet", own_loop / quiet,
            target="≤ 2×", met=own_loop / quiet <= 2,
        ),
        result("sandboxes", "same, experiment on the shared loop (before) ÷ quiet", shared / quiet),
    ]  # fmt: skip


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--learners", type=int, default=50)
    main(parser.parse_args().learners)
