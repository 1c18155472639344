"""The statement log: every SQL statement a task runs, with its parameters and time.

Section 3 counts and shows the statements each loading path sends; the page's numbers come from
here. SQLAlchemy's cursor events record each statement (as its performance FAQ does), and a
context variable scopes a log to the task that opened it, so statements of other sessions, the
background publisher or other learners never leak into it.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine


@dataclass(frozen=True)
class ExecutedStatement:
    """One SQL statement as the driver received it, and how long it took."""

    sql: str
    parameters: Any
    duration_ms: float
    executemany: bool = False


@dataclass
class StatementLog:
    """The statements executed inside one capture_statements() block, in order."""

    statements: list[ExecutedStatement] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many statements ran."""
        return len(self.statements)

    @property
    def total_ms(self) -> float:
        """Time spent in the database driver, summed over statements."""
        return sum(statement.duration_ms for statement in self.statements)

    def sql(self) -> list[str]:
        """The SQL text of each statement."""
        return [statement.sql for statement in self.statements]


_active_statement_logs: contextvars.ContextVar[tuple[StatementLog, ...]] = contextvars.ContextVar(
    "qulab_active_statement_logs", default=()
)


@contextmanager
def capture_statements() -> Iterator[StatementLog]:
    """Record every statement this task runs (on any engine) until the block ends.

    A context variable scopes the log to the current asyncio task, so statements of other
    sessions, the background publisher or other learners never leak into it.
    """
    log = StatementLog()
    token = _active_statement_logs.set((*_active_statement_logs.get(), log))
    try:
        yield log
    finally:
        _active_statement_logs.reset(token)


_STARTED_AT_KEY = "qulab_statement_started_at"


def _before_cursor_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> None:
    conn.info.setdefault(_STARTED_AT_KEY, []).append(time.perf_counter())


def _after_cursor_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> None:
    started = conn.info[_STARTED_AT_KEY].pop()
    logs = _active_statement_logs.get()
    if logs:
        executed = ExecutedStatement(
            statement, parameters, (time.perf_counter() - started) * 1000, many
        )
        for log in logs:
            log.statements.append(executed)


def _forget_failed_statement(context: Any) -> None:
    started = (
        context.connection.info.get(_STARTED_AT_KEY) if context.connection is not None else None
    )
    if started:
        started.pop()


def install_statement_log(engine: AsyncEngine) -> None:
    """Attach the statement listeners to an engine (listeners live on the sync engine)."""
    sync_engine = engine.sync_engine
    if not event.contains(sync_engine, "before_cursor_execute", _before_cursor_execute):
        event.listen(sync_engine, "before_cursor_execute", _before_cursor_execute)
        event.listen(sync_engine, "after_cursor_execute", _after_cursor_execute)
    # handle_error is a dialect event, and every SQLite engine shares one dialect
    # (classroom.sqlite.compilation): listened to per engine, one error ran it once per sandbox.
    dialect = sync_engine.dialect
    if not event.contains(dialect, "handle_error", _forget_failed_statement):
        event.listen(dialect, "handle_error", _forget_failed_statement)


@contextmanager
def statements_hidden() -> Iterator[None]:
    """Record nothing in this block (the journal's own writes, outside what a demo measures)."""
    token = _active_statement_logs.set(())
    try:
        yield
    finally:
        _active_statement_logs.reset(token)


@dataclass
class Measurement:
    """The statements one block ran and the wall-clock time it took."""

    statements: StatementLog
    elapsed_ms: float = 0.0


@contextmanager
def measure() -> Iterator[Measurement]:
    """Record every statement the block runs (this task only) and time the whole block."""
    with capture_statements() as log:
        measurement = Measurement(log)
        started = time.perf_counter()
        try:
            yield measurement
        finally:
            measurement.elapsed_ms = (time.perf_counter() - started) * 1000
