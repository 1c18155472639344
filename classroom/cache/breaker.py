"""A circuit breaker for a Redis server that hangs.

A frozen server (SIGSTOP, a stuck disk, a full network buffer) accepts the connection and never
answers: every call waits its whole timeout (about 1,000 ms). A stopped one refuses, but the
client retries each call (about 18 ms here). After one such failure the breaker opens: callers
skip Redis at once (reads go to the database, invalidations are remembered) while one
background probe PINGs the server after a cooling period. The first probe that answers
closes the breaker; one that fails opens it again with a longer cooling period (doubled,
capped). Nobody has to restart anything, and a healthy Redis costs the breaker one attribute
read per call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Optional

import redis.exceptions

import source

logger = logging.getLogger("qulab")


class RedisSkipped(redis.exceptions.ConnectionError):
    """Raised instead of calling Redis while the breaker is open.

    It is a ConnectionError, so callers fall back.
    """


# Every way a Redis call can fail; callers fall back to the database on any of them.
REDIS_ERRORS = source.REDIS_ERRORS
# The failures that say the server is unreachable (open the breaker); a wrong command or a bad
# reply (ResponseError, DataError) says nothing about the server's health.
SERVER_FAILURES: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ConnectionError,
    OSError,
)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """The breaker of one Redis server: closed, open or half-open.

    closed: calls go to Redis. open: calls are skipped while it cools. half-open: a probe is on
    its way.
    """

    def __init__(
        self,
        probe: Callable[[], Awaitable[object]],
        *,
        cooling_seconds: float = 5.0,
        max_cooling_seconds: float = 10.0,
        probe_timeout_seconds: float = 1.0,
    ) -> None:
        self._probe = probe
        self.cooling_seconds = cooling_seconds
        self.max_cooling_seconds = max_cooling_seconds
        self.probe_timeout_seconds = probe_timeout_seconds
        self.state = CLOSED
        self.trips = 0  # how many times it opened since start-up
        self.last_failure = ""
        self._cooling = cooling_seconds
        self._probe_at: Optional[float] = None
        self._prober: Optional[asyncio.Task[None]] = None

    @property
    def is_open(self) -> bool:
        """True while calls must skip Redis (open or half-open)."""
        return self.state != CLOSED

    def seconds_until_probe(self) -> Optional[float]:
        """How long until the next probe, while open; None otherwise."""
        if self.state != OPEN or self._probe_at is None:
            return None
        return max(0.0, self._probe_at - time.monotonic())

    def describe(self) -> str:
        """One line for the sidebar and the cache page."""
        if self.state == CLOSED:
            return "closed: calls go to Redis"
        if self.state == HALF_OPEN:
            return "half-open: probing Redis; calls still skip it"
        wait = self.seconds_until_probe()
        when = f"next probe in {wait:.0f} s" if wait is not None else "probing soon"
        return f"open: Redis failed ({self.last_failure.split(':')[0]}), calls skip it ({when})"

    def record_failure(self, error: BaseException) -> None:
        """A call timed out or could not connect: open, and start the background probe (once)."""
        self.last_failure = f"{type(error).__name__}: {error}"[:200] or type(error).__name__
        if self.state != CLOSED:
            return
        self.trips += 1
        self._cooling = self.cooling_seconds
        self._open()
        logger.warning(
            "Redis failed (%s); breaker open for %.1f s", self.last_failure, self._cooling
        )
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(
                self._probe_until_closed(), name="redis-breaker-probe"
            )

    def _open(self) -> None:
        self.state = OPEN
        self._probe_at = time.monotonic() + self._cooling

    async def _probe_until_closed(self) -> None:
        while self.state != CLOSED:
            await asyncio.sleep(self.seconds_until_probe() or 0.0)
            self.state = HALF_OPEN
            try:
                await asyncio.wait_for(self._probe(), self.probe_timeout_seconds)
            except REDIS_ERRORS as error:
                self.last_failure = f"probe: {type(error).__name__}"
                self._cooling = min(self._cooling * 2, self.max_cooling_seconds)
                self._open()
            except Exception:  # never let the prober die with the breaker open
                logger.exception("Redis breaker probe failed unexpectedly")
                self._open()
            else:
                self.state, self._probe_at = CLOSED, None
                logger.info("Redis answers again; breaker closed")

    async def close(self) -> None:
        """Stop probing (at shutdown)."""
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
