"""The connections a process may hold at once, shared by every engine it builds.

On PostgreSQL it is this replica's share of max_connections among the replicas the server shows
(classroom.sandboxes.replicas), and each reservation is also granted by the server's own count;
on SQLite, where each connection is a driver thread, a thread budget. Sandbox pools take their
share when they wake (admission admits them); experiments reserve theirs and wait while the class
is busy, instead of meeting "sorry, too many clients already".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Optional, Protocol

from classroom.errors import BackendUnavailableError

# While the server refuses a reservation (other replicas hold the connections), ask again this
# often: nothing in this process announces that another replica let go.
SERVER_RECHECK_SECONDS = 0.5


class ServerConnections(Protocol):
    """What the database server says about the connections every replica of the class holds."""

    async def recount(self, budget: ConnectionBudget) -> None:
        """Set budget.total to this replica's share among the replicas the server shows."""

    async def claim(self, budget: ConnectionBudget) -> bool:
        """True, and recorded, when budget.in_use more connections fit beside everyone else's."""

    async def settle(self, budget: ConnectionBudget) -> None:
        """Record budget.in_use (connections were given back)."""


class ConnectionBudget:
    """The connections this process may hold open at once, shared by every engine it builds.

    On PostgreSQL it is this replica's share of max_connections; on SQLite, where each
    connection is a driver thread, a thread budget. Sandbox pools take their share when they
    wake (capacity admits them); experiments reserve theirs and wait while the class is busy.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_use = 0
        self.taken = 0  # of in_use: held without waiting (pools), as opposed to reservations
        self.waiting = 0
        self.waited_in_total = 0.0  # seconds reservations spent waiting, summed
        self.reservations_that_waited = 0
        self.peak_in_use = 0
        # PostgreSQL: the server's word on every replica's connections; None: this process alone
        self.server: Optional[ServerConnections] = None
        self._changed: Optional[asyncio.Condition] = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    @property
    def available(self) -> int:
        """Connections nobody holds right now."""
        return max(0, self.total - self.in_use)

    def take(self, count: int) -> None:
        """Hold connections without waiting (a sandbox pool the capacity check admitted)."""
        self.in_use += count
        self.taken += count
        self.peak_in_use = max(self.peak_in_use, self.in_use)

    @property
    def most_one_reservation_gets(self) -> int:
        """The largest reservation that can ever be granted: what the pools leave."""
        return max(1, self.total - self.taken)

    async def give_back(self, count: int, *, taken: bool = True) -> None:
        """Return connections and wake whoever waits for them."""
        self.in_use = max(0, self.in_use - count)
        if taken:
            self.taken = max(0, self.taken - count)
        condition = self._condition()
        async with condition:
            condition.notify_all()

    async def refresh(self) -> None:
        """Follow the server: this replica's share among the replicas it shows now."""
        if self.server is not None:
            await self.server.recount(self)

    @asynccontextmanager
    async def reserve(self, count: int, *, timeout_seconds: float) -> AsyncIterator[float]:
        """Hold `count` connections for a block, waiting while the budget is spent.

        With a server, the reservation is also granted by it (every replica's connections must
        fit in max_connections); while it refuses, the reservation waits and asks again. Yields
        the seconds it waited.
        """
        started = time.monotonic()
        deadline = started + timeout_seconds
        condition = self._condition()
        self.waiting += 1
        waited = False
        try:
            while True:
                async with condition:
                    if self.in_use + count > self.total and not waited:
                        waited = True
                        self.reservations_that_waited += 1
                    await asyncio.wait_for(
                        condition.wait_for(lambda: self.in_use + count <= self.total),
                        max(0.0, deadline - time.monotonic()),
                    )
                    self.in_use += count  # still under the lock: nobody else counts these as free
                if await self._granted_by_server(count):
                    break
                await self.give_back(count, taken=False)  # another replica holds them: wait
                if not waited:
                    waited = True
                    self.reservations_that_waited += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.sleep(min(SERVER_RECHECK_SECONDS, remaining))
        except TimeoutError:
            raise BackendUnavailableError(
                f"The class's connection budget stayed busy for {timeout_seconds:g} s; "
                "try again in a moment."
            ) from None
        finally:
            self.waiting -= 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        self.waited_in_total += time.monotonic() - started
        try:
            yield time.monotonic() - started
        finally:
            await self.give_back(count, taken=False)
            if self.server is not None:
                await self.server.settle(self)

    async def _granted_by_server(self, count: int) -> bool:
        """True without a server; else its answer (a failure gives the connections back)."""
        if self.server is None:
            return True
        try:
            return await self.server.claim(self)
        except BaseException:
            await self.give_back(count, taken=False)
            raise
