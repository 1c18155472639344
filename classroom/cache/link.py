"""The process's Redis and each sandbox's guarded view of it.

- RedisService: the server at REDIS_URL, or an in-process fakeredis when none is configured; one
  breaker per server, shared by every sandbox (a frozen server is frozen for all of them).
- RedisLink: one sandbox's namespace (the lesson's RedisKeys: `client`, `key()`), its health,
  and the guarded way to call Redis: a timeout per call, the breaker consulted before and told
  after. Its outage switch cuts one sandbox off for real (a client whose connections fail).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import fakeredis
import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from classroom.cache import breaker
from classroom.cache.breaker import REDIS_ERRORS, CircuitBreaker, RedisSkipped
from classroom.cache.deadline import answer_within
from classroom.config import ConfigurationError, Settings, mask_url

logger = logging.getLogger("qulab")
T = TypeVar("T")

READING_FRESH_SECONDS = 2.0  # one probe answers every page drawn within this long
# A hung Redis costs a call at most this; then the breaker opens.
REDIS_COMMAND_TIMEOUT_SECONDS = 1.0  # fakeredis's; a real server's is QULAB_REDIS_TIMEOUT
NAMESPACE_DELETE_TIMEOUT_SECONDS = 5.0  # at most this long deleting one sandbox's keys (SCAN + DEL)


@dataclass
class RedisHealth:
    """What the last Redis calls of one sandbox did: the page shows 'degraded' from this."""

    last_error: str = ""
    last_error_at: Optional[float] = None
    last_success_at: Optional[float] = None
    error_count: int = 0

    def record_success(self) -> None:
        """Note a call that worked."""
        self.last_success_at = time.time()

    def record_failure(self, error: BaseException) -> None:
        """Note a call that failed, keeping a one-line description."""
        self.error_count += 1
        self.last_error = f"{type(error).__name__}: {error}"[:300]
        self.last_error_at = time.time()

    @property
    def degraded(self) -> bool:
        """True while the most recent call failed."""
        if self.last_error_at is None:
            return False
        return self.last_success_at is None or self.last_error_at > self.last_success_at


@dataclass(frozen=True)
class RedisReading:
    """Whether Redis answers now, as one bounded probe found; pages share it for a moment."""

    answers: bool
    at: float  # time.monotonic() of the probe
    failure: str = ""  # why it does not answer


class RedisService:
    """The process's Redis: the server at REDIS_URL, or an in-process fakeredis when none is set.

    With REDIS_URL set it is that server, even when it does not answer at start-up: the breaker
    opens then (reads go to the database, events stay pending) and its probe finds the server
    when it comes up. Settling on fakeredis instead would split a class of several replicas in
    two for good: events that never reach the real stream, invalidations the others never see.
    Clients belong to the event loop that created them, so this lives in the runtime's loop.
    """

    def __init__(
        self, *, mode: str, reason: str, url: Optional[str], client: Any, fake_server: Any = None
    ) -> None:
        self.mode = mode  # "redis" or "fakeredis"
        self._where = reason
        self._startup_failure = ""  # why it did not answer at start-up, until it answers
        self.url = url
        self.client = client
        self.fake_server = fake_server
        self.command_timeout_seconds = REDIS_COMMAND_TIMEOUT_SECONDS
        # One breaker per server, shared by every sandbox: a frozen server is frozen for them all.
        self.breaker = CircuitBreaker(self.client.ping)
        self._reading: Optional[RedisReading] = None
        self._probing = asyncio.Lock()

    @property
    def reason(self) -> str:
        """Which Redis this is, for the sidebar; while it has not answered since start-up, why."""
        if self._startup_failure and not self.breaker.is_open:
            self._startup_failure = ""  # the breaker's probe found it: it answers now
        return f"{self._where}; {self._startup_failure}" if self._startup_failure else self._where

    async def reading(self) -> RedisReading:
        """Whether Redis answers now: the breaker's word when it is open, else a PING given as
        long as any command (command_timeout_seconds), shared by every page drawn within
        READING_FRESH_SECONDS (the sidebar and the cache page, drawn in one rerun, never
        disagree). A failed PING opens the breaker, so the reads that follow skip Redis at once."""
        async with self._probing:
            now = time.monotonic()
            kept = self._reading
            # Kept only while the breaker still says the same: a probe that closed it (Redis is
            # back) or a call that opened it since makes a new reading, else the page would say
            # "not answering" beside "breaker closed" (or the reverse).
            if (
                kept is not None
                and now - kept.at < READING_FRESH_SECONDS
                and kept.answers != self.breaker.is_open
            ):
                return kept
            if self.breaker.is_open:
                self._reading = RedisReading(False, now, self.breaker.last_failure)
                return self._reading
            try:
                async with answer_within(self.command_timeout_seconds):
                    await self.client.ping()
            except REDIS_ERRORS as error:
                if isinstance(error, breaker.SERVER_FAILURES):
                    self.breaker.record_failure(error)
                self._reading = RedisReading(False, now, f"{type(error).__name__}: {error}"[:200])
            else:
                self._reading = RedisReading(True, now)
            return self._reading

    @classmethod
    async def connect(cls, settings: Settings) -> RedisService:
        """The server at REDIS_URL, answering or not yet (then its breaker is open and probes
        it); fakeredis only when REDIS_URL is not set. A URL redis-py cannot read stops the app."""
        if not settings.redis_url:
            return cls._fake("REDIS_URL is not set; using fakeredis, an in-process Redis")
        where = mask_url(settings.redis_url)
        try:
            client = redis_asyncio.from_url(
                settings.redis_url,
                decode_responses=True,
                socket_connect_timeout=settings.redis_connect_timeout_seconds,
                socket_timeout=5,
                health_check_interval=30,
            )
        except ValueError as error:
            raise ConfigurationError(f"REDIS_URL ({where}) is not a Redis URL: {error}") from None
        # Where, not how it is: the breaker's state says whether it answers now.
        service = cls(
            mode="redis", reason=f"REDIS_URL {where}", url=settings.redis_url, client=client
        )
        service.command_timeout_seconds = settings.redis_command_timeout_seconds
        try:
            await asyncio.wait_for(client.ping(), settings.redis_connect_timeout_seconds + 1)
        except REDIS_ERRORS as error:
            service._startup_failure = (
                f"it did not answer at start-up ({type(error).__name__}): reads use the database "
                "and events wait, until a probe finds it"
            )
            logger.warning("REDIS_URL (%s) did not answer at start-up: %s", where, error)
            service.breaker.record_failure(error)  # skip it now; the probe closes it later
        return service

    @classmethod
    def _fake(cls, reason: str) -> RedisService:
        server = fakeredis.FakeServer()
        client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
        return cls(mode="fakeredis", reason=reason, url=None, client=client, fake_server=server)

    def unreachable_client(self) -> Any:
        """A client whose connection attempts really fail: what a broker outage looks like."""
        if self.mode == "fakeredis":
            server = fakeredis.FakeServer()
            server.connected = False
            return fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
        # A Unix socket that does not exist: every connect fails at once with a real OSError. No
        # retries: redis-py's default retry backs off for seconds on this error, a refused TCP
        # connection (a stopped server) fails in about a millisecond.
        return redis_asyncio.Redis(
            unix_socket_path="/nonexistent/qulab-redis-outage.sock",
            decode_responses=True,
            retry=RedisRetry(NoBackoff(), 0),
        )

    async def close(self) -> None:
        """Stop the breaker's probe and close the client's connections."""
        await self.breaker.close()
        await self.client.aclose()


class RedisLink:
    """One sandbox's view of Redis: key prefix, health, the server's breaker, an outage switch.

    execute() and execute_many() are the guarded way to call Redis: a timeout per call, the
    breaker consulted before and told after, health recorded. The outage switch bypasses the
    breaker (its calls fail at once by themselves), so one learner's switch never opens the
    breaker for everyone else.
    """

    def __init__(self, service: RedisService, sandbox_id: str) -> None:
        self.service = service
        self.prefix = f"qulab:{sandbox_id}:"
        self.health = RedisHealth()
        self._unreachable: Any = None

    @property
    def client(self) -> Any:
        """The client this sandbox talks to: the real one, or an unreachable one in an outage."""
        return self._unreachable if self._unreachable is not None else self.service.client

    def key(self, *parts: str) -> str:
        """A key inside this sandbox's namespace."""
        return self.prefix + ":".join(parts)

    @property
    def breaker(self) -> CircuitBreaker:
        """The server's breaker, which every sandbox on this server shares.

        `link.breaker.state` is 'closed', 'open' or 'half-open'; `link.breaker.is_open` to skip.
        """
        return self.service.breaker

    async def execute(self, *command: Any) -> Any:
        """Send one command through the breaker, with the command timeout.

        Raises one of REDIS_ERRORS.
        """
        if (
            self._unreachable is None and not self.service.breaker.is_open
        ):  # the usual case, kept lean: a hit's path
            try:
                async with answer_within(self.service.command_timeout_seconds):
                    reply = await self.service.client.execute_command(*command)
            except REDIS_ERRORS as error:
                self._failed(error, cut_off=False)
                raise
            self.health.record_success()
            return reply
        return await self._guarded(lambda client: client.execute_command(*command))

    async def execute_many(
        self, *commands: tuple[Any, ...], transaction: bool = False
    ) -> list[Any]:
        """Send several commands in one round trip, through the breaker.

        With transaction, they go inside MULTI/EXEC.
        """

        async def send(client: Any) -> list[Any]:
            pipeline = client.pipeline(transaction=transaction)
            for command in commands:
                pipeline.execute_command(*command)
            return await pipeline.execute()

        return await self._guarded(send)

    async def _guarded(
        self, call: Callable[[Any], Awaitable[T]], timeout_seconds: Optional[float] = None
    ) -> T:
        cut_off = self._unreachable is not None
        if not cut_off and self.breaker.is_open:
            error = RedisSkipped(f"skipped: the Redis breaker is {self.breaker.state}")
            self.health.record_failure(error)
            raise error
        try:
            async with answer_within(timeout_seconds or self.service.command_timeout_seconds):
                reply = await call(self.client)
        except REDIS_ERRORS as error:
            self._failed(error, cut_off=cut_off)
            raise
        self.health.record_success()
        return reply

    def _failed(self, error: BaseException, *, cut_off: bool) -> None:
        if isinstance(error, breaker.SERVER_FAILURES) and not cut_off:
            self.breaker.record_failure(error)
        self.health.record_failure(error)

    @property
    def cut_off(self) -> bool:
        """True while the outage switch is on."""
        return self._unreachable is not None

    def cut(self) -> None:
        """Start an outage for this sandbox only: its calls go to an endpoint that refuses them."""
        if self._unreachable is None:
            self._unreachable = self.service.unreachable_client()

    async def restore(self) -> None:
        """End the outage; the next call reaches the real Redis again."""
        unreachable, self._unreachable = self._unreachable, None
        if unreachable is not None:
            await unreachable.aclose()

    async def check(self, *, timeout_seconds: float = 1.0) -> bool:
        """PING Redis now (through the breaker) and record the answer in health.

        Recording it now makes the status right at once.
        """
        try:
            await self._guarded(lambda client: client.ping(), timeout_seconds)
        except REDIS_ERRORS:
            return False
        return True

    async def switch_outage(self, *, cut: bool, timeout_seconds: float = 1.0) -> bool:
        """Turn the outage switch on or off, then PING; returns whether Redis answers now."""
        if cut:
            self.cut()
        else:
            await self.restore()
        return await self.check(timeout_seconds=timeout_seconds)

    async def delete_namespace(self) -> int:
        """Delete every key of this sandbox (SCAN, never KEYS); returns how many were deleted.

        Through the breaker and within a bounded time: the registry deletes sandboxes under its
        lock, and a frozen Redis must not hold every newcomer there for seconds a sandbox.
        """

        async def scan_and_delete(client: Any) -> int:
            deleted, batch = 0, []
            async for key in client.scan_iter(match=self.prefix + "*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await client.delete(*batch)
                    batch.clear()
            return deleted + (await client.delete(*batch) if batch else 0)

        return await self._guarded(
            scan_and_delete, timeout_seconds=NAMESPACE_DELETE_TIMEOUT_SECONDS
        )
