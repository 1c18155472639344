"""The read-through cache: exact hits and misses, TTLs, invalidation, races, outages, isolation."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import sys
import uuid
from pathlib import Path

import fakeredis
import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import delete, event, update

import classroom.cache.coherence
import source
from classroom import validation
from classroom.cache.coherent import CoherentCache, cache_coherence, cached_users
from classroom.cache.coherent import recent_invalidations as recent
from classroom.cache.link import RedisLink, RedisService
from classroom.config import Settings
from classroom.demos.caching import (
    CacheDemo,
    add_demo_airscore,
    cache_status,
    create_cache_demo_user,
    fetch_latest_airscore_cached,
    fetch_user_cached,
    find_cache_demo,
    invalidate_user_cache,
    rename_user,
    run_cache_experiment,
    set_redis_outage,
)
from classroom.demos.n_plus_one import (
    SCALE_UP_NAME_PREFIX,
    grow_scale_up_users,
    remove_scale_up_users,
)
from classroom.engines import (
    SandboxSession,
    TrackedSyncSession,
    _collect_flushed_changes,
    _tables_written,
)
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.reset import initialize_sandbox
from classroom.sandboxes.sandbox import Sandbox, new_sandbox_id
from classroom.statements import capture_statements
from source import FALLBACK as CACHE_FALLBACK
from source import HIT as CACHE_HIT
from source import MISS as CACHE_MISS
from source import get_session

PROJECT_ROOT = Path(__file__).resolve().parent.parent


async def prepare_cache_demo(sandbox: Sandbox) -> CacheDemo:
    """The page's demo user (Alex Smith, Jane Doe, else the Cache Demo User), with an AIRScore."""
    demo = await find_cache_demo(sandbox) or await create_cache_demo_user(sandbox)
    if demo.latest_airscore_id is None:
        score = await add_demo_airscore(sandbox, user_id=demo.user_id)
        demo = CacheDemo(demo.user_id, demo.user_name, score.id)
    return demo


def pending_invalidations(sandbox: Sandbox) -> int:
    """Writes whose invalidation Redis has not taken yet."""
    return cache_coherence(sandbox).pending_writes


@pytest.fixture
async def sandbox_with_users(sandbox: Sandbox) -> Sandbox:
    """A sandbox with the two sample users, initialized as section 2 does (Redis keys cleared)."""
    await initialize_sandbox(sandbox)
    return sandbox


@pytest.fixture
async def demo(sandbox_with_users) -> tuple[Sandbox, str]:
    """A sandbox with the sample users; Alex Smith has one AIRScore."""
    prepared = await prepare_cache_demo(sandbox_with_users)
    return sandbox_with_users, prepared.user_id


async def cache_keys(sandbox: Sandbox) -> list[str]:
    """The sandbox's cached values (not its epoch and fence tokens)."""
    return sorted(
        [
            key
            async for key in sandbox.redis.client.scan_iter(
                match=sandbox.redis.key("cache", "user") + "*"
            )
        ]
    )


async def stored_value(sandbox: Sandbox, key: str):
    """What Redis holds under a cache key, unwrapped from its {"epoch", "value"} envelope."""
    return json.loads(await sandbox.redis.client.get(key))["value"]


def sent(read) -> list[str]:
    """The names of the Redis commands a read or invalidation sent, in order."""
    return [command.command.split()[0] for command in read.redis_commands]


# MGET epoch+value; a miss GETs the fence, then SET … EX and re-reads the fence in one round trip.
MISS_COMMANDS = ["MGET", "GET", "SET", "GET"]
# The epoch's first value starts the epoch (SET NX, GET).
FIRST_MISS_COMMANDS = ["MGET", "GET", "SET", "GET", "SET", "GET"]


async def test_a_scripted_sequence_gives_exact_hits_misses_and_database_reads(demo):
    sandbox, user_id = demo
    cache = cached_users(sandbox)
    script = [
        (cache.get_user, CACHE_MISS),
        (cache.get_user, CACHE_HIT),
        (cache.get_latest_airscore, CACHE_MISS),
        (cache.get_latest_airscore, CACHE_HIT),
        (cache.get_user, CACHE_HIT),
        (cache.invalidate_user, None),
        (cache.get_user, CACHE_MISS),
        (cache.get_latest_airscore, CACHE_MISS),
        (cache.get_latest_airscore, CACHE_HIT),
    ]
    for step, expected in script:
        with capture_statements() as log:
            result = await step(user_id=user_id)
        if expected is not None:
            assert result.outcome == expected
            assert result.database_statements == log.count == (1 if expected == CACHE_MISS else 0)
            first_miss = expected == CACHE_MISS and cache.metrics.misses == 1
            assert sent(result) == (
                (FIRST_MISS_COMMANDS if first_miss else MISS_COMMANDS)
                if expected == CACHE_MISS
                else ["MGET"]
            )
    metrics = cache.metrics
    assert (metrics.hits, metrics.misses, metrics.errors, metrics.requests) == (4, 4, 0, 8)
    assert metrics.database_reads == 4 and metrics.lookups == 8
    assert metrics.hit_ratio == 0.5
    expected = 0.5 * metrics.mean_cache_ms + 0.5 * (
        metrics.mean_cache_ms + metrics.mean_database_ms
    )
    assert metrics.predicted_average_ms == pytest.approx(expected)
    assert metrics.measured_average_ms == pytest.approx(metrics.request_ms_total / 8)


async def test_hits_return_exactly_what_the_database_returned(demo):
    sandbox, user_id = demo
    cache = cached_users(sandbox)
    for read in (cache.get_user, cache.get_latest_airscore):
        miss, hit = await read(user_id=user_id), await read(user_id=user_id)
        assert (miss.outcome, hit.outcome) == (CACHE_MISS, CACHE_HIT)
        assert hit.value == miss.value and miss.value["id"]
    user = (await cache.get_user(user_id=user_id)).value
    assert user["name"] == "Alex Smith" and user["email"] == "alex.smith@innovateai.example"


async def test_every_key_has_a_ttl_within_the_jitter_bounds(sandbox_with_users):
    sandbox = sandbox_with_users
    cache = cached_users(sandbox)
    spread = round(source.CACHE_TTL_SECONDS * source.CACHE_TTL_JITTER)
    shortest, longest = source.CACHE_TTL_SECONDS - spread, source.CACHE_TTL_SECONDS + spread
    assert (shortest, longest) == (270, 330)
    user_ids = [u.id for u in await source.list_users(sandbox)]
    for index in range(10):
        user = await source.create_user(
            sandbox, email=f"ttl{index}@example.com", name=f"Ttl {index}"
        )
        user_ids.append(user.id)
    for user_id in user_ids:
        await cache.get_user(user_id=user_id)
        await cache.get_latest_airscore(user_id=user_id)
    keys = await cache_keys(sandbox)
    assert len(keys) == 2 * len(user_ids)
    ttls = [await sandbox.redis.client.ttl(key) for key in keys]
    assert all(shortest - 1 <= ttl <= longest for ttl in ttls), ttls
    assert len(set(ttls)) > 1, "jitter spreads the expiry times"
    await rename_user(sandbox, user_id=user_ids[0], name="Now With A Fence")
    coherence = cache_coherence(sandbox)
    for token in (coherence.epoch_key, coherence.fence_key):  # the tokens expire too
        assert (
            0 < await sandbox.redis.client.ttl(token) <= classroom.cache.coherence.TOKEN_TTL_SECONDS
        )
    every_key = [
        key async for key in sandbox.redis.client.scan_iter(match=sandbox.redis.prefix + "cache:*")
    ]
    assert all([await sandbox.redis.client.ttl(key) > 0 for key in every_key])
    assert len(every_key) == len(keys) - 1 + 2  # the rename dropped one


async def test_explicit_invalidation_deletes_both_keys_and_the_next_reads_miss(demo):
    sandbox, user_id = demo
    cache = cached_users(sandbox)
    await cache.get_user(user_id=user_id)
    await cache.get_latest_airscore(user_id=user_id)
    assert len(await cache_keys(sandbox)) == 2

    invalidation = await invalidate_user_cache(sandbox, user_id=user_id)

    assert invalidation.applied and sent(invalidation) == ["MULTI", "SET", "DEL", "EXEC"]
    assert invalidation.redis_commands[2].reply == "2"
    assert await cache_keys(sandbox) == []
    assert (await cache.get_user(user_id=user_id)).outcome == CACHE_MISS
    assert (await cache.get_latest_airscore(user_id=user_id)).outcome == CACHE_MISS


async def test_no_stale_read_after_writes_through_the_repositories(demo):
    sandbox, user_id = demo
    cache = cached_users(sandbox)
    await cache.get_user(user_id=user_id)
    first_score = (await cache.get_latest_airscore(user_id=user_id)).value

    await rename_user(sandbox, user_id=user_id, name="Alex Renamed")
    renamed = await cache.get_user(user_id=user_id)
    assert (renamed.outcome, renamed.value["name"]) == (CACHE_MISS, "Alex Renamed")
    # a rename leaves scores alone
    assert (await cache.get_latest_airscore(user_id=user_id)).outcome == CACHE_HIT

    new_score = await add_demo_airscore(sandbox, user_id=user_id)
    latest = await cache.get_latest_airscore(user_id=user_id)
    assert (latest.outcome, latest.value["id"]) == (CACHE_MISS, new_score.id)
    # a new score leaves the profile alone
    assert (await cache.get_user(user_id=user_id)).outcome == CACHE_HIT

    async with get_session(sandbox) as session:
        await source.AIRScoreRepository(session).delete(
            await session.get(source.AIRScore, new_score.id)
        )
    assert (await cache.get_latest_airscore(user_id=user_id)).value == first_score

    await source.delete_user(sandbox, user_id=user_id)
    for read in (cache.get_user, cache.get_latest_airscore):
        with pytest.raises(source.UserNotFoundError):
            await read(user_id=user_id)


async def test_a_user_without_scores_caches_null_until_a_score_is_added(sandbox_with_users):
    sandbox = sandbox_with_users
    cache = cached_users(sandbox)
    jane = next(u for u in await source.list_users(sandbox) if u.name == "Jane Doe")
    first, second = (
        await cache.get_latest_airscore(user_id=jane.id),
        await cache.get_latest_airscore(user_id=jane.id),
    )
    assert (first.outcome, first.value, second.outcome, second.value) == (
        CACHE_MISS,
        None,
        CACHE_HIT,
        None,
    )
    assert await stored_value(sandbox, first.key) is None
    score = await add_demo_airscore(sandbox, user_id=jane.id)
    assert (await cache.get_latest_airscore(user_id=jane.id)).value["id"] == score.id


class PausingCache(source.CachedUserRepository):
    """The real cache, made to pause at one chosen point so a test can commit a write there."""

    def __init__(self, sandbox: Sandbox, *, pause_before_set: bool = False) -> None:
        super().__init__(sandbox, CoherentCache(sandbox.redis, cache_coherence(sandbox)))
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self._armed = True
        if pause_before_set:
            self.cache.link = PausingLink(sandbox.redis, self._pause)

    async def _pause(self) -> None:
        if self._armed:
            self._armed = False
            self.paused.set()
            await self.resume.wait()

    async def _load_user(self, user_id):
        value = await super()._load_user(user_id)
        if not isinstance(self.cache.link, PausingLink):
            await self._pause()
        return value


class PausingLink:
    """The sandbox's real RedisLink, pausing once just before a miss's SET goes out."""

    def __init__(self, link: RedisLink, pause) -> None:
        self.link, self.pause = link, pause

    async def execute(self, *command):
        return await self.link.execute(*command)

    async def execute_many(self, *commands, transaction=False):
        if (
            commands[0][0] == "SET"
            and ":cache:user:" in commands[0][1]
            and not commands[0][1].endswith("airscore")
        ):
            await self.pause()
        return await self.link.execute_many(*commands, transaction=transaction)


async def test_a_miss_that_read_before_a_write_does_not_store_the_old_value(demo):
    sandbox, user_id = demo
    cache = sandbox.services["cache"] = PausingCache(sandbox)
    slow = asyncio.create_task(cache.get_user(user_id=user_id))
    await cache.paused.wait()  # the slow miss holds the old name, not yet stored

    await rename_user(sandbox, user_id=user_id, name="Alex After")
    # Must not join the slow read's flight (that would wait for it, and it waits for us).
    fresh = await asyncio.wait_for(cache.get_user(user_id=user_id), 10)
    cache.resume.set()
    old = await slow

    assert old.value["name"] == "Alex Smith" and "Not stored" in old.note
    assert sent(old) == ["MGET", "GET"]
    assert (fresh.outcome, fresh.value["name"], fresh.shared_database_read) == (
        CACHE_MISS,
        "Alex After",
        False,
    )
    assert (await stored_value(sandbox, cache.user_key(user_id)))["name"] == "Alex After"
    after = await cache.get_user(user_id=user_id)
    assert (after.outcome, after.value["name"]) == (CACHE_HIT, "Alex After")


async def test_an_invalidation_during_the_set_is_followed_by_a_delete(demo):
    sandbox, user_id = demo
    cache = sandbox.services["cache"] = PausingCache(sandbox, pause_before_set=True)
    await cache.get_latest_airscore(user_id=user_id)  # the epoch exists: the miss sends one SET
    slow = asyncio.create_task(cache.get_user(user_id=user_id))
    await cache.paused.wait()  # the generation check passed; the SET is about to go out

    await rename_user(sandbox, user_id=user_id, name="Alex During")
    cache.resume.set()
    old = await slow

    assert sent(old) == ["MGET", "GET", "SET", "GET", "DEL"]
    assert await sandbox.redis.client.get(cache.user_key(user_id)) is None
    assert (await cache.get_user(user_id=user_id)).value["name"] == "Alex During"


async def test_ten_concurrent_misses_on_one_key_cause_one_database_read(demo):
    sandbox, user_id = demo
    cache = cached_users(sandbox)
    with capture_statements() as log:
        reads = await asyncio.gather(*(cache.get_user(user_id=user_id) for _ in range(10)))
    assert log.count == 1
    assert cache.metrics.database_reads == 1 and cache.metrics.requests == 10
    assert [r.database_statements for r in reads].count(1) == 1
    assert all(r.value == reads[0].value for r in reads)
    assert sum(1 for r in reads if r.outcome == CACHE_MISS and not r.shared_database_read) == 1


async def test_concurrent_misses_for_an_unknown_user_all_get_the_error_and_nothing_is_cached(
    sandbox_with_users,
):
    sandbox = sandbox_with_users
    cache = cached_users(sandbox)
    unknown = str(uuid.uuid4())
    with capture_statements() as log:
        results = await asyncio.gather(
            *(cache.get_user(user_id=unknown) for _ in range(5)), return_exceptions=True
        )
    assert all(isinstance(r, source.UserNotFoundError) for r in results)
    assert log.count == 1
    assert await cache_keys(sandbox) == [] and cache.metrics.requests == 0


@pytest.mark.parametrize(
    "bad_id", ["", "   ", "not-a-uuid", "x" * 200, "'; DROP TABLE users; --", "<b>1</b>"]
)
async def test_malformed_ids_are_refused_before_redis_or_the_database(sandbox_with_users, bad_id):
    sandbox = sandbox_with_users
    cache = cached_users(sandbox)
    buttons = (fetch_user_cached, fetch_latest_airscore_cached, invalidate_user_cache)
    with capture_statements() as log:
        for button in buttons:
            with pytest.raises(validation.MalformedIdError):
                await button(sandbox, user_id=bad_id)
    assert log.count == 0 and await cache_keys(sandbox) == [] and cache.metrics.requests == 0


async def test_outage_by_cut_every_read_answered_and_no_stale_value_after_recovery(demo):
    sandbox, user_id = demo
    cache = cached_users(sandbox)
    await cache.get_user(user_id=user_id)
    await cache.get_latest_airscore(user_id=user_id)

    sandbox.redis.cut()
    during = await cache.get_user(user_id=user_id)
    assert (during.outcome, during.value["name"]) == (CACHE_FALLBACK, "Alex Smith")
    assert sandbox.redis.health.degraded
    await rename_user(sandbox, user_id=user_id, name="Alex Offline")
    new_score = await add_demo_airscore(sandbox, user_id=user_id)
    assert pending_invalidations(sandbox) == 2
    assert (await cache.get_user(user_id=user_id)).value["name"] == "Alex Offline"
    assert (await cache.get_latest_airscore(user_id=user_id)).value["id"] == new_score.id

    await sandbox.redis.restore()
    back = await cache.get_user(user_id=user_id)
    # What Redis missed is settled before that read (by the read itself, or by the background
    # settler if it came first): a new fence and a new epoch, so no value from before counts.
    settled = recent(sandbox)[0]
    assert (
        settled.reason == classroom.cache.coherence.SETTLE_REASON
        and settled.applied
        and settled.everything
    )
    assert sent(settled) == ["MULTI", "SET", "SET", "EXEC"]
    assert (back.outcome, back.value["name"]) == (CACHE_MISS, "Alex Offline")
    assert not sandbox.redis.health.degraded and pending_invalidations(sandbox) == 0
    assert (await cache.get_latest_airscore(user_id=user_id)).value["id"] == new_score.id
    assert (await cache.get_user(user_id=user_id)).outcome == CACHE_HIT
    assert (cache.metrics.hits, cache.metrics.misses, cache.metrics.errors) == (1, 4, 3)


@pytest.fixture
async def controlled_fake_redis(settings):
    """A sandbox whose Redis is a fakeredis server the test can disconnect (.connected)."""
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    service = RedisService(
        mode="fakeredis", reason="test", url=None, client=client, fake_server=server
    )
    registry = SandboxRegistry(settings, service)
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        await initialize_sandbox(sandbox)
        yield server, sandbox
    finally:
        server.connected = True
        await registry.close()
        await service.close()


async def test_outage_by_a_lost_fakeredis_connection_is_survived_and_recovered(
    controlled_fake_redis,
):
    server, sandbox = controlled_fake_redis
    sandbox.redis.breaker.cooling_seconds = 0.05  # probe soon after the connection is back
    user_id = (await prepare_cache_demo(sandbox)).user_id
    cache = cached_users(sandbox)
    assert (await cache.get_user(user_id=user_id)).outcome == CACHE_MISS

    server.connected = False
    assert (await cache.get_user(user_id=user_id)).outcome == CACHE_FALLBACK
    await rename_user(sandbox, user_id=user_id, name="Alex Disconnected")
    during = await cache.get_user(user_id=user_id)
    assert (during.outcome, during.value["name"]) == (CACHE_FALLBACK, "Alex Disconnected")
    assert sandbox.redis.health.degraded

    # a lost connection opens the breaker: later calls skip Redis
    assert sandbox.redis.breaker.is_open
    server.connected = True  # the old profile is still stored in the server
    deadline = asyncio.get_running_loop().time() + 20
    while sandbox.redis.breaker.is_open and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)  # the breaker's own probe closes it
    back = await cache.get_user(user_id=user_id)
    assert (back.outcome, back.value["name"]) == (CACHE_MISS, "Alex Disconnected")
    again = await cache.get_user(user_id=user_id)
    assert (again.outcome, again.value["name"]) == (CACHE_HIT, "Alex Disconnected")
    assert not sandbox.redis.health.degraded
    assert (cache.metrics.hits, cache.metrics.misses, cache.metrics.errors) == (1, 2, 2)


async def test_the_outage_switch_reports_whether_redis_answers(demo):
    sandbox, user_id = demo
    assert await set_redis_outage(sandbox, cut=True) is False
    assert (await cache_status(sandbox)).cut_off and sandbox.redis.health.degraded
    assert await set_redis_outage(sandbox, cut=False) is True
    status = await cache_status(sandbox)
    assert not status.cut_off and not status.degraded


async def test_reinitializing_resets_metrics_and_never_serves_keys_from_before(demo):
    sandbox, user_id = demo
    cache = cached_users(sandbox)
    await cache.get_user(user_id=user_id)
    sandbox.redis.cut()  # the reset cannot delete the old keys
    await initialize_sandbox(sandbox)
    await sandbox.redis.restore()
    assert cache.metrics.requests == 0
    # the wiped user, although its key is still in Redis
    with pytest.raises(source.UserNotFoundError):
        await cache.get_user(user_id=user_id)
    assert await cache_keys(sandbox) == [cache.user_key(user_id)]


async def test_a_corrupt_or_pickled_value_in_redis_is_replaced_not_served(demo):
    sandbox, user_id = demo
    cache = cached_users(sandbox)
    key = cache.user_key(user_id)
    for planted in ("not json", "[1, 2]", pickle.dumps({"name": "evil"}, protocol=0).decode()):
        await sandbox.redis.client.set(key, planted)
        read = await cache.get_user(user_id=user_id)
        assert (read.outcome, read.value["name"]) == (CACHE_MISS, "Alex Smith")
        assert (await stored_value(sandbox, key))["name"] == "Alex Smith"


async def test_every_cached_value_is_json(demo):
    sandbox, user_id = demo
    cache = cached_users(sandbox)
    for user in await source.list_users(sandbox):
        await cache.get_user(user_id=user.id)
        await cache.get_latest_airscore(user_id=user.id)
    keys = await cache_keys(sandbox)
    assert len(keys) == 4
    for key in keys:
        raw = await sandbox.redis.client.get(key)
        assert not raw.startswith("\x80")  # a binary pickle's first byte
        json.loads(raw)


async def test_two_sandboxes_never_see_each_others_keys(registry):
    first = await registry.acquire(new_sandbox_id())
    second = await registry.acquire(new_sandbox_id())
    same_id = str(uuid.uuid4())
    for sandbox, name in ((first, "First Owner"), (second, "Second Owner")):
        async with get_session(sandbox) as session:
            session.add(
                source.User(id=same_id, email=f"{name.split()[0].lower()}@example.com", name=name)
            )

    mine = (await fetch_user_cached(first, user_id=same_id)).read
    theirs = (await fetch_user_cached(second, user_id=same_id)).read

    assert (mine.outcome, mine.value["name"]) == (CACHE_MISS, "First Owner")
    assert (theirs.outcome, theirs.value["name"]) == (CACHE_MISS, "Second Owner")
    assert all(key.startswith(first.redis.prefix) for key in await cache_keys(first))
    assert len(await cache_keys(first)) == len(await cache_keys(second)) == 1
    await invalidate_user_cache(first, user_id=same_id)
    assert (await fetch_user_cached(second, user_id=same_id)).read.outcome == CACHE_HIT
    assert cached_users(second).metrics.hits == 1 and cached_users(first).metrics.hits == 0


async def test_the_demo_prefers_alex_and_otherwise_creates_its_own_user_with_a_score(registry):
    empty = await registry.acquire(new_sandbox_id())
    assert await find_cache_demo(empty) is None  # looking for the demo user writes nothing
    assert set((await source.count_rows(empty)).values()) == {0}
    first, again = await asyncio.gather(
        create_cache_demo_user(empty), create_cache_demo_user(empty)
    )
    assert (
        first.user_name == again.user_name == "Cache Demo User" and first.user_id == again.user_id
    )
    assert first.latest_airscore_id is not None and first == again
    rows = await source.count_rows(empty)
    assert (rows["users"], rows["air_scores"]) == (1, 1)
    assert await find_cache_demo(empty) == first

    await initialize_sandbox(empty)
    alex = await find_cache_demo(empty)
    assert (alex.user_name, alex.latest_airscore_id) == ("Alex Smith", None)
    assert await create_cache_demo_user(empty) == alex  # the demo user exists: nothing is created
    rows = await source.count_rows(empty)
    assert (rows["users"], rows["air_scores"]) == (2, 0)


async def test_rename_validates_before_touching_anything(demo):
    sandbox, user_id = demo
    cache = cached_users(sandbox)
    await cache.get_user(user_id=user_id)
    for bad in ("", "<script>x</script>", "x" * 300):
        with pytest.raises(source.ValidationError):
            await rename_user(sandbox, user_id=user_id, name=bad)
    assert (await cache.get_user(user_id=user_id)).outcome == CACHE_HIT


async def test_the_experiment_hits_its_target_ratios_and_leaves_the_page_metrics_alone(demo):
    sandbox, user_id = demo
    trials = await run_cache_experiment(
        sandbox, user_id=user_id, reads=20, hit_ratios=(0.0, 0.25, 1.0)
    )
    assert [(t.metrics.hits, t.metrics.misses) for t in trials] == [(0, 20), (5, 15), (20, 0)]
    assert [t.outcomes.count(CACHE_HIT) for t in trials] == [0, 5, 20]
    assert all(len(t.latencies_ms) == 20 for t in trials)
    assert cached_users(sandbox).metrics.requests == 0
    for bad in ({"reads": 0}, {"reads": 5000}, {"hit_ratios": ()}, {"hit_ratios": (1.5,)}):
        with pytest.raises(source.ValidationError):
            await run_cache_experiment(sandbox, user_id=user_id, **bad)


async def test_a_redis_that_accepts_but_never_answers_costs_a_read_one_cache_timeout(
    settings, monkeypatch
):
    connections: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # read whatever comes and never reply, like a hung server
        await reader.read()

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    # A socket timeout far beyond the test's patience: only the cache's own timeout can end a
    # command in time.
    client = redis.asyncio.Redis(
        host="127.0.0.1",
        port=port,
        decode_responses=True,
        socket_timeout=300,
        retry=Retry(NoBackoff(), 0),
    )
    service = RedisService(mode="redis", reason="test: a silent server", url=None, client=client)
    registry = SandboxRegistry(settings, service)
    service.command_timeout_seconds = 0.2
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        user = await source.create_user(sandbox, email="hung@example.com", name="Hung Redis")
        read = (await asyncio.wait_for(fetch_user_cached(sandbox, user_id=user.id), 30)).read
        assert (read.outcome, read.value["name"]) == (CACHE_FALLBACK, "Hung Redis")
        assert read.redis_commands[0].reply == "failed: TimeoutError"
        assert sandbox.redis.health.degraded
    finally:
        for (
            writer
        ) in connections:  # hang up, so releasing the sandbox fails fast instead of waiting
            writer.close()
        silent.close()
        await registry.close()
        await service.close()


async def test_no_stale_read_after_bulk_writes_the_orm_never_flushed(sandbox_with_users):
    sandbox = sandbox_with_users
    cache = cached_users(sandbox)
    await grow_scale_up_users(sandbox, target_users=3, scores_per_user=1)
    scale_up = [
        u for u in await source.list_users(sandbox) if u.name.startswith(SCALE_UP_NAME_PREFIX)
    ]
    jane = next(u for u in await source.list_users(sandbox) if u.name == "Jane Doe")
    for user in (*scale_up, jane):
        await cache.get_user(user_id=user.id)
        assert (await cache.get_user(user_id=user.id)).outcome == CACHE_HIT

    assert await remove_scale_up_users(sandbox) == 3  # one bulk delete(User)
    for user in scale_up:
        with pytest.raises(source.UserNotFoundError):
            await cache.get_user(user_id=user.id)
    assert recent(sandbox)[0].everything and "bulk" in recent(sandbox)[0].reason

    await cache.get_user(user_id=jane.id)
    async with get_session(sandbox) as session:  # an ORM-enabled bulk UPDATE
        await session.execute(
            update(source.User).where(source.User.id == jane.id).values(name="Jane Bulk")
        )
    assert (await cache.get_user(user_id=jane.id)).value["name"] == "Jane Bulk"
    await cache.get_user(user_id=jane.id)
    async with get_session(sandbox) as session:  # a Core UPDATE on the table, no ORM entity
        users = source.User.__table__
        await session.execute(update(users).where(users.c.id == jane.id).values(name="Jane Core"))
    assert (await cache.get_user(user_id=jane.id)).value["name"] == "Jane Core"
    # A bulk write to a table the cache does not hold leaves the cache alone.
    await cache.get_user(user_id=jane.id)
    async with get_session(sandbox) as session:
        await session.execute(delete(source.DomainEvent))
    assert (await cache.get_user(user_id=jane.id)).outcome == CACHE_HIT


async def test_session_listeners_hear_qulab_sessions_only(sandbox_with_users):
    from sqlalchemy.orm import Session

    assert SandboxSession.sync_session_class is TrackedSyncSession
    with Session() as foreign:  # some other library's session in the same process
        foreign.info.clear()
        foreign.flush()
    assert event.contains(TrackedSyncSession, "after_flush", _collect_flushed_changes)
    assert not event.contains(Session, "after_flush", _collect_flushed_changes)
    async with get_session(sandbox_with_users) as session:
        assert isinstance(session, SandboxSession)


@pytest.fixture
async def two_replicas(settings):
    """Two registries (two replicas of QuLab) opening one sandbox id on shared storage and Redis."""
    if settings.redis_url:
        services = [await RedisService.connect(settings) for _ in range(2)]
    else:
        server = fakeredis.FakeServer()
        services = [
            RedisService(
                mode="fakeredis",
                reason="test",
                url=None,
                fake_server=server,
                client=fakeredis.FakeAsyncRedis(server=server, decode_responses=True),
            )
            for _ in range(2)
        ]
    registries = [SandboxRegistry(settings, service) for service in services]
    sandbox_id = new_sandbox_id()
    try:
        first = await registries[0].acquire(sandbox_id)
        await initialize_sandbox(first)
        # the same SQLite file (same process) or schema
        second = await registries[1].acquire(sandbox_id)
        yield first, second
    finally:
        for registry, service in zip(reversed(registries), reversed(services), strict=True):
            await registry.close()
            await service.close()


async def test_a_write_on_another_replica_is_never_served_stale(two_replicas):
    here, there = two_replicas
    alex = (await prepare_cache_demo(here)).user_id
    jane = next(u for u in await source.list_users(here) if u.name == "Jane Doe").id
    cache = cached_users(here)
    for user_id in (alex, jane):
        await cache.get_user(user_id=user_id)
        await cache.get_latest_airscore(user_id=user_id)
    assert (await cache.get_user(user_id=alex)).outcome == CACHE_HIT
    assert "cache" not in there.services  # the other replica never used its cache

    await rename_user(there, user_id=alex, name="Alex Elsewhere")
    score = await add_demo_airscore(there, user_id=jane)
    assert (await cache.get_user(user_id=alex)).value["name"] == "Alex Elsewhere"
    assert (await cache.get_latest_airscore(user_id=jane)).value["id"] == score.id
    async with get_session(there) as session:
        await session.execute(delete(source.User).where(source.User.id == jane))
    with pytest.raises(source.UserNotFoundError):
        await cache.get_user(user_id=jane)


async def test_a_miss_racing_a_write_on_another_replica_does_not_keep_the_old_value(two_replicas):
    here, there = two_replicas
    user_id = (await prepare_cache_demo(here)).user_id
    cache = here.services["cache"] = PausingCache(here)
    await cache.get_latest_airscore(user_id=user_id)  # the epoch exists
    slow = asyncio.create_task(cache.get_user(user_id=user_id))
    await cache.paused.wait()  # read the old name from the database, not stored yet

    await rename_user(there, user_id=user_id, name="Alex Raced")  # this process hears nothing
    cache.resume.set()
    old = await slow

    assert old.value["name"] == "Alex Smith" and "deleted again" in old.note
    assert sent(old) == ["MGET", "GET", "SET", "GET", "DEL"]
    fresh = await cache.get_user(user_id=user_id)
    assert (fresh.outcome, fresh.value["name"]) == (CACHE_MISS, "Alex Raced")


REPLICA_SCRIPT = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from classroom.cache.link import RedisService
from classroom.config import Settings
from classroom.demos.caching import add_demo_airscore, rename_user
from classroom.demos.n_plus_one import remove_scale_up_users
from classroom.sandboxes.registry import SandboxRegistry

async def main(sandbox_id, alex, jane):
    settings = Settings.from_environment()
    service = await RedisService.connect(settings)
    assert service.mode == "redis", service.reason
    registry = SandboxRegistry(settings, service)
    # the same schema; never released here (that would drop it)
    sandbox = await registry.acquire(sandbox_id)
    await rename_user(sandbox, user_id=alex, name="Alex From Another Process")
    await add_demo_airscore(sandbox, user_id=alex)
    print(await remove_scale_up_users(sandbox))
    await sandbox.engine.dispose()
    await service.close()

asyncio.run(main(*sys.argv[2:]))
"""


async def test_a_write_from_another_process_on_postgresql_and_redis_is_never_served_stale(
    settings, postgres_url, real_redis_url
):
    shared = Settings(
        **{**settings.__dict__, "database_url": postgres_url, "redis_url": real_redis_url}
    )
    service = await RedisService.connect(shared)
    registry = SandboxRegistry(shared, service)
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        await initialize_sandbox(sandbox)
        alex = (await prepare_cache_demo(sandbox)).user_id
        await grow_scale_up_users(sandbox, target_users=2, scores_per_user=1)
        doomed = [
            u.id
            for u in await source.list_users(sandbox)
            if u.name.startswith(SCALE_UP_NAME_PREFIX)
        ]
        cache = cached_users(sandbox)
        for user_id in (alex, *doomed):
            await cache.get_user(user_id=user_id)
        before = (await cache.get_latest_airscore(user_id=alex)).value
        assert (await cache.get_user(user_id=alex)).outcome == CACHE_HIT

        environment = {**os.environ, "DATABASE_URL": postgres_url, "REDIS_URL": real_redis_url}
        replica = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            REPLICA_SCRIPT,
            str(PROJECT_ROOT),
            sandbox.id,
            alex,
            doomed[0],
            env=environment,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(replica.communicate(), 120)
        assert replica.returncode == 0, err.decode()[-2000:]
        assert out.decode().strip() == "2"

        assert (await cache.get_user(user_id=alex)).value["name"] == "Alex From Another Process"
        assert (await cache.get_latest_airscore(user_id=alex)).value["id"] != before["id"]
        for user_id in doomed:
            with pytest.raises(source.UserNotFoundError):
                await cache.get_user(user_id=user_id)
    finally:
        await registry.close()
        await service.close()


def test_raw_sql_that_may_write_counts_as_a_bulk_write_of_anything():
    from sqlalchemy import select, text

    assert _tables_written(text("UPDATE users SET name = 'x'")) == {"*"}
    assert _tables_written(text("  select 1")) == set()
    assert _tables_written(delete(source.User)) == {"users"}
    assert _tables_written(select(source.User)) == set()


async def test_writes_redis_missed_are_settled_in_the_background_for_other_replicas(two_replicas):
    here, there = two_replicas
    alex = (await prepare_cache_demo(here)).user_id
    theirs = cached_users(there)
    await theirs.get_user(user_id=alex)
    assert (await theirs.get_user(user_id=alex)).outcome == CACHE_HIT

    here.redis.cut()  # this replica cannot reach Redis while it writes
    await rename_user(here, user_id=alex, name="Alex While Cut")
    assert cache_coherence(here).pending_writes == 1
    await here.redis.restore()  # ...and never reads the cache again: the settler must do it
    deadline = asyncio.get_running_loop().time() + 30
    while cache_coherence(here).pending_writes and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)

    read = await theirs.get_user(user_id=alex)
    assert (read.outcome, read.value["name"]) == (CACHE_MISS, "Alex While Cut")
