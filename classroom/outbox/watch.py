"""One look at Redis for every idle consumer of a process, instead of one per consumer.

An idle consumer still has to notice what no in-process wake-up announces: entries another
process's relay added, messages a dead consumer left unacknowledged, a stream the broker lost in
a restart. Asking Redis itself every minute costs a round trip per sandbox (200 a minute for a
class). Here the idle consumers of one process register their stream; once per interval ONE
pipeline of XINFO GROUPS looks at every registered stream, and only the consumers whose stream has
something for their group (unread or unacknowledged entries, or no group or stream at all) are
woken. A woken consumer is forgotten; it registers again after its next empty look.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any, Optional

import redis.exceptions

logger = logging.getLogger("qulab")


def has_work_for(reply: Any, group: str) -> bool:
    """True when an XINFO GROUPS reply says the group has something to read, or cannot say.

    It cannot say when the reply is an error or has no such group.
    """
    if isinstance(reply, BaseException) or not isinstance(reply, list):
        return True  # no stream (a broker restart lost it) or an error: let the consumer find out
    for info in reply:
        if info.get("name") == group:
            lag = info.get("lag")
            # lag is nil when Redis cannot count it (entries deleted past the group's position).
            return lag is None or int(lag) > 0 or int(info.get("pending") or 0) > 0
    return True  # the group is gone: the consumer recreates it, and the audit looks for losses


class StreamWatch:
    """Watches the streams of idle consumers with one pipelined XINFO GROUPS per interval."""

    def __init__(
        self, client: Any, group: str, *, interval_seconds: float, timeout_seconds: float
    ) -> None:
        self.client = client
        self.group = group
        self.interval_seconds = interval_seconds
        self.timeout_seconds = timeout_seconds
        self.looks = 0  # pipelines sent so far
        self._watchers: dict[str, set[Callable[[], None]]] = {}
        self._task: Optional[asyncio.Task[None]] = None

    def watch(self, stream_key: str, wake: Callable[[], None]) -> None:
        """Call wake() once, at a look that finds something for the group in this stream."""
        self._watchers.setdefault(stream_key, set()).add(wake)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="outbox-stream-watch"
            )

    def unwatch(self, stream_key: str, wake: Callable[[], None]) -> None:
        """Forget this wake-up (the consumer was woken by something else, or stops)."""
        wakes = self._watchers.get(stream_key)
        if wakes is not None:
            wakes.discard(wake)
            if not wakes:
                del self._watchers[stream_key]
        if not self._watchers and self._task is not None:
            self._task.cancel()  # nobody left to look for: no timer stays behind
            self._task = None

    @property
    def watching(self) -> int:
        """How many streams are watched now."""
        return len(self._watchers)

    async def _run(self) -> None:
        while self._watchers:
            await asyncio.sleep(self.interval_seconds)
            keys = list(self._watchers)
            if not keys:
                return
            try:
                pipeline = self.client.pipeline(transaction=False)
                for key in keys:
                    pipeline.xinfo_groups(key)
                replies = await asyncio.wait_for(
                    pipeline.execute(raise_on_error=False), self.timeout_seconds
                )
            except (TimeoutError, redis.exceptions.RedisError, OSError) as error:
                # The broker is down: each relay's circuit reports it. Look again next interval.
                logger.debug("outbox stream watch could not look: %s", error)
                continue
            self.looks += 1
            # one XINFO GROUPS per key; raise_on_error=False puts errors in their place
            for key, reply in zip(keys, replies, strict=True):
                if has_work_for(reply, self.group):
                    for wake in self._watchers.pop(key, ()):
                        wake()


_by_loop: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[int, str, float], StreamWatch]
] = weakref.WeakKeyDictionary()


def stream_watch(
    client: Any, group: str, *, interval_seconds: float, timeout_seconds: float
) -> StreamWatch:
    """This loop's watch for one Redis client, group and interval (created on first use)."""
    per_loop = _by_loop.setdefault(asyncio.get_running_loop(), {})
    key = (id(client), group, interval_seconds)
    watch = per_loop.get(key)
    if watch is None or watch.client is not client:
        watch = per_loop[key] = StreamWatch(
            client, group, interval_seconds=interval_seconds, timeout_seconds=timeout_seconds
        )
    return watch
