"""Section 4's lesson alone: the plain read-through cache (source.ReadThroughCache) on fakeredis.

A first read misses and stores the value as JSON with a jittered TTL, the next one hits, an
invalidation makes the next read miss again; CacheMetrics' H and T_avg follow from the reads.
"""

import json

import pytest

import source
from source import CACHE_TTL_JITTER, CACHE_TTL_SECONDS, HIT, MISS, CacheMetrics, CacheRead

SPREAD = round(CACHE_TTL_SECONDS * CACHE_TTL_JITTER)


async def alex(sandbox) -> source.User:
    return next(u for u in await source.list_users(sandbox) if u.name == "Alex Smith")


def assert_ttl_within_jitter(pttl_ms: int) -> None:
    # The key was just set: at most a second of it has gone by (the test runs in milliseconds).
    assert (
        (CACHE_TTL_SECONDS - SPREAD) * 1000 - 1000 < pttl_ms <= (CACHE_TTL_SECONDS + SPREAD) * 1000
    )


async def test_a_first_read_misses_stores_json_with_a_jittered_ttl_and_the_next_one_hits(
    sandbox_with_users, statements
):
    sandbox = sandbox_with_users
    user = await alex(sandbox)
    repository = source.CachedUserRepository(sandbox)
    assert type(repository.cache) is source.ReadThroughCache
    key = repository.user_key(user.id)
    client = sandbox.redis.client
    assert await client.get(key) is None

    statements.reset()
    first = await repository.get_user(user_id=user.id)
    assert (first.key, first.outcome) == (key, MISS)
    assert first.value == source.row_as_json(user)
    assert len(statements.statements) == 1  # the database answered the miss
    assert first.database_ms is not None and first.lookup_ms is not None
    assert json.loads(await client.get(key)) == first.value  # kept as JSON
    assert_ttl_within_jitter(await client.pttl(key))

    statements.reset()
    second = await repository.get_user(user_id=user.id)
    assert (second.outcome, second.value, second.database_ms) == (HIT, first.value, None)
    assert statements.statements == []  # a hit answers from Redis alone
    assert (repository.metrics.hits, repository.metrics.misses) == (1, 1)
    assert repository.metrics.hit_ratio == 0.5


async def test_a_user_without_scores_caches_null_and_hits_it(sandbox_with_users):
    sandbox = sandbox_with_users
    user = await alex(sandbox)
    repository = source.CachedUserRepository(sandbox)
    first = await repository.get_latest_airscore(user_id=user.id)
    second = await repository.get_latest_airscore(user_id=user.id)
    assert [(read.outcome, read.value) for read in (first, second)] == [(MISS, None), (HIT, None)]
    key = repository.latest_airscore_key(user.id)
    assert await sandbox.redis.client.get(key) == "null"

    [score] = await source.add_sample_scores(sandbox, user_id=user.id, count=1)
    await repository.invalidate_user(user_id=user.id)
    third = await repository.get_latest_airscore(user_id=user.id)
    assert (third.outcome, third.value) == (MISS, source.row_as_json(score))


async def test_invalidate_deletes_both_keys_and_the_next_read_misses(sandbox_with_users):
    sandbox = sandbox_with_users
    user = await alex(sandbox)
    repository = source.CachedUserRepository(sandbox)
    await repository.get_user(user_id=user.id)
    await repository.get_latest_airscore(user_id=user.id)
    assert (await repository.get_user(user_id=user.id)).outcome == HIT

    assert await repository.invalidate_user(user_id=user.id) == 2  # DEL removed both keys
    client = sandbox.redis.client
    assert await client.exists(repository.user_key(user.id)) == 0
    assert await client.exists(repository.latest_airscore_key(user.id)) == 0
    assert (await repository.get_user(user_id=user.id)).outcome == MISS
    assert (await repository.get_user(user_id=user.id)).outcome == HIT


async def test_an_unknown_user_is_refused_and_nothing_is_cached(sandbox_with_users):
    sandbox = sandbox_with_users
    repository = source.CachedUserRepository(sandbox)
    unknown = source.new_id()
    with pytest.raises(source.UserNotFoundError):
        await repository.get_user(user_id=unknown)
    with pytest.raises(source.UserNotFoundError):
        await repository.get_user(user_id="not-a-uuid")
    assert await sandbox.redis.client.exists(repository.user_key(unknown)) == 0
    assert repository.metrics.requests == 0


def test_each_ttl_is_the_ttl_plus_or_minus_the_jitter():
    cache = source.ReadThroughCache(client=None)
    ttls = {cache.jittered_ttl() for _ in range(500)}
    assert min(ttls) >= CACHE_TTL_SECONDS - SPREAD and max(ttls) <= CACHE_TTL_SECONDS + SPREAD
    assert len(ttls) > 10  # keys written together do not expire together
    short = source.ReadThroughCache(client=None, ttl_seconds=60)
    assert {short.jittered_ttl() for _ in range(200)} <= set(range(54, 67))


def test_cache_metrics_compute_h_and_t_avg_from_the_recorded_reads():
    metrics = CacheMetrics()
    assert metrics.hit_ratio is None and metrics.predicted_average_ms is None
    assert metrics.measured_average_ms is None
    for read in (
        CacheRead("k", HIT, 1, total_ms=1.0, lookup_ms=1.0),
        CacheRead("k", HIT, 1, total_ms=3.0, lookup_ms=3.0),
        CacheRead("k", MISS, 1, total_ms=14.0, lookup_ms=2.0, database_ms=8.0),
        CacheRead("k", source.FALLBACK, 1, total_ms=9.0, lookup_ms=None, database_ms=9.0),
    ):
        metrics.record(read)
    assert (metrics.hits, metrics.misses, metrics.errors, metrics.requests) == (2, 1, 1, 4)
    assert metrics.hit_ratio == pytest.approx(0.5)  # H = 2 hits ÷ 4 requests
    assert metrics.mean_cache_ms == pytest.approx(2.0)  # (1 + 3 + 2) ÷ 3 lookups
    assert metrics.mean_database_ms == pytest.approx(8.5)  # (8 + 9) ÷ 2 database reads
    # T_avg = H·T_cache + (1 − H)·(T_cache + T_db) = 0.5·2 + 0.5·(2 + 8.5)
    assert metrics.predicted_average_ms == pytest.approx(6.25)
    assert metrics.measured_average_ms == pytest.approx((1 + 3 + 14 + 9) / 4)


def test_all_hits_need_no_database_time_for_the_prediction():
    metrics = CacheMetrics()
    for total in (1.0, 2.0, 3.0):
        metrics.record(CacheRead("k", HIT, None, total_ms=total, lookup_ms=total))
    assert metrics.hit_ratio == 1.0 and metrics.mean_database_ms is None
    assert metrics.predicted_average_ms == pytest.approx(2.0)
