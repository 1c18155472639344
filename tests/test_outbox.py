"""Outbox: the score and its event commit together; publishers deliver every event, once, in order.

Timings are shrunk through OutboxSettings; tests wait for conditions with bounded polling.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from contextlib import suppress
from dataclasses import replace
from datetime import timedelta
from typing import Optional

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

import source
from classroom import validation
from classroom.demos import eventing
from classroom.outbox.audit import VACUUM_AFTER_PRUNING, prune_delivered_events
from classroom.outbox.circuit import BrokerCircuit
from classroom.outbox.relay import GuardedPublisher, oversized_message_bytes
from classroom.outbox.service import OutboxService, outbox_service, set_broker_outage
from classroom.outbox.settings import OutboxSettings
from classroom.outbox.status import outbox_status
from classroom.sandboxes.reset import initialize_sandbox
from classroom.sandboxes.sandbox import new_sandbox_id
from source import AIRScore, ConsumedEvent, DomainEvent, get_session

FAST = OutboxSettings(
    batch_size=50,
    idle_wait_seconds=0.02,
    idle_wait_max_seconds=0.2,
    outage_backoff_base_seconds=0.005,
    outage_backoff_max_seconds=0.02,
    consumer_reclaim_idle_seconds=0.05,
    # a loaded machine can take a while; the outage switch fails at once
    broker_timeout_seconds=3.0,
    stop_timeout_seconds=5,
)


def new_publisher(
    sandbox: source.Sandbox, settings: OutboxSettings = FAST, *, name: Optional[str] = None
) -> source.OutboxPublisher:
    """The lesson's relay, with the settings' batch size, lease and broker timeout."""
    return source.OutboxPublisher(
        sandbox,
        name=name,
        batch_size=settings.batch_size,
        lease_seconds=settings.lease_seconds,
        broker_timeout_seconds=settings.broker_timeout_seconds,
    )


def new_consumer(sandbox: source.Sandbox, settings: OutboxSettings = FAST) -> source.StreamConsumer:
    """The lesson's consumer, with the settings' batch size, reclaim age and broker timeout."""
    return source.StreamConsumer(
        sandbox,
        batch_size=settings.consumer_batch_size,
        reclaim_idle_seconds=settings.consumer_reclaim_idle_seconds,
        broker_timeout_seconds=settings.broker_timeout_seconds,
    )


async def eventually(check, *, timeout: float = 15.0, interval: float = 0.01):
    """Poll an async condition until it holds; fail once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"condition still false after {timeout:g} s"
        await asyncio.sleep(interval)


class IdleWaits:
    """Which outbox loops sleep now, and for how long they meant to.

    source.run_publisher and source.run_consumer wait only through source.sleep_until_woken;
    watch_idle_waits wraps it, so a test can wait until a loop has settled into a long idle wait
    instead of sleeping and hoping it has.
    """

    def __init__(self, original) -> None:
        self.original = original
        self.sleeping: dict[asyncio.Event, float] = {}  # the loop's wake-up -> seconds it sleeps

    async def sleep_until_woken(
        self, wake: asyncio.Event, stopping: asyncio.Event, seconds: float
    ) -> None:
        self.sleeping[wake] = seconds
        try:
            await self.original(wake, stopping, seconds)
        finally:
            self.sleeping.pop(wake, None)

    def asleep(self, wake: asyncio.Event, *, at_least: float) -> bool:
        """True while the loop woken by `wake` sleeps a wait of at least `at_least` seconds."""
        return self.sleeping.get(wake, 0.0) >= at_least and not wake.is_set()

    async def settled(self, outbox: OutboxService, *, at_least: float) -> bool:
        """Both of the outbox's loops asleep, the publisher for at least `at_least` seconds."""
        return self.asleep(outbox.publisher_wake, at_least=at_least) and self.asleep(
            outbox.consumer_wake, at_least=0.0
        )


def watch_idle_waits(monkeypatch: pytest.MonkeyPatch) -> IdleWaits:
    """Record the outbox loops' idle waits for the rest of the test."""
    waits = IdleWaits(source.sleep_until_woken)
    monkeypatch.setattr(source, "sleep_until_woken", waits.sleep_until_woken)
    return waits


async def stream_event_ids(sandbox: source.Sandbox) -> list[str]:
    """Event ids in the stream, in stream order, through the real client (even in an outage)."""
    entries = await sandbox.redis.service.client.xrange(sandbox.redis.key("events"))
    return [fields["event_id"] for _, fields in entries]


async def counts_by_status(sandbox: source.Sandbox) -> dict[str, int]:
    async with get_session(sandbox) as session:
        statement = select(DomainEvent.status, func.count()).group_by(DomainEvent.status)
        return dict((await session.execute(statement)).all())


async def inbox_event_ids(sandbox: source.Sandbox) -> list[str]:
    async with get_session(sandbox) as session:
        return list((await session.scalars(select(ConsumedEvent.event_id))).all())


async def add_pending_events(sandbox: source.Sandbox, count: int, **columns) -> list[str]:
    """Insert `count` pending events directly (no scores), oldest first; returns their ids."""
    events = [
        DomainEvent(
            event_type="TestEvent",
            aggregate_type="Test",
            aggregate_id=source.new_id(),
            payload={"n": n},
            **columns,
        )
        for n in range(count)
    ]
    async with get_session(sandbox) as session:
        session.add_all(events)
    return [event.id for event in events]


async def drain(publisher: source.OutboxPublisher) -> int:
    """Publish batches until nothing is due; returns how many events this publisher marked."""
    published = 0
    while (report := await publisher.publish_due_batch()).claimed:
        published += report.published
    return published


async def drain_consumer(consumer: source.StreamConsumer) -> int:
    received = 0
    while (report := await consumer.consume_batch()).received:
        received += report.received
    return received


# --- the score and its event ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        # Worked by hand from the docstring's formula. Evidence: Master's 82; 8 years
        # 100(1 - e^-1) = 63.21; θ = 0 gives 50. VR = 195.21 / 3 = 65.07. HR (SOC group 15) = 88.
        # Synergy = 65.07 · 88 / 100 = 57.26.
        # AIR = (0.6 · 65.07 + 0.4 · 88 + 0.15 · 57.26) / 1.15 = 82.83 / 1.15 = 72.03.
        # σ = 10 / √(1 + 3) = 5, so the interval is 72.03 ± 9.80.
        (
            dict(
                occupation_code="15-1252.00",
                education_level="Master's degree",
                years_experience=8.0,
                abilities=(0.0,),
            ),
            dict(
                vr_score=65.07,
                hr_score=88.0,
                synergy_score=57.26,
                air_score=72.03,
                ci_lower=62.23,
                ci_upper=81.83,
            ),
        ),
        # No evidence: VR = 50; an unknown group gets HR = 45. Synergy = 22.5.
        # AIR = (30 + 18 + 3.375) / 1.15 = 44.67; σ = 10, so ± 19.60.
        (
            dict(occupation_code="99-9999"),
            dict(
                vr_score=50.0,
                hr_score=45.0,
                synergy_score=22.5,
                air_score=44.67,
                ci_lower=25.07,
                ci_upper=64.27,
            ),
        ),
        # One ability θ = 6: VR = 100 / (1 + e^-6) = 99.75; HR = 88; synergy = 87.78;
        # AIR = (59.85 + 35.2 + 13.17) / 1.15 = 94.10; σ = 10 / √2, so ± 13.86, and the top is
        # clipped to 100.
        (
            dict(occupation_code="15-1252.00", abilities=(6.0,)),
            dict(
                vr_score=99.75,
                hr_score=88.0,
                synergy_score=87.78,
                air_score=94.1,
                ci_lower=80.24,
                ci_upper=100.0,
            ),
        ),
    ],
)
def test_the_score_follows_the_documented_formula(profile, expected):
    calculation = source.calculate_airscore(**profile)
    assert {field: calculation[field] for field in expected} == expected
    assert calculation["parameter_version"] == "qulab-air-1.0"


def test_more_evidence_narrows_the_interval_and_unknown_groups_get_the_default():
    bare = source.calculate_airscore(occupation_code="99-9999")
    assert bare["vr_score"] == 50.0 and bare["hr_score"] == source.DEFAULT_OCCUPATION_READINESS
    assessed = source.calculate_airscore(
        occupation_code="99-9999", abilities=(0.5, 1.0, float("nan"), 1e9)
    )
    assert assessed["calculation_metadata"]["assessment_abilities"] == [0.5, 1.0, 6.0]
    width = assessed["ci_upper"] - assessed["ci_lower"]
    assert width < bare["ci_upper"] - bare["ci_lower"]


async def test_score_and_pending_event_are_stored_together(sandbox_with_users):
    alex = (await source.list_users(sandbox_with_users))[-1]
    stored = await source.calculate_and_store_airscore(
        sandbox_with_users, user_id=alex.id, occupation_code="15-1252.00"
    )
    async with get_session(sandbox_with_users) as session:
        score = await session.get(AIRScore, stored.score.id)
        event = await session.get(DomainEvent, stored.event.id)
    assert event.status == "pending" and event.attempts == 0 and event.published_at is None
    assert (event.event_type, event.aggregate_type, event.aggregate_id) == (
        "AIRScoreCalculated",
        "AIRScore",
        score.id,
    )
    assert event.payload == {
        "event_id": event.id,
        "score_id": score.id,
        "user_id": alex.id,
        "occupation_code": "15-1252.00",
        "air_score": score.air_score,
        "vr_score": score.vr_score,
        "hr_score": score.hr_score,
        "synergy_score": score.synergy_score,
        "ci_lower": score.ci_lower,
        "ci_upper": score.ci_upper,
        "parameter_version": source.AIR_PARAMETER_VERSION,
    }


async def _refuse_event_inserts(sandbox: source.Sandbox) -> None:
    """A database trigger that makes every insert into domain_events fail, for real."""
    async with sandbox.engine.begin() as connection:
        if sandbox.backend == "sqlite":
            await connection.execute(
                text(
                    "CREATE TRIGGER refuse_events BEFORE INSERT ON domain_events "
                    "BEGIN SELECT RAISE(ABORT, 'the event store refused the insert'); END"
                )
            )
        else:
            schema = f'"{sandbox.location}"'
            await connection.execute(
                text(
                    f"CREATE FUNCTION {schema}.refuse_events() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'the event store refused the insert'; END $$"
                )
            )
            await connection.execute(
                text(
                    f"CREATE TRIGGER refuse_events BEFORE INSERT ON {schema}.domain_events "
                    f"FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_events()"
                )
            )


async def test_when_the_event_insert_fails_no_score_remains(sandbox_with_users):
    user = (await source.list_users(sandbox_with_users))[0]
    await _refuse_event_inserts(sandbox_with_users)
    with pytest.raises(DBAPIError, match="refused the insert"):
        await source.calculate_and_store_airscore(
            sandbox_with_users, user_id=user.id, occupation_code="15-1252"
        )
    counts = await source.count_rows(sandbox_with_users)
    assert (counts["air_scores"], counts["domain_events"]) == (0, 0)


@pytest.mark.parametrize(
    ("user_id", "occupation_code", "error"),
    [
        ("3f2b9c1e-8d4a-4c7e-9b1f-2a6d5e8c0f11", "15-1252", source.UserNotFoundError),
        ("not-a-uuid", "15-1252", validation.MalformedIdError),
        (None, "<script>", source.ValidationError),
        (None, "", source.ValidationError),
        (None, "15-1252'; DROP TABLE air_scores; --", source.ValidationError),
    ],
)
def test_bad_input_stores_nothing(runtime, user_id, occupation_code, error):
    lab = runtime.lab(new_sandbox_id())  # as the page runs it: through Lab.run
    lab.run(initialize_sandbox)
    user_id = user_id or lab.run(source.list_users)[0].id
    with pytest.raises(error):
        lab.run(
            source.calculate_and_store_airscore, user_id=user_id, occupation_code=occupation_code
        )
    counts = lab.run(source.count_rows)
    assert (counts["air_scores"], counts["domain_events"]) == (0, 0)


async def test_a_burst_is_validated_and_needs_users(sandbox):
    for count in (0, eventing.MAX_BURST_WRITES + 1, "500"):
        with pytest.raises(source.ValidationError):
            await eventing.store_airscore_burst(sandbox, count=count)
    with pytest.raises(source.ValidationError, match="no users"):
        await eventing.store_airscore_burst(sandbox, count=5)


async def test_a_burst_commits_one_score_and_one_event_per_write(sandbox_with_users):
    result = await eventing.store_airscore_burst(sandbox_with_users, count=30)
    counts = await source.count_rows(sandbox_with_users)
    assert result.writes == 30 and (counts["air_scores"], counts["domain_events"]) == (30, 30)


# --- the publisher -------------------------------------------------------------------------


async def test_events_are_claimed_and_published_oldest_first(sandbox):
    now = source.utc_now()
    ages = [5, 1, 4, 2, 3]  # seconds old, inserted out of order
    ids_by_age = {}
    for age in ages:
        [event_id] = await add_pending_events(sandbox, 1, created_at=now - timedelta(seconds=age))
        ids_by_age[age] = event_id
    publisher = new_publisher(sandbox, replace(FAST, batch_size=2))
    reports = []
    while (report := await publisher.publish_due_batch()).claimed:
        reports.append(report)
    assert [report.published for report in reports] == [2, 2, 1]
    assert await stream_event_ids(sandbox) == [ids_by_age[age] for age in (5, 4, 3, 2, 1)]
    assert await counts_by_status(sandbox) == {"published": 5}


async def test_each_stream_message_carries_the_event_id_and_its_payload(sandbox_with_users):
    user = (await source.list_users(sandbox_with_users))[0]
    stored = await source.calculate_and_store_airscore(
        sandbox_with_users, user_id=user.id, occupation_code="13-2011"
    )
    report = await new_publisher(sandbox_with_users).publish_due_batch()
    assert (report.claimed, report.published) == (1, 1)
    stream = sandbox_with_users.redis.key("events")
    [(_, fields)] = await sandbox_with_users.redis.client.xrange(stream)
    assert fields["event_id"] == stored.event.id and fields["event_type"] == "AIRScoreCalculated"
    assert json.loads(fields["payload"]) == stored.event.payload
    async with get_session(sandbox_with_users) as session:
        event = await session.get(DomainEvent, stored.event.id)
    assert event.status == "published" and event.published_at >= event.created_at
    assert event.claimed_by is None


async def test_each_published_event_records_its_own_stream_entry_id(sandbox):
    ids = await add_pending_events(sandbox, 7)
    publisher = new_publisher(sandbox, replace(FAST, batch_size=5))
    assert await drain(publisher) == 7
    entries = await sandbox.redis.client.xrange(sandbox.redis.key("events"))
    entry_of = {fields["event_id"]: entry_id for entry_id, fields in entries}
    async with get_session(sandbox) as session:
        statement = select(DomainEvent.id, DomainEvent.stream_id)
        recorded = dict((await session.execute(statement)).all())
    assert recorded == entry_of and set(recorded) == set(ids)


async def test_a_mark_leaves_alone_an_event_whose_lease_another_publisher_took(sandbox):
    [taken, kept] = await add_pending_events(sandbox, 2)
    first = new_publisher(sandbox, name="first")
    async with sandbox.engine.connect() as connection:
        # as the relay runs its statements: each commits by itself
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        assert {event.id for event in await first.claim_due_events(connection)} == {taken, kept}
        # the lease passes to another publisher meanwhile
        async with get_session(sandbox) as session:
            (await session.get(DomainEvent, taken)).claimed_by = "second"
        assert await first.mark_published(connection, {taken: "1-1", kept: "1-2"}) == 1
    async with get_session(sandbox) as session:
        events = (await session.scalars(select(DomainEvent))).all()
        rows = {row.id: (row.status, row.stream_id) for row in events}
    assert rows == {taken: ("pending", None), kept: ("published", "1-2")}


async def test_the_running_publisher_is_woken_by_the_commit_not_the_poll(sandbox_with_users):
    slow = replace(FAST, idle_wait_seconds=60, idle_wait_max_seconds=60)
    service = outbox_service(sandbox_with_users, slow)
    assert await service.start()
    user = (await source.list_users(sandbox_with_users))[0]
    stored = await source.calculate_and_store_airscore(
        sandbox_with_users, user_id=user.id, occupation_code="15-1252"
    )
    # the poll would take a minute; the commit listener wakes the publisher (and it the
    # consumer) now
    await eventually(lambda: inbox_event_ids(sandbox_with_users), timeout=10)
    assert await inbox_event_ids(sandbox_with_users) == [stored.event.id]
    assert await stream_event_ids(sandbox_with_users) == [stored.event.id]
    assert await service.stop()


async def test_start_stop_and_start_again(sandbox_with_users):
    service = outbox_service(sandbox_with_users, FAST)
    user = (await source.list_users(sandbox_with_users))[0]

    async def store() -> str:
        stored = await source.calculate_and_store_airscore(
            sandbox_with_users, user_id=user.id, occupation_code="15-1252"
        )
        return stored.event.id

    assert await service.start() is True
    assert await service.start() is False  # one publisher per sandbox
    first = await store()
    await eventually(lambda: _delivered(sandbox_with_users, {first}))
    assert await service.stop() is True and not service.running
    assert await service.stop() is False
    second = await store()
    assert await counts_by_status(sandbox_with_users) == {"published": 1, "pending": 1}
    assert await service.start() is True
    await eventually(lambda: _delivered(sandbox_with_users, {first, second}))
    assert await stream_event_ids(sandbox_with_users) == [first, second]
    await service.stop()


async def _delivered(sandbox: source.Sandbox, event_ids: set[str]) -> bool:
    return set(await inbox_event_ids(sandbox)) == event_ids


class MarkingGate:
    """Mixed into a publisher: it pauses between sending and marking until the gate opens."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reached_marking = asyncio.Event()
        self.gate = asyncio.Event()

    async def mark_published(self, connection, stream_ids):
        self.reached_marking.set()
        await self.gate.wait()
        return await super().mark_published(connection, stream_ids)


class GatedPublisher(MarkingGate, source.OutboxPublisher):
    """The lesson's relay, with the gate."""


class GatedGuardedPublisher(MarkingGate, GuardedPublisher):
    """The relay a sandbox's outbox runs, with the gate."""


async def test_stop_lets_the_current_batch_finish(sandbox):
    service = outbox_service(sandbox, FAST)
    service.publisher = gated = GatedGuardedPublisher(service)
    await service.start()
    ids = await add_pending_events(sandbox, 10)
    await asyncio.wait_for(gated.reached_marking.wait(), 10)
    stopping = asyncio.create_task(service.stop())
    finished, _ = await asyncio.wait({stopping}, timeout=0.05)  # the gate stays shut meanwhile
    assert not finished, "stop waits for the batch in hand"
    gated.gate.set()
    assert await stopping is True
    assert not service.running
    assert await counts_by_status(sandbox) == {"published": 10}
    assert sorted(await stream_event_ids(sandbox)) == sorted(ids)


async def test_a_publisher_cancelled_mid_batch_loses_nothing_and_the_consumer_deduplicates(sandbox):
    settings = replace(FAST, lease_seconds=0.2)
    ids = await add_pending_events(sandbox, 10)
    # its gate never opens: it dies between send and mark
    crashing = GatedPublisher(
        sandbox, batch_size=settings.batch_size, lease_seconds=settings.lease_seconds
    )
    batch = asyncio.create_task(crashing.publish_due_batch())
    await asyncio.wait_for(crashing.reached_marking.wait(), 10)
    batch.cancel()
    with suppress(asyncio.CancelledError):
        await batch
    assert sorted(await stream_event_ids(sandbox)) == sorted(ids)  # sent...
    assert await counts_by_status(sandbox) == {"pending": 10}  # ...but never marked

    survivor = new_publisher(sandbox, settings)  # picks them up once the dead lease expires
    await eventually(lambda: drain(survivor))
    assert await counts_by_status(sandbox) == {"published": 10}
    assert Counter(await stream_event_ids(sandbox)) == {event_id: 2 for event_id in ids}

    consumer = new_consumer(sandbox, settings)
    assert await drain_consumer(consumer) == 20
    assert sorted(await inbox_event_ids(sandbox)) == sorted(ids)
    assert consumer.duplicates_ignored == 10


async def _two_publishers_never_publish_an_event_twice(sandbox: source.Sandbox) -> None:
    ids = await add_pending_events(sandbox, 400)
    settings = replace(FAST, batch_size=20)
    totals = await asyncio.gather(*(drain(new_publisher(sandbox, settings)) for _ in range(2)))
    in_stream = await stream_event_ids(sandbox)
    assert len(in_stream) == 400 and set(in_stream) == set(ids)
    assert sum(totals) == 400
    assert await counts_by_status(sandbox) == {"published": 400}


async def test_two_concurrent_publishers_never_publish_an_event_twice(sandbox):
    await _two_publishers_never_publish_an_event_twice(sandbox)


async def test_two_concurrent_publishers_on_postgresql_never_publish_an_event_twice(
    postgres_registry,
):
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    await _two_publishers_never_publish_an_event_twice(sandbox)


async def test_reconnecting_the_broker_ends_the_degraded_status_before_any_batch(
    sandbox_with_users,
):
    sandbox = sandbox_with_users
    [user, _] = await source.list_users(sandbox)
    await source.calculate_and_store_airscore(
        sandbox, user_id=user.id, occupation_code="15-1252.00"
    )
    publisher = outbox_service(sandbox, FAST).publisher  # the sandbox's relay, not started
    await set_broker_outage(sandbox, cut=True)
    assert (await publisher.publish_due_batch()).broker_error.startswith("broker unavailable")
    assert sandbox.redis.health.degraded

    # The publisher is stopped: only the switch itself can tell that Redis answers again.
    await set_broker_outage(sandbox, cut=False)
    assert not sandbox.redis.cut_off and not sandbox.redis.health.degraded
    assert (await outbox_status(sandbox)).pending == 1  # still waiting for the publisher


async def test_broker_outage_during_a_burst_delays_but_loses_nothing(sandbox_with_users):
    sandbox = sandbox_with_users
    service = outbox_service(sandbox, FAST)
    await service.start()
    await set_broker_outage(sandbox, cut=True)
    burst = asyncio.create_task(eventing.store_airscore_burst(sandbox, count=60))

    async def relay_paused() -> bool:
        return service.circuit.is_open

    await eventually(relay_paused)
    await burst
    assert await stream_event_ids(sandbox) == []
    assert (await counts_by_status(sandbox)) == {"pending": 60}
    assert sandbox.redis.health.degraded and service.circuit.is_open
    async with get_session(sandbox) as session:  # the outage spent no event's attempts
        assert await session.scalar(select(func.max(DomainEvent.attempts))) == 0

    await set_broker_outage(sandbox, cut=False)
    async with get_session(sandbox) as session:
        all_ids = set((await session.scalars(select(DomainEvent.id))).all())
    await eventually(lambda: _delivered(sandbox, all_ids))
    in_stream = await stream_event_ids(sandbox)
    assert len(in_stream) == 60 and set(in_stream) == all_ids  # every event, exactly once
    assert await counts_by_status(sandbox) == {"published": 60}
    await service.stop()


async def test_an_oversized_event_fails_at_once_with_its_reason_without_blocking_the_rest(
    sandbox,
):
    settings = replace(FAST, max_message_bytes=2000)
    async with get_session(sandbox) as session:
        poison = DomainEvent(
            event_type="Huge",
            aggregate_type="Test",
            aggregate_id=source.new_id(),
            payload={"x": "y" * 5000},
        )
        session.add(poison)
    good = await add_pending_events(sandbox, 5)  # all younger than the poison event
    publisher = outbox_service(sandbox, settings).publisher  # the relay that checks sizes
    first = await publisher.publish_due_batch()
    assert (first.claimed, first.published, first.failed, first.released) == (6, 5, 1, 0)
    assert await stream_event_ids(sandbox) == good
    async with get_session(sandbox) as session:
        failed = await session.get(DomainEvent, poison.id)
    assert failed.status == "failed" and failed.attempts == 1
    assert failed.last_error.startswith("message is ") and "limit is 2000" in failed.last_error
    assert (await publisher.publish_due_batch()).claimed == 0  # never retried on its own

    # the operator raises the limit, then retries the failed event: it gets a fresh set of
    # attempts
    assert await eventing.retry_failed_events(sandbox) == 1
    async with get_session(sandbox) as session:
        retried = await session.get(DomainEvent, poison.id)
    assert (retried.status, retried.attempts) == ("pending", 0)
    raised = OutboxService(sandbox, replace(settings, max_message_bytes=10_000)).publisher
    assert (await raised.publish_due_batch()).published == 1
    assert await stream_event_ids(sandbox) == [*good, poison.id]
    assert await counts_by_status(sandbox) == {"published": 6}


def test_a_message_near_the_limit_is_measured_in_utf8_bytes_not_characters():
    payload = json.dumps({"note": "é" * 600}, ensure_ascii=False)  # 2 bytes a character
    claimed = source.ClaimedEvent(
        source.new_id(), "Huge", "Test", source.new_id(), payload, source.utc_now()
    )
    exact = sum(len(key) + len(value.encode()) for key, value in claimed.stream_message().items())
    assert exact > sum(len(key) + len(value) for key, value in claimed.stream_message().items())
    assert oversized_message_bytes(claimed, limit=exact) is None  # exactly at the limit: sent
    assert oversized_message_bytes(claimed, limit=exact - 1) == exact  # one byte over: refused
    assert oversized_message_bytes(claimed, limit=64 * 1024) is None


def test_the_broker_circuit_opens_once_and_probes_with_growing_jittered_backoff():
    circuit = BrokerCircuit(base_seconds=1, max_seconds=8)
    circuit._random = random.Random(7)
    assert circuit.open(ConnectionError("refused")) is True
    assert circuit.open(ConnectionError("refused again")) is False, "one outage, reported once"
    for failed_probes, full_delay in [(0, 1), (1, 2), (2, 4), (3, 8), (4, 8), (40, 8)]:
        circuit.probes_failed = failed_probes
        delays = [circuit.seconds_until_probe() for _ in range(50)]
        assert all(full_delay / 2 <= delay <= full_delay for delay in delays)
        assert len(set(delays)) > 1, "jitter spreads the probes"
    assert circuit.close() is not None and not circuit.is_open and circuit.close() is None
    assert circuit.outages == 1


# --- the consumer --------------------------------------------------------------------------


async def test_the_consumer_reclaims_messages_another_consumer_abandoned(sandbox):
    ids = await add_pending_events(sandbox, 5)
    await drain(new_publisher(sandbox))
    client, stream = sandbox.redis.client, sandbox.redis.key("events")
    await client.xgroup_create(stream, source.EVENT_CONSUMER_GROUP, id="0")
    # read, never acknowledged
    await client.xreadgroup(source.EVENT_CONSUMER_GROUP, "crashed-consumer", {stream: ">"})

    consumer = new_consumer(sandbox)
    reclaimed = 0

    async def all_recorded() -> bool:
        nonlocal reclaimed
        reclaimed += (await consumer.consume_batch()).reclaimed
        return sorted(await inbox_event_ids(sandbox)) == sorted(ids)

    await eventually(all_recorded)
    assert reclaimed == 5
    assert (await client.xpending(stream, source.EVENT_CONSUMER_GROUP))["pending"] == 0


async def test_the_consumer_recreates_its_group_after_the_sandbox_is_reset(sandbox_with_users):
    sandbox = sandbox_with_users
    service = outbox_service(sandbox, FAST)
    await service.start()
    user = (await source.list_users(sandbox))[0]
    before = await source.calculate_and_store_airscore(
        sandbox, user_id=user.id, occupation_code="15-1252"
    )
    await eventually(lambda: _delivered(sandbox, {before.event.id}))

    # section 2's initialize: deletes the events, the inbox, the stream and its group
    users = await initialize_sandbox(sandbox)
    after = await source.calculate_and_store_airscore(
        sandbox, user_id=users[0].id, occupation_code="15-1252"
    )
    await eventually(lambda: _delivered(sandbox, {after.event.id}))
    assert await stream_event_ids(sandbox) == [after.event.id]
    await service.stop()


# --- status, metrics and lifecycle ---------------------------------------------------------


async def test_status_counts_rates_and_latencies_come_from_the_data(sandbox_with_users):
    sandbox = sandbox_with_users
    service = outbox_service(sandbox, FAST)
    await service.start()
    user = (await source.list_users(sandbox))[0]
    stored = [
        await source.calculate_and_store_airscore(
            sandbox, user_id=user.id, occupation_code="15-1252"
        )
        for _ in range(3)
    ]

    async def published_and_delivered():
        status = await outbox_status(sandbox)
        return status if status.published == status.delivered == 3 else None

    # delivery may come before the mark commits
    status = await eventually(published_and_delivered)
    assert (status.pending, status.published, status.failed, status.delivered) == (0, 3, 0, 3)
    assert status.publisher_running and status.stream_length == 3
    assert status.duplicates_ignored == 0
    assert 0 <= status.median_latency_ms <= status.p95_latency_ms
    assert status.oldest_pending_age_seconds is None
    newest_first = [s.event.id for s in reversed(stored)]
    assert [row["id"] for row in status.published_events] == newest_first
    assert all(row["published_at"] and row["delivered_at"] for row in status.published_events)
    assert any(re.search(r"published [13]\b", line) for line in status.activity)

    await service.stop()
    await set_broker_outage(sandbox, cut=True)
    waiting = await source.calculate_and_store_airscore(
        sandbox, user_id=user.id, occupation_code="15-1252"
    )
    status = await outbox_status(sandbox)
    assert not status.publisher_running and status.broker_cut_off
    assert status.pending == 1 and status.pending_events[0]["id"] == waiting.event.id
    assert status.oldest_pending_age_seconds >= 0 and status.stream_length is None


async def test_releasing_the_sandbox_stops_its_publisher(registry):
    sandbox = await registry.acquire(new_sandbox_id())
    service = outbox_service(sandbox, FAST)
    await service.start()
    assert service.running
    await registry.release(sandbox.id)
    assert not service.running


async def _publish_consume_and_prune(sandbox: source.Sandbox, count: int, keep: int) -> int:
    await add_pending_events(sandbox, count)
    service = outbox_service(sandbox, replace(FAST, batch_size=500))
    await drain(service.publisher)
    while (await service.consumer.consume_batch()).received:
        pass
    pruned = 0
    while step := await prune_delivered_events(sandbox, keep=keep, inbox_retention_seconds=3600):
        pruned += step
    return pruned


async def test_a_large_history_is_pruned_down_to_the_newest_kept_events(sandbox):
    # a batch stays whole
    assert await _publish_consume_and_prune(sandbox, 1_500, keep=200) >= 1_500 - 200 - 500
    async with get_session(sandbox) as session:
        left = await session.scalar(select(func.count()).select_from(DomainEvent))
    assert 200 <= left <= 200 + 500
    status = await outbox_status(sandbox, limit=10)
    assert status.published == status.delivered == left and len(status.published_events) == 10


async def test_a_large_prune_on_postgresql_vacuums_the_events_and_the_inbox_at_once(
    postgres_registry,
):
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    assert await _publish_consume_and_prune(sandbox, 1_500, keep=200) >= VACUUM_AFTER_PRUNING
    vacuumed_tables = text(
        "SELECT relname, last_vacuum IS NOT NULL FROM pg_stat_user_tables "
        "WHERE schemaname = :schema"
    )
    async with sandbox.engine.connect() as connection:
        rows = await connection.execute(vacuumed_tables, {"schema": sandbox.location})
        vacuumed = dict(rows.all())
    assert vacuumed[DomainEvent.__tablename__] and vacuumed[ConsumedEvent.__tablename__]


async def test_the_outbox_change_count_moves_with_events_and_batches_not_with_reads(
    sandbox_with_users,
):
    """What an idle status panel looks at every few seconds (pages/common/outbox_panels.py's
    watch_for_changes)."""
    sandbox = sandbox_with_users
    before = await eventing.outbox_changes(sandbox)
    await outbox_status(sandbox, limit=10)
    assert await eventing.outbox_changes(sandbox) == before  # reading changes nothing
    user = (await source.list_users(sandbox))[0]
    await source.calculate_and_store_airscore(sandbox, user_id=user.id, occupation_code="13-2011")
    stored = await eventing.outbox_changes(sandbox)
    assert stored > before  # an event committed (by any tab of this process)
    service = outbox_service(sandbox, FAST)
    await service.start()
    try:
        # the publisher's batch moved it again
        await eventually(lambda: _changed_since(sandbox, stored))
        assert (await counts_by_status(sandbox)) == {"published": 1}
    finally:
        await service.stop()


async def _changed_since(sandbox: source.Sandbox, count: int) -> bool:
    moved = await eventing.outbox_changes(sandbox) > count
    return moved and (await counts_by_status(sandbox)).get("published") == 1
