"""The read-through cache QuLab runs: the lesson's pattern, each of its steps hardened.

CoherentCache subclasses source.ReadThroughCache and keeps its read() as it is: GET, on a miss
load and SET. Only the steps change:

- get:  MGET of the sandbox's epoch and the value (a value counts only under the current epoch);
        on a miss the fence too. A Redis that fails or is skipped (breaker open) is a miss the
        database answers, and nothing is stored (the read becomes a FALLBACK).
- load: concurrent misses on one key share one database read (single flight).
- set:  SET … EX, then the fence read again: a write that landed meanwhile deletes the value.

Every commit of a sandbox invalidates what it changed (invalidate_cached_changes, the sandbox's
first commit listener): the keys of the rows the ORM flushed, or, after a bulk write whose rows
are unknown, a new epoch that drops every value of the sandbox at once, in every process.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import source
from classroom.cache.breaker import REDIS_ERRORS
from classroom.cache.coherence import CacheCoherence, CachedEntry, CacheInvalidation
from classroom.cache.link import RedisLink
from classroom.cache.single_flight import SingleFlight
from classroom.cache.tracing import CommandTrace, RedisCommand
from classroom.engines import CommittedChanges
from classroom.statements import capture_statements

if TYPE_CHECKING:
    from classroom.sandboxes.sandbox import Sandbox

logger = logging.getLogger("qulab")


@dataclass(slots=True)
class TracedRead(source.CacheRead):
    """A read as the cache page shows it: the lesson's CacheRead and what it really sent."""

    redis_commands: tuple[RedisCommand, ...] = ()
    database_statements: int = 0
    shared_database_read: bool = False  # waited for the same key's read already in flight
    note: str = ""


@dataclass
class _ReadTrace:
    """What one read's hardened steps did, for the TracedRead it becomes."""

    commands: CommandTrace
    redis_error: Optional[BaseException] = None
    shared: bool = False
    statements: int = 0
    notes: list[str] = field(default_factory=list)


_current_read: contextvars.ContextVar[_ReadTrace] = contextvars.ContextVar("qulab_cache_read")


class CoherentCache(source.ReadThroughCache):
    """source.ReadThroughCache with an epoch, a fence, single flight and a guarded Redis link."""

    def __init__(self, link: RedisLink, coherence: CacheCoherence) -> None:
        super().__init__(link.client)
        self.link = link
        self.coherence = coherence
        self.flights = SingleFlight()

    async def read(self, key: str, load: Callable[[], Awaitable[Any]]) -> TracedRead:
        """The lesson's read (GET, miss, load, SET), traced; a Redis failure makes it a FALLBACK."""
        trace = _ReadTrace(CommandTrace(self.link))
        token = _current_read.set(trace)
        try:
            read = await super().read(key, load)
        finally:
            _current_read.reset(token)
            self.flights.landed(key)  # later GETs see the value: later misses start afresh
        outcome, lookup_ms, database_ms = read.outcome, read.lookup_ms, read.database_ms
        if trace.redis_error is not None:
            outcome, lookup_ms = source.FALLBACK, None
            trace.notes.append(
                f"Redis failed ({type(trace.redis_error).__name__}); "
                "the database answered and nothing was stored."
            )
        if trace.shared:
            database_ms = None
            trace.notes = ["Another read of this key went to the database; this one shared it."]
        return TracedRead(
            key,
            outcome,
            read.value,
            read.total_ms,
            lookup_ms,
            database_ms,
            tuple(trace.commands.commands),
            trace.statements,
            trace.shared,
            " ".join(trace.notes),
        )

    async def get(self, key: str) -> CachedEntry:
        """MGET epoch and value; a failed or skipped Redis is a miss the database answers."""
        trace = _current_read.get()
        ticket = self.flights.ticket()  # taken just before the GET: single flight orders by it
        try:
            entry = await self.coherence.get(key, trace.commands)
        except REDIS_ERRORS as error:
            trace.redis_error = error
            return CachedEntry(
                False, generation=self.coherence.generation, ticket=ticket, failed=True
            )
        entry.ticket = ticket
        return entry

    async def load(
        self, key: str, load: Callable[[], Awaitable[Any]], cached: source.Cached
    ) -> Any:
        """The database read, shared by every concurrent miss of this key and generation."""
        assert isinstance(cached, CachedEntry)
        trace = _current_read.get()

        async def counted_load() -> Any:
            with capture_statements() as log:
                value = await load()
            trace.statements = log.count
            return value

        value, trace.shared = await self.flights.load(
            key, generation=cached.generation, ticket=cached.ticket, load=counted_load
        )
        return value

    async def set(self, key: str, value: Any, cached: source.Cached) -> None:
        """SET … EX unless Redis failed, checked against the fence the GET saw."""
        assert isinstance(cached, CachedEntry)
        if cached.failed:
            return
        trace = _current_read.get()
        ttl = self.jittered_ttl()
        note = await self.coherence.set(key, value, ttl=ttl, since=cached, trace=trace.commands)
        trace.notes.append(note)

    async def invalidate(self, keys: list[str], *, reason: str = "requested") -> CacheInvalidation:
        """DEL the keys and move the fence, in one MULTI.

        If Redis fails, the cache settles before the next read.
        """
        return await self.coherence.invalidate(keys, reason=reason)


def cache_coherence(sandbox: Sandbox) -> CacheCoherence:
    """The sandbox's epoch, fence and pending invalidations (shared by its cache and commits)."""

    def create(owner: Sandbox) -> CacheCoherence:
        coherence = CacheCoherence(owner.redis)
        owner.release_listeners.append(lambda released: coherence.close())
        owner.dormant_listeners.append(lambda sleeping: coherence.settle_once_and_stop())
        owner.wake_listeners.append(lambda woken: coherence.resume_settling())
        return coherence

    return sandbox.service("cache-coherence", create)


def cached_users(sandbox: Sandbox) -> source.CachedUserRepository:
    """The sandbox's CachedUserRepository on a CoherentCache, created on first use."""

    def create(owner: Sandbox) -> source.CachedUserRepository:
        repository = source.CachedUserRepository(
            owner, CoherentCache(owner.redis, cache_coherence(owner))
        )

        async def forget_everything(reset: Sandbox) -> None:
            # The reset's bulk deletes already moved the epoch: start counting afresh.
            repository.metrics = source.CacheMetrics()
            repository.cache.flights.clear()
            repository.cache.coherence.forget_history()

        owner.reset_listeners.append(forget_everything)
        return repository

    return sandbox.service("cache", create)


CACHED_TABLES = frozenset({"*", "users", "air_scores"})


def cache_keys_changed_by(sandbox: Sandbox, changes: CommittedChanges) -> list[str]:
    """The cache keys a commit's ORM changes made stale (bulk writes move the epoch instead)."""
    repository = cached_users(sandbox)
    keys: dict[str, None] = {}  # ordered, without repeats
    for user in (*changes.updated, *changes.deleted):
        if isinstance(user, source.User):
            keys[repository.user_key(user.id)] = None
    for user in changes.deleted:
        if isinstance(user, source.User):
            keys[repository.latest_airscore_key(user.id)] = None
    for score in changes.of_type(source.AIRScore):
        keys[repository.latest_airscore_key(score.user_id)] = None
    return list(keys)


async def invalidate_cached_changes(
    sandbox: Sandbox, changes: CommittedChanges
) -> Optional[CacheInvalidation]:
    """Drop what a commit made stale: its changed keys, or (after a bulk write) the whole epoch.

    Runs after every commit, whether or not this process has used the cache: another replica
    may have cached what this one just changed. It never raises: the commit stands, and a
    failed invalidation is settled before the cache is read again.
    """
    keys = cache_keys_changed_by(sandbox, changes)
    bulk = sorted(changes.bulk_tables & CACHED_TABLES)
    if not keys and not bulk:
        return None
    changed = (*changes.updated, *changes.deleted, *changes.inserted)
    what = ", ".join(bulk) if bulk else ", ".join(sorted({type(row).__name__ for row in changed}))
    reason = f"a {'bulk ' if bulk else ''}write committed ({what})"
    try:
        return await cache_coherence(sandbox).invalidate(keys, reason=reason, everything=bool(bulk))
    except Exception:
        logger.exception("cache invalidation failed in sandbox %s", sandbox.id)
        return None


def recent_invalidations(sandbox: Sandbox) -> Sequence[CacheInvalidation]:
    """The sandbox's last invalidations, newest first."""
    return tuple(cache_coherence(sandbox).recent_invalidations)
