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
from typing import TYPE_CHECKING, Optional, TypeVar

from sqlalchemy import select

import source
from classroom.cache.breaker import REDIS_ERRORS
from classroom.outbox.broker import (
    is_broker_wide_refusal,
    outbox_broker_call,
    trim_acknowledged_entries,
)
from classroom.outbox.settings import OutboxSettings
from classroom.outbox.watch import stream_watch

if TYPE_CHECKING:
    from classroom.outbox.core import OutboxCore

T = TypeVar("T")
LEASE_END_MARGIN_SECONDS = 0.05  # look just after another relay's lease ended, not just before


def backoff_seconds(settings: OutboxSettings, failures: int) -> float:
    """Exponential backoff with jitter for database failures (the broker's are the circuit's)."""
    base, ceiling = settings.outage_backoff_base_seconds, settings.outage_backoff_max_seconds
    delay = min(ceiling, base * 2 ** min(failures - 1, 30))
    return delay / 2 + random.uniform(0, delay / 2)


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

    async def publish_due_batch(self) -> source.BatchReport:
        """The lesson's batch, unless the broker is down; then the audit, if it is due."""
        outbox = self.outbox
        self._paused = outbox.circuit.is_open and not await outbox.probe_broker_if_due()
        if self._paused:
            return source.BatchReport()
        try:
            report = await super().publish_due_batch()
            self._next_claimable = None
            if report.claimed < self.batch_size and not report.broker_error:
                self._next_claimable = await self.seconds_until_claimable()
            audit = await outbox.audit_if_due()
        except Exception as error:  # the database failed: keep running, try again later
            self._database_failures += 1
            outbox.activity.note_error("publisher", error)
            return source.BatchReport()
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
        """Refuse oversized messages here; send the rest as the lesson does."""
        too_large: dict[str, str] = {}
        sendable = []
        for claimed in events:
            size = sum(
                len(key) + len(value.encode()) for key, value in claimed.stream_message().items()
            )
            if size > self.settings.max_message_bytes:
                too_large[claimed.id] = (
                    f"message is {size} bytes; "
                    f"the broker's limit is {self.settings.max_message_bytes}"
                )
            else:
                sendable.append(claimed)
        delivery = await super().send_to_stream(sendable) if sendable else source.StreamDelivery()
        delivery.rejected.update(too_large)
        return delivery

    def refused(self, delivery: source.StreamDelivery, event_id: str, reply: Exception) -> None:
        """A refusal the broker would give every event (out of memory, read-only…) is an outage."""
        if is_broker_wide_refusal(reply):
            delivery.unsent.append(event_id)
            delivery.broker_error = f"broker unavailable: it refused every message: {reply!r}"[:300]
        else:
            super().refused(delivery, event_id, reply)

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

    def idle_seconds(self, report: source.BatchReport) -> float:
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
