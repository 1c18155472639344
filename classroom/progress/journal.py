"""The learning journal: what each demo measured, kept in the sandbox's own database.

"N+1 fetch: 5 statements for N = 3" is written once the operation has returned (Lab.run records
it, outside every statement log and every timed block), so the counts and times a page shows
are what they would be without it. The progress checks read it back: a step is done when the
journal shows it happened, never because a button was clicked. It lives in its own table, on a
declarative base of its own: the lesson's models and its initialize never touch it.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import JSON, String, insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import source
from classroom.statements import statements_hidden

if TYPE_CHECKING:
    from classroom.sandboxes.sandbox import Sandbox

logger = logging.getLogger("qulab")
JOURNAL_TABLE = "lab_journal"
MAX_LINES_KEPT = 500  # written lines kept for the next progress reading (SQLite)


class JournalBase(DeclarativeBase):
    """The platform's own tables in a sandbox: not the lesson's, never emptied by its initialize."""

    type_annotation_map = {datetime: source.UTCDateTime()}


class JournalEntry(JournalBase):
    """What a demo measured in this sandbox, for the progress checks."""

    __tablename__ = JOURNAL_TABLE
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    recorded_at: Mapped[datetime] = mapped_column(source.UTCDateTime(), default=source.utc_now)
    kind: Mapped[str] = mapped_column(String(40))
    detail: Mapped[str] = mapped_column(String(300))
    facts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


@dataclass(frozen=True)
class JournalLine:
    """One journal entry as the progress checks read it."""

    id: int
    recorded_at: datetime
    kind: str
    detail: str
    facts: dict[str, Any]


@dataclass(frozen=True)
class Evidence:
    """What one operation measured: a kind the checks look for, a sentence, and the numbers."""

    kind: str
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)


_journal_muted: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "qulab_journal_muted", default=False
)


@contextmanager
def journal_muted() -> Iterator[None]:
    """Write no journal entries in this block (benchmarks time the operations bare)."""
    token = _journal_muted.set(True)
    try:
        yield
    finally:
        _journal_muted.reset(token)


async def record_evidence(sandbox: Sandbox, evidence: Optional[Evidence]) -> None:
    """Append one entry to the sandbox's journal; never counted by a statement log, never raises."""
    if evidence is None or _journal_muted.get():
        return
    row = {
        "recorded_at": source.utc_now(),
        "kind": evidence.kind,
        "detail": evidence.detail[:300],
        "facts": evidence.facts,
    }
    line: Optional[JournalLine] = None
    try:
        with statements_hidden():
            async with sandbox.engine.begin() as connection:
                written = await connection.execute(insert(JournalEntry.__table__), row)
        facts = json.loads(json.dumps(row["facts"]))  # as the JSON column reads it back
        line = JournalLine(
            written.inserted_primary_key[0], row["recorded_at"], row["kind"], row["detail"], facts
        )
    except Exception:  # the demo already succeeded: a lost journal line must not undo it
        logger.warning(
            "could not journal %s in sandbox %s", evidence.kind, sandbox.id, exc_info=True
        )
    finally:
        sandbox.journal_generation += 1
        if (
            line is not None
            and sandbox.backend == "sqlite"
            and len(sandbox.journal_written) < MAX_LINES_KEPT
        ):
            sandbox.journal_written.append(line)  # the next progress reading need not read it
