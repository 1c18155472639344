"""A sandbox's life after it is made: who holds it, when it sleeps and wakes, when it is deleted.

- Holds: which browser sessions and Labs hold which sandbox. A held sandbox is active; when its
  last holder goes it is idle, and its grace period starts.
- Dormancy: a sleep in two parts: dormant at once (under the registry's lock), then its flush and
  close as a task (outside the lock: a slow broker never holds up another learner's open).
  A wake renews the sandbox's lease first (another replica may have deleted it meanwhile), then
  takes its connections from the budget again and tells its wake listeners.
- Deletion: a sandbox's data, storage and Redis keys deleted (after the idle limit, or on
  request), and why it was deleted remembered, for the notice its learner sees on return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Optional

from classroom.budget import ConnectionBudget
from classroom.cache.breaker import REDIS_ERRORS
from classroom.sandboxes.sandbox import SANDBOX_ACTIVE, SANDBOX_DORMANT, SANDBOX_IDLE, Sandbox
from classroom.sandboxes.stores import PostgresSandboxStore, SQLiteSandboxStore

logger = logging.getLogger("qulab")
MAX_REMEMBERED_DELETIONS = 10_000
# Sleeps whose storage work (checkpoint, closing connections) runs at once. A class leaving
# together sends dozens to sleep in one sweep: all at once, each operation finding every
# shared SQLite worker busy started another (31 threads for 50 sandboxes, idle 30 s after).
SLEEPS_CLOSING_AT_ONCE = 2


def still_going_dormant(sandbox: Sandbox) -> bool:
    """True while the flush and close of the sandbox's sleep are still running."""
    return sandbox.going_dormant is not None and not sandbox.going_dormant.done()


class Holds:
    """Which holder (a browser session, a Lab) holds which sandbox."""

    def __init__(self, sandboxes: dict[str, Sandbox]) -> None:
        self._sandboxes = sandboxes
        self._holder_sandbox: dict[str, str] = {}  # holder -> the sandbox id it holds

    def hold(self, sandbox: Sandbox, holder: str) -> None:
        """The holder holds this sandbox now (and no longer the one it held before)."""
        previous = self._holder_sandbox.get(holder)
        if previous != sandbox.id:
            if previous is not None:
                self.drop(holder)
            self._holder_sandbox[holder] = sandbox.id
        sandbox.holders.add(holder)
        sandbox.change_state(SANDBOX_ACTIVE)

    def drop(self, holder: str) -> None:
        """A holder let go (a browser session ended, a Lab closed): idle if nobody else holds it."""
        sandbox = self._sandboxes.get(self._holder_sandbox.pop(holder, ""))
        if sandbox is not None and holder in sandbox.holders:
            sandbox.holders.discard(holder)
            if not sandbox.holders:
                sandbox.change_state(SANDBOX_IDLE)
                sandbox.unheld_since = time.monotonic()
                sandbox.touch()  # idle time counts from the moment the last holder left

    def forget(self, sandbox: Sandbox) -> None:
        """The sandbox is gone: its holders hold nothing."""
        for holder in list(sandbox.holders):
            self._holder_sandbox.pop(holder, None)

    def clear(self) -> None:
        """Forget every hold (the registry closed)."""
        self._holder_sandbox.clear()


class Dormancy:
    """Sleep and wake: engines, connections and background work freed and taken again."""

    def __init__(
        self, store: SQLiteSandboxStore | PostgresSandboxStore, budget: ConnectionBudget
    ) -> None:
        self.store = store
        self.budget = budget
        self._closing = asyncio.Semaphore(SLEEPS_CLOSING_AT_ONCE)

    def begin_sleep(self, sandbox: Sandbox) -> Optional[asyncio.Task[None]]:
        """Mark the sandbox dormant now (under the lock) and run its flush and close as a task.

        A learner arriving meanwhile finds it going dormant, waits for the task (outside the
        lock), then wakes it properly. Returns the task, or None when it was already asleep.
        """
        if not sandbox.awake:
            return sandbox.going_dormant if still_going_dormant(sandbox) else None
        sandbox.change_state(SANDBOX_DORMANT)
        sandbox.going_dormant = asyncio.get_running_loop().create_task(
            self._finish_sleep(sandbox), name=f"sandbox-dormant-{sandbox.id}"
        )
        return sandbox.going_dormant

    async def sleep(self, sandbox: Sandbox) -> None:
        """Awake -> dormant, and wait until it is."""
        going = self.begin_sleep(sandbox)
        if going is not None:
            await asyncio.shield(going)

    async def _finish_sleep(self, sandbox: Sandbox) -> None:
        """The slow part of a sleep (listeners flush, then the engine goes); never raises."""
        try:
            await sandbox.notify(sandbox.dormant_listeners, "dormant")  # flushes: all at once
            # SQLite: its own file and engine, a checkpoint and closes that take turns.
            async with self._closing if sandbox.backend == "sqlite" else contextlib.nullcontext():
                try:
                    await self.store.before_sleep(sandbox)
                except Exception:
                    logger.warning("could not checkpoint sandbox %s", sandbox.id, exc_info=True)
                await sandbox.close_engine()
        except Exception:
            logger.exception("sandbox %s did not close cleanly on going dormant", sandbox.id)
        finally:
            await self.budget.give_back(self.store.connections_per_sandbox)

    async def wake(self, sandbox: Sandbox) -> bool:
        """Dormant -> idle; the caller's hold makes it active.

        The lease is renewed first, before anything touches the sandbox's storage: False (and
        nothing woken) when another replica deleted the sandbox after the idle limit.
        """
        if not await self.store.renew_lease(sandbox):
            return False
        sandbox.lease_renewed_at = time.monotonic()
        self.budget.take(self.store.connections_per_sandbox)
        sandbox.change_state(SANDBOX_IDLE)
        sandbox.unheld_since = time.monotonic()
        await sandbox.notify(sandbox.wake_listeners, "wake")
        return True


class Deletion:
    """Deletes a sandbox's storage and Redis keys, and remembers why, for its learner's return."""

    def __init__(self, store: SQLiteSandboxStore | PostgresSandboxStore) -> None:
        self.store = store
        self.reasons: dict[str, str] = {}  # sandbox id -> why it was deleted (bounded)

    async def delete(self, sandbox: Sandbox, reason: str, *, only_if_expired: bool) -> bool:
        """Delete the (dormant) sandbox's data and keys; False when another replica (or, on
        sqlite:///path, another process) used it lately."""

        async def forget_keys() -> None:  # the store calls it while it holds the sandbox's lease
            try:
                await sandbox.redis.restore()
                await sandbox.redis.delete_namespace()
            except REDIS_ERRORS:
                logger.warning("could not delete Redis keys of released sandbox %s", sandbox.id)

        deleted = await self.store.delete(
            sandbox, only_if_expired=only_if_expired, reason=reason, forget_keys=forget_keys
        )
        if not deleted:
            return False  # its data stays for the replica that used it
        await sandbox.notify(sandbox.release_listeners, "release")
        self.remember(sandbox.id, reason)
        return True

    def remember(self, sandbox_id: str, reason: str) -> None:
        """Keep why a sandbox was deleted, for its learner's return to this process (bounded)."""
        self.reasons[sandbox_id] = reason
        while len(self.reasons) > MAX_REMEMBERED_DELETIONS:
            self.reasons.pop(next(iter(self.reasons)))

    def notice_for(self, sandbox_id: str, stored_reason: Optional[str] = None) -> Optional[str]:
        """What to tell a learner whose sandbox was deleted, once; None if it never was.

        stored_reason is the one the database kept (PostgreSQL: any replica may have deleted it).
        """
        reason = self.reasons.pop(sandbox_id, None) or stored_reason
        if reason is None:
            return None
        return f"Your previous sandbox was deleted because {reason}; this one starts empty."
