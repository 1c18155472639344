"""Deleting a sandbox deletes every Redis key it made, on every backend, fakeredis included.

A sandbox that lived a learner's life (cached reads, events published and consumed, asleep and
woken again) is deleted after the idle limit, or released on request while awake; then nothing
under its prefix is left: on the embedded files with fakeredis (the app's own memory), on the
embedded files with a real Redis, and on PostgreSQL with a real Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from test_outbox import FAST, eventually, inbox_event_ids
from test_sandboxes import age

import source
from classroom.cache.coherent import cached_users
from classroom.cache.link import RedisService
from classroom.outbox.service import outbox_service
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import Sandbox, new_sandbox_id


@pytest.fixture(params=["embedded+fakeredis", "embedded+redis", "postgresql+redis"])
async def class_registry(request, settings) -> AsyncIterator[SandboxRegistry]:
    """A registry on one backend pair, with no grace period (idle means asleep at the sweep)."""
    database, broker = request.param.split("+")
    database_url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    redis_url = request.getfixturevalue("real_redis_url") if broker == "redis" else None
    on_backends = replace(
        settings, database_url=database_url, redis_url=redis_url, sandbox_grace_seconds=0
    )
    redis_service = await RedisService.connect(on_backends)
    assert redis_service.mode == ("redis" if redis_url else "fakeredis"), redis_service.reason
    registry = SandboxRegistry(on_backends, redis_service)
    try:
        yield registry
    finally:
        await registry.close()
        await redis_service.close()


async def keys_of(registry: SandboxRegistry, sandbox_id: str) -> list[str]:
    client = registry.redis_service.client
    return sorted([key async for key in client.scan_iter(match=f"qulab:{sandbox_id}:*")])


async def live_a_learners_life(sandbox: Sandbox) -> None:
    """Cached reads, a score whose event is published and consumed, the publisher left on."""
    users = await source.init_db(sandbox, reset=True)
    cache = cached_users(sandbox)
    for user in users:
        await cache.get_user(user_id=user.id)
        await cache.get_user(user_id=user.id)  # a hit
        await cache.get_latest_airscore(user_id=user.id)
    await outbox_service(sandbox, FAST).start()
    stored = await source.calculate_and_store_airscore(
        sandbox, user_id=users[0].id, occupation_code="15-1252.00"
    )
    await eventually(lambda: _consumed(sandbox, stored.event.id))


async def _consumed(sandbox: Sandbox, event_id: str) -> bool:
    return event_id in await inbox_event_ids(sandbox)


async def test_after_the_idle_limit_no_key_of_the_sandbox_is_left(class_registry):
    registry = class_registry
    sandbox = await registry.acquire(new_sandbox_id(), holder="tab")
    await live_a_learners_life(sandbox)
    made = await keys_of(registry, sandbox.id)
    assert {"events", "cache:epoch"} <= {key.split(":", 2)[2] for key in made}, made

    registry.release_holder("tab")  # the tab closed: asleep at the next sweep
    assert sandbox.id in (await registry.sweep())["dormant"]
    woken = await registry.acquire(sandbox.id, holder="tab again")  # back, then gone again
    assert woken is sandbox
    [user, *_] = await source.list_users(sandbox)
    await cached_users(sandbox).get_user(user_id=user.id)
    registry.release_holder("tab again")
    await registry.sweep()
    await age(registry, sandbox, seconds=registry.settings.sandbox_idle_seconds + 60)

    assert sandbox.id in (await registry.sweep())["deleted"]
    assert await keys_of(registry, sandbox.id) == []
    await _still_none_after_the_background_work(registry, sandbox.id)


async def test_a_sandbox_released_while_awake_leaves_no_key(class_registry):
    registry = class_registry
    sandbox = await registry.acquire(new_sandbox_id(), holder="tab")
    await live_a_learners_life(sandbox)
    assert await keys_of(registry, sandbox.id)

    assert await registry.release(sandbox.id, "the learner asked")
    assert await keys_of(registry, sandbox.id) == []
    await _still_none_after_the_background_work(registry, sandbox.id)


async def _still_none_after_the_background_work(registry: SandboxRegistry, sandbox_id: str):
    """None comes back while the loops that may outlive a deletion take their turns (the outbox's
    idle look, the cache's settling): checked over a bounded second, not once."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert await keys_of(registry, sandbox_id) == []
        await asyncio.sleep(0.05)
