"""Script turns: at most a few Streamlit reruns run Python at once; the others wait their turn, in order.

Streamlit runs each browser session's rerun on its own thread, and every rerun also needs the
runtime's one event loop (every query and Redis call goes through it) and the SQLite workers.
All of them share one GIL. With dozens of reruns drawing elements at the same moment, the loop
thread waits its turn for the GIL behind each of them, several times per query, so every rerun
waits for every other: at 100 learners a click took seconds while the process used about 60% of
one core. A turn limits how many reruns run Python at once. A rerun gives its turn up while it
waits for the loop (`Runtime.run`), so a slow query or experiment never holds one.

    turns = ScriptTurns(2)
    with turns.turn():            # the rerun's whole script
        ...
        with turns.given_up():    # waiting for the loop
            future.result()
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["ScriptTurns"]


class ScriptTurns:
    """A fair (first come, first served) limit on how many threads run a script at once."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self._lock = threading.Lock()
        self._free = slots
        self._waiting: "list[threading.Lock]" = []  # in arrival order: a released turn goes to the first
        self._holding = threading.local()

    @property
    def held(self) -> bool:
        """True while the calling thread holds a turn."""
        return getattr(self._holding, "turn", False)

    @property
    def waiting(self) -> int:
        """Threads waiting for a turn now."""
        with self._lock:
            return len(self._waiting)

    def _take(self) -> None:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                self._holding.turn = True
                return
            ticket = threading.Lock()
            ticket.acquire()
            self._waiting.append(ticket)
        ticket.acquire()  # released by _give when this thread's turn comes (the turn is handed over)
        self._holding.turn = True

    def _give(self) -> None:
        self._holding.turn = False
        with self._lock:
            if self._waiting:
                self._waiting.pop(0).release()  # hand the turn straight to the longest waiter
            else:
                self._free += 1

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold a turn for the block (re-entrant: a thread already holding one just runs)."""
        if self.held:
            yield
            return
        self._take()
        try:
            yield
        finally:
            if self.held:
                self._give()

    @contextmanager
    def given_up(self) -> Iterator[None]:
        """Give the turn up for the block (a wait that needs no Python), then wait for one again."""
        if not self.held:
            yield
            return
        self._give()
        try:
            yield
        finally:
            self._take()
