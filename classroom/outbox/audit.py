"""What keeps the outbox whole over a class: an audit of what the broker lost, and bounded history.

- PublishedEventAudit: a broker restarted without persistence forgets entries it had accepted;
  the outbox says 'published', the consumer never sees them. The audit looks each unconsumed
  published event up in the stream and makes those it cannot find pending again (the consumer's
  inbox recognises one that did arrive after all).
- prune_delivered_events: events published AND consumed, beyond the newest few hundred, are
  deleted, so the status panel's cost stays flat however long the class runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Optional

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError

import source
from classroom.cache.breaker import REDIS_ERRORS
from classroom.outbox.broker import outbox_broker_call
from classroom.outbox.settings import OutboxSettings
from classroom.sandboxes.sandbox import quoted_schema

if TYPE_CHECKING:
    from classroom.sandboxes.sandbox import Sandbox

logger = logging.getLogger("qulab")
_EVENTS = source.DomainEvent.__table__
ConsumedEvent = source.ConsumedEvent
utc_now = source.utc_now


@dataclass(frozen=True)
class AuditReport:
    """What one audit of published events found."""

    at: datetime
    checked: int  # published events nobody had consumed yet, looked up in the stream
    missing: int  # of those, gone from the stream: the broker lost them
    republished: int  # pending again, so the relay sends them once more
    broker_error: str = ""


class PublishedEventAudit:
    """Finds events marked published that the broker lost and nobody consumed; republishes them.

    A broker restarted without persistence forgets entries it had accepted: the outbox says
    'published', the consumer never sees them. The audit looks each unconsumed published event up
    by its stream id (one pipelined XRANGE), checks the inbox again for those missing (the consumer
    may have acknowledged and the stream trimmed them meanwhile), and makes the rest pending again.
    A republished event that did arrive after all is recognised by the consumer's inbox.
    """

    def __init__(self, sandbox: Sandbox, settings: OutboxSettings) -> None:
        self.sandbox = sandbox
        self.settings = settings
        self.last: Optional[AuditReport] = None
        self.republished_total = 0
        # Events published before this moment are known consumed:
        # each audit reads only what is newer.
        self._checked_from = datetime.min.replace(tzinfo=UTC)

    async def run(self) -> AuditReport:
        """Audit the oldest unconsumed published events (at most audit_batch_size)."""
        started = utc_now()
        events = _EVENTS.c
        consumed = (
            select(ConsumedEvent.event_id).where(ConsumedEvent.event_id == events.id).exists()
        )
        unconsumed = (
            select(events.id, events.stream_id, events.published_at)
            .where(
                events.status == "published", events.published_at >= self._checked_from, ~consumed
            )
            .order_by(events.published_at)
            .limit(self.settings.audit_batch_size)
        )
        async with self.sandbox.engine.connect() as connection:
            candidates = [
                row for row in (await connection.execute(unconsumed)).all() if row.stream_id
            ]
        missing: list[str] = []
        if candidates:
            try:
                pipeline = self.sandbox.redis.client.pipeline(transaction=False)
                for row in candidates:
                    pipeline.xrange(
                        self.sandbox.redis.key("events"), row.stream_id, row.stream_id, count=1
                    )
                found = await outbox_broker_call(
                    pipeline.execute(), self.settings.broker_timeout_seconds
                )
            except REDIS_ERRORS as error:
                error_text = f"broker unavailable: {type(error).__name__}: {error}"[:300]
                return AuditReport(
                    at=started, checked=0, missing=0, republished=0, broker_error=error_text
                )
            # one XRANGE per candidate, so one reply per candidate
            missing = [
                row.id for row, entries in zip(candidates, found, strict=True) if not entries
            ]
        republished = await self._republish(missing) if missing else 0
        still_waiting = [row.published_at for row in candidates if row.id not in set(missing)]
        if still_waiting:
            self._checked_from = min(still_waiting)
        elif len(candidates) < self.settings.audit_batch_size:
            # A mark commits a moment after its published_at was stamped:
            # look back a lease's length.
            self._checked_from = started - timedelta(seconds=self.settings.lease_seconds)
        self.last = AuditReport(
            at=started, checked=len(candidates), missing=len(missing), republished=republished
        )
        self.republished_total += republished
        return self.last

    async def _republish(self, event_ids: list[str]) -> int:
        events = _EVENTS.c
        consumed_meanwhile = select(ConsumedEvent.event_id).where(
            ConsumedEvent.event_id.in_(event_ids)
        )
        republish = (
            update(_EVENTS)
            .where(
                events.id.in_(event_ids),
                events.status == "published",
                events.id.not_in(consumed_meanwhile),
            )
            .values(
                status="pending",
                published_at=None,
                stream_id=None,
                last_error="republished: the broker lost it before anyone consumed it",
            )
        )
        async with self.sandbox.engine.begin() as connection:
            return int((await connection.execute(republish)).rowcount)


PRUNE_BATCH = 5_000


async def prune_delivered_events(
    sandbox: Sandbox, *, keep: int, inbox_retention_seconds: float
) -> int:
    """Delete events that are published AND consumed, beyond the newest `keep`; returns how many.

    The outbox only needs an event until it is delivered; keeping every one makes each status
    query slower with history. Pending, failed and unconsumed events are never touched. The
    consumer's inbox keeps its ids longer (inbox_retention_seconds), so a late duplicate of a
    pruned event is still recognised.
    """
    events = _EVENTS.c
    newest_kept = (
        select(events.published_at)
        .where(events.status == "published")
        .order_by(events.published_at.desc())
        .offset(keep)
        .limit(1)
        .scalar_subquery()
    )
    consumed = select(ConsumedEvent.event_id).where(ConsumedEvent.event_id == events.id).exists()
    # Strictly older: a batch shares one published_at,
    # so the batch holding the boundary stays whole.
    prunable = select(events.id).where(
        events.status == "published", events.published_at < newest_kept, consumed
    )
    async with sandbox.engine.begin() as connection:
        doomed = (await connection.execute(prunable.limit(PRUNE_BATCH))).scalars().all()
        if doomed:
            await connection.execute(delete(_EVENTS).where(events.id.in_(doomed)))
        forgotten = utc_now() - timedelta(seconds=inbox_retention_seconds)
        await connection.execute(delete(ConsumedEvent).where(ConsumedEvent.consumed_at < forgotten))
    if sandbox.backend == "postgresql" and len(doomed) >= VACUUM_AFTER_PRUNING:
        try:
            await _vacuum_events(sandbox)
        except SQLAlchemyError as error:  # the prune committed; autovacuum will get there later
            logger.warning("could not vacuum the events of sandbox %s: %s", sandbox.id, error)
    return len(doomed)


# PostgreSQL keeps a deleted row's version until VACUUM: right after a large prune every status
# query still walked 20,000 dead index entries (the panel read 2–3.5× slower than at 100 events)
# until autovacuum came round. Pruning this many rows vacuums the table at once.
VACUUM_AFTER_PRUNING = 1_000


async def _vacuum_events(sandbox: Sandbox) -> None:
    """VACUUM (ANALYZE) the events and the inbox of this sandbox's schema.

    It runs outside a transaction, as VACUUM must. The inbox is only analyzed with it: it grew by
    every event, and a planner that still thinks it empty counts delivered events by scanning all of
    it.
    """
    schema = quoted_schema(sandbox.location)
    tables = f"{schema}.{_EVENTS.name}, {schema}.{ConsumedEvent.__table__.name}"
    async with sandbox.engine.execution_options(
        isolation_level="AUTOCOMMIT"
    ).connect() as connection:
        await connection.exec_driver_sql(f"VACUUM (ANALYZE) {tables}")
