"""The outbox's counts, kept by triggers, agree with the rows after everything that moves events.

Each check compares classroom.outbox.counts' figures with the rows counted outright. On
PostgreSQL a relay's mark and a consumer's record of the same event race in two transactions;
the last test holds both open at once, the way they meet under load.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, inspect, select, text, update
from test_outbox import FAST, add_pending_events, drain, drain_consumer

import source
from classroom.demos import eventing
from classroom.outbox.audit import prune_delivered_events
from classroom.outbox.counts import (
    COUNTS_TABLE,
    PublishedRate,
    counts_removal,
    counts_statement,
    install_outbox_counts,
)
from classroom.outbox.service import outbox_service
from classroom.outbox.status import outbox_status
from classroom.sandboxes.reset import initialize_sandbox, reset_sandbox
from classroom.sandboxes.sandbox import new_sandbox_id, quoted_schema
from classroom.sandboxes.stores import create_schema
from source import ConsumedEvent, DomainEvent, get_session

STATUSES = ("pending", "published", "failed")


async def kept(sandbox) -> dict[str, int]:
    """The counts as the triggers keep them (published_total aside)."""
    async with get_session(sandbox) as session:
        row = (await session.execute(counts_statement())).one()
    return dict(
        zip(("pending", "published", "failed", "delivered"), map(int, row[:4]), strict=True)
    )


async def counted(sandbox) -> dict[str, int]:
    """The same figures, counted from the rows."""
    async with get_session(sandbox) as session:
        by_status = dict(
            (
                await session.execute(
                    select(DomainEvent.status, func.count()).group_by(DomainEvent.status)
                )
            ).all()
        )
        delivered = await session.scalar(
            select(func.count())
            .select_from(DomainEvent)
            .join(ConsumedEvent, ConsumedEvent.event_id == DomainEvent.id)
            .where(DomainEvent.status == "published")
        )
    return {**{status: by_status.get(status, 0) for status in STATUSES}, "delivered": delivered}


async def assert_counts(sandbox, expected: dict[str, int]) -> None:
    assert await counted(sandbox) == expected  # the scenario did what it says...
    assert await kept(sandbox) == expected  # ...and the triggers followed


async def test_the_counts_follow_every_way_an_event_moves(sandbox_with_users):
    sandbox = sandbox_with_users
    service = outbox_service(sandbox, replace(FAST, batch_size=10, max_message_bytes=2000))
    await assert_counts(sandbox, {"pending": 0, "published": 0, "failed": 0, "delivered": 0})

    async with get_session(sandbox) as session:  # the oldest event, too large to send
        session.add(
            DomainEvent(
                event_type="Huge", aggregate_type="Test", aggregate_id=source.new_id(),
                payload={"x": "y" * 5000},
            )
        )  # fmt: skip
    await eventing.store_airscore_burst(sandbox, count=12)  # score and event, one transaction
    await assert_counts(sandbox, {"pending": 13, "published": 0, "failed": 0, "delivered": 0})

    assert (await service.publisher.publish_due_batch()).published == 9  # 10 claimed, 1 refused
    await assert_counts(sandbox, {"pending": 3, "published": 9, "failed": 1, "delivered": 0})
    assert await drain_consumer(service.consumer) == 9
    await assert_counts(sandbox, {"pending": 3, "published": 9, "failed": 1, "delivered": 9})
    assert await drain(service.publisher) == 3
    await assert_counts(sandbox, {"pending": 0, "published": 12, "failed": 1, "delivered": 9})

    assert await eventing.retry_failed_events(sandbox) == 1  # failed -> pending
    await assert_counts(sandbox, {"pending": 1, "published": 12, "failed": 0, "delivered": 9})

    async with get_session(sandbox) as session:  # what the audit does to a lost event
        republished = await session.scalar(
            select(DomainEvent.id).where(DomainEvent.status == "published").limit(1)
        )
        await session.execute(
            update(DomainEvent).where(DomainEvent.id == republished).values(status="pending")
        )
    await assert_counts(sandbox, {"pending": 2, "published": 11, "failed": 0, "delivered": 8})

    assert await drain_consumer(service.consumer) == 3  # the other three consumed
    await assert_counts(sandbox, {"pending": 2, "published": 11, "failed": 0, "delivered": 11})
    pruned = await prune_delivered_events(sandbox, keep=2, inbox_retention_seconds=0)
    assert pruned > 0
    left = 11 - pruned
    await assert_counts(sandbox, {"pending": 2, "published": left, "failed": 0, "delivered": 0})
    # The inbox went too (retention 0), so what was left is published but not delivered.

    await initialize_sandbox(sandbox)  # section 2's button empties every table
    await assert_counts(sandbox, {"pending": 0, "published": 0, "failed": 0, "delivered": 0})
    await add_pending_events(sandbox, 2)
    await reset_sandbox(sandbox)  # the sidebar's reset, too
    await assert_counts(sandbox, {"pending": 0, "published": 0, "failed": 0, "delivered": 0})


async def stored_published_and_consumed(sandbox, count: int):
    """`count` scores with their events, every event published and consumed; the service."""
    service = outbox_service(sandbox, FAST)
    await eventing.store_airscore_burst(sandbox, count=count)
    await drain(service.publisher)
    await drain_consumer(service.consumer)
    return service


async def test_a_sandbox_from_before_the_counts_is_counted_when_it_opens(sandbox_with_users):
    sandbox = sandbox_with_users
    await stored_published_and_consumed(sandbox, 7)
    await add_pending_events(sandbox, 2)
    schema = quoted_schema(sandbox.location) if sandbox.backend == "postgresql" else ""
    async with sandbox.engine.begin() as connection:  # the sandbox as an older QuLab left it
        for statement in counts_removal(sandbox.backend, schema):
            await connection.exec_driver_sql(statement)
        location = sandbox.location if sandbox.backend == "postgresql" else None
        kept = await connection.run_sync(
            lambda sync: inspect(sync).has_table(COUNTS_TABLE, schema=location)
        )
        assert not kept
    await add_pending_events(sandbox, 1)  # written while nothing counts: a trigger left fails it

    await create_schema(sandbox)  # what opening the sandbox does
    expected = {"pending": 3, "published": 7, "failed": 0, "delivered": 7}
    await assert_counts(sandbox, expected)
    async with sandbox.engine.begin() as connection:  # and only once
        assert await install_outbox_counts(connection, schema) is False
    await add_pending_events(sandbox, 1)
    await assert_counts(sandbox, {**expected, "pending": 4})


async def test_the_panel_shows_the_kept_counts_and_the_rate_of_the_last_seconds(
    sandbox_with_users,
):
    sandbox = sandbox_with_users
    await stored_published_and_consumed(sandbox, 5)
    status = await outbox_status(sandbox)
    assert (status.pending, status.published, status.failed, status.delivered) == (0, 5, 0, 5)
    assert status.events_per_second == pytest.approx(5 / 5.0)  # all five within the window


def test_the_rate_is_the_growth_since_a_reading_a_window_ago():
    rate = PublishedRate(window_seconds=5.0)
    assert rate.per_second(100, now=0.0) is None  # nothing to compare with: count instead
    assert rate.per_second(110, now=1.0) is None
    assert rate.per_second(150, now=5.0) == pytest.approx(50 / 5.0)
    assert rate.per_second(160, now=6.0) == pytest.approx(50 / 5.0)  # since the reading at 1 s
    assert rate.per_second(160, now=30.0) is None  # the last reading is too old to say
    assert rate.per_second(170, now=36.0) == pytest.approx(10 / 6.0)


def test_the_rate_counts_only_the_window_even_when_the_last_reading_before_it_is_older():
    rate = PublishedRate(window_seconds=5.0)
    rate.per_second(0, now=0.0)
    rate.per_second(0, now=4.0)  # quiet until 4 s...
    assert rate.per_second(50, now=8.0) == pytest.approx(50 / 5.0)  # ...then 50 in the window


async def test_a_redelivered_event_recorded_again_is_not_delivered_twice(sandbox_with_users):
    sandbox = sandbox_with_users
    service = await stored_published_and_consumed(sandbox, 3)
    stream = sandbox.redis.key("events")
    entries = await sandbox.redis.client.xrange(stream)
    for _, fields in entries:  # the broker hands every entry out again
        await sandbox.redis.client.xadd(stream, fields)
    assert await drain_consumer(service.consumer) == 3  # read, and ignored by the inbox
    await assert_counts(sandbox, {"pending": 0, "published": 3, "failed": 0, "delivered": 3})


def mark_published(event_id: str) -> Any:
    """What the relay's mark does to one event."""
    return update(DomainEvent).where(DomainEvent.id == event_id).values(status="published")


def record_in_inbox(event_id: str) -> Any:
    """What the consumer's record does for one event."""
    return insert(ConsumedEvent).values(
        event_id=event_id,
        event_type="TestEvent",
        stream_message_id="1-0",
        consumer_name="racer",
        consumed_at=source.utc_now(),
    )


@pytest.mark.parametrize("first", ["mark", "record"])
async def test_on_postgresql_a_mark_and_a_record_in_flight_together_count_the_event_once(
    postgres_registry, first
):
    """The relay's mark and the consumer's record of one event, each in a transaction still
    open when the other writes: the second waits on the counts' lock, then sees the first."""
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    [event_id] = await add_pending_events(sandbox, 1)
    writes = {"mark": mark_published(event_id), "record": record_in_inbox(event_id)}
    second = "record" if first == "mark" else "mark"
    async with (
        sandbox.engine.connect() as earlier,
        sandbox.engine.connect() as later,
        sandbox.engine.connect() as observer,
    ):
        await earlier.begin()
        await earlier.execute(writes[first])  # written, not committed yet
        await later.begin()
        writing = asyncio.create_task(later.execute(writes[second]))  # written meanwhile
        await _until_someone_waits_on_the_counts_lock(observer, writing)
        await earlier.commit()
        await writing
        await later.commit()
    await assert_counts(sandbox, {"pending": 0, "published": 1, "failed": 0, "delivered": 1})


async def _until_someone_waits_on_the_counts_lock(observer, task) -> None:
    waiting = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    deadline = time.monotonic() + 10
    while not await observer.scalar(waiting):
        assert not task.done(), "the second writer did not wait for the first's transaction"
        assert time.monotonic() < deadline, "nobody waited on the counts' lock"
        await observer.rollback()


async def test_on_postgresql_a_writer_that_asks_for_the_lock_late_never_deadlocks(
    postgres_registry,
):
    """A reset deletes events (no lock needed) before the inbox (the lock): it holds a counts
    row while it waits for the lock. A consumer holding the lock must never wait for that row,
    even when both connections' pids choose the same row."""
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    [published_id] = await add_pending_events(sandbox, 1)
    async with get_session(sandbox) as session:
        await session.execute(
            update(DomainEvent).where(DomainEvent.id == published_id).values(status="published")
        )
    [pending_id] = await add_pending_events(sandbox, 1)

    async with get_session(sandbox) as session:  # already consumed, so a reset deletes it
        await session.execute(record_in_inbox(published_id))
    connections = []
    try:
        by_row: dict[int, object] = {}
        while True:  # two connections whose pids choose the same counts row
            connection = await sandbox.engine.connect()
            connections.append(connection)
            row = await connection.scalar(text("SELECT pg_backend_pid() % 8"))
            await connection.rollback()
            if row in by_row:
                resetting, consuming = by_row[row], connection
                break
            by_row[row] = connection
        observer = await sandbox.engine.connect()
        connections.append(observer)
        await resetting.begin()
        await resetting.execute(delete(DomainEvent).where(DomainEvent.id == pending_id))
        await consuming.begin()
        recording = consuming.execute(
            record_in_inbox(pending_id)
        )  # the lock (an inbox write), a row
        await asyncio.wait_for(recording, timeout=10)  # it must not wait for the reset's row
        deleting = asyncio.create_task(
            resetting.execute(delete(ConsumedEvent).where(ConsumedEvent.event_id == published_id))
        )
        await _until_someone_waits_on_the_counts_lock(observer, deleting)
        await consuming.commit()  # no deadlock: the consumer never waited on the reset's row
        await deleting
        await resetting.commit()
    finally:
        for connection in connections:
            await connection.close()
    await assert_counts(sandbox, {"pending": 0, "published": 1, "failed": 0, "delivered": 0})
