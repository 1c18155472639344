"""What section 5's status panel shows, read in a few statements, and the broker's durability.

Counts by status, the rate of the last few seconds, the oldest pending event, commit-to-publish
latencies, the latest events of each kind, the stream's backlog: every figure measured now,
from the database and the broker. The broker's persistence settings are read once per process
(a broker that does not answer is asked again next time).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

import source
from classroom.cache.breaker import REDIS_ERRORS
from classroom.cache.link import RedisService
from classroom.outbox.audit import AuditReport
from classroom.outbox.broker import (
    BrokerDurability,
    StreamBacklog,
    read_broker_durability,
    read_stream_backlog,
)
from classroom.outbox.counts import PublishedRate, counts_statement
from classroom.outbox.service import outbox_service

if TYPE_CHECKING:
    from classroom.sandboxes.sandbox import Sandbox

DomainEvent, ConsumedEvent = source.DomainEvent, source.ConsumedEvent
EVENT_CONSUMER_GROUP = source.EVENT_CONSUMER_GROUP
get_session, utc_now = source.get_session, source.utc_now
_broker_durability: weakref.WeakKeyDictionary[RedisService, BrokerDurability] = (
    weakref.WeakKeyDictionary()
)


async def read_durability_of(service: RedisService) -> BrokerDurability:
    """How this Redis keeps its streams across a restart: asked once, then known.

    The Runtime asks at start-up. A broker that does not answer says "unknown", and is asked again
    next time.
    """
    known = _broker_durability.get(service)
    if known is None:
        if service.breaker.is_open:  # not answering: asking would cost every page a timeout
            return BrokerDurability(
                "unknown", "the broker does not answer, so how it persists is not known yet."
            )
        try:
            known = await asyncio.wait_for(
                read_broker_durability(service.client, in_process=service.mode == "fakeredis"), 2.0
            )
        except REDIS_ERRORS:
            return BrokerDurability(
                "unknown", "the broker did not answer, so how it persists is not known yet."
            )
        _broker_durability[service] = known
    return known


async def broker_durability(sandbox: Sandbox) -> BrokerDurability:
    """How the sandbox's broker keeps its stream across a restart.

    Read at start-up; no round trip after.
    """
    return await read_durability_of(sandbox.redis.service)


@dataclass(frozen=True)
class OutboxStatus:
    """The event status panel: counts, rates and latencies measured now, and the latest events."""

    publisher_running: bool
    broker_cut_off: bool
    broker_outage_seconds: Optional[float]  # how long the relay has been paused (None: not paused)
    changes: int  # outbox_changes as it was before anything below was read
    pending: int
    published: int
    failed: int
    delivered: int
    duplicates_ignored: int
    stream_length: Optional[int]  # None while the broker cannot be reached
    consumer_lag: Optional[int]  # entries the consumer group has not read yet
    consumer_unacknowledged: Optional[int]  # read but not acknowledged yet
    events_per_second: float  # published during the last RATE_WINDOW_SECONDS, per second
    oldest_pending_age_seconds: Optional[float]
    median_latency_ms: Optional[float]  # commit-to-publish, over the latest published events
    p95_latency_ms: Optional[float]
    last_audit: Optional[AuditReport]
    republished_by_audits: int
    pruned: (
        int  # published and consumed events pruned so far (beyond the newest keep_published_events)
    )
    durability: BrokerDurability
    pending_events: list[dict[str, Any]]
    published_events: list[dict[str, Any]]
    failed_events: list[dict[str, Any]]
    activity: list[str]

    @property
    def moving(self) -> bool:
        """True while events are on their way: pending, not yet consumed, or held by an outage."""
        unconsumed = self.published != self.delivered
        return self.pending > 0 or unconsumed or self.broker_outage_seconds is not None


RATE_WINDOW_SECONDS = 5.0
LATENCY_SAMPLE_SIZE = 200  # the median and p95 latencies are over the newest this many


def _event_row(event: DomainEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "event_type": event.event_type,
        "aggregate_id": event.aggregate_id,
        "status": event.status,
        "attempts": event.attempts,
        "created_at": event.created_at,
        "next_attempt_at": event.next_attempt_at,
        "last_error": event.last_error,
        "published_at": event.published_at,
    }


_published_rates: weakref.WeakKeyDictionary[Any, PublishedRate] = weakref.WeakKeyDictionary()


async def _event_overview(
    session: AsyncSession, sandbox: Sandbox, now: datetime
) -> tuple[dict[str, int], float, Optional[datetime]]:
    """Events by status and delivered ones, the rate of the last few seconds, the oldest pending
    event.

    The counts are the database's own (classroom.outbox.counts: kept by triggers), read with the
    oldest pending event in one statement, so a refresh costs the same with 100 events as with
    20,000. The rate is the growth of published_total since a reading about a window ago; only
    without one (the first reading, or after a quiet spell) are the window's events counted.
    """
    events = DomainEvent
    oldest_pending = (
        select(events.created_at)
        .where(events.status == "pending")
        .order_by(events.created_at)
        .limit(1)
        .scalar_subquery()
    )
    counted = counts_statement().add_columns(oldest_pending)
    pending, published, failed, delivered, published_total, oldest = (
        await session.execute(counted)
    ).one()
    rate = _published_rates.setdefault(sandbox, PublishedRate(RATE_WINDOW_SECONDS))
    per_second = rate.per_second(int(published_total), time.monotonic())
    if per_second is None:
        since = now - timedelta(seconds=RATE_WINDOW_SECONDS)
        recently_published = await session.scalar(
            select(func.count())
            .select_from(events)
            .where(events.status == "published", events.published_at >= since)
        )
        per_second = int(recently_published or 0) / RATE_WINDOW_SECONDS
    counts = {
        "pending": int(pending),
        "published": int(published),
        "failed": int(failed),
        "delivered": int(delivered),
    }
    return counts, per_second, oldest


async def _latency_sample(session: AsyncSession) -> list[float]:
    """Commit-to-publish latencies (ms), sorted.

    The sample is the newest LATENCY_SAMPLE_SIZE published events.
    """
    latency_sample = await session.execute(
        select(DomainEvent.created_at, DomainEvent.published_at)
        .where(DomainEvent.status == "published")
        .order_by(DomainEvent.published_at.desc())
        .limit(LATENCY_SAMPLE_SIZE)
    )
    # Latency runs from created_at, stamped inside the writing transaction just before its commit,
    # so it slightly overstates commit-to-publish, never understates it.
    return sorted(
        (published - created).total_seconds() * 1000 for created, published in latency_sample
    )


async def _latest_events(session: AsyncSession, *, limit: int) -> dict[str, list[dict[str, Any]]]:
    """The oldest pending and failed events, the latest published ones with their delivery time."""
    latest: dict[str, list[dict[str, Any]]] = {}
    for status in ("pending", "failed"):
        statement = (
            select(DomainEvent)
            .where(DomainEvent.status == status)
            .order_by(DomainEvent.created_at)
            .limit(limit)
        )
        latest[status] = [_event_row(event) for event in (await session.scalars(statement)).all()]
    published = await session.execute(
        select(DomainEvent, ConsumedEvent.consumed_at)
        .outerjoin(ConsumedEvent, ConsumedEvent.event_id == DomainEvent.id)
        .where(DomainEvent.status == "published")
        .order_by(DomainEvent.published_at.desc(), DomainEvent.created_at.desc())
        .limit(limit)
    )
    latest["published"] = [
        {**_event_row(event), "delivered_at": delivered_at} for event, delivered_at in published
    ]
    return latest


async def _stream_backlog(sandbox: Sandbox, timeout_seconds: float) -> Optional[StreamBacklog]:
    try:
        return await asyncio.wait_for(
            read_stream_backlog(
                sandbox.redis.client, sandbox.redis.key("events"), EVENT_CONSUMER_GROUP
            ),
            timeout_seconds,
        )
    except REDIS_ERRORS:
        return None  # the broker cannot be reached


def _percentile(sorted_values: list[float], fraction: float) -> Optional[float]:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


async def outbox_status(sandbox: Sandbox, *, limit: int = 20) -> OutboxStatus:
    """Count events by status; measure rate, backlog age, latency; list the latest of each kind."""
    service = outbox_service(sandbox)
    now, changes = (
        utc_now(),
        service.changes,
    )  # first: a change while reading shows as a change after
    async with get_session(sandbox) as session:
        counts, events_per_second, oldest_pending = await _event_overview(session, sandbox, now)
        latencies = await _latency_sample(session)
        latest = await _latest_events(session, limit=limit)
    backlog = await _stream_backlog(sandbox, service.settings.broker_timeout_seconds)
    return OutboxStatus(
        publisher_running=service.running,
        broker_cut_off=sandbox.redis.cut_off,
        broker_outage_seconds=service.circuit.seconds_open() if service.circuit.is_open else None,
        changes=changes,
        pending=int(counts.get("pending", 0)),
        published=int(counts.get("published", 0)),
        failed=int(counts.get("failed", 0)),
        delivered=int(counts.get("delivered") or 0),
        duplicates_ignored=service.consumer.duplicates_ignored,
        stream_length=None if backlog is None else backlog.length,
        consumer_lag=None if backlog is None else backlog.lag,
        consumer_unacknowledged=None if backlog is None else backlog.pending,
        events_per_second=events_per_second,
        oldest_pending_age_seconds=(now - oldest_pending).total_seconds()
        if oldest_pending
        else None,
        median_latency_ms=statistics.median(latencies) if latencies else None,
        p95_latency_ms=_percentile(latencies, 0.95),
        last_audit=service.audit.last,
        republished_by_audits=service.audit.republished_total,
        pruned=service.pruned_total,
        durability=await broker_durability(sandbox),
        pending_events=latest["pending"],
        published_events=latest["published"],
        failed_events=latest["failed"],
        activity=list(service.activity.lines),
    )
