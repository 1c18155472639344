"""Pooled connections against a new connection per query, through section 2's experiment.

Run: python3 bench/pool.py (on whatever DATABASE_URL / REDIS_URL say), or bench/run_all.py.
The experiment the pooling page runs (classroom.demos.pooling.run_pool_experiment), repeated:
R queries, C in flight, through a warmed pool of P connections and through NullPool. Ratios
are medians over the repeats.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from benchtools import (  # also puts the project on sys.path
    print_table,
    result,
    sandbox_on_configured_backend,
)

import source
from classroom.demos.pooling import run_pool_experiment

REQUESTS = 400
CONCURRENCY = 20
POOL_SIZE = 5
REPEATS = 3
# Opening a connection costs a thread and a file open on SQLite and a TCP handshake plus a
# server process on PostgreSQL: reusing them should at least halve the time on both.
THROUGHPUT_TARGET = 1.5


async def measure(
    *, requests: int, concurrency: int, pool_size: int, repeats: int
) -> list[tuple[source.PoolTrial, source.PoolTrial]]:
    """Run the pooling experiment `repeats` times on one fresh sandbox: (pooled, NullPool) each."""
    async with sandbox_on_configured_backend() as sandbox:
        return [
            (
                await run_pool_experiment(
                    sandbox, requests=requests, concurrency=concurrency, pool_size=pool_size
                )
            ).trials
            for _ in range(repeats)
        ]


def main(
    *,
    requests: int = REQUESTS,
    concurrency: int = CONCURRENCY,
    pool_size: int = POOL_SIZE,
    repeats: int = REPEATS,
) -> list[dict[str, Any]]:
    """Measure pooled vs NullPool throughput and connections opened; print and return the rows."""
    runs = asyncio.run(
        measure(requests=requests, concurrency=concurrency, pool_size=pool_size, repeats=repeats)
    )
    throughput_ratio = statistics.median(
        pooled.throughput / unpooled.throughput for pooled, unpooled in runs
    )
    latency_ratio = statistics.median(
        unpooled.median_latency_ms / pooled.median_latency_ms for pooled, unpooled in runs
    )
    pooled_opened = max(pooled.connections_opened for pooled, _ in runs) / requests
    unpooled_opened = min(unpooled.connections_opened for _, unpooled in runs) / requests
    none_opened, one_each = pooled_opened == 0, unpooled_opened == 1
    setup = f"R={requests}, C={concurrency}, P={pool_size}"
    rows = [
        result(
            "pool",
            f"pooled ÷ NullPool throughput ({setup})",
            throughput_ratio,
            target=f"≥ {THROUGHPUT_TARGET:g}×",
            met=throughput_ratio >= THROUGHPUT_TARGET,
        ),
        result(
            "pool",
            "NullPool ÷ pooled median latency",
            latency_ratio,
            target="> 1×",
            met=latency_ratio > 1,
        ),
        result(
            "pool",
            "connections opened per query, warmed pool",
            pooled_opened,
            unit="",
            target="0",
            met=none_opened,
        ),
        result(
            "pool",
            "connections opened per query, NullPool",
            unpooled_opened,
            unit="",
            target="1",
            met=one_each,
        ),
    ]
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
