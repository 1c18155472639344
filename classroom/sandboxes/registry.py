"""Every sandbox of this process, and the one place a sandbox is opened, held, slept and deleted.

A sandbox is held while a browser session (or a Lab) has it open; a held sandbox is never put to
sleep or deleted. When its last holder goes it stays awake for a grace period (a reload comes
back at once), then goes dormant: engine, pool and background tasks freed, data kept. Any use
wakes it. Only after the idle limit is its data deleted (on PostgreSQL only if no replica used
the schema meanwhile). The registry is a facade over Admission (capacity), Holds, Dormancy and
Deletion; it owns the lock that keeps their decisions consistent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Optional

import source
from classroom.budget import ConnectionBudget
from classroom.cache.coherent import invalidate_cached_changes
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
    create_schema,
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
            else SQLiteSandboxStore(settings, self.target)
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
        # Renew often enough that a lease never looks expired while its sandbox is in use.
        self.lease_renewal_seconds = min(60.0, settings.sandbox_idle_seconds / 4)

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
                    if sandbox is None:
                        sandbox = await self._create(sandbox_id)
                        sandbox.notice = self.deletion.notice_for(sandbox_id)
                        self._sandboxes[sandbox_id] = sandbox
                    elif not sandbox.awake:
                        await self.dormancy.wake(sandbox)
            break
        if holder is not None:
            self.holds.hold(sandbox, holder)
        sandbox.touch()
        if (
            sandbox.backend == "postgresql"
            and time.monotonic() - sandbox.lease_renewed_at >= self.lease_renewal_seconds
        ):
            sandbox.lease_renewed_at = time.monotonic()
            if not await self.store.renew_lease(sandbox):
                # Another replica found the lease expired and dropped the schema: start afresh.
                await self.release(sandbox_id, "its storage was reclaimed after it sat idle")
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
        location, open_engine = await self.store.open(sandbox_id)
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
        return sandbox

    async def sweep(self) -> dict[str, list[str]]:
        """One pass: idle past the grace period -> dormant; unused past idle limit -> deleted."""
        now = time.monotonic()
        slept, deleted, kept_for_another_replica = [], [], []
        going_dormant: list[Optional[asyncio.Task[None]]] = []
        async with self._lock:
            for sandbox in list(self._sandboxes.values()):
                if sandbox.holders or sandbox.operations_in_flight:
                    if (
                        sandbox.backend == "postgresql"
                        and now - sandbox.lease_renewed_at >= self.lease_renewal_seconds
                    ):
                        sandbox.lease_renewed_at = now  # a connected learner keeps the lease
                        await self.store.renew_lease(sandbox)
                    continue
                if now - sandbox.last_used > self.settings.sandbox_idle_seconds:
                    minutes = self.settings.sandbox_idle_seconds / 60
                    reason = f"it was idle for more than {minutes:g} minutes"
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

    async def reap_abandoned_schemas(
        self, *, expired_after_seconds: Optional[float] = None
    ) -> list[str]:
        """Drop sandbox schemas nobody used for longer than the idle limit (PostgreSQL).

        Covers schemas left by a process that died, on this replica or any other; replicas
        reaping at once share the work (FOR UPDATE SKIP LOCKED). Their Redis keys go too.
        """
        if self.backend != "postgresql":
            return []
        if expired_after_seconds is None:
            expired_after_seconds = self.settings.sandbox_idle_seconds + self.lease_renewal_seconds
        async with self._lock:
            await self._start()
            live = [sandbox.location for sandbox in self._sandboxes.values()]
            reaped = await self.store.reap_abandoned_schemas(
                expired_after_seconds=expired_after_seconds, live=live
            )
        if reaped:
            logger.info("dropped %d abandoned sandbox schemas: %s", len(reaped), ", ".join(reaped))
        return reaped

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
