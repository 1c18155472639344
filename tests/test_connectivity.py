"""Section 2's use cases: the engine report and the pooling experiment measure real things."""

import dataclasses

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

import source


async def test_describe_engine_reports_the_live_pool_and_hides_passwords(sandbox):
    report = await source.describe_engine(sandbox)
    assert report.pool["pool_class"] == "AsyncAdaptedQueuePool"
    assert report.pool["checkedout"] == 0
    assert report.backend == sandbox.backend
    async with sandbox.engine.connect():  # the counters are live: one connection out while this block runs
        assert (await source.describe_engine(sandbox)).pool["checkedout"] == 1
    # The same report for an engine whose URL carries a password (a real engine; it connects to nothing).
    engine = create_async_engine("postgresql+asyncpg://alex:s3cr3t-p%40ss@db.example:5432/qulab")
    try:
        report = await source.describe_engine(dataclasses.replace(sandbox, engine=engine))
    finally:
        await engine.dispose()
    assert "s3cr3t" not in report.url and "p@ss" not in report.url and "p%40ss" not in report.url
    assert "alex" in report.url and "db.example:5432/qulab" in report.url


async def test_pool_experiment_reuses_connections_and_nullpool_opens_one_per_query(sandbox_with_users):
    pooled, unpooled = await source.run_pool_experiment(sandbox_with_users, requests=40, concurrency=8, pool_size=4)
    assert (pooled.pool_class, unpooled.pool_class) == ("AsyncAdaptedQueuePool", "NullPool")
    assert pooled.connections_opened == 0  # warmed: every query reused one of the 4 connections
    assert unpooled.connections_opened == 40
    assert len(pooled.latencies_ms) == len(unpooled.latencies_ms) == 40
    assert pooled.throughput > 0 and unpooled.throughput > 0


async def test_pool_experiment_does_not_touch_the_sandbox_pool(sandbox_with_users):
    before = source.pool_status(sandbox_with_users.engine)
    await source.run_pool_experiment(sandbox_with_users, requests=20, concurrency=5, pool_size=2)
    assert source.pool_status(sandbox_with_users.engine)["checkedout"] == before["checkedout"] == 0


@pytest.mark.parametrize(
    "arguments", [{"requests": 0}, {"requests": 10_000}, {"concurrency": 0}, {"pool_size": 500}, {"requests": 2.5}]
)
async def test_pool_experiment_refuses_out_of_range_settings(sandbox, arguments):
    with pytest.raises(source.ValidationError):
        await source.run_pool_experiment(sandbox, **arguments)
