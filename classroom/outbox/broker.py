"""What the relay needs to know about its broker: which refusals are outages, what retention may
trim, and whether a restart of the broker could lose events."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import redis.exceptions

T = TypeVar("T")
# Outbox calls to the broker at once, per process: redis-py's pool refuses a connection beyond its
# 100th, and 200 idle consumers looking at once would take that for an outage.
OUTBOX_BROKER_CALLS_AT_ONCE = 32
_broker_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


async def outbox_broker_call(call: Awaitable[T], timeout_seconds: float) -> T:
    """One outbox call to the broker, within its timeout, once a slot is free (not timed)."""
    loop = asyncio.get_running_loop()
    slots = _broker_slots.get(loop)
    if slots is None:
        slots = _broker_slots[loop] = asyncio.Semaphore(OUTBOX_BROKER_CALLS_AT_ONCE)
    async with slots:
        return await asyncio.wait_for(call, timeout_seconds)


# Error replies that describe the broker, not the message: out of memory, loading, a read-only
# replica, a failed snapshot, a key of the wrong type... Every event would get the same answer,
# so they pause the relay like an outage instead of failing the event.
BROKER_WIDE_REPLY_PREFIXES = (
    "OOM",
    "LOADING",
    "READONLY",
    "MISCONF",
    "NOAUTH",
    "NOPERM",
    "WRONGPASS",
    "BUSY",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "NOREPLICAS",
    "WRONGTYPE",
)


# redis-py turns some of these codes into classes of its own and strips the code from the
# message ("OOM command not allowed…" arrives as OutOfMemoryError("command not allowed…")), so
# a refusal is known by its class, its status_code, or (for the others) its first word.
BROKER_WIDE_ERROR_CLASSES: tuple[type[Exception], ...] = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.AuthenticationError,
    redis.exceptions.NoPermissionError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
    redis.exceptions.MaxClientsReachedError,
)


def is_broker_wide_refusal(reply: BaseException) -> bool:
    """True when an error reply to one XADD would be the same for every event (an outage)."""
    if not isinstance(reply, redis.exceptions.ResponseError):
        return True  # a connection or timeout error inside a pipeline reply
    if isinstance(reply, BROKER_WIDE_ERROR_CLASSES):
        return True
    code = str(getattr(reply, "status_code", "") or "").upper()
    return code.startswith(BROKER_WIDE_REPLY_PREFIXES) or str(reply).lstrip().upper().startswith(
        BROKER_WIDE_REPLY_PREFIXES
    )


def _stream_id(value: str) -> tuple[int, int]:
    milliseconds, _, sequence = value.partition("-")
    return int(milliseconds), int(sequence or 0)


def _next_stream_id(value: str) -> str:
    milliseconds, sequence = _stream_id(value)
    return f"{milliseconds}-{sequence + 1}"


@dataclass(frozen=True)
class StreamBacklog:
    """A stream's length and what its consumer group has not handled yet."""

    length: int
    lag: Optional[int]  # entries the group has not read yet (None: no group, or unknown)
    pending: int  # entries read but not acknowledged


async def read_stream_backlog(client: Any, stream_key: str, group: str) -> StreamBacklog:
    """XLEN and XINFO GROUPS in one round trip."""
    pipeline = client.pipeline(transaction=False)
    pipeline.xlen(stream_key)
    pipeline.xinfo_groups(stream_key)
    length, groups = await pipeline.execute(raise_on_error=False)
    if isinstance(length, Exception):
        raise length
    for info in groups if isinstance(groups, list) else []:
        if info.get("name") == group:
            lag = info.get("lag")
            return StreamBacklog(
                int(length), None if lag is None else int(lag), int(info.get("pending") or 0)
            )
    return StreamBacklog(int(length), None, 0)


async def trim_acknowledged_entries(client: Any, stream_key: str, *, keep_at_least: int) -> int:
    """Trim entries every consumer group has acknowledged, once the stream exceeds keep_at_least.

    XADD MAXLEN would cut by length, read or not: a consumer that falls behind loses events. Here
    the floor is, over every group, the older of its oldest unacknowledged entry and the first
    entry after what it has read (XTRIM MINID keeps everything from the floor on). A stream
    without a group is never trimmed: nobody has read anything yet.
    """
    pipeline = client.pipeline(transaction=False)
    pipeline.xlen(stream_key)
    pipeline.xinfo_groups(stream_key)
    length, groups = await pipeline.execute(raise_on_error=False)
    if (
        isinstance(length, Exception)
        or int(length) <= keep_at_least
        or not isinstance(groups, list)
        or not groups
    ):
        return 0
    floor: Optional[str] = None
    for info in groups:
        needed = _next_stream_id(info["last-delivered-id"])
        if int(info.get("pending") or 0):
            oldest_unacknowledged = (await client.xpending(stream_key, info["name"]))["min"]
            if oldest_unacknowledged and _stream_id(oldest_unacknowledged) < _stream_id(needed):
                needed = oldest_unacknowledged
        if floor is None or _stream_id(needed) < _stream_id(floor):
            floor = needed
    return int(await client.xtrim(stream_key, minid=floor, approximate=False))


@dataclass(frozen=True)
class BrokerDurability:
    """Whether a restart of the broker keeps the stream, as the broker itself reports it."""

    kind: str  # "aof" | "snapshots" | "none" | "in-process" | "unknown"
    description: str

    @property
    def restart_can_lose_events(self) -> bool:
        """True unless the broker writes every entry to its append-only file."""
        return self.kind != "aof"


async def read_broker_durability(client: Any, *, in_process: bool) -> BrokerDurability:
    """Ask the broker how it persists: CONFIG GET, else INFO persistence, else unknown."""
    if in_process:
        return BrokerDurability(
            "in-process",
            "fakeredis runs inside this server process: "
            "the stream lives and dies with the process.",
        )
    settings: dict[str, str] = {}
    try:
        for name in ("appendonly", "appendfsync", "save"):
            settings.update(await client.config_get(name))
    except redis.exceptions.RedisError:
        try:  # CONFIG is often disabled on managed servers; INFO usually is not
            info = await client.info("persistence")
            settings["appendonly"] = "yes" if int(info.get("aof_enabled", 0)) else "no"
            settings["save"] = (
                "?" if int(info.get("rdb_saves", 0) or info.get("rdb_last_save_time", 0)) else ""
            )
        except redis.exceptions.RedisError:
            return BrokerDurability(
                "unknown", "the broker did not say how it persists (CONFIG and INFO refused)."
            )
    if settings.get("appendonly") == "yes":
        fsync = settings.get("appendfsync", "everysec")
        note = (
            "a crash of the machine can lose the last second"
            if fsync == "everysec"
            else f"appendfsync {fsync}"
        )
        return BrokerDurability("aof", f"Redis keeps an append-only file (appendonly yes; {note}).")
    if settings.get("save"):
        return BrokerDurability(
            "snapshots",
            "Redis only takes snapshots (no append-only file): "
            "a restart loses events added since the last one.",
        )
    return BrokerDurability(
        "none",
        "Redis persists nothing (no snapshots, no append-only file): a restart loses the stream.",
    )
