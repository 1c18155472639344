"""A sandbox going dormant flushes its outbox outside the registry's lock.

With a frozen broker (a real redis-server stopped with SIGSTOP) that flush waits for the broker's
timeout. Another learner's open must not wait for it, and the learner coming back to the sandbox
meanwhile waits for its own flush, then finds it awake, on a new engine, publishing again.
No timings are asserted: only what had finished when.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import servers
from sqlalchemy import func, select
from test_outbox import FAST, add_pending_events, counts_by_status, eventually

import source
from classroom.cache.link import RedisService
from classroom.config import Settings
from classroom.outbox.service import OutboxService, outbox_service
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import SANDBOX_DORMANT, Sandbox, new_sandbox_id


@dataclass
class PublishingClass:
    """A registry on a real redis-server, and learner A's sandbox with its publisher on."""

    registry: SandboxRegistry
    sandbox: Sandbox
    outbox: OutboxService
    redis_process: Any


@asynccontextmanager
async def a_publishing_class(
    settings: Settings, **overrides: Any
) -> AsyncIterator[PublishingClass]:
    """Learner A holds a sandbox whose publisher runs; the broker is a real process the test can
    freeze (SIGSTOP)."""
    with servers.redis_server_process() as (url, redis_process):
        on_redis = replace(settings, redis_url=url, **overrides)
        redis_service = await RedisService.connect(on_redis)
        assert redis_service.mode == "redis", redis_service.reason
        registry = SandboxRegistry(on_redis, redis_service)
        try:
            sandbox = await registry.acquire(new_sandbox_id(), holder="learner-a")
            slow_broker = replace(FAST, broker_timeout_seconds=5.0, stop_timeout_seconds=10)
            outbox = outbox_service(sandbox, slow_broker)
            assert await outbox.start()
            yield PublishingClass(registry, sandbox, outbox, redis_process)
        finally:
            redis_process.send_signal(signal.SIGCONT)
            await registry.close()
            await redis_service.close()


async def _event_count(sandbox: Sandbox) -> int:
    async with source.get_session(sandbox) as session:
        return await session.scalar(select(func.count()).select_from(source.DomainEvent))


async def test_a_flush_stuck_on_a_frozen_broker_blocks_no_other_learner_and_a_returning_one_waits_for_it(  # noqa: E501
    settings,
):
    async with a_publishing_class(settings, sandbox_grace_seconds=0) as publishing:
        registry, sandbox, outbox = publishing.registry, publishing.sandbox, publishing.outbox
        redis_process = publishing.redis_process
        registry.release_holder("learner-a")  # the learner closes the tab; no grace period
        redis_process.send_signal(signal.SIGSTOP)
        ids = await add_pending_events(sandbox, 5)  # wakes the publisher: its XADD hangs

        sweep = asyncio.create_task(registry.sweep())
        await eventually(lambda: _going_dormant(sandbox))
        newcomer = await registry.acquire(new_sandbox_id(), holder="learner-b")
        # B's sandbox was created while A's flush still waited for the frozen broker.
        assert not sandbox.going_dormant.done() and not sweep.done()
        assert newcomer.awake and sandbox.state == SANDBOX_DORMANT

        back = asyncio.create_task(registry.acquire(sandbox.id, holder="learner-a"))
        finished, _ = await asyncio.wait({back}, timeout=0.2)
        assert not finished  # A's own learner waits for A's flush...
        redis_process.send_signal(signal.SIGCONT)
        assert await back is sandbox
        assert sandbox.going_dormant.done()  # ...which finished before the wake
        assert (await sweep)["dormant"] == [sandbox.id]
        assert sandbox.awake and outbox.running  # resumed on the new engine, publishing again
        await eventually(lambda: _published(sandbox, len(ids)), timeout=30)


async def _going_dormant(sandbox: Sandbox) -> bool:
    return sandbox.going_dormant is not None and not sandbox.going_dormant.done()


async def _published(sandbox: Sandbox, count: int) -> bool:
    return (await counts_by_status(sandbox)).get("published") == count


async def test_making_room_in_a_full_class_does_not_wait_for_the_sleeper_to_flush_to_a_frozen_broker(  # noqa: E501
    settings,
):
    async with a_publishing_class(settings, max_sandboxes=1) as publishing:
        registry, sleeper, outbox = publishing.registry, publishing.sandbox, publishing.outbox
        redis_process = publishing.redis_process
        registry.release_holder("learner-a")  # gone, but within the grace period: still awake
        redis_process.send_signal(signal.SIGSTOP)
        ids = await add_pending_events(sleeper, 3)

        # the class is full
        newcomer = await registry.acquire(new_sandbox_id(), holder="learner-b")
        # B got in while A still flushes
        assert sleeper.state == SANDBOX_DORMANT and _going(sleeper)
        assert newcomer.awake
        redis_process.send_signal(signal.SIGCONT)
        await sleeper.going_dormant
        assert not outbox.running and outbox.resume_on_return
        assert await _event_count(newcomer) == 0  # B's sandbox works
        registry.release_holder("learner-b")
        # A back: B made room
        assert await registry.acquire(sleeper.id, holder="learner-a") is sleeper
        # nothing A had was lost
        await eventually(lambda: _published(sleeper, len(ids)), timeout=30)


def _going(sandbox: Sandbox) -> bool:
    return sandbox.going_dormant is not None and not sandbox.going_dormant.done()


async def test_releasing_a_sandbox_whose_flush_hangs_on_a_frozen_broker_blocks_no_other_learner(
    settings,
):
    async with a_publishing_class(settings) as publishing:
        registry, doomed, outbox = publishing.registry, publishing.sandbox, publishing.outbox
        redis_process = publishing.redis_process
        redis_process.send_signal(signal.SIGSTOP)
        await add_pending_events(doomed, 3)  # wakes the publisher: its XADD hangs

        release = asyncio.create_task(registry.release(doomed.id, "the learner asked for it"))
        await eventually(lambda: _going_dormant(doomed))
        newcomer = await registry.acquire(new_sandbox_id(), holder="learner-b")
        assert newcomer.awake and not release.done()  # B got in while A's release still flushes
        redis_process.send_signal(signal.SIGCONT)
        assert await release is True
        assert registry.get_existing(doomed.id) is None and not outbox.running
        assert await _event_count(newcomer) == 0  # B's sandbox works
