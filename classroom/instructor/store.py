"""Where the class is kept: the roster, the servers and the message, in one database.

On PostgreSQL (DATABASE_URL) three tables in the database's default (public) schema, which
every replica sees; replicas starting at once create them under an advisory lock, as the lease
table is. On SQLite a file of this process's own in the sandbox directory (each process keeps
its own sandboxes there, so its class is its own): a WAL file with a real pool on the shared
SQLite workers, like every sandbox's (an in-memory database would get a StaticPool, which loses
concurrent writes: NOTES). QULAB_CLASS names the tables, so several classes can share one
PostgreSQL. The store has an engine of its own, so the class is still written while the
sandboxes' shared engine closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import Column, Integer, MetaData, String, Table, Text, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

import source
from classroom.budget import ConnectionBudget
from classroom.config import DatabaseTarget, Settings, sandbox_directory
from classroom.engines import engine_connection_limit, open_engine
from classroom.errors import BackendUnavailableError
from classroom.sandboxes.claims import process_alive

logger = logging.getLogger("qulab")
_CLASS_TABLES_LOCK_KEY = 0x7175_6C61_63  # pg_advisory_xact_lock key: "qulac"
DISPLAY_NAME_MAX = 40
RETRY_SECONDS = 10.0  # a store that could not open is tried again after this long
STEP_KEY_MAX = 40


class ClassTables:
    """The class's three tables, named after the class (QULAB_CLASS) when it has a name."""

    def __init__(self, class_name: str = "") -> None:
        prefix = f"qulab_class_{class_name}_" if class_name else "qulab_class_"
        self.metadata = MetaData()
        self.roster = Table(
            f"{prefix}roster",
            self.metadata,
            Column("sandbox_id", String(32), primary_key=True),
            Column("display_name", String(DISPLAY_NAME_MAX)),
            Column("joined_at", source.UTCDateTime(), nullable=False),
            Column("state", String(10), nullable=False),
            Column("state_at", source.UTCDateTime(), nullable=False),
            Column("heartbeat_at", source.UTCDateTime(), nullable=False),
            Column("next_step", String(STEP_KEY_MAX)),
            Column("step_since", source.UTCDateTime()),
            Column("completed", Text, nullable=False),  # JSON: {step key: ISO time first seen}
        )
        self.servers = Table(
            f"{prefix}servers",
            self.metadata,
            Column("server_id", String(64), primary_key=True),
            Column("started_at", source.UTCDateTime(), nullable=False),
            Column("capacity", Integer, nullable=False),
            Column("limited_by", String(200), nullable=False),
            Column("heartbeat_at", source.UTCDateTime(), nullable=False),
        )
        self.message = Table(
            f"{prefix}message",
            self.metadata,
            Column("board", String(16), primary_key=True),  # one row: "class"
            Column("message_id", String(32), nullable=False),
            Column("body", Text, nullable=False),
            Column("posted_at", source.UTCDateTime(), nullable=False),
        )


class ClassStore:
    """The class's database: its engine, its tables, and upserts in its dialect.

    Opened on first use (`ready`), not with the runtime: a database that does not answer yet
    costs the instructor's view, never a learner's page, and is tried again every
    RETRY_SECONDS. Each time it opens, its `opened_listeners` run (the roster writes again what
    it noted meanwhile).
    """

    def __init__(
        self, settings: Settings, target: DatabaseTarget, budget: ConnectionBudget
    ) -> None:
        self.settings = settings
        self.target = target
        self.tables = ClassTables(settings.class_name)
        self.engine: Optional[AsyncEngine] = None
        self.path: Optional[Path] = None  # SQLite: this process's class file
        self.opened_listeners: list[Callable[[], Awaitable[None]]] = []
        self._budget = budget
        self._connections = 0
        self._opening: Optional[asyncio.Lock] = None
        self._retry_at = 0.0
        self._closed = False

    async def ready(self) -> AsyncEngine:
        """The engine, the store opened first if it is not yet (BackendUnavailableError when
        the database does not answer)."""
        if self.engine is not None:
            return self.engine
        self._opening = self._opening or asyncio.Lock()
        async with self._opening:
            if self.engine is None:
                if self._closed or time.monotonic() < self._retry_at:
                    raise BackendUnavailableError("The class roster's database is not answering.")
                try:
                    await self._open()
                except Exception as error:
                    self._retry_at = time.monotonic() + RETRY_SECONDS
                    logger.warning("the class roster's database did not open", exc_info=True)
                    raise BackendUnavailableError(
                        "The class roster's database is not answering; it is tried again "
                        f"every {RETRY_SECONDS:g} s."
                    ) from error
                for listener in self.opened_listeners:
                    await listener()
        assert self.engine is not None
        return self.engine

    @property
    def shared(self) -> bool:
        """True when every replica sees this class (PostgreSQL); False: this process's only."""
        return self.target.kind == "postgresql"

    async def _open(self) -> None:
        """Build the engine, create the tables if they are missing, take the connections."""
        if self.shared:
            assert self.target.url is not None
            engine = open_engine(self.target.url, self.settings, pool_size=1, max_overflow=1)
        else:
            token = secrets.token_hex(4)  # two runtimes of one process (tests) keep apart
            directory = sandbox_directory(self.settings)
            remove_dead_processes_class_files(directory)
            self.path = directory / f"qulab-{os.getpid()}-class-{token}.sqlite3"
            engine = open_engine(
                URL.create("sqlite+aiosqlite", database=str(self.path)), self.settings
            )
        try:
            async with engine.begin() as connection:
                if self.shared:  # IF NOT EXISTS alone can still collide between two starts
                    await connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CLASS_TABLES_LOCK_KEY}
                    )
                await connection.run_sync(self.tables.metadata.create_all)
        except BaseException:
            await engine.dispose()
            self._delete_file()
            raise
        self._connections = engine_connection_limit(engine)
        self._budget.take(self._connections)
        self.engine = engine

    def upsert(self, table: Table, values: dict[str, Any], *, update: tuple[str, ...]) -> Any:
        """INSERT … ON CONFLICT (primary key) DO UPDATE SET the `update` columns."""
        dialect = postgresql if self.shared else sqlite
        statement = dialect.insert(table).values(**values)
        keys = [column.name for column in table.primary_key.columns]
        return statement.on_conflict_do_update(
            index_elements=keys, set_={name: statement.excluded[name] for name in update}
        )

    async def close(self) -> None:
        """Dispose the engine; this process's class file goes with it."""
        self._closed = True
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.dispose()
            await self._budget.give_back(self._connections)
        self._delete_file()

    def _delete_file(self) -> None:
        if self.path is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)


CLASS_FILE_NAME = re.compile(r"qulab-(?P<pid>[0-9]+)-class-[0-9a-f]+\.sqlite3(-wal|-shm|-journal)?")


def remove_dead_processes_class_files(directory: Path) -> None:
    """Delete the class files a process that died (SIGKILL: no close) left in the directory.

    An embedded class file belongs to its process only (the page covers that process's
    learners), so a file whose process is gone is never read again.
    """
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        named = CLASS_FILE_NAME.fullmatch(entry.name)
        if named and not process_alive(int(named["pid"])):
            Path(entry.path).unlink(missing_ok=True)
