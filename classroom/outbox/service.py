"""One sandbox's outbox at work: the publisher and consumer tasks behind one facade.

OutboxService starts source.run_publisher and source.run_consumer as tasks on the runtime's loop,
with GuardedPublisher and GuardedConsumer, and keeps what they share: the broker circuit, the
wake-up events, the audit's schedule and the activity log the page shows. A commit that adds an
event wakes the publisher (on PostgreSQL also a commit in another process, through
LISTEN/NOTIFY); a published batch wakes the consumer. A sandbox going dormant publishes what is
pending and stops; it starts again when its learner returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Optional

import source
from classroom.engines import CommittedChanges
from classroom.outbox.audit import PublishedEventAudit
from classroom.outbox.core import OutboxCore
from classroom.outbox.notify import commit_notifications, install_notify_trigger
from classroom.outbox.relay import GuardedConsumer, GuardedPublisher
from classroom.outbox.settings import OutboxSettings

if TYPE_CHECKING:
    from classroom.sandboxes.sandbox import Sandbox

logger = logging.getLogger("qulab")
OUTBOX_SERVICE_NAME = "outbox"


class OutboxService(OutboxCore):
    """One sandbox's publisher and consumer: their tasks, their switches, their listeners."""

    def __init__(self, sandbox: Sandbox, settings: Optional[OutboxSettings] = None) -> None:
        super().__init__(sandbox, settings)
        self.publisher = GuardedPublisher(self)
        self.consumer = GuardedConsumer(self)
        self.resume_on_return = False  # the publisher was on when the sandbox went dormant
        self._tasks: list[asyncio.Task[None]] = []
        sandbox.commit_listeners.append(self._on_commit)
        sandbox.reset_listeners.append(self._on_reset)
        sandbox.release_listeners.append(self._on_release)
        sandbox.dormant_listeners.append(lambda sleeping: self.publish_pending_and_stop())
        sandbox.wake_listeners.append(lambda woken: self.resume())

    @property
    def running(self) -> bool:
        """True while the background tasks run."""
        return any(not task.done() for task in self._tasks)

    async def start(self) -> bool:
        """Start the publisher and the consumer on this loop; False if they were running."""
        if self.running:
            return False
        self.stopping.clear()
        loop = asyncio.get_running_loop()
        wake, stopping = self.publisher_wake, self.stopping
        self._tasks = [
            loop.create_task(
                source.run_publisher(self.publisher, wake=wake, stopping=stopping),
                name=f"outbox-publisher-{self.sandbox.id}",
            ),
            loop.create_task(
                source.run_consumer(self.consumer, wake=self.consumer_wake, stopping=stopping),
                name=f"outbox-consumer-{self.sandbox.id}",
            ),
        ]
        self.activity.note(f"publisher {self.publisher.name} started")
        if self.sandbox.backend == "postgresql":
            await self._listen_for_other_processes()
        return True

    async def _listen_for_other_processes(self) -> None:
        try:
            await install_notify_trigger(self.sandbox.engine, self.sandbox.location)
            budget = self.sandbox.connection_budget
            notifications = commit_notifications(self.sandbox.engine.url, budget)
            await notifications.subscribe(self.sandbox.location, self.publisher_wake.set)
        except Exception as error:  # the idle wait still finds the events, only later
            logger.warning("outbox of sandbox %s cannot LISTEN: %s", self.sandbox.id, error)
            return
        self._notifications = notifications

    async def stop(self) -> bool:
        """Let both tasks finish their current batch, then stop; False if they were not running."""
        if not self.running:
            return False
        self.stopping.set()
        self.wake()
        tasks = list(self._tasks)
        _, still_running = await asyncio.wait(tasks, timeout=self.settings.stop_timeout_seconds)
        for task in still_running:
            task.cancel()  # a batch stuck longer than the timeout; its lease will expire
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        self.consumer.stop_watching()
        if self._notifications is not None:
            notifications, self._notifications = self._notifications, None
            await notifications.unsubscribe(self.sandbox.location, self.publisher_wake.set)
        self.activity.note(f"publisher {self.publisher.name} stopped")
        return True

    async def publish_pending_and_stop(self) -> int:
        """Before the sandbox sleeps: stop, then publish what is pending; returns how many went.

        With the broker down nothing can go out: the events stay pending in the database.
        """
        self.resume_on_return = self.running
        if not self.resume_on_return:
            return 0
        await self.stop()
        published = 0
        deadline = time.monotonic() + self.settings.stop_timeout_seconds
        while not self.circuit.is_open and time.monotonic() < deadline:
            report = await self.publisher.publish_due_batch()
            published += report.published
            if report.broker_error or report.claimed < self.settings.batch_size:
                break
        self.activity.note(f"sandbox dormant: published {published} pending events, then stopped")
        return published

    async def resume(self) -> bool:
        """The learner is back: start again if the publisher was on when the sandbox slept."""
        if not self.resume_on_return:
            return False
        self.resume_on_return = False
        return await self.start()

    async def _on_commit(self, changes: CommittedChanges) -> None:
        if any(isinstance(row, source.DomainEvent) for row in changes.inserted):
            self.activity.changes += 1
            self.publisher_wake.set()

    async def _on_reset(self, sandbox: Sandbox) -> None:
        self.consumer.duplicates_ignored = 0
        self.audit = PublishedEventAudit(sandbox, self.settings)
        self.activity.clear()
        self.activity.note("sandbox reset: events, inbox and stream emptied")

    async def _on_release(self, sandbox: Sandbox) -> None:
        await self.stop()


def outbox_service(sandbox: Sandbox, settings: Optional[OutboxSettings] = None) -> OutboxService:
    """The sandbox's outbox, created on first use (settings apply only to that first call)."""
    return sandbox.service(OUTBOX_SERVICE_NAME, lambda owner: OutboxService(owner, settings))


async def start_event_publisher(sandbox: Sandbox) -> bool:
    """Start the sandbox's publisher and consumer in the background; False if already running."""
    return await outbox_service(sandbox).start()


async def stop_event_publisher(sandbox: Sandbox) -> bool:
    """Stop them after their current batch; False if they were not running."""
    return await outbox_service(sandbox).stop()


async def set_broker_outage(sandbox: Sandbox, *, cut: bool) -> bool:
    """Cut this sandbox off from the broker (its connections really fail), or reconnect it.

    The switch PINGs at once, so the status stops saying 'degraded' as soon as Redis answers,
    and a relay paused by the outage probes now instead of after its backoff. Returns whether
    the broker answers.
    """
    service = outbox_service(sandbox)
    timeout = service.settings.broker_timeout_seconds
    answers = await sandbox.redis.switch_outage(cut=cut, timeout_seconds=timeout)
    if answers:
        service.wake()
    return answers
