"""The relay and the consumer QuLab runs: the lesson's, with what keeps them going under faults.

source.run_publisher and source.run_consumer are the loops that run; these subclasses only
change the steps inside them:

- GuardedPublisher.publish_due_batch: skipped while the broker circuit is open (a probe decides
  when to try again), a database failure noted and retried with backoff, each batch noted in
  the activity log and the journal, the audit run when it is due. Its send refuses oversized
  messages itself and takes a broker-wide refusal (OOM, READONLY, MISCONF, LOADING, …) for an
  outage, not for the event's fault. idle_seconds says how long the loop may sleep.
- GuardedConsumer.consume_batch: skipped during an outage, trims what every group acknowledged,
  and while idle lets the process's one StreamWatch wake it.

Both talk to Redis through outbox_broker_call: a timeout, and at most OUTBOX_BROKER_CALLS_AT_ONCE
calls per process, so 200 idle consumers never exhaust redis-py's pool of connections.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from sqlalchemy import bindparam, select, update

import source
from classroom.cache.breaker import REDIS_ERRORS
from classroom.outbox.broker import (
    is_broker_wide_refusal,
    outbox_broker_call,
    trim_acknowledged_entries,
)
from classroom.outbox.report import RelayReport
from classroom.outbox.settings import OutboxSettings
from classroom.outbox.watch import stream_watch

if TYPE_CHECKING:
    from classroom.outbox.core import OutboxCore

T = TypeVar("T")
LEASE_END_MARGIN_SECONDS = 0.05  # look just after another relay's lease ended, not just before


# The stream message's fields besides the stored ones: its names, and the ISO time it adds.
_MESSAGE_OVERHEAD_CHARACTERS = (
    len("event_idevent_typeaggregate_typeaggregate_idoccurred_atpayload") + 32
)


def oversized_message_bytes(claimed: source.ClaimedEvent, *, limit: int) -> Optional[int]:
    """The size in bytes of the event's stream message if it is over `limit`, else None.

    UTF-8 takes at most 4 bytes a character: a message whose characters, times 4, stay within
    the limit is within it without being built (a batch's messages are then built once, to be
    sent, not twice).
    """
    stored = (claimed.id, claimed.event_type, claimed.aggregate_type, claimed.aggregate_id)
    characters = _MESSAGE_OVERHEAD_CHARACTERS + sum(map(len, stored)) + len(claimed.payload_json)
    if 4 * characters <= limit:
        return None
    size = sum(len(key) + len(value.encode()) for key, value in claimed.stream_message().items())
    return size if size > limit else None


def backoff_seconds(settings: OutboxSettings, failures: int) -> float:
    """Exponential backoff with jitter for database failures (the broker's are the circuit's)."""
    base, ceiling = settings.outage_backoff_base_seconds, settings.outage_backoff_max_seconds
    delay = min(ceiling, base * 2 ** min(failures - 1, 30))
    return delay / 2 + random.uniform(0, delay / 2)


@dataclass
class Undelivered:
    """The events of a batch the broker did not take, sorted by whose fault it was."""

    refused: dict[str, str] = field(default_factory=dict)  # event id -> why it can never go
    unsent: list[str] = field(default_factory=list)  # the broker was down: not the event's fault
    broker_error: str = ""


_EVENTS = source.DomainEvent.__table__


class GuardedPublisher(source.OutboxPublisher):
    """The lesson's relay, paused during broker outages, audited, and noted in the activity log."""

    def __init__(self, outbox: OutboxCore) -> None:
        settings = outbox.settings
        super().__init__(
            outbox.sandbox,
            batch_size=settings.batch_size,
            lease_seconds=settings.lease_seconds,
            broker_timeout_seconds=settings.broker_timeout_seconds,
            idle_seconds=settings.idle_wait_seconds,
        )
        self.outbox = outbox
        self.settings = settings
        self._paused = False
        self._database_failures = 0
        self._next_claimable: Optional[float] = None  # seconds; math.inf: nothing pending
        self._backoff = settings.idle_wait_seconds
        self._undelivered = Undelivered()

    async def publish_due_batch(self) -> RelayReport:
        """The lesson's batch, unless the broker is down; then the audit, if it is due."""
        outbox = self.outbox
        self._paused = outbox.circuit.is_open and not await outbox.probe_broker_if_due()
        if self._paused:
            return RelayReport()
        try:
            self._undelivered = Undelivered()
            report = RelayReport(**vars(await super().publish_due_batch()))
            await self.settle_undelivered(report)
            self._next_claimable = None
            if report.claimed < self.batch_size and not report.broker_error:
                self._next_claimable = await self.seconds_until_claimable()
            audit = await outbox.audit_if_due()
        except Exception as error:  # the database failed: keep running, try again later
            self._database_failures += 1
            outbox.activity.note_error("publisher", error)
            if self._undelivered.broker_error:  # the broker failed first: that is still news
                outbox.broker_failed(self._undelivered.broker_error[:300])
            return RelayReport()
        self._database_failures = 0
        outbox.activity.clear_error("publisher")
        await outbox.after_batch(report)
        broker_error = report.broker_error or (audit.broker_error if audit else "")
        if broker_error:
            outbox.broker_failed(broker_error)
        elif audit is not None and audit.republished:
            outbox.publisher_wake.set()  # the audit made events pending again: go at once
        return report

    async def send_to_stream(self, events: list[source.ClaimedEvent]) -> source.StreamDelivery:
        """As the lesson, but oversized messages are refused here and never sent, and a broker
        that is down, or refuses every event (out of memory, read-only…), leaves the events unsent
        rather than refused: the outage is not their fault."""
        undelivered = self._undelivered
        sendable = []
        for claimed in events:
            size = oversized_message_bytes(claimed, limit=self.settings.max_message_bytes)
            if size is not None:
                undelivered.refused[claimed.id] = (
                    f"message is {size} bytes; "
                    f"the broker's limit is {self.settings.max_message_bytes}"
                )
            else:
                sendable.append(claimed)
        if not sendable:
            return source.StreamDelivery()
        try:
            delivery = await super().send_to_stream(sendable)
        except REDIS_ERRORS as error:
            undelivered.unsent = [claimed.id for claimed in sendable]
            undelivered.broker_error = f"broker unavailable: {type(error).__name__}: {error}"[:300]
            return source.StreamDelivery()
        for event_id, reply in delivery.refused.items():
            if is_broker_wide_refusal(reply):
                undelivered.unsent.append(event_id)
                undelivered.broker_error = (
                    f"broker unavailable: it refused every message: {reply!r}"
                )
            else:
                undelivered.refused[event_id] = f"the broker refused this event: {reply}"
        delivery.refused = {}
        return delivery

    async def settle_undelivered(self, report: RelayReport) -> None:
        """Mark refused events failed with their reason; give unsent ones back at once."""
        undelivered = self._undelivered
        if not (undelivered.refused or undelivered.unsent):
            return
        report.broker_error = undelivered.broker_error[:300]
        async with self.sandbox.engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            report.failed = await self.mark_failed(connection, undelivered.refused)
            report.released = await self.release(
                connection, undelivered.unsent, undelivered.broker_error
            )

    async def mark_failed(self, connection: Any, reasons: dict[str, str]) -> int:
        """Mark the events the broker refused for what they are: 'failed', with the reason."""
        if not reasons:
            return 0
        events = _EVENTS.c
        record = (
            update(_EVENTS)
            .where(events.id == bindparam("event_id"), events.claimed_by == self.name)
            .values(
                status="failed",
                attempts=events.attempts + 1,
                last_error=bindparam("reason"),
                claimed_by=None,
                claimed_until=None,
            )
        )
        rows = [{"event_id": key, "reason": reason[:500]} for key, reason in reasons.items()]
        await connection.execute(record, rows)
        return len(rows)

    async def release(self, connection: Any, event_ids: list[str], error: str) -> int:
        """Give unsent events back, pending, their attempts untouched: the outage was not theirs."""
        if not event_ids:
            return 0
        events = _EVENTS.c
        release = (
            update(_EVENTS)
            .where(events.id.in_(event_ids), events.claimed_by == self.name)
            .values(last_error=error[:500], claimed_by=None, claimed_until=None)
        )
        return int((await connection.execute(release)).rowcount)

    async def call_broker(self, call: Awaitable[T]) -> T:
        """Through the process's outbox slots, with the timeout; the sandbox's health noted."""
        link = self.sandbox.redis
        try:
            result = await outbox_broker_call(call, self.broker_timeout_seconds)
        except REDIS_ERRORS as error:
            link.health.record_failure(error)
            raise
        link.health.record_success()
        return result

    async def seconds_until_claimable(self) -> float:
        """0 if a pending event can be claimed now, math.inf if none is pending, else when a
        lease ends (another relay's lease, perhaps of a relay that died, is the only thing that
        keeps a pending event from being claimed)."""
        events = source.DomainEvent.__table__.c
        soonest = (
            select(events.claimed_until)
            .where(events.status == "pending")
            .order_by(events.claimed_until.asc().nulls_first())
            .limit(1)
        )
        async with self.sandbox.engine.connect() as connection:
            row = (await connection.execute(soonest)).first()
        if row is None:
            return math.inf
        if row[0] is None:
            return 0.0
        return max(0.0, (row[0] - source.utc_now()).total_seconds())

    def idle_seconds(self, report: RelayReport) -> float:  # type: ignore[override]
        """How long to idle: until a probe, a backoff, or until a wake-up is sure.

        Broker down: until the next probe. Database down: a backoff. Nothing pending and every
        commit wakes it: it looks on its own only every quiet_look_seconds. An event leased by
        another relay: until that lease ends. Otherwise a backoff that doubles with each empty look,
        up to idle_wait_max_seconds.
        """
        settings, outbox = self.settings, self.outbox
        if self._paused or outbox.circuit.is_open:
            return outbox.seconds_until_probe()
        if self._database_failures:
            return backoff_seconds(settings, self._database_failures)
        if report.claimed:
            self._backoff = settings.idle_wait_seconds
        backoff, ahead = self._backoff, self._next_claimable
        self._backoff = min(settings.idle_wait_max_seconds, self._backoff * 2)
        if ahead is None or not outbox.every_commit_wakes_the_publisher:
            if ahead is None or math.isinf(ahead):
                wait = backoff
            else:
                wait = min(backoff, ahead + LEASE_END_MARGIN_SECONDS)
        elif math.isinf(ahead):
            wait = settings.quiet_look_seconds
        else:
            wait = min(settings.quiet_look_seconds, ahead + LEASE_END_MARGIN_SECONDS)
        return outbox.until_audit(wait)


class GuardedConsumer(source.StreamConsumer):
    """The lesson's consumer, paused during broker outages; idle, the process's watch wakes it."""

    def __init__(self, outbox: OutboxCore) -> None:
        settings = outbox.settings
        super().__init__(
            outbox.sandbox,
            batch_size=settings.consumer_batch_size,
            reclaim_idle_seconds=settings.consumer_reclaim_idle_seconds,
            broker_timeout_seconds=settings.broker_timeout_seconds,
            idle_seconds=settings.quiet_look_seconds,
        )
        self.outbox = outbox
        self.settings = settings
        self._paused = False
        self._database_failures = 0
        self._watching = False

    async def consume_batch(self) -> source.ConsumeReport:
        """The lesson's batch, unless the broker is down; then trim what all groups acknowledged."""
        outbox = self.outbox
        self.stop_watching()
        self._paused = outbox.circuit.is_open
        if self._paused:
            return source.ConsumeReport()
        try:
            report = await super().consume_batch()
            if report.received:
                trim = trim_acknowledged_entries(
                    self.sandbox.redis.client,
                    self.stream_key,
                    keep_at_least=self.settings.stream_trim_above,
                )
                await outbox_broker_call(trim, self.broker_timeout_seconds)
        except REDIS_ERRORS as error:
            outbox.broker_failed(f"broker unavailable: {type(error).__name__}: {error}"[:300])
            self._paused = True
            return source.ConsumeReport()
        except Exception as error:  # the database failed: keep running, try again later
            self._database_failures += 1
            outbox.activity.note_error("consumer", error)
            return source.ConsumeReport()
        self._database_failures = 0
        outbox.activity.clear_error("consumer")
        if report.group_created:  # the stream was new: a broker restart may have lost entries
            outbox.audit_now()
            outbox.publisher_wake.set()
        if report.received:
            reclaimed = f", {report.reclaimed} reclaimed" if report.reclaimed else ""
            outbox.activity.note(
                f"consumer received {report.received}: {report.recorded} new, "
                f"{report.duplicates} duplicates ignored{reclaimed}"
            )
        if report.received < self.batch_size:
            self.start_watching()
        return report

    async def call_broker(self, call: Awaitable[T]) -> T:
        """Through the process's outbox slots, with the timeout."""
        return await outbox_broker_call(call, self.broker_timeout_seconds)

    def idle_seconds(self, report: source.ConsumeReport) -> float:
        """Until the broker is back (it wakes the consumer), a backoff, or a quiet look."""
        if self._paused:
            return self.settings.idle_wait_max_seconds
        if self._database_failures:
            return backoff_seconds(self.settings, self._database_failures)
        return self.settings.quiet_look_seconds

    def start_watching(self) -> None:
        """Idle: the process's one look at every idle stream wakes this consumer when its stream
        holds entries the group has not read or acknowledged (another process's relay, a dead
        consumer), or the broker lost the stream or the group."""
        watch = stream_watch(
            self.sandbox.redis.service.client,
            source.EVENT_CONSUMER_GROUP,
            interval_seconds=self.settings.idle_wait_max_seconds,
            timeout_seconds=self.settings.broker_timeout_seconds,
        )
        watch.watch(self.stream_key, self.outbox.consumer_wake.set)
        self._watching = True

    def stop_watching(self) -> None:
        """Busy again, or stopped: the watch forgets this consumer."""
        if self._watching:
            self._watching = False
            watch = stream_watch(
                self.sandbox.redis.service.client,
                source.EVENT_CONSUMER_GROUP,
                interval_seconds=self.settings.idle_wait_max_seconds,
                timeout_seconds=self.settings.broker_timeout_seconds,
            )
            watch.unwatch(self.stream_key, self.outbox.consumer_wake.set)
