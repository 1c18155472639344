"""Engines and sessions, built by the platform around the lesson's create_engine and get_session.

- open_engine: the lesson's engine with the pool sizes from Settings; a SQLite sandbox's file in
  WAL mode with a busy timeout and foreign keys, its connections on the process's shared SQLite
  workers (classroom.sqlite), its SQL compiled once per process; every engine gets the
  statement log.
- SandboxSession: the session class of every sandbox. The lesson's get_session only commits;
  this class collects what each transaction changed (ORM flushes and bulk writes, from session
  events) and, once the commit succeeded, hands it to the sandbox (cache invalidation, the
  publisher's wake-up). Nothing is handed over for a rolled-back transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause

import source
from classroom import sqlite as shared_sqlite
from classroom.config import Settings
from classroom.sqlite.compilation import share_compilation
from classroom.statements import install_statement_log

T = TypeVar("T")

SQLITE_WAL_LIMIT_BYTES = (
    512 * 1024
)  # a checkpoint truncates the WAL back to this (RAM under /dev/shm)
SQLITE_WAL_CHECKPOINT_PAGES = 200  # checkpoint every ~800 KB of WAL instead of SQLite's 4 MB
# PostgreSQL shows it in pg_stat_activity: QuLab's connections are told from other clients', and
# each replica's shared engine names itself (classroom.sandboxes.replicas) so replicas count it.
QULAB_APPLICATION_NAME = "qulab"


def application_name_arguments(name: str) -> dict[str, Any]:
    """asyncpg's connect arguments that set the connection's application_name."""
    return {"server_settings": {"application_name": name}}


def _sqlite_connection_setup(busy_timeout_seconds: float) -> Callable[[Any, Any], None]:
    def configure(dbapi_connection: Any, connection_record: Any) -> None:
        # WAL lets readers run beside one writer; the busy timeout makes writers queue instead
        # of failing; SQLite ignores foreign keys unless each connection asks for them; the
        # journal size limit keeps a burst's WAL from staying in RAM after its checkpoint.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT_BYTES}")
        cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_CHECKPOINT_PAGES}")
        cursor.close()

    return configure


def open_engine(url: URL, settings: Settings, **overrides: Any) -> AsyncEngine:
    """The lesson's engine with the configured pool; a SQLite one also set up for a class.

    A SQLite sandbox serves one learner: a pool of one connection and no pre-ping (a local file
    does not drop connections). Its operations run on the process's shared SQLite workers, so
    threads follow the operations running at once, not the learners. PostgreSQL's shared pool
    pre-pings, because a server restart or a network cut does kill pooled connections.
    """
    is_sqlite = url.get_backend_name() == "sqlite"
    options: dict[str, Any] = {
        "pool_size": settings.sqlite_pool_size if is_sqlite else settings.pool_size,
        "max_overflow": settings.sqlite_max_overflow if is_sqlite else settings.max_overflow,
        "pool_timeout": settings.pool_timeout_seconds,
        "pre_ping": not is_sqlite,
    }
    options.update(overrides)
    if url.get_backend_name() == "postgresql":
        # Bounded: a port that takes the connection and never speaks PostgreSQL fails in time.
        options["connect_args"] = {
            "timeout": settings.database_connect_timeout_seconds,
            **application_name_arguments(QULAB_APPLICATION_NAME),
            **options.get("connect_args", {}),
        }
    if is_sqlite:  # no thread per connection: the process's shared SQLite workers run it
        creator = functools.partial(shared_sqlite.connect, max_workers=settings.connection_budget)
        options.setdefault(
            "connect_args",
            {"timeout": settings.sqlite_busy_timeout_seconds, "async_creator_fn": creator},
        )
    engine = source.create_engine(url, **options)
    if is_sqlite:
        setup = _sqlite_connection_setup(settings.sqlite_busy_timeout_seconds)
        event.listen(engine.sync_engine, "connect", setup)
        share_compilation(engine)  # each statement compiled once per process, not per sandbox
    install_statement_log(engine)
    return engine


def engine_connection_limit(engine: AsyncEngine) -> int:
    """The most connections this engine's pool opens at once (pool size + overflow; NullPool: 0)."""
    pool = engine.pool
    size, overflow = getattr(pool, "size", None), getattr(pool, "_max_overflow", 0)
    return int(size()) + max(0, int(overflow)) if callable(size) else 0


def engine_pre_pings(engine: AsyncEngine) -> bool:
    """Whether the engine's pool tests each connection before lending it out."""
    return bool(getattr(engine.pool, "_pre_ping", False))


class TrackedSyncSession(Session):
    """The ORM session behind SandboxSession.

    The listeners below hear only sessions of this class.
    """


@dataclass
class CommittedChanges:
    """What one committed transaction changed: ORM objects (detached), tables written in bulk."""

    inserted: list[Any] = field(default_factory=list)
    updated: list[Any] = field(default_factory=list)
    deleted: list[Any] = field(default_factory=list)
    # Tables a bulk INSERT/UPDATE/DELETE wrote (rows unknown to the ORM); "*" when it can't tell.
    bulk_tables: set[str] = field(default_factory=set)

    def of_type(self, model: type[T]) -> list[T]:
        """Every changed object of one model class."""
        return [
            obj for obj in (*self.inserted, *self.updated, *self.deleted) if isinstance(obj, model)
        ]


_CHANGES_KEY = "qulab_changes"


@event.listens_for(TrackedSyncSession, "after_flush")
def _collect_flushed_changes(session: Session, flush_context: Any) -> None:
    # after_flush still sees the pre-flush new/dirty/deleted sets; keep them until commit so
    # the unit of work can tell caches and the outbox publisher what changed.
    changes: CommittedChanges = session.info.setdefault(_CHANGES_KEY, CommittedChanges())
    changes.inserted.extend(session.new)
    changes.updated.extend(obj for obj in session.dirty if session.is_modified(obj))
    changes.deleted.extend(session.deleted)


@event.listens_for(TrackedSyncSession, "do_orm_execute")
def _collect_bulk_writes(execute_state: Any) -> None:
    # session.execute(delete(User).where(...)) and friends never pass through the flush: note
    # the tables they write, so the commit can tell the cache (which then drops the whole epoch).
    tables = _tables_written(execute_state.statement)
    if tables:
        changes: CommittedChanges = execute_state.session.info.setdefault(
            _CHANGES_KEY, CommittedChanges()
        )
        changes.bulk_tables.update(tables)


def _tables_written(statement: Any) -> set[str]:
    if getattr(statement, "is_dml", False):
        return {getattr(statement.table, "name", "*")}
    if isinstance(statement, TextClause) and not statement.text.lstrip().upper().startswith(
        ("SELECT", "WITH", "PRAGMA")
    ):
        return {"*"}  # raw SQL that may write anything
    return set()


@event.listens_for(TrackedSyncSession, "after_rollback")
def _forget_rolled_back_changes(session: Session) -> None:
    session.info.pop(_CHANGES_KEY, None)


class SandboxSession(AsyncSession):
    """The session of every sandbox: after a successful commit, it tells the sandbox what changed.

    Its sync_session_class carries the listeners above, so they hear QuLab's sessions only
    (listening on SQLAlchemy's Session class would run them for every session in the process).
    The session factory gives each session `info={"on_commit": callback}`; the callback (the
    sandbox's after_commit) is awaited before commit() returns, so a read that follows the commit
    never finds a cached value the commit made stale.
    """

    sync_session_class = TrackedSyncSession

    async def commit(self) -> None:
        await super().commit()
        changes = self.sync_session.info.pop(_CHANGES_KEY, None)
        on_commit = self.sync_session.info.get("on_commit")
        if changes is not None and on_commit is not None:
            await on_commit(changes)
