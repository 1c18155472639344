"""Section 5's demos as the page runs them: the users to score, an event's delivery, the burst.

Storing a score and its event is the lesson's calculate_and_store_airscore; the publisher and
consumer are the lesson's loops, run by the sandbox's OutboxService (classroom.outbox). This adds
what the page reads around them: where one event is now, the publisher's switches, and a burst
of writes that takes turns with other learners' clicks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from sqlalchemy import select, update

import source
from classroom import validation
from classroom.demos.n_plus_one import is_scale_up_user
from classroom.experiments import HeavyWorkPacer
from classroom.outbox.service import (  # noqa: F401  (section 5's switches, in one place)
    outbox_service,
    set_broker_outage,
    start_event_publisher,
    stop_event_publisher,
)
from classroom.outbox.settings import OutboxSettings
from classroom.outbox.status import OutboxStatus, outbox_status  # noqa: F401
from classroom.sandboxes.sandbox import Sandbox

logger = logging.getLogger("qulab")
MAX_BURST_WRITES = 2000
BURST_CONCURRENCY = 8
BURST_FALLBACK_OCCUPATION = "15-1252.00"  # for users without an occupation code of their own


async def list_learner_users(sandbox: Sandbox, *, limit: int = 100) -> list[source.User]:
    """The learner's own users, oldest first (section 3's scale-up users left out)."""
    statement = (
        select(source.User).where(~is_scale_up_user()).order_by(source.User.created_at).limit(limit)
    )
    async with source.get_session(sandbox) as session:
        return list((await session.scalars(statement)).all())


@dataclass(frozen=True)
class EventDelivery:
    """Where one event is now: its status, when it was published, when the consumer had it."""

    event_id: str
    status: str
    created_at: datetime
    published_at: Optional[datetime]
    delivered_at: Optional[datetime]
    last_error: Optional[str]


async def event_delivery(sandbox: Sandbox, *, event_id: str) -> Optional[EventDelivery]:
    """The event's state now (None once it is gone: pruned after delivery, or initialized away)."""
    event_id = validation.parse_entity_id(event_id, what="event")
    DomainEvent, ConsumedEvent = source.DomainEvent, source.ConsumedEvent
    statement = (
        select(DomainEvent, ConsumedEvent.consumed_at)
        .outerjoin(ConsumedEvent, ConsumedEvent.event_id == DomainEvent.id)
        .where(DomainEvent.id == event_id)
    )
    async with source.get_session(sandbox) as session:
        row = (await session.execute(statement)).first()
    if row is None:
        return None
    event, delivered_at = row
    return EventDelivery(
        event.id, event.status, event.created_at, event.published_at, delivered_at, event.last_error
    )


@dataclass(frozen=True)
class StoredNow:
    """Where a stored score and its event are now: whether the score still exists, the event's
    delivery (None once the event is gone)."""

    score_exists: bool
    delivery: Optional[EventDelivery]


async def stored_score_now(sandbox: Sandbox, *, score_id: str, event_id: str) -> StoredNow:
    """The score and its event as they are now, for a page that keeps showing them."""
    delivery = await event_delivery(sandbox, event_id=event_id)
    async with source.get_session(sandbox) as session:
        score = await source.AIRScoreRepository(session).find(score_id)
    return StoredNow(score is not None, delivery)


@dataclass(frozen=True)
class PublisherState:
    """Whether the publisher runs and whether the broker is cut off (no database call)."""

    running: bool
    publisher_name: str
    broker_cut_off: bool
    settings: OutboxSettings


async def event_publisher_state(sandbox: Sandbox) -> PublisherState:
    """The publisher's switches, for the page's controls."""
    service = outbox_service(sandbox)
    return PublisherState(
        service.running, service.publisher.name, sandbox.redis.cut_off, service.settings
    )


async def outbox_changes(sandbox: Sandbox) -> int:
    """A number that moves whenever the outbox may have changed: an event committed in this
    process, a batch published or consumed, an outage, a reset. Reading it costs no query, so an
    idle status panel can look every few seconds and redraw only when it moved."""
    return outbox_service(sandbox).changes


async def retry_failed_events(sandbox: Sandbox) -> int:
    """Give every failed event a fresh set of attempts (pending, due now); returns how many."""
    DomainEvent = source.DomainEvent
    retry = (
        update(DomainEvent)
        .where(DomainEvent.status == "failed")
        .values(
            status="pending",
            attempts=0,
            next_attempt_at=source.utc_now(),
            claimed_by=None,
            claimed_until=None,
        )
    )
    async with source.get_session(sandbox) as session:
        result = await session.execute(retry, execution_options={"synchronize_session": False})
    outbox_service(sandbox).wake()
    return int(result.rowcount)


@dataclass(frozen=True)
class BurstResult:
    """What a burst committed (each write its own transaction) and how long it spent writing."""

    writes: int  # committed: each one a score and its event
    concurrency: int
    seconds: float
    failed: int = 0  # writes that rolled back whole (nothing of them was stored)
    first_error: str = ""  # why the first of them failed

    @property
    def writes_per_second(self) -> Optional[float]:
        """Committed writes per second of writing (None when nothing was timed)."""
        return self.writes / self.seconds if self.seconds > 0 else None


async def store_airscore_burst(
    sandbox: Sandbox, *, count: int, concurrency: int = BURST_CONCURRENCY
) -> BurstResult:
    """`count` scores with their events, round-robin over the sandbox's users, a few at a time."""
    source.validate_whole_number(
        count, label="Burst writes", low=1, high=MAX_BURST_WRITES, field="count"
    )
    source.validate_whole_number(concurrency, label="Concurrency", low=1, high=50)
    users = await list_learner_users(sandbox) or await source.list_users(sandbox, limit=100)
    if not users:
        raise source.ValidationError(
            "Your sandbox has no users yet: initialize it on page 2 first.", field="user_id"
        )
    in_flight = asyncio.Semaphore(concurrency)
    pacer = HeavyWorkPacer()  # rests between slices of writes, so other learners get through

    async def write(number: int) -> None:
        user = users[number % len(users)]
        occupation = user.occupation_code or BURST_FALLBACK_OCCUPATION
        async with in_flight, pacer.unit():
            await source.calculate_and_store_airscore(
                sandbox, user_id=user.id, occupation_code=occupation
            )

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(write(n) for n in range(count)), return_exceptions=True)
    seconds = time.perf_counter() - started - pacer.rested_seconds  # no write runs in a rest
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    for error in errors:
        if not isinstance(error, Exception):
            raise error  # cancelled: stop here
    first_error = f"{type(errors[0]).__name__}: {errors[0]}"[:300] if errors else ""
    if errors and not isinstance(errors[0], source.QuLabError):
        logger.error("burst writes failed in sandbox %s", sandbox.id, exc_info=errors[0])
    return BurstResult(count - len(errors), concurrency, seconds, len(errors), first_error)
