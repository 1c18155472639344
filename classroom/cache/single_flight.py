"""Single flight: concurrent misses on one key share one database read.

Without it, a popular key that expires sends every reader to the database at once (a cache
stampede). A miss joins the key's flight while it runs, and also after it ended if this miss
asked Redis before the flight's SET had landed (its GET could not have seen the value). A write
in between changes the generation, and a miss never joins a flight of an older generation: it
would get data the write has replaced.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Flight:
    generation: int
    answer: asyncio.Future[Any]
    finished_after: float = math.inf  # tickets up to this one may still join; inf while running


class SingleFlight:
    """One database read per key at a time.

    Readers are numbered (tickets) in the order they asked Redis.
    """

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}  # the latest read of each key
        self._tickets = 0

    def ticket(self) -> int:
        """A number for a read about to ask Redis (call it just before the GET)."""
        self._tickets += 1
        return self._tickets

    async def load(
        self, key: str, *, generation: int, ticket: int, load: Callable[[], Awaitable[T]]
    ) -> tuple[T, bool]:
        """(value, shared): run load(), or share the answer of the key's read already in flight."""
        flight = self._flights.get(key)
        if (
            flight is not None
            and flight.generation == generation
            and ticket <= flight.finished_after
        ):
            try:
                return await asyncio.shield(flight.answer), True
            except asyncio.CancelledError:
                if not flight.answer.cancelled():
                    raise  # this read itself was cancelled
        flight = _Flight(generation, asyncio.get_running_loop().create_future())
        self._flights[key] = flight
        try:
            value = await load()
        except Exception as error:  # e.g. a user not found: concurrent misses share it too
            flight.answer.set_exception(error)
            flight.answer.exception()  # retrieved, so asyncio does not warn when no one else waited
            flight.finished_after = self._tickets
            raise
        except BaseException:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.answer.cancel()
            raise
        flight.answer.set_result(value)
        return value, False

    def landed(self, key: str) -> None:
        """The key's value is in Redis now (or will not be).

        Later GETs see it, so later misses start afresh.
        """
        flight = self._flights.get(key)
        if flight is not None and flight.answer.done():
            flight.finished_after = self._tickets
            if len(self._flights) > 10_000:  # finished flights are only hints: keep the map bounded
                self._flights = {k: f for k, f in self._flights.items() if not f.answer.done()}

    def clear(self) -> None:
        """Forget every flight (the sandbox was reset)."""
        self._flights.clear()
