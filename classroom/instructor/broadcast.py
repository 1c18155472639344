"""The instructor's word to the class: one short plain-text message at a time.

Posting replaces the message (a new id, so a learner who dismissed the old one sees the new);
clearing posts an empty one. It is kept with the roster, so every replica sees it. Learners'
pages read it through this process's copy, refreshed from the store at most every
REFRESH_SECONDS however many learners ask (one query per 2 s per process), and never when no
page asks. A page may read the copy from its own thread without a hop to the runtime's loop
while it is fresh.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from sqlalchemy import select

import source
from classroom.instructor.roster import utc_now
from classroom.instructor.store import ClassStore
from classroom.statements import statements_hidden

MESSAGE_MAX = 280
REFRESH_SECONDS = 2.0
_BOARD = "class"


@dataclass(frozen=True)
class ClassMessage:
    """The message the class sees: its id (new for each post), text and when it was posted."""

    id: str
    text: str
    posted_at: datetime


def checked_message(typed: object) -> str:
    """The message stripped; refused (ValidationError) when empty or over 280 characters."""
    text = typed.strip() if isinstance(typed, str) else ""
    if not text:
        raise source.ValidationError(
            'Type a message first (to take the message down, use "Clear the message").',
            field="message",
        )
    if len(text) > MESSAGE_MAX:
        raise source.ValidationError(
            f"A message to the class has at most {MESSAGE_MAX} characters; this one has "
            f"{len(text)}. Nothing was posted.",
            field="message",
        )
    return text


class ClassBoard:
    """The class's message, posted by the instructor, read through a per-process copy."""

    def __init__(self, store: ClassStore, *, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._copy: Optional[ClassMessage] = None
        self._read_at = float("-inf")  # time.monotonic() of the last read of the store
        self._reading: Optional[asyncio.Future[Optional[ClassMessage]]] = None
        self.reads = 0  # reads of the store so far (the benchmark and the tests count them)

    def fresh_copy(self) -> tuple[bool, Optional[ClassMessage]]:
        """(True, the message) when this process's copy is fresh; (False, None) when it is due
        a read. Safe from any thread."""
        with self._lock:
            if time.monotonic() - self._read_at < self.refresh_seconds:
                return True, self._current(self._copy)
        return False, None

    async def current(self) -> Optional[ClassMessage]:
        """The message shown now (None when there is none): the copy, read again when stale.
        Learners asking at once share one read."""
        fresh, message = self.fresh_copy()
        if fresh:
            return message
        if self._reading is None or self._reading.done():
            self._reading = asyncio.get_running_loop().create_task(
                self._read(), context=contextvars.Context()
            )
        return self._current(await asyncio.shield(self._reading))

    async def _read(self) -> Optional[ClassMessage]:
        table = self.store.tables.message
        engine = await self.store.ready()
        with statements_hidden():
            async with engine.connect() as connection:
                row = (await connection.execute(select(table))).one_or_none()
        self.reads += 1
        message = ClassMessage(row.message_id, row.body, row.posted_at) if row else None
        self._keep(message)
        return message

    async def post(self, text: str) -> ClassMessage:
        """Replace the message with this one (checked first: nothing is written if refused)."""
        return await self._write(checked_message(text))

    async def clear(self) -> None:
        """Take the message down (an empty one replaces it)."""
        await self._write("")

    async def _write(self, text: str) -> ClassMessage:
        message = ClassMessage(uuid.uuid4().hex, text, utc_now())
        values = {
            "board": _BOARD,
            "message_id": message.id,
            "body": message.text,
            "posted_at": message.posted_at,
        }
        engine = await self.store.ready()
        with statements_hidden():
            async with engine.begin() as connection:
                await connection.execute(
                    self.store.upsert(
                        self.store.tables.message,
                        values,
                        update=("message_id", "body", "posted_at"),
                    )
                )
        self._keep(message)  # this process shows it at once; other replicas within 2 s
        return message

    def _keep(self, message: Optional[ClassMessage]) -> None:
        with self._lock:
            self._copy, self._read_at = message, time.monotonic()

    @staticmethod
    def _current(message: Optional[ClassMessage]) -> Optional[ClassMessage]:
        return message if message is not None and message.text else None
