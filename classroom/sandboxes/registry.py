"""Every sandbox of this process, and the one place a sandbox is opened, held, slept and deleted.

A sandbox is held while a browser session (or a Lab) has it open; a held sandbox is never put to
sleep or deleted. When its last holder goes it stays awake for a grace period (a reload comes
back at once), then goes dormant: engine, pool and background tasks freed, data kept. Any use
wakes it. Only after the idle limit is its data deleted (on PostgreSQL only if no replica used
the schema meanwhile). What a dead process left (schemas with expired leases, files no live
process holds) is reaped by any process after the idle limit. A sandbox another replica deleted
while it slept here is never half-used: its learner gets a new one and is told why. The registry
is a facade over Admission (capacity), Holds, Dormancy and Deletion; it owns the lock that keeps
their decisions consistent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Optional

import source
from classroom.budget import ConnectionBudget
from classroom.cache.coherence import SETTLE_REASON, CacheCoherence
from classroom.cache.coherent import cache_coherence, invalidate_cached_changes
from classroom.cache.link import RedisLink, RedisService
from classroom.config import Settings, resolve_database_target
from classroom.sandboxes.admission import Admission, SandboxCapacity
from classroom.sandboxes.lifecycle import Deletion, Dormancy, Holds, still_going_dormant
from classroom.sandboxes.sandbox import (
    SANDBOX_ACTIVE,
    SANDBOX_DORMANT,
    SANDBOX_ID_PATTERN,
    SANDBOX_IDLE,
    Sandbox,
)
from classroom.sandboxes.stores import (
    PostgresSandboxStore,
    SQLiteSandboxStore,
    abandoned_after_seconds,
    create_schema,
    idle_reason,
    lease_renewal_seconds,
    note_journal_writes,
)

logger = logging.getLogger("qulab")


class SandboxRegistry:
    """Every sandbox of this process and its lifecycle: active, idle, dormant, deleted."""

    def __init__(self, settings: Settings, redis_service: RedisService) -> None:
        self.settings = settings
        self.redis_service = redis_service
        self.target = resolve_database_target(settings.database_url)
        self.store: SQLiteSandboxStore | PostgresSandboxStore = (
            PostgresSandboxStore(settings, self.target, redis_service)
            if self.target.kind == "postgresql"
            else SQLiteSandboxStore(settings, self.target, redis_service)
        )
        self.budget = ConnectionBudget(settings.connection_budget)
        self._sandboxes: dict[str, Sandbox] = {}
        self.admission = Admission(
            settings, self.budget, self.store.backend, self.store.connections_per_sandbox
        )
        self.holds = Holds(self._sandboxes)
        self.dormancy = Dormancy(self.store, self.budget)
        self.deletion = Deletion(self.store)
        self._lock = asyncio.Lock()
        self._started = False
        # Told of each sandbox this process makes (to attach per-sandbox listeners), and of the
        # ids of sandboxes reaped after their process died (no listener of theirs runs here).
        self.created_listeners: list[Callable[[Sandbox], None]] = []
        self.reaped_listeners: list[Callable[[list[str]], Awaitable[None]]] = []
        # Renew often enough that a lease (PostgreSQL's row, a SQLite file's lock file) never
        # looks expired while its sandbox is in use.
        self.lease_renewal_seconds = lease_renewal_seconds(settings)

    @property
    def backend(self) -> str:
        """'postgresql' or 'sqlite'."""
        return self.store.backend

    def describe_database(self) -> str:
        """A one-line, password-free description of where sandboxes live."""
        return self.store.describe()

    def __len__(self) -> int:
        return sum(1 for sandbox in self._sandboxes.values() if sandbox.awake)

    def counts(self) -> dict[str, int]:
        """How many sandboxes are in each state."""
        counted = {SANDBOX_ACTIVE: 0, SANDBOX_IDLE: 0, SANDBOX_DORMANT: 0}
        for sandbox in self._sandboxes.values():
            counted[sandbox.state] += 1
        return counted

    def capacity(self) -> SandboxCapacity:
        """Awake sandboxes this process can afford, and which budget sets it."""
        return self.admission.capacity()

    def get_existing(self, sandbox_id: str) -> Optional[Sandbox]:
        """The sandbox with this id if this process knows it (awake or dormant), or None."""
        return self._sandboxes.get(sandbox_id)

    def all(self) -> list[Sandbox]:
        """Every sandbox this process knows (awake or dormant)."""
        return list(self._sandboxes.values())

    async def start(self) -> None:
        """Connect the store now (it also connects on first use)."""
        async with self._lock:
            await self._start()

    async def _start(self) -> None:
        if not self._started:
            await self.store.start(self.budget)
            self._started = True

    async def acquire(self, sandbox_id: str, *, holder: Optional[str] = None) -> Sandbox:
        """The sandbox with this id, awake: created on first use, woken if dormant.

        `holder` takes a hold on it. Raises ClassFullError when it would have to wake and
        every awake sandbox is held.
        """
        if not isinstance(sandbox_id, str) or not SANDBOX_ID_PATTERN.fullmatch(sandbox_id):
            raise source.ValidationError("Malformed sandbox id.", field="sandbox_id")
        while True:
            sandbox = self._sandboxes.get(sandbox_id)
            if sandbox is not None and still_going_dormant(sandbox):
                # Its flush runs outside the lock: wait for it (never holding the lock), then
                # wake the sandbox the usual way.
                await asyncio.shield(sandbox.going_dormant)  # type: ignore[arg-type]
                continue
            if sandbox is None or not sandbox.awake:
                async with self._lock:
                    await self._start()
                    sandbox = self._sandboxes.get(sandbox_id)
                    if sandbox is not None and still_going_dormant(sandbox):
                        continue  # it began to sleep after the check above
                    if sandbox is None or not sandbox.awake:
                        for sleeper in self.admission.make_room(self._sandboxes.values()):
                            self.dormancy.begin_sleep(sleeper)  # its flush goes on meanwhile
                    # A wake renews the lease first; it fails when another replica deleted the
                    # sandbox after the idle limit while it slept here.
                    if sandbox is not None and not sandbox.awake:
                        if await self.dormancy.wake(sandbox):
                            await self._settle_if_missed(sandbox)
                        else:
                            await self._forget(sandbox)
                            sandbox = None
                    if sandbox is None:
                        sandbox = await self._create(sandbox_id)
            break
        if holder is not None:
            self.holds.hold(sandbox, holder)
        sandbox.touch()
        if time.monotonic() - sandbox.lease_renewed_at >= self.lease_renewal_seconds:
            sandbox.lease_renewed_at = time.monotonic()
            if not await self.store.renew_lease(sandbox):
                # Another replica found the lease expired and deleted the sandbox: a new one,
                # and the learner is told (its storage is not ours to touch any more).
                await self._forget_awake(sandbox)
                return await self.acquire(sandbox_id, holder=holder)
        return sandbox

    @asynccontextmanager
    async def using(
        self, sandbox_id: str, *, holder: Optional[str] = None
    ) -> AsyncIterator[Sandbox]:
        """The awake sandbox for the length of one operation: it cannot go dormant meanwhile."""
        sandbox = await self.acquire(sandbox_id, holder=holder)
        sandbox.operations_in_flight += 1
        try:
            yield sandbox
        finally:
            sandbox.operations_in_flight -= 1
            sandbox.touch()

    def release_holder(self, holder: str) -> None:
        """A browser session ended or a Lab closed: its hold goes (call on the runtime's loop)."""
        self.holds.drop(holder)

    async def _create(self, sandbox_id: str) -> Sandbox:
        """A new Sandbox for this id (its storage opened, or created), registered here.

        Its notice says why the sandbox this id had before was deleted, if it was.
        """
        location, open_engine, deleted_because = await self.store.open(sandbox_id)
        sandbox = Sandbox(
            id=sandbox_id,
            backend=self.backend,
            redis=RedisLink(self.redis_service, sandbox_id),
            settings=self.settings,
            location=location,
            open_engine=open_engine,
            owns_engine=self.backend == "sqlite",
            connection_budget=self.budget,
        )
        # First of all commit listeners: a commit drops what it made stale before anyone hears.
        sandbox.commit_listeners.append(lambda changes: invalidate_cached_changes(sandbox, changes))
        sandbox.commit_listeners.append(note_journal_writes(sandbox))
        self.budget.take(self.store.connections_per_sandbox)
        try:
            await create_schema(sandbox)
        except BaseException:
            await sandbox.close_engine()
            await self.budget.give_back(self.store.connections_per_sandbox)
            await self.store.delete(sandbox, only_if_expired=False)
            raise
        sandbox.notice = self.deletion.notice_for(sandbox_id, deleted_because)
        await self._watch_missed_invalidations(sandbox)
        self._sandboxes[sandbox_id] = sandbox
        for listener in self.created_listeners:
            listener(sandbox)
        return sandbox

    async def _watch_missed_invalidations(self, sandbox: Sandbox) -> None:
        """Its writes that miss Redis are noted in the database; writes that missed it before
        (another replica's, a dead process's) are settled before its first cached read."""
        coherence = cache_coherence(sandbox)
        coherence.on_missed = lambda: self.store.note_cache_missed(sandbox)
        await self._settle_if_missed(sandbox)

    async def _settle_if_missed(self, sandbox: Sandbox) -> None:
        if await self.store.cache_missed(sandbox):
            cache_coherence(sandbox).note_missed()

    async def settle_missed_invalidations(self) -> list[str]:
        """For every sandbox whose writes missed Redis on any replica (or in a process that
        died), set a new cache epoch if Redis answers this replica, and clear the note: no
        replica serves a value from before those writes after this. Returns the ids settled.
        Run every few seconds (Runtime), only while a sandbox is awake here; on SQLite only
        adopted files are ever noted."""
        settled: list[str] = []
        if not any(sandbox.awake for sandbox in self._sandboxes.values()):
            return settled  # nothing is read here: a wake settles first (idle costs nothing)
        for sandbox_id, noted_at in await self.store.cache_missed():
            sandbox = self._sandboxes.get(sandbox_id)
            if sandbox is not None and sandbox.awake:
                coherence = cache_coherence(sandbox)
                coherence.note_missed()
                done = await coherence.settle_pending()
            else:  # not awake here: its keys are set through a link of its own
                link = RedisLink(self.redis_service, sandbox_id)
                invalidation = await CacheCoherence(link).invalidate(
                    [], reason=SETTLE_REASON, everything=True, remember=False, settling=True
                )
                done = invalidation.applied
            if done:
                await self.store.clear_cache_missed(sandbox_id, noted_at)
                settled.append(sandbox_id)
        return settled

    async def _forget(self, sandbox: Sandbox) -> None:
        """Forget a dormant sandbox whose storage another replica deleted (under the lock).

        Its storage and keys are left alone: the id may be a new sandbox's already.
        """
        self._sandboxes.pop(sandbox.id, None)
        self.holds.forget(sandbox)
        await sandbox.notify(sandbox.release_listeners, "release")

    async def _forget_awake(self, sandbox: Sandbox) -> None:
        """As _forget, for an awake sandbox: it goes to sleep first (outside the lock)."""
        async with self._lock:
            if self._sandboxes.get(sandbox.id) is not sandbox:
                return  # forgotten (or deleted) meanwhile
            self._sandboxes.pop(sandbox.id)
            self.holds.forget(sandbox)
            going = self.dormancy.begin_sleep(sandbox)
        if going is not None:
            await asyncio.shield(going)
        await sandbox.notify(sandbox.release_listeners, "release")

    async def sweep(self) -> dict[str, list[str]]:
        """One pass: idle past the grace period -> dormant; unused past idle limit -> deleted."""
        now = time.monotonic()
        slept, deleted, kept_for_another_replica = [], [], []
        going_dormant: list[Optional[asyncio.Task[None]]] = []
        resting: list[Sandbox] = []  # awake, nothing running: their WAL may be trimmed
        async with self._lock:
            for sandbox in list(self._sandboxes.values()):
                if sandbox.holders or sandbox.operations_in_flight:
                    if now - sandbox.lease_renewed_at >= self.lease_renewal_seconds:
                        sandbox.lease_renewed_at = now  # a connected learner keeps the lease
                        await self.store.renew_lease(sandbox)
                    if sandbox.awake and not sandbox.operations_in_flight:
                        resting.append(sandbox)
                    continue
                if now - sandbox.last_used > self.settings.sandbox_idle_seconds:
                    reason = idle_reason(self.settings)
                    if await self._delete(sandbox, reason, only_if_expired=True):
                        deleted.append(sandbox.id)
                    else:
                        kept_for_another_replica.append(sandbox.id)
                elif (
                    sandbox.awake
                    and now - sandbox.unheld_since >= self.settings.sandbox_grace_seconds
                ):
                    going_dormant.append(self.dormancy.begin_sleep(sandbox))
                    slept.append(sandbox.id)
        # Their flushes (up to seconds each with a slow broker) run after the lock is released.
        await asyncio.gather(*(asyncio.shield(task) for task in going_dormant if task is not None))
        for sandbox in resting:
            if sandbox.awake and not sandbox.operations_in_flight:
                try:
                    await self.store.trim_wal(sandbox)
                except Exception:  # it stays as it is until the next pass or its sleep
                    logger.warning(
                        "could not trim the WAL of sandbox %s", sandbox.id, exc_info=True
                    )
        return {"dormant": slept, "deleted": deleted, "kept": kept_for_another_replica}

    async def release(self, sandbox_id: str, reason: str = "released") -> bool:
        """Delete a sandbox now, whoever holds it.

        Its workers are stopped, its engine freed, its data and keys deleted. Its flush and engine
        close run outside the lock, as a sleep's do.
        """
        while True:
            async with self._lock:
                sandbox = self._sandboxes.get(sandbox_id)
                if sandbox is None:
                    return False  # never here, or released by someone else meanwhile
                going = self.dormancy.begin_sleep(sandbox)
                if going is None:  # dormant, its flush done: deleting it takes no wait
                    return await self._delete(sandbox, reason, only_if_expired=False)
            # A learner returning meanwhile may wake it again: then it goes back to sleep, here.
            await asyncio.shield(going)

    async def _delete(self, sandbox: Sandbox, reason: str, *, only_if_expired: bool) -> bool:
        await self.dormancy.sleep(sandbox)
        self._sandboxes.pop(sandbox.id, None)
        self.holds.forget(sandbox)
        return await self.deletion.delete(sandbox, reason, only_if_expired=only_if_expired)

    async def release_idle(self, *, idle_seconds: Optional[float] = None) -> list[str]:
        """Delete every unheld sandbox unused for longer than the idle limit; returns their ids."""
        limit = self.settings.sandbox_idle_seconds if idle_seconds is None else idle_seconds
        now = time.monotonic()
        released = []
        async with self._lock:
            for sandbox in list(self._sandboxes.values()):
                unused = now - sandbox.last_used > limit
                if not sandbox.holders and not sandbox.operations_in_flight and unused:
                    reason = f"it was idle for more than {limit / 60:g} minutes"
                    if await self._delete(sandbox, reason, only_if_expired=idle_seconds is None):
                        released.append(sandbox.id)
        return released

    async def reap_abandoned(
        self, *, expired_after_seconds: Optional[float] = None
    ) -> list[tuple[str, str]]:
        """Delete what nobody holds and nobody used for longer than the idle limit.

        On PostgreSQL, schemas whose lease expired (a dead process's, on this replica or any
        other; replicas reaping at once share the work with FOR UPDATE SKIP LOCKED); on SQLite,
        sandbox files no live process holds (their lock died with their process). Their Redis
        keys go too. Returns (sandbox id, schema or file) of each. Then the connection budget
        follows what PostgreSQL says about the replicas.
        """
        if expired_after_seconds is None:
            expired_after_seconds = abandoned_after_seconds(self.settings)
        async with self._lock:
            await self._start()
            reaped = await self.store.reap_abandoned(
                unused_for_seconds=expired_after_seconds,
                live=set(self._sandboxes),
                reason=idle_reason(self.settings),
            )
        await self.budget.refresh()
        if reaped:
            where = ", ".join(location for _, location in reaped)
            logger.info("deleted %d abandoned sandboxes: %s", len(reaped), where)
            for sandbox_id, _ in reaped:
                self.deletion.remember(sandbox_id, idle_reason(self.settings))
            for told in self.reaped_listeners:
                try:
                    await told([sandbox_id for sandbox_id, _ in reaped])
                except Exception:
                    logger.exception("a listener of reaped sandboxes failed")
        return reaped

    async def reap_abandoned_schemas(
        self, *, expired_after_seconds: Optional[float] = None
    ) -> list[str]:
        """reap_abandoned on PostgreSQL, returning the schemas dropped; [] on SQLite."""
        if self.backend != "postgresql":
            return []
        reaped = await self.reap_abandoned(expired_after_seconds=expired_after_seconds)
        return [schema for _, schema in reaped]

    async def close(self, *, delete_data: bool = True) -> None:
        """Stop every sandbox; delete their data too unless told to keep it."""
        async with self._lock:
            for sandbox in list(self._sandboxes.values()):
                if delete_data:
                    await self._delete(sandbox, "the server shut down", only_if_expired=False)
                else:
                    await self.dormancy.sleep(sandbox)
            self._sandboxes.clear()
            self.holds.clear()
            await self.store.close()
            self._started = False
