"""Section 4's demos as the page runs them: reads through the cache, the demo user, the experiment.

Every read goes through the sandbox's source.CachedUserRepository on the CoherentCache, so the
page shows the lesson's read-through pattern running, with the commands it really sent. Opening
the page writes nothing: the demo user is Alex Smith when the sandbox has him, else Jane Doe,
else the Cache Demo User once the learner asks for one (create_cache_demo_user).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Optional

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

import source
from classroom import validation
from classroom.cache.coherence import CacheInvalidation
from classroom.cache.coherent import TracedRead, cache_coherence, cached_users
from classroom.experiments import HeavyWorkPacer
from classroom.sandboxes.sandbox import Sandbox

CACHE_DEMO_EMAIL = "cache.demo@innovateai.example"
CACHE_DEMO_NAME = "Cache Demo User"
MAX_CACHE_EXPERIMENT_READS = 1000
MAX_CACHE_EXPERIMENT_RATIOS = 11


@dataclass(frozen=True)
class CacheDemo:
    """The user the cache page reads, and their newest AIRScore's id (None: no score yet)."""

    user_id: str
    user_name: str
    latest_airscore_id: Optional[str]


async def find_cache_demo(sandbox: Sandbox) -> Optional[CacheDemo]:
    """Alex Smith, else Jane Doe, else the Cache Demo User; None when the sandbox has none.

    Reads only, in one statement: the candidates with each one's newest AIRScore id.
    """
    emails = [*(sample["email"] for sample in source.SAMPLE_USERS), CACHE_DEMO_EMAIL]
    newest_score = (
        select(source.AIRScore.id)
        .where(source.AIRScore.user_id == source.User.id)
        .order_by(source.AIRScore.created_at.desc(), source.AIRScore.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    candidates = select(source.User.id, source.User.name, source.User.email, newest_score).where(
        func.lower(source.User.email).in_(emails)
    )
    async with source.get_session(sandbox) as session:
        found = {row.email.lower(): row for row in await session.execute(candidates)}
    row = next((found[email] for email in emails if email in found), None)
    return CacheDemo(row[0], row[1], row[3]) if row is not None else None


@dataclass(frozen=True)
class CachePanel:
    """What the cache demo draws before any click: the cache's state and the demo user."""

    status: CacheStatus
    demo: Optional[CacheDemo]


async def cache_panel(sandbox: Sandbox) -> CachePanel:
    """The cache's state and the demo user, read together (one call from the page)."""
    return CachePanel(await cache_status(sandbox), await find_cache_demo(sandbox))


async def create_cache_demo_user(sandbox: Sandbox) -> CacheDemo:
    """The Cache Demo User, created with one AIRScore (or the demo user the sandbox already has)."""
    demo = await find_cache_demo(sandbox)
    if demo is not None:
        return demo
    try:
        async with source.get_session(sandbox) as session:
            user = await source.UserRepository(session).create(
                email=CACHE_DEMO_EMAIL,
                name=CACHE_DEMO_NAME,
                occupation_code=source.SAMPLE_OCCUPATION_CODE,
            )
            score = await _add_sample_airscore(session, user)
    except source.DuplicateEmailError:  # another tab of this sandbox made it first
        return await create_cache_demo_user(sandbox)
    return CacheDemo(user.id, user.name, score.id)


async def _add_sample_airscore(session: AsyncSession, user: source.User) -> source.AIRScore:
    return await source.AIRScoreRepository(session).create(
        user_id=user.id,
        occupation_code=user.occupation_code or source.SAMPLE_OCCUPATION_CODE,
        calculation_metadata={"source": "codelab section 4 cache demo"},
        **source.sample_score_values(random.Random()),
    )


@dataclass(frozen=True)
class CachedFetch:
    """One read a button made: which read, what it returned and cost, and the counters after it."""

    kind: str  # "user" or "latest_airscore"
    user_id: str
    read: TracedRead
    metrics: source.CacheMetrics


async def fetch_user_cached(sandbox: Sandbox, *, user_id: str) -> CachedFetch:
    """The Fetch User (Cached) button."""
    user_id = validation.parse_entity_id(user_id)
    repository = cached_users(sandbox)
    read = await repository.get_user(user_id=user_id)
    return CachedFetch("user", user_id, read, replace(repository.metrics))


async def fetch_latest_airscore_cached(sandbox: Sandbox, *, user_id: str) -> CachedFetch:
    """The Fetch Latest AIRScore (Cached) button."""
    user_id = validation.parse_entity_id(user_id)
    repository = cached_users(sandbox)
    read = await repository.get_latest_airscore(user_id=user_id)
    return CachedFetch("latest_airscore", user_id, read, replace(repository.metrics))


async def invalidate_user_cache(sandbox: Sandbox, *, user_id: str) -> CacheInvalidation:
    """The Invalidate Cache for this User button."""
    user_id = validation.parse_entity_id(user_id)
    return await cached_users(sandbox).invalidate_user(user_id=user_id)


async def rename_user(sandbox: Sandbox, *, user_id: str, name: str) -> source.User:
    """Change a user's name (the commit invalidates their cached profile)."""
    new_name = validation.validate_name(name)
    async with source.get_session(sandbox) as session:
        user = await source.UserRepository(session).get(validation.parse_entity_id(user_id))
        user.name = new_name
    return user


async def add_demo_airscore(sandbox: Sandbox, *, user_id: str) -> source.AIRScore:
    """A new AIRScore for the user: their latest now (the commit invalidates the cached one)."""
    async with source.get_session(sandbox) as session:
        user = await source.UserRepository(session).get(user_id)
        return await _add_sample_airscore(session, user)


@dataclass(frozen=True)
class CacheStatus:
    """What the cache page shows besides reads: metrics, Redis, its breaker and health."""

    metrics: source.CacheMetrics
    redis_mode: str  # "redis" or "fakeredis"
    redis_reason: str
    answers: bool  # Redis answers now (a probe shared with the sidebar), and is not cut off
    breaker_state: str  # "closed", "open" or "half-open"
    breaker: str  # the breaker's state in one line
    cut_off: bool
    degraded: bool
    last_error: str
    pending_invalidations: int
    recent_invalidations: tuple[CacheInvalidation, ...]


async def cache_status(sandbox: Sandbox) -> CacheStatus:
    """The sandbox's cache metrics and Redis's state, read as the sidebar reads it."""
    repository, link = cached_users(sandbox), sandbox.redis
    coherence = cache_coherence(sandbox)
    reading = await link.service.reading()
    return CacheStatus(
        metrics=replace(repository.metrics),
        answers=reading.answers and not link.cut_off,
        redis_mode=link.service.mode,
        redis_reason=link.service.reason,
        breaker_state=link.breaker.state,
        breaker=link.breaker.describe(),
        cut_off=link.cut_off,
        degraded=link.health.degraded,
        last_error=link.health.last_error,
        pending_invalidations=coherence.pending_writes,
        recent_invalidations=tuple(coherence.recent_invalidations),
    )


async def cache_metrics(sandbox: Sandbox) -> source.CacheMetrics:
    """The sandbox's cache counters as they stand (a copy)."""
    return replace(cached_users(sandbox).metrics)


async def recent_invalidations(sandbox: Sandbox) -> tuple[CacheInvalidation, ...]:
    """What the sandbox's cache was told to forget lately, newest first."""
    return tuple(cache_coherence(sandbox).recent_invalidations)


async def set_redis_outage(sandbox: Sandbox, *, cut: bool) -> bool:
    """Cut this sandbox off from Redis, or reconnect it.

    True when Redis answers (and took what it missed).
    """
    timeout = sandbox.redis.service.command_timeout_seconds
    answers = await sandbox.redis.switch_outage(cut=cut, timeout_seconds=timeout)
    return answers and await cache_coherence(sandbox).settle_pending()


@dataclass(frozen=True)
class CacheTrial:
    """R reads of one user's profile with a planned share of misses, and what they measured."""

    target_hit_ratio: float
    outcomes: tuple[str, ...]
    latencies_ms: tuple[float, ...]
    metrics: source.CacheMetrics


async def run_cache_experiment(
    sandbox: Sandbox,
    *,
    user_id: str,
    reads: int = 100,
    hit_ratios: tuple[float, ...] = (0.0, 0.5, 0.9, 1.0),
) -> list[CacheTrial]:
    """For each target H, read the user's profile R times, evicting before the reads meant to miss.

    The key is warmed first and evictions are not timed, so each trial's measured H is its target
    (unless Redis fails, or another tab touches this user meanwhile). Each trial counts on its
    own; the page's counters stay as they are.
    """
    source.validate_whole_number(reads, label="Reads", low=1, high=MAX_CACHE_EXPERIMENT_READS)
    valid = all(
        not isinstance(ratio, bool) and isinstance(ratio, (int, float)) and 0 <= ratio <= 1
        for ratio in hit_ratios
    )
    if not hit_ratios or len(hit_ratios) > MAX_CACHE_EXPERIMENT_RATIOS or not valid:
        raise source.ValidationError(
            f"Choose from 1 to {MAX_CACHE_EXPERIMENT_RATIOS} hit ratios, each between 0 and 1.",
            field="hit_ratios",
        )
    repository = cached_users(sandbox)
    user_id = validation.parse_entity_id(user_id)
    # Reads of the experiment's own: the same cache and keys, counters of their own.
    experiment = source.CachedUserRepository(sandbox, repository.cache)
    key = experiment.user_key(user_id)
    pacer = HeavyWorkPacer()  # thousands of reads: rest between slices for everyone else
    trials = []
    for ratio in hit_ratios:
        await experiment.get_user(user_id=user_id)  # warm the key; not counted
        planned_misses = round(reads * (1 - ratio))
        experiment.metrics = source.CacheMetrics()
        outcomes, latencies = [], []
        for index in range(reads):
            async with pacer.unit():  # each read timed on its own: the rests fall between reads
                if (index + 1) * planned_misses // reads > index * planned_misses // reads:
                    await repository.cache.coherence.invalidate(
                        [key], reason="experiment", remember=False
                    )
                read = await experiment.get_user(user_id=user_id)
            outcomes.append(read.outcome)
            latencies.append(read.total_ms)
        metrics = replace(experiment.metrics)
        trials.append(CacheTrial(float(ratio), tuple(outcomes), tuple(latencies), metrics))
    return trials
