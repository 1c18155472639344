"""Section 5's lesson alone: the outbox on a SQLite file and fakeredis.

The score and its event commit in one transaction; the publisher sends due events to the stream
oldest first and marks them with their entry ids; the consumer records each event id once; the
background loops deliver a new event once woken and stop when asked.
"""

import asyncio
import time

import fakeredis
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

import source
from source import AIRScore, ConsumedEvent, DomainEvent, get_session

OCCUPATION = "15-1252.00"


async def alex_id(sandbox) -> str:
    return next(u.id for u in await source.list_users(sandbox) if u.name == "Alex Smith")


async def rows(sandbox, model) -> list:
    async with get_session(sandbox) as session:
        return list((await session.scalars(select(model))).all())


async def events_oldest_first(sandbox) -> list[DomainEvent]:
    async with get_session(sandbox) as session:
        query = select(DomainEvent).order_by(DomainEvent.created_at, DomainEvent.id)
        return list((await session.scalars(query)).all())


async def store(sandbox, user_id: str, count: int) -> list[str]:
    """`count` scores with their events; the event ids in the order they were stored."""
    return [
        (
            await source.calculate_and_store_airscore(
                sandbox, user_id=user_id, occupation_code=OCCUPATION
            )
        ).event.id
        for _ in range(count)
    ]


async def eventually(condition, *, timeout: float = 10.0):
    """Poll `condition` until it returns something true, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := await condition()):
        assert time.monotonic() < deadline, "condition still false"
        await asyncio.sleep(0.01)
    return result


# --- the transaction ------------------------------------------------------------------------------


async def test_a_score_and_its_pending_event_are_committed_together(sandbox_with_users):
    sandbox = sandbox_with_users
    user_id = await alex_id(sandbox)
    stored = await source.calculate_and_store_airscore(
        sandbox, user_id=user_id, occupation_code=OCCUPATION
    )
    [score], [event] = await rows(sandbox, AIRScore), await rows(sandbox, DomainEvent)
    assert (score.id, event.id) == (stored.score.id, stored.event.id)
    assert (event.event_type, event.aggregate_type) == (source.AIRSCORE_CALCULATED, "AIRScore")
    assert event.aggregate_id == score.id and event.status == "pending"
    assert (event.published_at, event.stream_id, event.attempts) == (None, None, 0)
    assert event.payload["event_id"] == event.id and event.payload["score_id"] == score.id
    assert event.payload["user_id"] == user_id and event.payload["air_score"] == score.air_score
    assert score.ci_lower <= score.air_score <= score.ci_upper


async def test_when_the_event_cannot_be_written_the_score_is_rolled_back_too(
    sandbox_with_users, monkeypatch
):
    sandbox = sandbox_with_users
    user_id = await alex_id(sandbox)
    make_event = source.airscore_calculated_event

    def broken_event(score: AIRScore) -> DomainEvent:
        event = make_event(score)
        event.event_type = None  # NOT NULL: the INSERT fails at commit, after the score's flush
        return event

    monkeypatch.setattr(source, "airscore_calculated_event", broken_event)
    with pytest.raises(IntegrityError):
        await source.calculate_and_store_airscore(
            sandbox, user_id=user_id, occupation_code=OCCUPATION
        )
    counts = await source.count_rows(sandbox)
    assert (counts["air_scores"], counts["domain_events"]) == (0, 0)


async def test_an_unknown_user_writes_neither_row(sandbox_with_users):
    sandbox = sandbox_with_users
    with pytest.raises(source.UserNotFoundError):
        await source.calculate_and_store_airscore(
            sandbox, user_id=source.new_id(), occupation_code=OCCUPATION
        )
    counts = await source.count_rows(sandbox)
    assert (counts["air_scores"], counts["domain_events"]) == (0, 0)


# --- the publisher --------------------------------------------------------------------------------


async def test_the_publisher_sends_due_events_oldest_first_and_marks_them_with_their_ids(
    sandbox_with_users,
):
    sandbox = sandbox_with_users
    stored = await store(sandbox, await alex_id(sandbox), 3)
    publisher = source.OutboxPublisher(sandbox, name="publisher-a", batch_size=2)
    client = sandbox.redis.client

    first = await publisher.publish_due_batch()
    assert (first.claimed, first.published, first.refused, first.lease_lost) == (2, 2, 0, 0)
    entries = await client.xrange(publisher.stream_key)
    assert [fields["event_id"] for _, fields in entries] == stored[:2]  # the two oldest
    second = await publisher.publish_due_batch()
    assert (second.claimed, second.published) == (1, 1)
    third = await publisher.publish_due_batch()
    assert (third.claimed, third.published) == (0, 0)

    entries = await client.xrange(publisher.stream_key)
    assert [fields["event_id"] for _, fields in entries] == stored  # oldest first, each once
    entry_ids = {fields["event_id"]: entry_id for entry_id, fields in entries}
    for event in await events_oldest_first(sandbox):
        assert event.status == "published" and event.published_at is not None
        assert event.stream_id == entry_ids[event.id]
        assert (event.claimed_by, event.claimed_until) == (None, None)
    [(_, fields)] = [entry for entry in entries if entry[0] == entry_ids[stored[0]]]
    assert fields["event_type"] == source.AIRSCORE_CALCULATED and stored[0] in fields["payload"]


async def test_an_event_leased_by_another_publisher_is_not_sent_twice(sandbox_with_users):
    sandbox = sandbox_with_users
    [event_id] = await store(sandbox, await alex_id(sandbox), 1)
    holder = source.OutboxPublisher(sandbox, name="holder", lease_seconds=60)
    async with sandbox.engine.connect() as connection:
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        [claimed] = await holder.claim_due_events(connection)
    assert claimed.id == event_id
    other = source.OutboxPublisher(sandbox, name="other")
    assert (await other.publish_due_batch()).claimed == 0
    assert await sandbox.redis.client.xlen(other.stream_key) == 0


async def test_events_the_broker_refuses_stay_leased_and_go_once_the_lease_ends(
    sandbox_with_users,
):
    sandbox = sandbox_with_users
    stored = await store(sandbox, await alex_id(sandbox), 2)
    publisher = source.OutboxPublisher(sandbox, name="publisher-a", lease_seconds=60)
    client = sandbox.redis.client
    await client.set(publisher.stream_key, "not a stream")  # every XADD gets WRONGTYPE

    refused = await publisher.publish_due_batch()
    assert (refused.claimed, refused.published, refused.refused) == (2, 0, 2)
    events = await events_oldest_first(sandbox)
    assert {(event.status, event.claimed_by) for event in events} == {("pending", "publisher-a")}

    await client.delete(publisher.stream_key)
    assert (await publisher.publish_due_batch()).claimed == 0  # the leases have not ended
    async with get_session(sandbox) as session:  # ... until they do
        await session.execute(update(DomainEvent).values(claimed_until=source.utc_now()))
    after = await publisher.publish_due_batch()
    assert (after.claimed, after.published, after.refused) == (2, 2, 0)
    entries = await client.xrange(publisher.stream_key)
    assert [fields["event_id"] for _, fields in entries] == stored


async def test_the_publishing_loop_outlives_a_broker_outage(sandbox_with_users):
    sandbox = sandbox_with_users
    [event_id] = await store(sandbox, await alex_id(sandbox), 1)
    server = fakeredis.FakeServer()  # a server that can go down: connected = False
    sandbox.redis.client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    publisher = source.OutboxPublisher(sandbox, lease_seconds=0, idle_seconds=0.01)
    server.connected = False
    wake, stopping = asyncio.Event(), asyncio.Event()
    loop = asyncio.create_task(source.run_publisher(publisher, wake=wake, stopping=stopping))
    try:

        async def claimed_and_unsent() -> bool:
            [event] = await events_oldest_first(sandbox)
            return event.claimed_by == publisher.name and event.status == "pending"

        await eventually(claimed_and_unsent)
        assert not loop.done()
        server.connected = True
        await eventually(lambda: published(sandbox, event_id))
    finally:
        stopping.set()
        await asyncio.wait_for(loop, timeout=10)


# --- the consumer ---------------------------------------------------------------------------------


async def test_the_consumer_records_each_event_once_and_counts_a_redelivery_as_a_duplicate(
    sandbox_with_users,
):
    sandbox = sandbox_with_users
    stored = await store(sandbox, await alex_id(sandbox), 3)
    publisher = source.OutboxPublisher(sandbox, name="publisher-a")
    await publisher.publish_due_batch()
    consumer = source.StreamConsumer(sandbox)

    report = await consumer.consume_batch()
    assert report.group_created  # the first read created the consumer group
    assert (report.received, report.recorded, report.duplicates) == (3, 3, 0)
    inbox = await rows(sandbox, ConsumedEvent)
    assert sorted(row.event_id for row in inbox) == sorted(stored)
    assert {row.consumer_name for row in inbox} == {consumer.name}
    assert (await consumer.consume_batch()).received == 0  # acknowledged: not read again

    # At least once: the first event goes to the stream again (its mark was lost, say).
    async with get_session(sandbox) as session:
        pending_again = update(DomainEvent).where(DomainEvent.id == stored[0])
        await session.execute(pending_again.values(status="pending"))
    assert (await publisher.publish_due_batch()).published == 1
    redelivered = await consumer.consume_batch()
    assert (redelivered.received, redelivered.recorded, redelivered.duplicates) == (1, 0, 1)
    assert consumer.duplicates_ignored == 1
    assert len(await rows(sandbox, ConsumedEvent)) == 3  # still one row per event id


async def test_an_entry_a_stopped_consumer_never_acknowledged_is_reclaimed(sandbox_with_users):
    sandbox = sandbox_with_users
    [event_id] = await store(sandbox, await alex_id(sandbox), 1)
    publisher = source.OutboxPublisher(sandbox, name="publisher-a")
    await publisher.publish_due_batch()
    client, stream = sandbox.redis.client, publisher.stream_key
    await client.xgroup_create(stream, source.EVENT_CONSUMER_GROUP, id="0")
    # A consumer reads the entry and stops before recording or acknowledging it.
    [[_, [(entry_id, _)]]] = await client.xreadgroup(
        source.EVENT_CONSUMER_GROUP, "stopped", {stream: ">"}
    )
    survivor = source.StreamConsumer(sandbox, reclaim_idle_seconds=0)
    report = await survivor.consume_batch()
    assert (report.received, report.reclaimed, report.recorded) == (1, 1, 1)
    [row] = await rows(sandbox, ConsumedEvent)
    assert (row.event_id, row.stream_message_id) == (event_id, entry_id)
    assert (await client.xpending(stream, source.EVENT_CONSUMER_GROUP))["pending"] == 0


# --- the background loops -------------------------------------------------------------------------


async def published(sandbox, event_id: str) -> bool:
    [event] = [event for event in await events_oldest_first(sandbox) if event.id == event_id]
    return event.status == "published"


async def consumed(sandbox, event_id: str) -> bool:
    return event_id in {row.event_id for row in await rows(sandbox, ConsumedEvent)}


async def test_the_loops_deliver_a_new_event_once_woken_and_stop_when_asked(sandbox_with_users):
    sandbox = sandbox_with_users
    user_id = await alex_id(sandbox)
    # Idle waits far longer than the test: only a wake-up can make them look again in time.
    publisher = source.OutboxPublisher(sandbox, name="publisher-a", idle_seconds=60)
    consumer = source.StreamConsumer(sandbox, idle_seconds=60)
    publisher_wake, consumer_wake, stopping = asyncio.Event(), asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(
            source.run_publisher(publisher, wake=publisher_wake, stopping=stopping)
        ),
        asyncio.create_task(source.run_consumer(consumer, wake=consumer_wake, stopping=stopping)),
    ]
    try:
        for _ in range(2):  # the second event arrives while both loops idle
            [event_id] = await store(sandbox, user_id, 1)
            publisher_wake.set()  # what QuLab's session does after such a commit
            await eventually(lambda event_id=event_id: published(sandbox, event_id))
            consumer_wake.set()
            await eventually(lambda event_id=event_id: consumed(sandbox, event_id))
        assert not any(task.done() for task in tasks)
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    finally:
        for task in tasks:
            task.cancel()
    assert len(await rows(sandbox, ConsumedEvent)) == 2
    assert {event.status for event in await events_oldest_first(sandbox)} == {"published"}
