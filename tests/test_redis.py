"""Redis link: the outage switch really cuts, the breaker skips a frozen server, health follows."""

import asyncio
import signal
import time

import pytest
import redis
import servers

import source
from classroom.cache.breaker import REDIS_ERRORS
from classroom.cache.coherent import cache_coherence, cached_users
from classroom.cache.deadline import answer_within
from classroom.cache.link import RedisService
from classroom.config import Settings
from classroom.demos.caching import cache_status, rename_user
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import new_sandbox_id


async def test_the_outage_switch_cuts_and_restores_with_health_updated_at_once(sandbox):
    link = sandbox.redis
    assert await link.switch_outage(cut=True) is False
    assert link.cut_off and link.health.degraded
    with pytest.raises(REDIS_ERRORS):
        await link.client.get(link.key("anything"))

    assert await link.switch_outage(cut=False) is True
    assert not link.cut_off and not link.health.degraded
    await link.client.set(link.key("k"), "v")
    assert await link.client.get(link.key("k")) == "v"


async def test_an_outage_in_one_sandbox_leaves_another_connected(registry):
    first = await registry.acquire(new_sandbox_id())
    second = await registry.acquire(new_sandbox_id())
    await first.redis.switch_outage(cut=True)
    assert await second.redis.check() is True
    assert not second.redis.health.degraded


@pytest.fixture
def freezable_redis():
    """A redis-server of this test's own (URL and process), so the test can SIGSTOP it."""
    with servers.redis_server_process() as (url, process):
        yield url, process


async def wait_until(condition, *, seconds: float = 20.0) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_a_frozen_redis_opens_the_breaker_reads_skip_it_and_it_closes_by_itself(
    settings, freezable_redis
):
    url, process = freezable_redis
    on_redis = Settings(**{**settings.__dict__, "redis_url": url})
    service = await RedisService.connect(on_redis)
    assert service.mode == "redis", service.reason
    service.command_timeout_seconds = 0.3
    breaker = service.breaker
    breaker.cooling_seconds, breaker.probe_timeout_seconds = 0.3, 0.3
    registry = SandboxRegistry(on_redis, service)
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        other = await registry.acquire(new_sandbox_id())
        user = await source.create_user(sandbox, email="frozen@example.com", name="Before Freeze")
        cache = cached_users(sandbox)
        await cache.get_user(user_id=user.id)
        assert (await cache.get_user(user_id=user.id)).outcome == source.HIT
        assert breaker.state == "closed" and (await cache_status(sandbox)).breaker_state == "closed"

        process.send_signal(signal.SIGSTOP)
        # waits one timeout, then the database answers
        first = await cache.get_user(user_id=user.id)
        assert (first.outcome, first.value["name"]) == (source.FALLBACK, "Before Freeze")
        assert first.redis_commands[-1].reply == "failed: TimeoutError"
        assert breaker.is_open and breaker.trips == 1

        skipped = await cache.get_user(user_id=user.id)  # no wait: the breaker skips Redis
        assert skipped.outcome == source.FALLBACK
        assert [c.reply for c in skipped.redis_commands] == ["failed: RedisSkipped"]
        await rename_user(sandbox, user_id=user.id, name="Renamed While Frozen")
        coherence = cache_coherence(sandbox)
        assert coherence.pending_writes == 1 and not coherence.recent_invalidations[0].applied
        assert (await cache.get_user(user_id=user.id)).value["name"] == "Renamed While Frozen"
        assert await other.redis.check() is False  # every sandbox skips the frozen server
        status = await cache_status(sandbox)
        assert status.breaker_state in ("open", "half-open") and status.degraded
        assert not status.breaker.startswith("closed")
        assert await wait_until(lambda: breaker.state == "half-open")  # it probes by itself...
        assert await wait_until(lambda: breaker.state != "half-open")  # ...the probe's answer:
        assert breaker.is_open and breaker.trips == 1  # ...a probe that times out keeps it open

        process.send_signal(signal.SIGCONT)
        assert await wait_until(lambda: breaker.state == "closed"), breaker.describe()
        # what Redis missed is settled first: no stale name
        back = await cache.get_user(user_id=user.id)
        assert (back.outcome, back.value["name"]) == (source.MISS, "Renamed While Frozen")
        assert (await cache.get_user(user_id=user.id)).outcome == source.HIT
        assert coherence.pending_writes == 0 and not sandbox.redis.health.degraded
        assert (await cache_status(sandbox)).breaker_state == "closed"
    finally:
        process.send_signal(signal.SIGCONT)
        await registry.close()
        await service.close()


async def test_the_outage_switch_never_opens_the_shared_breaker(sandbox):
    await sandbox.redis.switch_outage(cut=True)
    with pytest.raises(REDIS_ERRORS):
        await sandbox.redis.execute("GET", sandbox.redis.key("x"))
    assert sandbox.redis.breaker.state == "closed" and sandbox.redis.breaker.trips == 0
    await sandbox.redis.switch_outage(cut=False)
    assert await sandbox.redis.execute("SET", sandbox.redis.key("x"), "1") in (True, "OK")


async def test_the_reading_pages_share_follows_the_breaker_so_they_never_disagree(settings):
    """A reading is shared for 2 s, but never against the breaker: the sidebar's "not answering"
    never stands beside the cache page's "breaker closed", nor "answering" beside "open"."""
    service = await RedisService.connect(settings)
    breaker = service.breaker
    breaker.cooling_seconds = 0.2
    try:
        assert (await service.reading()).answers and breaker.state == "closed"
        breaker.record_failure(redis.exceptions.ConnectionError("refused"))  # a call just failed
        assert breaker.is_open
        assert not (await service.reading()).answers  # not the "answers" read a moment ago
        assert await wait_until(lambda: breaker.state == "closed")  # its probe: Redis is back
        assert (await service.reading()).answers  # not the "not answering" read a moment ago
    finally:
        await service.close()


async def test_qulab_redis_timeout_is_the_command_timeout_of_a_real_server(real_redis_url):
    """What the first read waits when Redis hangs is an operator's choice (docs/operations.md)."""
    settings = Settings.from_environment(
        {"REDIS_URL": real_redis_url, "QULAB_REDIS_TIMEOUT": "0.25"}
    )
    service = await RedisService.connect(settings)
    try:
        assert service.command_timeout_seconds == 0.25
    finally:
        await service.close()


async def test_a_busy_loop_never_makes_an_answered_command_late(real_redis_url):
    """Redis answers in a millisecond, but the process's loop is held for three timeouts by other
    work: the answer was in time, so the read is a hit and the shared breaker stays closed."""
    settings = Settings.from_environment(
        {"REDIS_URL": real_redis_url, "QULAB_REDIS_TIMEOUT": "0.1"}
    )
    service = await RedisService.connect(settings)
    registry = SandboxRegistry(settings, service)
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        user = await source.create_user(sandbox, email="busy@example.com", name="Busy Loop")
        cache = cached_users(sandbox)
        await cache.get_user(user_id=user.id)
        loop = asyncio.get_running_loop()
        for _ in range(3):
            # Another learner's work holds the loop while the MGET's answer comes in (the
            # loop's next pass but one: the MGET is sent by then).
            loop.call_soon(loop.call_soon, time.sleep, 0.3)
            read = await cache.get_user(user_id=user.id)
            assert read.outcome == source.HIT, read.note
        assert service.breaker.state == "closed" and service.breaker.trips == 0
    finally:
        await registry.close()
        await service.close()


async def test_a_frozen_redis_is_late_after_the_timeout_even_on_a_busy_loop(
    settings, freezable_redis
):
    url, process = freezable_redis
    on_redis = Settings(**{**settings.__dict__, "redis_url": url})
    service = await RedisService.connect(on_redis)
    service.command_timeout_seconds = 0.1
    registry = SandboxRegistry(on_redis, service)
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        user = await source.create_user(sandbox, email="frozen2@example.com", name="Frozen")
        await cached_users(sandbox).get_user(user_id=user.id)
        process.send_signal(signal.SIGSTOP)
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)  # busy, and Redis never answers
        started = time.monotonic()
        read = await cached_users(sandbox).get_user(user_id=user.id)
        assert read.outcome == source.FALLBACK and read.value["name"] == "Frozen"
        assert time.monotonic() - started < 1.0  # about the busy 0.3 s, then the timeout
        assert service.breaker.is_open and service.breaker.trips == 1
    finally:
        process.send_signal(signal.SIGCONT)
        await registry.close()
        await service.close()


async def test_a_call_that_swallowed_the_deadlines_cancellation_leaves_none_behind():
    """asyncio.timeout takes its cancellation back whatever the call did with it: so does
    answer_within, or every later timeout in the task would end in CancelledError."""
    async with answer_within(0.01):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            pass  # a call that turned the cancellation into something else
    assert asyncio.current_task().cancelling() == 0
    with pytest.raises(TimeoutError):
        async with answer_within(0.01):
            await asyncio.sleep(5)
    assert asyncio.current_task().cancelling() == 0
