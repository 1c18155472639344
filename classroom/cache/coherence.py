"""No stale read after any write, in any process: two small tokens per sandbox, kept in Redis.

Every process serving a sandbox (replicas behind a load balancer, a restarted server) shares
its Redis keys, so what keeps the cache right must live in Redis too, not in one process:

- the **epoch** (`…:cache:epoch`): every cached value is stored with the epoch it was read
  under, and counts as a hit only while that epoch is current. A write whose rows are unknown
  (a bulk `delete(User)`, `update(...)` over many rows, a reset, or writes Redis missed during an
  outage) sets a new epoch: one command drops every value of the sandbox at once, atomically,
  for every process. No epoch in Redis (never set, expired, evicted) means nothing is a hit.
- the **fence** (`…:cache:fence`): every invalidation sets a new fence in the same MULTI as
  its DELs. A miss remembers the fence it saw with its GET, and after its SET reads the fence
  again (same round trip): if it moved, a write landed while the miss was at the database, and
  the miss deletes what it just stored. Either the write's DEL came after the SET (and removed
  it) or the fence moved before it: an old value never stays, whichever process wrote.
- in this process, a generation counter moves synchronously with each invalidation, so a miss
  that started before it does not even send its SET.

Both tokens are random (a token that expires never comes back), and both expire (one hour), as
do the values (TTL with jitter): every key of a sandbox has bounded retention. One read is one
round trip (MGET of epoch and value); a miss adds one (GET fence) before it reads the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Optional

import source
from classroom.cache.breaker import REDIS_ERRORS
from classroom.cache.tracing import CommandTrace, RedisCommand

logger = logging.getLogger("qulab")

TOKEN_TTL_SECONDS = (
    3600  # longer than any value's TTL, so a value never outlives the epoch it was read under
)
SETTLE_REASON = "writes Redis missed, settled once it answered again"
SETTLE_FIRST_DELAY_SECONDS, SETTLE_MAX_DELAY_SECONDS = 0.5, 10.0  # retrying what Redis missed
_ABSENT = object()


@dataclass(frozen=True)
class CacheInvalidation:
    """Keys deleted after a write (or on request), the commands sent, whether Redis took them."""

    reason: str
    keys: tuple[str, ...]
    redis_commands: tuple[RedisCommand, ...]
    # False: Redis failed or was skipped; a new epoch is set before the cache is read again
    applied: bool
    everything: bool = False  # a new epoch: every value of the sandbox was dropped

    @property
    def deleted(self) -> Optional[int]:
        """How many keys Redis said its DEL removed (None when no DEL was answered)."""
        for command in self.redis_commands:
            if command.command.startswith("DEL ") and command.reply.isdigit():
                return int(command.reply)
        return None


@dataclass(slots=True)
class CachedEntry(source.Cached):
    """What one GET found (the lesson's Cached), and the tokens a later SET is checked against."""

    epoch: Optional[str] = None
    fence: Optional[str] = None
    generation: int = 0  # this process's invalidation count when the GET went out
    ticket: int = 0  # the read's place in line for single flight (SingleFlight.ticket)
    failed: bool = False  # Redis failed or was skipped: the database answers, nothing is stored


def _new_token() -> str:
    return secrets.token_hex(6)


class CacheCoherence:
    """Epoch- and fence-checked GET and SET for one sandbox's cache keys, and their invalidation."""

    def __init__(self, link: Any, *, recent: int = 10) -> None:
        self.link = link
        self.epoch_key = link.key("cache", "epoch")
        self.fence_key = link.key("cache", "fence")
        self.generation = 0
        self.pending_writes = 0  # invalidations Redis did not take; a new epoch settles them all
        self.recent_invalidations: deque[CacheInvalidation] = deque(maxlen=recent)
        self._settler: Optional[asyncio.Task[None]] = None
        # Told when a write's invalidation missed Redis (the sandbox's store keeps a note of it
        # in the database, so that another replica, or this sandbox's next wake anywhere, sets a
        # new epoch even if this process dies before Redis answers it again).
        self.on_missed: Optional[Callable[[], Awaitable[None]]] = None

    async def get(self, key: str, trace: CommandTrace) -> CachedEntry:
        """MGET epoch and value; on a miss, GET the fence too.

        The value counts only under the current epoch. The fence is read before the miss goes to
        the database: a write that commits after that moves the fence, and set() will see it. A
        hit never needs it, so it costs no key.
        """
        if self.pending_writes:
            await self.invalidate([], reason=SETTLE_REASON, trace=trace, settling=True)
        generation = self.generation
        epoch, raw = await trace.send("MGET", self.epoch_key, key)
        value = _decode(raw, epoch)
        if value is not _ABSENT:
            return CachedEntry(True, value, epoch=epoch, generation=generation)
        fence = await trace.send("GET", self.fence_key)
        return CachedEntry(False, None, epoch=epoch, fence=fence, generation=generation)

    async def set(
        self, key: str, value: Any, *, ttl: int, since: CachedEntry, trace: CommandTrace
    ) -> str:
        """SET the value with its epoch, unless a write landed since the GET; say what happened."""
        if self.generation != since.generation:
            return (
                "Not stored: a write committed while the database was read, "
                "so this value may be old."
            )
        try:
            epoch = since.epoch
            if (
                epoch is None
            ):  # the first value of an epoch starts it (NX: another process may be first)
                _, epoch = await trace.send_together(
                    ("SET", self.epoch_key, _new_token(), "NX", "EX", TOKEN_TTL_SECONDS),
                    ("GET", self.epoch_key),
                )
            stored = json.dumps({"epoch": epoch, "value": value}, separators=(",", ":"))
            _, fence = await trace.send_together(
                ("SET", key, stored, "EX", ttl), ("GET", self.fence_key)
            )
            if fence != since.fence or self.generation != since.generation:
                await trace.send("DEL", key)
                return "Stored, then deleted again: a write committed while the SET was on its way."
        except REDIS_ERRORS as error:
            self.pending_writes += (
                1  # the SET may have landed next to a write: settle with a new epoch
            )
            self._settle_in_background()
            return f"Not stored: Redis failed ({type(error).__name__})."
        return f"Stored for {ttl} s."

    async def invalidate(
        self,
        keys: list[str],
        *,
        reason: str,
        everything: bool = False,
        remember: bool = True,
        trace: Optional[CommandTrace] = None,
        settling: bool = False,
    ) -> CacheInvalidation:
        """Delete these keys and move the fence, in one MULTI.

        With everything, start a new epoch too. If Redis fails or is skipped, the write is
        remembered: before the cache is read again a new epoch is set, which drops these keys and
        any other value a missed write made stale.
        """
        self.generation += 1  # before any await: a miss in flight here must see it
        pending = self.pending_writes
        everything = everything or pending > 0
        commands: list[tuple[Any, ...]] = [
            ("SET", self.fence_key, _new_token(), "EX", TOKEN_TTL_SECONDS)
        ]
        if everything:
            commands.append(("SET", self.epoch_key, _new_token(), "EX", TOKEN_TTL_SECONDS))
        if keys:
            commands.append(("DEL", *keys))
        trace = trace or CommandTrace(self.link)
        already = len(trace.commands)
        try:
            await trace.send_together(*commands, transaction=True)
        except REDIS_ERRORS:
            if not settling:  # a failed settle leaves the same writes pending, no new ones
                self.pending_writes += 1
                self._settle_in_background()
                await self._tell_missed()
            applied = False
        else:
            self.pending_writes -= pending
            applied = True
        invalidation = CacheInvalidation(
            reason, tuple(keys), tuple(trace.commands[already:]), applied, everything
        )
        if remember:
            self.recent_invalidations.appendleft(invalidation)
        return invalidation

    async def _tell_missed(self) -> None:
        if self.on_missed is None:
            return
        try:
            await self.on_missed()
        except Exception:  # the database too: this process's own settling still runs
            logger.warning("could not note a missed cache invalidation", exc_info=True)

    def note_missed(self) -> None:
        """Writes Redis missed elsewhere (another replica, a process that died): set a new
        epoch before the next read, and in the background from now on."""
        self.pending_writes += 1
        self._settle_in_background()

    def _settle_in_background(self) -> None:
        # Another replica may read this sandbox's keys: it cannot wait for this process's next
        # read to settle what Redis missed. Retry until Redis takes it (cheap while the breaker
        # is open: the call is skipped), for as long as a stale value could still be alive.
        if self._settler is None or self._settler.done():
            self._settler = asyncio.get_running_loop().create_task(
                self._settle_until_done(), name="cache-settle"
            )

    async def _settle_until_done(self) -> None:
        delay, deadline = SETTLE_FIRST_DELAY_SECONDS, time.monotonic() + TOKEN_TTL_SECONDS
        while self.pending_writes and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            await self.settle_pending()
            delay = min(delay * 2, SETTLE_MAX_DELAY_SECONDS)

    async def close(self) -> None:
        """Stop settling in the background (the sandbox was released)."""
        if self._settler is not None:
            self._settler.cancel()
            await asyncio.gather(self._settler, return_exceptions=True)

    async def settle_once_and_stop(self) -> None:
        """The sandbox goes dormant: try what Redis missed once more, then stop the background task.

        What is still pending stays counted: waking the sandbox resumes settling, and its next
        read or write sends a new epoch first.
        """
        await self.close()
        try:
            await self.settle_pending()
        except Exception:  # the breaker or a timeout: it stays pending for the wake
            logger.warning(
                "cache invalidation still pending as the sandbox goes dormant", exc_info=True
            )

    async def resume_settling(self) -> None:
        """Sandbox woke: settle in the background again if Redis missed writes before it slept."""
        if self.pending_writes:
            self._settle_in_background()

    async def settle_pending(self) -> bool:
        """Send what Redis missed (a new epoch) now; True when nothing is left pending."""
        if self.pending_writes:
            await self.invalidate([], reason=SETTLE_REASON, settling=True)
        return self.pending_writes == 0

    def forget_history(self) -> None:
        """Clear the list of recent invalidations (the sandbox was reset)."""
        self.recent_invalidations.clear()


def _decode(raw: Optional[str], epoch: Optional[str]) -> Any:
    """The cached value if raw is ours and of the current epoch, else _ABSENT.

    A value that is not ours is never unpickled, never trusted.
    """
    if raw is None or epoch is None:
        return _ABSENT
    try:
        stored = json.loads(raw)
    except ValueError:
        return _ABSENT
    if not isinstance(stored, dict) or stored.get("epoch") != epoch:
        return _ABSENT
    value = stored.get("value", _ABSENT)
    return value if value is None or isinstance(value, dict) else _ABSENT
