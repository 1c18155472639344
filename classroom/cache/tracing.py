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

    async def execute_many(
        self, *commands: tuple[Any, ...], transaction: bool = False
    ) -> list[Any]: ...


class RedisCommand:
    """One command the cache sent to Redis, with its reply and round-trip time; rendered when shown.

    A hit makes one of these, so it keeps the raw parts and reply and writes them out only when
    read (`command`, `reply`): rendering on every read cost more than the hit's own bookkeeping.
    """

    __slots__ = ("parts", "raw_reply", "duration_ms", "failure")

    def __init__(
        self, parts: tuple[Any, ...], raw_reply: Any, duration_ms: float, failure: str = ""
    ) -> None:
        self.parts, self.raw_reply, self.duration_ms, self.failure = (
            parts,
            raw_reply,
            duration_ms,
            failure,
        )

    @property
    def command(self) -> str:
        """The command as sent (long values shortened)."""
        return " ".join(_render_part(part) for part in self.parts)

    @property
    def reply(self) -> str:
        """What Redis answered, or 'failed: <error>'."""
        return f"failed: {self.failure}" if self.failure else _render_reply(self.raw_reply)

    def __repr__(self) -> str:
        return f"RedisCommand({self.command!r} -> {self.reply!r}, {self.duration_ms:.3f} ms)"


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
        started = time.perf_counter()
        try:
            reply = await self.link.execute(*command)
        except Exception as error:
            self.commands.append(RedisCommand(command, None, _since(started), type(error).__name__))
            raise
        self.commands.append(RedisCommand(command, reply, _since(started)))
        return reply

    async def send_together(
        self, *commands: tuple[Any, ...], transaction: bool = False
    ) -> list[Any]:
        """Send several commands in one round trip; each shows the shared time.

        With transaction, they go inside MULTI/EXEC.
        """
        started = time.perf_counter()
        try:
            replies = await self.link.execute_many(*commands, transaction=transaction)
        except Exception as error:
            sent = [("MULTI",), *commands, ("EXEC",)] if transaction else commands
            self.commands.extend(
                RedisCommand(command, None, _since(started), type(error).__name__)
                for command in sent
            )
            raise
        elapsed = _since(started)
        if transaction:
            self.commands.append(RedisCommand(("MULTI",), True, elapsed))
        self.commands.extend(
            # a pipeline answers each command it was sent with one reply, in order
            RedisCommand(command, reply, elapsed)
            for command, reply in zip(commands, replies, strict=True)
        )
        if transaction:
            self.commands.append(RedisCommand(("EXEC",), f"{len(replies)} replies", elapsed))
        return replies


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
