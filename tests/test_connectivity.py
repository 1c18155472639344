"""Section 2's use cases: the engine report and the pooling experiment measure real things."""

import asyncio
import dataclasses

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

import source
from classroom.budget import ConnectionBudget
from classroom.demos.pooling import describe_engine, run_pool_experiment
from classroom.sandboxes.admission import MAX_POOL_EXPERIMENT_CONCURRENCY
from classroom.sandboxes.sandbox import new_sandbox_id
from classroom.sandboxes.stores import POSTGRES_RESERVED_CONNECTIONS


async def test_describe_engine_reports_the_live_pool_and_hides_passwords(sandbox):
    report = await describe_engine(sandbox)
    assert report.pool["pool_class"] == "AsyncAdaptedQueuePool"
    assert report.pool["checkedout"] == 0
    assert report.backend == sandbox.backend
    # The counters are live: one connection out while this block runs.
    async with sandbox.engine.connect():
        assert (await describe_engine(sandbox)).pool["checkedout"] == 1
    # The same report for an engine whose URL carries a password (a real engine; it connects to
    # nothing).
    engine = create_async_engine("postgresql+asyncpg://alex:s3cr3t-p%40ss@db.example:5432/qulab")
    try:
        report = await describe_engine(
            dataclasses.replace(sandbox, _engine=engine, owns_engine=False)
        )
    finally:
        await engine.dispose()
    assert "s3cr3t" not in report.url and "p@ss" not in report.url and "p%40ss" not in report.url
    assert "alex" in report.url and "db.example:5432/qulab" in report.url


async def test_pool_experiment_reuses_connections_and_nullpool_opens_one_per_query(
    sandbox_with_users,
):
    experiment = await run_pool_experiment(
        sandbox_with_users, requests=40, concurrency=8, pool_size=4
    )
    pooled, unpooled = experiment.pooled, experiment.unpooled
    assert (pooled.pool_class, unpooled.pool_class) == ("AsyncAdaptedQueuePool", "NullPool")
    assert pooled.connections_opened == 0  # warmed: every query reused one of the 4 connections
    assert unpooled.connections_opened == 40
    assert len(pooled.latencies_ms) == len(unpooled.latencies_ms) == 40
    assert pooled.throughput > 0 and unpooled.throughput > 0


async def test_pool_experiment_does_not_touch_the_sandbox_pool(sandbox_with_users):
    before = source.pool_status(sandbox_with_users.engine)
    await run_pool_experiment(sandbox_with_users, requests=20, concurrency=5, pool_size=2)
    assert source.pool_status(sandbox_with_users.engine)["checkedout"] == before["checkedout"] == 0


@pytest.mark.parametrize(
    "arguments",
    [
        {"requests": 0},
        {"requests": 10_000},
        {"concurrency": 0},
        {"pool_size": 500},
        {"requests": 2.5},
    ],
)
async def test_pool_experiment_refuses_out_of_range_settings(sandbox, arguments):
    with pytest.raises(source.ValidationError):
        await run_pool_experiment(sandbox, **arguments)


async def test_the_connection_budget_makes_a_second_reservation_wait_for_the_first():
    budget = ConnectionBudget(10)
    first_done = asyncio.Event()
    order = []

    async def first():
        async with budget.reserve(8, timeout_seconds=30):
            order.append("first in")
            await first_done.wait()
        order.append("first out")

    async def second():
        async with budget.reserve(8, timeout_seconds=30) as waited:
            order.append("second in")
            return waited

    first_task = asyncio.create_task(first())
    for _ in range(100):
        if order:
            break
        await asyncio.sleep(0)
    second_task = asyncio.create_task(second())
    for _ in range(100):
        if budget.waiting:
            break
        await asyncio.sleep(0)
    try:
        assert budget.waiting == 1 and budget.in_use == 8 and order == ["first in"]
    finally:
        first_done.set()
        await asyncio.gather(first_task, second_task)
    assert order == ["first in", "first out", "second in"] and budget.in_use == 0


async def test_on_postgresql_nullpool_opens_its_connections_one_at_a_time(postgres_registry):
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    experiment = await run_pool_experiment(sandbox, requests=40, concurrency=8, pool_size=4)
    assert experiment.unpooled.connections_opened == 40
    assert experiment.opened_at_once == 1  # eight queries wanted a connection at once


async def test_five_learners_at_the_experiment_maximum_share_default_max_connections(
    postgres_registry,
):
    learners = [await postgres_registry.acquire(new_sandbox_id()) for _ in range(5)]
    # The default: nothing raised to hide a leak.
    assert postgres_registry.store.max_connections <= 100
    budget = postgres_registry.budget
    assert budget.total <= postgres_registry.store.max_connections - POSTGRES_RESERVED_CONNECTIONS

    results = await asyncio.gather(
        *(
            run_pool_experiment(
                sandbox,
                requests=100,
                concurrency=MAX_POOL_EXPERIMENT_CONCURRENCY,
                pool_size=MAX_POOL_EXPERIMENT_CONCURRENCY,
            )
            for sandbox in learners
        ),
        return_exceptions=True,
    )

    failures = [result for result in results if isinstance(result, BaseException)]
    assert failures == []  # no "sorry, too many clients already"
    assert all(result.unpooled.connections_opened == 100 for result in results)
    assert budget.reservations_that_waited >= 1  # they took turns...
    assert budget.peak_in_use <= budget.total  # ...and together never went over the budget
    assert budget.in_use == budget.taken
