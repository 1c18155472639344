"""A time limit on a server's answer that a busy event loop cannot trip by itself.

`asyncio.timeout(t)` cancels the call once t has passed on the loop's clock, whatever made it
late. In a class, one process's loop can be held for hundreds of milliseconds by other learners'
work: Redis answered in a millisecond, the answer sits read and waiting for the loop, and the
deadline fires first. Every sandbox shares one breaker, so that one false timeout sent the whole
class's reads to the database for the breaker's cooling time; the limit had to stay at a second.

`answer_within(t)` is asyncio.timeout(t) on the time the loop was listening. When the deadline
comes late (the loop was held past it), it moves on by as long as it was late, at most t: the
loop was not reading the server's answer then. And when it comes while the call's task has its
answer already (the future it awaits is done, its wake-up queued), the task runs first. Whatever
the loop does, a call is given up on after LONGEST_WAIT_FACTOR × t: on a loop that is late at
every pass, a server that hangs costs that much, not more.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Optional

LONGEST_WAIT_FACTOR = 4
LATE_SECONDS = 0.005  # a deadline run this much after its time means the loop was held


def answer_within(seconds: float) -> AnswerDeadline:
    """`async with answer_within(seconds):` raise TimeoutError if the server has not answered."""
    return AnswerDeadline(seconds)


class AnswerDeadline:
    """The context manager answer_within returns (asyncio.timeout's Timeout, loop-stall aware)."""

    __slots__ = (
        "_seconds", "_loop", "_task", "_handle", "_due", "_give_up_at", "_expired", "_cancelling"
    )  # fmt: skip

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._expired = False

    async def __aenter__(self) -> AnswerDeadline:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("answer_within must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()  # cancellations asked of it before: not ours
        self._due = self._loop.time() + self._seconds
        self._give_up_at = self._due + (LONGEST_WAIT_FACTOR - 1) * self._seconds
        self._handle: asyncio.Handle = self._loop.call_at(self._due, self._deadline)
        return self

    def _deadline(self) -> None:
        now = self._loop.time()
        if now < self._give_up_at:
            late = now - self._due
            if late > LATE_SECONDS:  # the loop was held: that time does not count
                self._due = now + min(late, self._seconds)
                self._handle = self._loop.call_at(self._due, self._deadline)
                return
            waiter: Any = getattr(self._task, "_fut_waiter", None)  # what the task awaits
            if waiter is not None and waiter.done():  # answered in time: the task runs next
                self._handle = self._loop.call_soon(self._deadline)
                return
        self._expired = True
        self._task.cancel()

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self._handle.cancel()
        if not self._expired:
            return
        remaining = self._task.uncancel()  # ours taken back, whatever the call made of it
        if remaining <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
