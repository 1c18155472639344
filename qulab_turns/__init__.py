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

import collections
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["ScriptTurns", "RESUME_WAIT_SECONDS"]

RESUME_WAIT_SECONDS = 1.0


class ScriptTurns:
    """A limit on how many threads run a script at once: first come, first served, a run under way first."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self._lock = threading.Lock()
        self._free = slots
        # Waiting threads, in arrival order: reruns coming back from a wait go before reruns that
        # have not started, so a click already under way finishes first instead of queueing
        # again behind every newcomer at each of its queries.
        self._resuming: "collections.deque[threading.Lock]" = collections.deque()
        self._starting: "collections.deque[threading.Lock]" = collections.deque()
        self._holding = threading.local()

    @property
    def held(self) -> bool:
        """True while the calling thread holds a turn."""
        return getattr(self._holding, "turn", False)

    @property
    def waiting(self) -> int:
        """Threads waiting for a turn now."""
        with self._lock:
            return len(self._resuming) + len(self._starting)

    def _take(self, *, resuming: bool = False) -> None:
        with self._lock:
            if self._free and not (self._resuming or self._starting):
                self._free -= 1
                self._holding.turn = True
                return
            line = self._resuming if resuming else self._starting
            ticket = threading.Lock()
            ticket.acquire()
            line.append(ticket)
        # Released by _give when this thread's turn comes (the turn is handed over). A rerun coming
        # back from a wait may hold a lock the turns' holders wait for; after RESUME_WAIT_SECONDS
        # it goes on without a turn rather than wait forever (the limit bends; nothing deadlocks).
        got = ticket.acquire(timeout=RESUME_WAIT_SECONDS if resuming else -1)
        if not got:
            with self._lock:
                try:
                    line.remove(ticket)
                except ValueError:  # handed over between the timeout and now: it is ours
                    got = ticket.acquire()
        self._holding.turn = got

    def _give(self) -> None:
        self._holding.turn = False
        with self._lock:
            waiting = self._resuming or self._starting
            if waiting:
                waiting.popleft().release()  # hand the turn straight to the first in line
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
            self._take(resuming=True)
