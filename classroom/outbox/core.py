"""What one sandbox's publisher and consumer share: the broker circuit, wake-ups, the audit's
schedule and the activity log.

GuardedPublisher and GuardedConsumer (relay.py) are written against OutboxCore; OutboxService
(service.py) is the OutboxCore that also starts and stops them. While the circuit is open the
relay sleeps until the next probe (a jittered, growing backoff), or until asked to probe now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Optional

import redis.exceptions

from classroom.cache.breaker import REDIS_ERRORS
from classroom.outbox.audit import AuditReport, PublishedEventAudit, prune_delivered_events
from classroom.outbox.broker import is_broker_wide_refusal
from classroom.outbox.circuit import BrokerCircuit
from classroom.outbox.notify import CommitNotifications
from classroom.outbox.report import RelayReport
from classroom.outbox.settings import OutboxSettings
from classroom.progress.publication import journal_background_publication

if TYPE_CHECKING:
    from classroom.sandboxes.sandbox import Sandbox

logger = logging.getLogger("qulab")


class ActivityLog:
    """The newest lines of what the publisher and consumer did, and a counter of every change."""

    def __init__(self, size: int = 40) -> None:
        self.lines: deque[str] = deque(maxlen=size)
        self.changes = 0  # moves whenever what the status panel shows may have changed
        self._errors: dict[str, str] = {}

    def note(self, message: str) -> None:
        """Add a line, timestamped to the millisecond (UTC)."""
        stamp = f"{datetime.now(UTC):%H:%M:%S.%f}"[:-3]
        self.lines.appendleft(f"{stamp}  {message}")
        self.changes += 1

    def note_error(self, worker: str, error: BaseException) -> None:
        """One line per new error of a worker, not one per retry; logged too."""
        description = f"{worker} error: {type(error).__name__}: {error}"[:300]
        if self._errors.get(worker) != description:
            self._errors[worker] = description
            logger.warning("outbox %s", description)
            self.note(description)

    def clear_error(self, worker: str) -> None:
        """The worker succeeded again: its next error is news."""
        self._errors.pop(worker, None)

    def clear(self) -> None:
        """Forget every line (the sandbox was reset)."""
        self.lines.clear()
        self.changes += 1


class OutboxCore:
    """The state a sandbox's publisher and consumer share, and how they react to the broker."""

    def __init__(self, sandbox: Sandbox, settings: Optional[OutboxSettings] = None) -> None:
        self.sandbox = sandbox
        self.settings = settings = settings or OutboxSettings()
        self.circuit = BrokerCircuit(
            base_seconds=settings.outage_backoff_base_seconds,
            max_seconds=settings.outage_backoff_max_seconds,
        )
        self.activity = ActivityLog()
        self.publisher_wake = asyncio.Event()
        self.consumer_wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.audit = PublishedEventAudit(sandbox, settings)
        self.pruned_total = 0
        self._probe_at = 0.0  # time.monotonic() of the next broker probe, while the circuit is open
        self._probe_requested = False
        self._audit_due_at: Optional[float] = None  # time.monotonic(); None: nothing to audit
        self._notifications: Optional[CommitNotifications] = None  # PostgreSQL: other processes

    @property
    def changes(self) -> int:
        """A number that moves whenever what the status panel shows may have changed."""
        return self.activity.changes

    @property
    def every_commit_wakes_the_publisher(self) -> bool:
        """SQLite: only this process writes the sandbox; PostgreSQL: once LISTEN is on."""
        return self.sandbox.backend == "sqlite" or self._notifications is not None

    def wake(self) -> None:
        """Make both workers look for work now (and the publisher probe a paused broker now)."""
        self._probe_requested = True
        self.publisher_wake.set()
        self.consumer_wake.set()

    def broker_failed(self, error: str) -> None:
        """An outage: pause the relay (no event spends an attempt); reported once per outage."""
        if self.circuit.open(error):
            self._probe_at = time.monotonic() + self.circuit.seconds_until_probe()
            self.publisher_wake.set()  # the publisher probes (the consumer may have met it first)
            logger.warning("outbox broker unreachable in sandbox %s (%s)", self.sandbox.id, error)
            self.activity.note(
                f"{error}: relay paused, events keep their attempts; probing with backoff"
            )

    def seconds_until_probe(self) -> float:
        """How long the paused relay sleeps before it probes the broker again."""
        return max(0.0, self._probe_at - time.monotonic())

    async def probe_broker_if_due(self) -> bool:
        """While paused: PING the broker when the backoff is over (or on request); True if back."""
        if not self._probe_requested and time.monotonic() < self._probe_at:
            return False
        self._probe_requested = False
        if not await self.broker_takes_writes():
            self.circuit.probe_failed()
            self._probe_at = time.monotonic() + self.circuit.seconds_until_probe()
            return False
        lasted = self.circuit.close() or 0.0
        self.consumer_wake.set()
        self.audit_now()  # had it restarted, it may have lost what it held
        logger.warning(
            "outbox broker answers again in sandbox %s after %.1f s", self.sandbox.id, lasted
        )
        self.activity.note(f"broker answers again after {lasted:.1f} s: publishing resumes")
        return True

    async def broker_takes_writes(self) -> bool:
        """PING, then a write the broker refuses whenever it would refuse an XADD.

        A full Redis (OOM), a read-only replica (READONLY) or one whose snapshots fail (MISCONF)
        still answers PING: probing with PING alone closed the circuit at once, the next batch met
        the refusal again, and the relay flapped (an outage logged per pass). XADD NOMKSTREAM to
        a stream that never exists is refused exactly like the relay's XADD, and adds nothing.
        """
        link = self.sandbox.redis
        if not await link.check(timeout_seconds=self.settings.broker_timeout_seconds):
            return False
        try:
            await link.execute("XADD", link.key("outbox", "probe"), "NOMKSTREAM", "*", "probe", "1")
        except redis.exceptions.ResponseError as refusal:
            if is_broker_wide_refusal(refusal):
                self.circuit.error = f"broker still refuses writes: {refusal!r}"[:300]
                return False
            return True  # a reply about the command itself (an old Redis): PING's word stands
        except REDIS_ERRORS:
            return False
        return True

    async def after_batch(self, report: RelayReport) -> None:
        """A batch went through: note it, journal it, wake the consumer, schedule the audit."""
        if not report.claimed:
            return
        parts = [f"claimed {report.claimed}", f"published {report.published}"]
        if report.failed:
            parts.append(f"{report.failed} refused by the broker: failed")
        if report.released:
            parts.append(f"{report.released} back to pending (broker down)")
        if report.lease_lost:
            parts.append(f"{report.lease_lost} had lost their lease")
        self.activity.note(", ".join(parts) + f" in {report.seconds * 1000:.1f} ms")
        if report.published:
            self.consumer_wake.set()  # consuming overlaps the rest of the backlog
            if self._audit_due_at is None:
                self._audit_due_at = time.monotonic() + self.settings.audit_interval_seconds
            await journal_background_publication(
                self.sandbox,
                publisher=self.publisher.name,
                report=report,
                outages=self.circuit.outages,
            )

    def audit_now(self) -> None:
        """Audit at the publisher's next round."""
        self._audit_due_at = time.monotonic()

    def until_audit(self, wait: float) -> float:
        """The wait, cut short so the publisher wakes when the audit is due."""
        if self._audit_due_at is None:
            return wait
        return max(0.0, min(wait, self._audit_due_at - time.monotonic()))

    async def audit_if_due(self) -> Optional[AuditReport]:
        """Run the audit (and prune delivered history) when it is due; None when it is not."""
        if self._audit_due_at is None or time.monotonic() < self._audit_due_at:
            return None
        report = await self.audit.run()
        if report.broker_error:
            return report
        settings = self.settings
        pruned = await prune_delivered_events(
            self.sandbox,
            keep=settings.keep_published_events,
            inbox_retention_seconds=settings.inbox_retention_seconds,
        )
        if pruned:
            self.pruned_total += pruned
            self.activity.note(
                f"pruned {pruned} events published and consumed, "
                f"beyond the newest {settings.keep_published_events}"
            )
        due_again = time.monotonic() + settings.audit_interval_seconds
        self._audit_due_at = due_again if report.checked else None
        if report.missing:
            self.activity.note(
                f"audit: {report.missing} published events were gone from the stream and "
                f"never consumed; {report.republished} republished"
            )
            logger.warning("outbox audit republished %d lost events", report.republished)
        return report
