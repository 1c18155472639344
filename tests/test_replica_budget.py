"""Replicas count each other on PostgreSQL: nobody meets "sorry, too many clients already".

Two real QuLab processes (tests/sandbox_process.py) share one PostgreSQL at its default
max_connections (100), with QULAB_REPLICAS unset, as an operator who forgot it would run them.
Learners on both press the pool experiment at its maximum together. Every experiment finishes,
and the server never holds more connections than max_connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers

HELPER = Path(__file__).resolve().parent / "sandbox_process.py"
LEARNERS_PER_REPLICA = 3
START_SECONDS = 90.0
EXPERIMENTS_SECONDS = 400.0  # 6 experiments taking turns on a busy 2-core machine


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[str]:
    """A PostgreSQL of this test's own, at its default max_connections: nobody else's clients."""
    with servers.postgres_server() as url:
        yield url


async def _client_connections(url: str, stop: threading.Event, peak: list[int]) -> None:
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        while not stop.is_set():
            now = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            )
            peak[0] = max(peak[0], now)
            await asyncio.sleep(0.005)
    finally:
        await connection.close()


def read_line(process: subprocess.Popen, seconds: float) -> dict:
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    line = process.stdout.readline() if ready else b""
    assert line, f"the replica said nothing within {seconds:g} s"
    return json.loads(line)


def test_two_replicas_left_at_one_count_each_other_and_never_exceed_max_connections(
    own_postgres, tmp_path
):
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DATABASE_URL", "REDIS_URL", "QULAB_REPLICAS"}
    }
    environment["DATABASE_URL"] = own_postgres
    replicas = []
    try:
        for number in (1, 2):
            replicas.append(
                subprocess.Popen(
                    [sys.executable, str(HELPER), "pool", str(LEARNERS_PER_REPLICA)],
                    env=environment,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=(tmp_path / f"replica{number}.log").open("wb"),
                )
            )
        for replica in replicas:
            assert read_line(replica, START_SECONDS)["ready"]

        stop, peak = threading.Event(), [0]
        watcher = threading.Thread(
            target=asyncio.run, args=(_client_connections(own_postgres, stop, peak),)
        )
        watcher.start()
        try:
            for replica in replicas:  # every learner presses the button at once
                replica.stdin.write(b"go\n")
                replica.stdin.flush()
            reports = [read_line(replica, EXPERIMENTS_SECONDS) for replica in replicas]
            for replica in replicas:
                replica.stdin.write(b"stop\n")
                replica.stdin.flush()
        finally:
            stop.set()
            watcher.join(30)

        outcomes = [outcome for report in reports for outcome in report["outcomes"]]
        print(f"peak client connections {peak[0]}; reports {reports}")
        assert [outcome for outcome in outcomes if "error" in outcome] == []  # no too many clients
        assert len(outcomes) == 2 * LEARNERS_PER_REPLICA
        assert all(outcome["connections_opened"] > 0 for outcome in outcomes)
        assert peak[0] <= 100  # the server's default max_connections, which CI keeps
        assert [report["replicas_seen"] for report in reports] == [2, 2]  # not QULAB_REPLICAS
        assert all(report["peak_in_use"] <= report["budget_total"] for report in reports)
    finally:
        for replica in replicas:
            replica.kill()
            replica.wait(30)
