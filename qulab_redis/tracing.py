"""The commands a cache read or write really sent, as sent, with their replies and round-trip times.

The cache page prints them under each read, so a learner sees GET, SET … EX and DEL happen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class RedisExecutor(Protocol):
    """What tracing needs from a Redis link: send one command, or several in one round trip."""

    async def execute(self, *command: Any) -> Any: ...

    async def execute_many(self, *commands: tuple[Any, ...], transaction: bool = False) -> list[Any]: ...


@dataclass(slots=True)  # made on every read: slots, not frozen, keeps that cheap (frozen costs 4x)
class RedisCommand:
    """One command the cache sent to Redis, written as sent, with its reply and round-trip time."""

    command: str
    reply: str
    duration_ms: float


def _render_part(part: Any) -> str:
    text_part = str(part)
    if len(text_part) <= 120:
        return text_part
    return f"'{text_part[:40]}…' ({len(text_part.encode())} bytes)"


def _render_reply(reply: Any) -> str:
    if reply is None:
        return "(nil)"
    if reply is True:
        return "OK"
    if isinstance(reply, list):
        return "[" + ", ".join(_render_reply(item) for item in reply) + "]"
    if isinstance(reply, str) and reply.startswith("{"):
        return f"{len(reply.encode())} bytes of JSON"
    return str(reply)


@dataclass(slots=True)
class CommandTrace:
    """Sends commands through a link and keeps a RedisCommand for each (failed ones too)."""

    link: RedisExecutor
    commands: list[RedisCommand] = field(default_factory=list)

    async def send(self, *command: Any) -> Any:
        """Send one command; note it with its reply and time; return the reply."""
        shown = " ".join(_render_part(part) for part in command)
        started = time.perf_counter()
        try:
            reply = await self.link.execute(*command)
        except Exception as error:
            self.commands.append(RedisCommand(shown, f"failed: {type(error).__name__}", _since(started)))
            raise
        self.commands.append(RedisCommand(shown, _render_reply(reply), _since(started)))
        return reply

    async def send_together(self, *commands: tuple[Any, ...], transaction: bool = False) -> list[Any]:
        """Send several commands in one round trip (MULTI/EXEC when transaction); each shows the shared time."""
        shown = [" ".join(_render_part(part) for part in command) for command in commands]
        if transaction:
            shown = ["MULTI", *shown, "EXEC"]
        started = time.perf_counter()
        try:
            replies = await self.link.execute_many(*commands, transaction=transaction)
        except Exception as error:
            self.commands.extend(RedisCommand(line, f"failed: {type(error).__name__}", _since(started)) for line in shown)
            raise
        elapsed = _since(started)
        rendered = [_render_reply(reply) for reply in replies]
        if transaction:
            rendered = ["OK", *rendered, f"{len(replies)} replies"]
        self.commands.extend(RedisCommand(line, reply, elapsed) for line, reply in zip(shown, rendered))
        return replies


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
