"""The instructor's key: compared in constant time, at most five tries a minute per session,
and at most thirty a minute for the whole process (a reload starts a new session: without the
second limit, reloading would buy five more guesses each time).

The key comes from the page layer as a string (QULAB_INSTRUCTOR_KEY, else Streamlit's secrets);
a browser session's tries are a list the page keeps in its session state. A sixth try within a
minute is refused without being compared, with the seconds left to wait. A failed try is logged
(logger "qulab") without the key or what was typed.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("qulab")
TRIES_PER_MINUTE = 5
PROCESS_TRIES_PER_MINUTE = 30  # every session of the process together
WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class KeyCheck:
    """What a try gave: in, or refused with why (and how long to wait, when it was one too
    many)."""

    accepted: bool
    message: str = ""
    wait_seconds: int = 0


class ProcessTries:
    """The try times of every session of this process (pages run in several threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: list[float] = []

    def take(self, now: float) -> Optional[int]:
        """Count a try now; None if allowed, else the seconds to wait."""
        with self._lock:
            self._times[:] = [moment for moment in self._times if now - moment < WINDOW_SECONDS]
            if len(self._times) >= PROCESS_TRIES_PER_MINUTE:
                return max(1, math.ceil(WINDOW_SECONDS - (now - self._times[0])))
            self._times.append(now)
            return None

    def clear(self) -> None:
        """Forget every try (tests, between cases)."""
        with self._lock:
            self._times.clear()


EVERY_SESSION = ProcessTries()


def try_instructor_key(
    typed: str,
    *,
    configured: str,
    tries: list[float],
    now: Optional[float] = None,
    every_session: ProcessTries = EVERY_SESSION,
) -> KeyCheck:
    """Check a typed key against the configured one; `tries` (this session's try times, kept
    by the caller) and every_session (the process's) are updated."""
    now = time.monotonic() if now is None else now
    tries[:] = [moment for moment in tries if now - moment < WINDOW_SECONDS]
    if len(tries) < TRIES_PER_MINUTE and (wait := every_session.take(now)) is not None:
        logger.warning(
            "instructor key: a try refused uncompared (%d tries this minute in this process)",
            PROCESS_TRIES_PER_MINUTE,
        )
        return KeyCheck(
            False,
            f"Too many tries on this server: {PROCESS_TRIES_PER_MINUTE} in a minute. "
            f"Wait {wait} s, then try again.",
            wait,
        )
    if len(tries) >= TRIES_PER_MINUTE:
        wait = max(1, math.ceil(WINDOW_SECONDS - (now - tries[0])))
        logger.warning(
            "instructor key: a try refused uncompared (%d tries this minute)", len(tries)
        )
        return KeyCheck(
            False,
            f"Too many tries: {TRIES_PER_MINUTE} in a minute. Wait {wait} s, then try again.",
            wait,
        )
    tries.append(now)
    if configured and hmac.compare_digest(typed.encode(), configured.encode()):
        return KeyCheck(True)
    logger.warning(
        "instructor key refused (try %d of %d this minute)", len(tries), TRIES_PER_MINUTE
    )
    left = TRIES_PER_MINUTE - len(tries)
    return KeyCheck(False, f"That is not the instructor key. {left} more tries this minute.")
