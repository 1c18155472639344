"""Where sandboxes keep their data: one SQLite file each, or one PostgreSQL schema each.

A store opens a sandbox's storage (and says how to build its engine), renews its lease, gets it
ready to sleep, and deletes it. PostgreSQL sandboxes are schemas named qulab_<sandbox id>, each
with a row in the lease table saying when any replica last used it (the database's clock, so
replicas agree). A process that dies cannot drop its schemas, so every replica's reaper also
drops schemas whose lease expired, whoever created them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

import source
from classroom.budget import ConnectionBudget
from classroom.cache.breaker import REDIS_ERRORS
from classroom.cache.link import RedisLink, RedisService
from classroom.config import DatabaseTarget, Settings, mask_url, sandbox_directory
from classroom.engines import CommittedChanges, engine_connection_limit, open_engine
from classroom.progress.journal import JOURNAL_TABLE, JournalBase
from classroom.sandboxes.sandbox import (
    SANDBOX_ID_PATTERN,
    SANDBOX_SCHEMA_PATTERN,
    Sandbox,
    quoted_schema,
)

logger = logging.getLogger("qulab")

SANDBOX_LEASE_TABLE = "qulab_sandbox_leases"
_LEASE_TABLE_LOCK_KEY = 0x7175_6C61_62  # pg_advisory_xact_lock key: "qulab"
MAX_SCHEMAS_REAPED_PER_PASS = 50
POSTGRES_RESERVED_CONNECTIONS = 3  # superuser_reserved_connections' default: never ours to spend


class SQLiteSandboxStore:
    """Sandboxes as SQLite files in WAL mode: a file, a small engine and pool per awake sandbox."""

    backend = "sqlite"

    def __init__(self, settings: Settings, target: DatabaseTarget) -> None:
        self.settings = settings
        self.target = target
        self.directory = sandbox_directory(settings) if target.kind == "embedded" else None
        self.connections_per_sandbox = settings.sqlite_pool_size + settings.sqlite_max_overflow

    def describe(self) -> str:
        if self.target.kind == "embedded":
            return f"embedded SQLite, one WAL file per sandbox in {self.directory}"
        return mask_url(self.target.url)

    async def start(self, budget: ConnectionBudget) -> None:
        """Nothing to connect to: the budget is the configured thread budget.

        With DATABASE_URL=sqlite:///path, delete sandbox files beside that path nobody touched for
        longer than the idle limit (nothing left behind).
        """
        if self.target.kind != "sqlite-file":
            return
        template = self.path_for("x" * 8)
        prefix, suffix = template.name.split("x" * 8, 1)
        cutoff = time.time() - self.settings.sandbox_idle_seconds
        for path in template.parent.glob(f"{prefix}*{suffix}"):
            sandbox_id = path.name[len(prefix) : len(path.name) - len(suffix)]
            companions = [Path(str(path) + extra) for extra in ("", "-wal", "-shm", "-journal")]
            # In WAL mode commits land in -wal; the main file changes only at a checkpoint, so the
            # newest of the files says when the sandbox was last written.
            last_written = max(
                companion.stat().st_mtime for companion in companions if companion.exists()
            )
            if SANDBOX_ID_PATTERN.fullmatch(sandbox_id) and last_written < cutoff:
                for extra in ("", "-wal", "-shm", "-journal"):
                    Path(str(path) + extra).unlink(missing_ok=True)
                logger.info("deleted sandbox file %s, unused for longer than the idle limit", path)

    def path_for(self, sandbox_id: str) -> Path:
        if self.directory is not None:
            return self.directory / f"qulab-{os.getpid()}-{sandbox_id}.sqlite3"
        assert self.target.url is not None and self.target.url.database
        given = Path(self.target.url.database)
        return given.with_name(f"{given.stem}-{sandbox_id}{given.suffix or '.sqlite3'}")

    async def open(self, sandbox_id: str) -> tuple[str, Callable[[], AsyncEngine]]:
        url = URL.create("sqlite+aiosqlite", database=str(self.path_for(sandbox_id)))
        return url.database or "", lambda: open_engine(url, self.settings)

    async def renew_lease(self, sandbox: Sandbox) -> bool:
        return True

    async def before_sleep(self, sandbox: Sandbox) -> None:
        """Fold the WAL back into the database and truncate it.

        A dormant sandbox then holds no RAM for it.
        """
        if sandbox._engine is None:
            return
        async with sandbox._engine.connect() as connection:
            await connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    async def delete(self, sandbox: Sandbox, *, only_if_expired: bool) -> bool:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(sandbox.location + suffix).unlink(missing_ok=True)
        return True

    async def reap_abandoned_schemas(
        self, *, expired_after_seconds: float, live: list[str]
    ) -> list[str]:
        return []

    async def close(self) -> None:
        """Nothing shared to close."""


class SchemaLeases:
    """The lease table: which sandbox schemas exist and when any replica last used each."""

    def __init__(self, holder: str) -> None:
        self.holder = holder

    async def create_table(self, connection: Any) -> None:
        # Replicas may start together; CREATE TABLE IF NOT EXISTS alone can still collide.
        await connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LEASE_TABLE_LOCK_KEY}
        )
        await connection.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {SANDBOX_LEASE_TABLE} ("
                "schema_name text PRIMARY KEY, last_used timestamptz NOT NULL, "
                "holder text NOT NULL)"
            )
        )

    async def take(self, connection: Any, schema: str) -> None:
        await connection.execute(
            text(
                f"INSERT INTO {SANDBOX_LEASE_TABLE} (schema_name, last_used, holder) "
                "VALUES (:schema, now(), :holder) "
                "ON CONFLICT (schema_name) "
                "DO UPDATE SET last_used = now(), holder = excluded.holder"
            ),
            {"schema": schema, "holder": self.holder},
        )

    async def renew(self, connection: Any, schema: str) -> bool:
        renewed = await connection.execute(
            text(
                f"UPDATE {SANDBOX_LEASE_TABLE} SET last_used = now(), holder = :holder "
                "WHERE schema_name = :schema"
            ),
            {"schema": schema, "holder": self.holder},
        )
        return renewed.rowcount == 1

    async def end(
        self, connection: Any, schema: str, *, only_if_unused_for: Optional[float]
    ) -> bool:
        """Delete the lease.

        With only_if_unused_for, only when no replica used the schema for that long.
        """
        condition = (
            ""
            if only_if_unused_for is None
            else " AND last_used < now() - make_interval(secs => :seconds)"
        )
        ended = await connection.execute(
            text(f"DELETE FROM {SANDBOX_LEASE_TABLE} WHERE schema_name = :schema{condition}"),
            {"schema": schema, "seconds": float(only_if_unused_for or 0)},
        )
        return ended.rowcount == 1

    async def lease_orphans(self, connection: Any) -> None:
        """Give schemas without a lease (made before leases existed) one.

        That way they go one idle period later.
        """
        await connection.execute(
            text(
                f"INSERT INTO {SANDBOX_LEASE_TABLE} (schema_name, last_used, holder) "
                "SELECT nspname, now(), :holder FROM pg_catalog.pg_namespace "
                "WHERE nspname ~ :pattern "
                "ORDER BY nspname ON CONFLICT (schema_name) DO NOTHING"
            ),
            {
                "holder": f"{self.holder} (found without a lease)",
                "pattern": f"^{SANDBOX_SCHEMA_PATTERN.pattern}$",
            },
        )

    async def claim_expired(self, connection: Any, *, seconds: float, live: list[str]) -> list[str]:
        """Expired leases not live here; FOR UPDATE SKIP LOCKED gives each to one replica."""
        expired = await connection.execute(
            text(
                f"SELECT schema_name FROM {SANDBOX_LEASE_TABLE} "
                "WHERE last_used < now() - make_interval(secs => :seconds) "
                "AND NOT (schema_name = ANY(:live)) "
                "ORDER BY last_used LIMIT :limit FOR UPDATE SKIP LOCKED"
            ),
            {"seconds": float(seconds), "live": live, "limit": MAX_SCHEMAS_REAPED_PER_PASS},
        )
        return list(expired.scalars().all())


class PostgresSandboxStore:
    """Sandboxes as schemas of one PostgreSQL database, all through one shared engine and pool."""

    backend = "postgresql"

    def __init__(
        self, settings: Settings, target: DatabaseTarget, redis_service: RedisService
    ) -> None:
        self.settings = settings
        self.target = target
        self.redis_service = redis_service
        self.leases = SchemaLeases(f"{os.uname().nodename}:{os.getpid()}")
        self.shared_engine: Optional[AsyncEngine] = None
        self.connections_per_sandbox = 0  # sandboxes share the pool
        self.max_connections: Optional[int] = None
        self._start_lock = asyncio.Lock()

    def describe(self) -> str:
        return mask_url(self.target.url)

    async def start(self, budget: ConnectionBudget) -> None:
        """Create the shared engine and the lease table.

        The budget is sized from max_connections ÷ replicas.
        """
        async with self._start_lock:
            if self.shared_engine is not None:
                return
            assert self.target.url is not None
            engine = open_engine(self.target.url, self.settings)
            try:
                async with engine.begin() as connection:
                    await self.leases.create_table(connection)
                    self.max_connections = int(
                        await connection.scalar(text("SHOW max_connections"))
                    )
            except BaseException:
                await engine.dispose()
                raise
            share = (self.max_connections - POSTGRES_RESERVED_CONNECTIONS) // self.settings.replicas
            budget.total = max(1, min(self.settings.connection_budget, share))
            budget.take(engine_connection_limit(engine))
            self.shared_engine = engine

    async def engine(self) -> AsyncEngine:
        if self.shared_engine is None:
            raise RuntimeError("the PostgreSQL sandbox store was not started")
        return self.shared_engine

    async def open(self, sandbox_id: str) -> tuple[str, Callable[[], AsyncEngine]]:
        shared = await self.engine()
        schema = f"qulab_{sandbox_id}"
        async with shared.begin() as connection:  # schema and lease appear together
            await connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted_schema(schema)}"))
            await self.leases.take(connection, schema)
        return schema, lambda: shared.execution_options(schema_translate_map={None: schema})

    async def renew_lease(self, sandbox: Sandbox) -> bool:
        async with (await self.engine()).begin() as connection:
            return await self.leases.renew(connection, sandbox.location)

    async def before_sleep(self, sandbox: Sandbox) -> None:
        """Nothing: the schema's connections belong to the shared pool."""

    async def delete(self, sandbox: Sandbox, *, only_if_expired: bool) -> bool:
        """Drop the schema with its lease.

        only_if_expired keeps it when another replica used it lately.
        """
        only_if_unused_for = self.settings.sandbox_idle_seconds if only_if_expired else None
        async with (await self.engine()).begin() as connection:
            lease_ended = await self.leases.end(
                connection, sandbox.location, only_if_unused_for=only_if_unused_for
            )
            if not lease_ended and only_if_expired:
                return False
            await connection.execute(
                text(f"DROP SCHEMA IF EXISTS {quoted_schema(sandbox.location)} CASCADE")
            )
        return True

    async def reap_abandoned_schemas(
        self, *, expired_after_seconds: float, live: list[str]
    ) -> list[str]:
        """Drop schemas (and their Redis keys) whose lease expired and that are not live here."""
        engine = await self.engine()
        async with engine.begin() as connection:
            await self.leases.lease_orphans(connection)
        async with engine.begin() as connection:
            expired = await self.leases.claim_expired(
                connection, seconds=expired_after_seconds, live=live
            )
            reaped = [schema for schema in expired if SANDBOX_SCHEMA_PATTERN.fullmatch(schema)]
            for schema in reaped:
                await connection.execute(
                    text(f"DROP SCHEMA IF EXISTS {quoted_schema(schema)} CASCADE")
                )
            if expired:
                await connection.execute(
                    text(f"DELETE FROM {SANDBOX_LEASE_TABLE} WHERE schema_name = ANY(:expired)"),
                    {"expired": expired},
                )
        for schema in reaped:  # nothing left behind: the sandbox's Redis keys go with its schema
            try:
                await RedisLink(
                    self.redis_service, schema.removeprefix("qulab_")
                ).delete_namespace()
            except REDIS_ERRORS:
                logger.warning("could not delete the Redis keys of reaped schema %s", schema)
        return reaped

    async def close(self) -> None:
        if self.shared_engine is not None:
            await self.shared_engine.dispose()
            self.shared_engine = None


async def create_schema(sandbox: Sandbox) -> None:
    """Create the sandbox's tables (the lesson's and the journal) if they do not exist yet."""
    async with sandbox.engine.begin() as connection:
        await connection.run_sync(source.Base.metadata.create_all)
        await connection.run_sync(JournalBase.metadata.create_all)


def note_journal_writes(sandbox: Sandbox) -> Callable[[CommittedChanges], Awaitable[None]]:
    """A commit listener: a bulk write of the journal (a reset) makes its cached reading stale."""

    async def noted(changes: CommittedChanges) -> None:
        if changes.bulk_tables & {JOURNAL_TABLE, "*"}:
            sandbox.journal_generation += 1

    return noted
