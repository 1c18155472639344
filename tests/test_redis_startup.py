"""With REDIS_URL set, the app never settles on fakeredis: a Redis down at start-up is probed until
it answers, and meanwhile reads go to the database and events wait in the outbox.

A fakeredis fallback would split a class of several replicas for good: the one that started
during the blip writes its events to a stream nobody else reads, and its invalidations never
reach the others' cache. Real servers only: a redis-server that is not running yet, then is.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
import servers

import source
from classroom.cache.link import RedisService
from classroom.config import ConfigurationError, Settings
from classroom.demos import caching
from classroom.outbox.service import start_event_publisher
from classroom.runtime import Runtime
from classroom.sandboxes.sandbox import new_sandbox_id
from classroom.status import runtime_status
from pages.common.sidebar import server_details

# The breaker probes a Redis that failed after 5 s, then every 10 s: found within ~10 s of its
# start; the outbox's own probe follows within its backoff. Generous for a loaded machine.
FOUND_WITHIN_SECONDS = 45


@pytest.fixture
def redis_not_yet_running() -> Iterator[servers.RedisProcess]:
    """A redis-server with a port of its own, not started: connections to it are refused."""
    process = servers.RedisProcess(persistent=True)
    try:
        yield process
    finally:
        process.close()


def wait_for(check, *, seconds: float = FOUND_WITHIN_SECONDS, interval: float = 0.1):
    deadline = time.monotonic() + seconds
    while not (value := check()):
        assert time.monotonic() < deadline, f"still false after {seconds:g} s"
        time.sleep(interval)
    return value


def test_a_redis_down_at_start_up_is_used_once_it_answers(settings, redis_not_yet_running):
    server = redis_not_yet_running
    runtime = Runtime(replace(settings, redis_url=server.url))
    try:
        assert runtime.redis.mode == "redis", runtime.redis.reason  # not fakeredis
        lab = runtime.lab(new_sandbox_id())
        status = runtime_status(lab)
        assert not status.redis_answers and status.redis_mode == "redis"
        details = server_details(status)
        assert "a Redis server, not answering: reads use the database" in details
        assert "did not answer at start-up" in details and "fakeredis" not in details

        # Degraded meanwhile: reads from the database, the event kept pending in the outbox.
        demo = lab.run(caching.create_cache_demo_user)
        assert lab.run(caching.fetch_user_cached, user_id=demo.user_id).read.outcome == "FALLBACK"
        lab.run(start_event_publisher)
        stored = lab.run(
            source.calculate_and_store_airscore,
            user_id=demo.user_id,
            occupation_code="15-1252.00",
        )
        assert lab.run(_event_status, event_id=stored.event.id) == "pending"

        server.start()  # Redis comes up: no restart of the app, no click
        wait_for(lambda: runtime_status(lab).redis_answers)
        real = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            stream = f"qulab:{lab.sandbox_id}:events"
            # The event goes out to the real server's stream by itself.
            wait_for(lambda: stored.event.id in _stream_event_ids(real, stream))
            # ...and is marked published in the transaction after its XADD: wait for that too.
            wait_for(lambda: lab.run(_event_status, event_id=stored.event.id) == "published")
            # Reads and writes reach the real server: the cached value is one of its keys.
            first = lab.run(caching.fetch_user_cached, user_id=demo.user_id).read
            again = lab.run(caching.fetch_user_cached, user_id=demo.user_id).read
            assert (first.outcome, again.outcome) == ("MISS", "HIT")
            assert real.exists(again.key) == 1
            status = runtime_status(lab)
            assert "did not answer at start-up" not in status.redis_reason
        finally:
            real.close()
        lab.close()
    finally:
        runtime.close()


async def _event_status(sandbox, *, event_id: str) -> str:
    async with source.get_session(sandbox) as session:
        return (await session.get(source.DomainEvent, event_id)).status


def _stream_event_ids(client: redis.Redis, stream: str) -> list[str]:
    return [fields["event_id"] for _, fields in client.xrange(stream)]


async def test_without_redis_url_it_is_fakeredis_and_says_so():
    service = await RedisService.connect(Settings(redis_url=None))
    try:
        assert service.mode == "fakeredis" and "REDIS_URL is not set" in service.reason
    finally:
        await service.close()


async def test_a_redis_url_redis_cannot_read_stops_the_app_naming_the_variable():
    with pytest.raises(ConfigurationError, match="REDIS_URL") as refused:
        await RedisService.connect(Settings(redis_url="http://:Pw-bad-url-7Q@cache.example/0"))
    assert "Pw-bad-url-7Q" not in str(refused.value)
