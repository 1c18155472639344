"""Where sandboxes keep their data: one SQLite file each, or one PostgreSQL schema each.

A store opens a sandbox's storage (and says how to build its engine), renews its lease, gets it
ready to sleep, and deletes it. PostgreSQL sandboxes are schemas named qulab_<sandbox id>, each
with a row in the lease table saying when any replica last used it (the database's clock, so
replicas agree). SQLite sandbox files are claimed by a lock that dies with its process
(classroom.sandboxes.claims). A process that dies cannot delete what it held, so every process's
reaper also deletes schemas whose lease expired, and files no live process holds, once unused
for longer than the idle limit, with their Redis keys. On PostgreSQL a deletion leaves a note
saying why, so a learner who comes back to that sandbox, on any replica, is told.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
from classroom.engines import (
    CommittedChanges,
    application_name_arguments,
    engine_connection_limit,
    open_engine,
)
from classroom.outbox.counts import install_outbox_counts
from classroom.progress.journal import JOURNAL_TABLE, JournalBase
from classroom.sandboxes.claims import (
    FileClaims,
    adopt_unheld,
    delete_sandbox_files,
    embedded_sandbox_files,
    files_beside,
    reap_unheld,
)
from classroom.sandboxes.replicas import POSTGRES_RESERVED_CONNECTIONS, ReplicaConnections
from classroom.sandboxes.sandbox import SANDBOX_SCHEMA_PATTERN, Sandbox, quoted_schema

logger = logging.getLogger("qulab")
WAL_TRIM_ABOVE_BYTES = 128 * 1024  # an awake sandbox's WAL larger than this is checkpointed
WAL_TRIM_WAIT_MS = 100  # how long that checkpoint waits for readers before trying next pass

__all__ = ["POSTGRES_RESERVED_CONNECTIONS", "PostgresSandboxStore", "SQLiteSandboxStore"]

SANDBOX_LEASE_TABLE = "qulab_sandbox_leases"
SANDBOX_DELETION_TABLE = "qulab_sandbox_deletions"  # why each recently deleted sandbox went
DELETIONS_KEPT_DAYS = 7  # a learner returning later than this is not told why it went
_LEASE_TABLE_LOCK_KEY = 0x7175_6C61_62  # pg_advisory_xact_lock key: "qulab"
MAX_SCHEMAS_REAPED_PER_PASS = 50
_ID_PLACEHOLDER = "x" * 8
KeyDeletion = Callable[[], Awaitable[None]]  # deletes a sandbox's Redis keys; never raises


def lease_renewal_seconds(settings: Settings) -> float:
    """How often a sandbox in use renews its lease: a lease never looks expired while in use."""
    return min(60.0, settings.sandbox_idle_seconds / 4)


def abandoned_after_seconds(settings: Settings) -> float:
    """A lease (or an unheld file) this old was unused for at least the idle limit."""
    return settings.sandbox_idle_seconds + lease_renewal_seconds(settings)


def idle_reason(settings: Settings) -> str:
    """Why a sandbox unused for the idle limit was deleted, as its learner is told."""
    return f"it was idle for more than {settings.sandbox_idle_seconds / 60:g} minutes"


def key_deletion(redis_service: RedisService, sandbox_id: str) -> KeyDeletion:
    """Deletes the Redis keys of a sandbox this process does not hold (a warning if it cannot)."""

    async def delete_keys() -> None:
        try:
            await RedisLink(redis_service, sandbox_id).delete_namespace()
        except REDIS_ERRORS:
            logger.warning("could not delete the Redis keys of deleted sandbox %s", sandbox_id)

    return delete_keys


class SQLiteSandboxStore:
    """Sandboxes as SQLite files in WAL mode: a file, a small engine and pool per awake sandbox."""

    backend = "sqlite"

    def __init__(
        self, settings: Settings, target: DatabaseTarget, redis_service: RedisService
    ) -> None:
        self.settings = settings
        self.target = target
        self.redis_service = redis_service
        self.directory = sandbox_directory(settings) if target.kind == "embedded" else None
        self.connections_per_sandbox = settings.sqlite_pool_size + settings.sqlite_max_overflow
        self.claims = FileClaims()
        self.adopted: set[str] = set()  # sandboxes whose files a dead process left

    def describe(self) -> str:
        if self.target.kind == "embedded":
            return f"embedded SQLite, one WAL file per sandbox in {self.directory}"
        return mask_url(self.target.url)

    async def start(self, budget: ConnectionBudget) -> None:
        """Nothing to connect to: the budget is the configured thread budget.

        First, delete the sandbox files no live process holds that nobody used for longer than
        the idle limit: a crashed process's, or the last run's with DATABASE_URL=sqlite:///path.
        """
        await self.reap_abandoned(
            unused_for_seconds=abandoned_after_seconds(self.settings), live=set(), reason=""
        )

    def path_for(self, sandbox_id: str) -> Path:
        if self.directory is not None:
            return self.directory / f"qulab-{os.getpid()}-{sandbox_id}.sqlite3"
        assert self.target.url is not None and self.target.url.database
        given = Path(self.target.url.database)
        return given.with_name(f"{given.stem}-{sandbox_id}{given.suffix or '.sqlite3'}")

    async def open(self, sandbox_id: str) -> tuple[str, Callable[[], AsyncEngine], Optional[str]]:
        """Claim the sandbox's file (a lock held while this process holds the sandbox).

        Returns its path, its engine's factory, and why it was deleted before (None here).
        """
        path = self.path_for(sandbox_id)
        await self.claims.claim(path)
        if self.directory is not None and not path.exists():
            adopted = adopt_unheld(self.directory, sandbox_id, path)
            if adopted is not None:
                self.adopted.add(sandbox_id)
                logger.info("adopted sandbox file %s: no live process held it", adopted.name)
        url = URL.create("sqlite+aiosqlite", database=str(path))
        return str(path), lambda: open_engine(url, self.settings), None

    async def renew_lease(self, sandbox: Sandbox) -> bool:
        """Mark the file used now (its lock file's time): no reaper deletes it while in use."""
        self.claims.renew(Path(sandbox.location))
        return True

    async def trim_wal(self, sandbox: Sandbox) -> None:
        """Fold a grown WAL back into the database and truncate it, if no reader is in the way
        within WAL_TRIM_WAIT_MS (else the next pass tries again): a burst's WAL would otherwise
        stay in RAM (/dev/shm) while its learner is connected."""
        try:
            size = Path(sandbox.location + "-wal").stat().st_size
        except FileNotFoundError:
            return
        if size <= WAL_TRIM_ABOVE_BYTES or sandbox._engine is None:
            return
        busy_ms = int(self.settings.sqlite_busy_timeout_seconds * 1000)
        async with sandbox._engine.connect() as connection:
            await connection.exec_driver_sql(f"PRAGMA busy_timeout={WAL_TRIM_WAIT_MS}")
            try:
                await connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                await connection.exec_driver_sql(f"PRAGMA busy_timeout={busy_ms}")

    async def note_cache_missed(self, sandbox: Sandbox) -> None:
        """Nothing to keep: one process serves a SQLite sandbox, and it remembers what Redis
        missed while it lives (a process that adopts a dead one's file settles at once)."""

    async def cache_missed(self, sandbox: Optional[Sandbox] = None) -> list[tuple[str, Any]]:
        """An adopted file's sandbox, once: its dead process may have left writes Redis
        missed."""
        if sandbox is None or sandbox.id not in self.adopted:
            return []
        self.adopted.discard(sandbox.id)
        return [(sandbox.id, None)]

    async def clear_cache_missed(self, sandbox_id: str, noted_at: Any) -> None:
        self.adopted.discard(sandbox_id)

    async def before_sleep(self, sandbox: Sandbox) -> None:
        """Fold the WAL back into the database and truncate it.

        A dormant sandbox then holds no RAM for it.
        """
        if sandbox._engine is None:
            return
        async with sandbox._engine.connect() as connection:
            await connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    async def delete(
        self,
        sandbox: Sandbox,
        *,
        only_if_expired: bool,
        reason: Optional[str] = None,
        forget_keys: Optional[KeyDeletion] = None,
    ) -> bool:
        """Delete the files and keys; False when another live process holds the file too."""
        path = Path(sandbox.location)
        descriptor = self.claims.take_for_deletion(path)
        if descriptor is None:
            return False  # DATABASE_URL=sqlite:///path shared with a live process: it stays
        try:
            delete_sandbox_files(path)
            if forget_keys is not None:
                await forget_keys()
        finally:
            self.claims.end_deletion(path, descriptor)
        return True

    async def reap_abandoned(
        self, *, unused_for_seconds: float, live: set[str], reason: str
    ) -> list[tuple[str, str]]:
        """Delete sandbox files no live process holds, unused for that long, with their keys.

        Returns (sandbox id, file) of each.
        """
        if self.directory is not None:
            found = embedded_sandbox_files(self.directory)
        else:
            found = files_beside(self.path_for(_ID_PLACEHOLDER), _ID_PLACEHOLDER)
        reaped = reap_unheld(found, self.claims, unused_for_seconds=unused_for_seconds)
        for sandbox_file in reaped:
            if sandbox_file.sandbox_id not in live:  # else the keys are this process's sandbox's
                await key_deletion(self.redis_service, sandbox_file.sandbox_id)()
        return [(sandbox_file.sandbox_id, str(sandbox_file.path)) for sandbox_file in reaped]

    async def close(self) -> None:
        """Let go of the files' claims; files still here are the next start's to reap."""
        self.claims.release_all()


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
        # When a write's cache invalidation missed Redis (NULL: nothing missed): any replica
        # that reaches Redis sets a new epoch for the sandbox, then clears it.
        await connection.execute(
            text(
                f"ALTER TABLE {SANDBOX_LEASE_TABLE} "
                "ADD COLUMN IF NOT EXISTS cache_missed_at timestamptz"
            )
        )
        await connection.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {SANDBOX_DELETION_TABLE} ("
                "schema_name text PRIMARY KEY, deleted_at timestamptz NOT NULL DEFAULT now(), "
                "reason text NOT NULL)"
            )
        )

    async def take(self, connection: Any, schema: str) -> Optional[str]:
        """Take (or renew) the schema's lease, its row locked until the transaction ends.

        The lock orders this against any deletion: a deleting replica holds the same row. Returns
        why the sandbox was deleted when this opens one that was (said once), else None.
        """
        held = await connection.execute(
            text(f"SELECT 1 FROM {SANDBOX_LEASE_TABLE} WHERE schema_name = :schema FOR UPDATE"),
            {"schema": schema},
        )
        existed = held.first() is not None
        await connection.execute(
            text(
                f"INSERT INTO {SANDBOX_LEASE_TABLE} (schema_name, last_used, holder) "
                "VALUES (:schema, now(), :holder) "
                "ON CONFLICT (schema_name) "
                "DO UPDATE SET last_used = now(), holder = excluded.holder"
            ),
            {"schema": schema, "holder": self.holder},
        )
        if existed:
            return None
        deleted = await connection.execute(
            text(
                f"DELETE FROM {SANDBOX_DELETION_TABLE} WHERE schema_name = :schema RETURNING reason"
            ),
            {"schema": schema},
        )
        return deleted.scalar()

    async def note_cache_missed(self, connection: Any, schema: str) -> None:
        """A write of this schema's sandbox committed and Redis did not take its invalidation."""
        await connection.execute(
            text(
                f"UPDATE {SANDBOX_LEASE_TABLE} SET cache_missed_at = clock_timestamp() "
                "WHERE schema_name = :schema"
            ),
            {"schema": schema},
        )

    async def cache_missed(self, connection: Any, schema: Optional[str] = None) -> list[Any]:
        """(schema, when) of every sandbox with writes Redis missed (or of this one only)."""
        only = "AND schema_name = :schema" if schema is not None else ""
        rows = await connection.execute(
            text(
                f"SELECT schema_name, cache_missed_at FROM {SANDBOX_LEASE_TABLE} "
                f"WHERE cache_missed_at IS NOT NULL {only}"
            ),
            {"schema": schema},
        )
        return list(rows)

    async def clear_cache_missed(self, connection: Any, schema: str, noted_at: Any) -> None:
        """Settled: clear the note, unless a newer write missed Redis since it was read."""
        await connection.execute(
            text(
                f"UPDATE {SANDBOX_LEASE_TABLE} SET cache_missed_at = NULL "
                "WHERE schema_name = :schema AND cache_missed_at = :noted_at"
            ),
            {"schema": schema, "noted_at": noted_at},
        )

    async def record_deletion(self, connection: Any, schemas: list[str], reason: str) -> None:
        """Note why these schemas were deleted, for their learners' return; old notes go."""
        await connection.execute(
            text(
                f"INSERT INTO {SANDBOX_DELETION_TABLE} (schema_name, reason) "
                "SELECT unnest(CAST(:schemas AS text[])), :reason "
                "ON CONFLICT (schema_name) DO UPDATE "
                "SET deleted_at = now(), reason = excluded.reason"
            ),
            {"schemas": schemas, "reason": reason},
        )
        await connection.execute(
            text(
                f"DELETE FROM {SANDBOX_DELETION_TABLE} "
                "WHERE deleted_at < now() - make_interval(days => :days)"
            ),
            {"days": DELETIONS_KEPT_DAYS},
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
        self.connections = ReplicaConnections(settings)  # the share PostgreSQL's count gives
        self.shared_engine: Optional[AsyncEngine] = None
        self.connections_per_sandbox = 0  # sandboxes share the pool
        self.max_connections: Optional[int] = None
        self._start_lock = asyncio.Lock()

    def describe(self) -> str:
        return mask_url(self.target.url)

    async def start(self, budget: ConnectionBudget) -> None:
        """Create the shared engine and the tables.

        The budget is this replica's share of max_connections among the replicas PostgreSQL
        shows (its connections carry this replica's application_name), and follows the server.
        """
        async with self._start_lock:
            if self.shared_engine is not None:
                return
            assert self.target.url is not None
            engine = open_engine(
                self.target.url,
                self.settings,
                connect_args=application_name_arguments(self.connections.name),
            )
            try:
                async with engine.begin() as connection:
                    await self.leases.create_table(connection)  # under the advisory lock...
                    await self.connections.create_table(connection)  # ...held to the commit
                    self.max_connections = int(
                        await connection.scalar(text("SHOW max_connections"))
                    )
            except BaseException:
                await engine.dispose()
                raise
            budget.take(engine_connection_limit(engine))
            self.shared_engine = engine
            await self.connections.start(engine, self.max_connections, budget)

    async def engine(self) -> AsyncEngine:
        if self.shared_engine is None:
            raise RuntimeError("the PostgreSQL sandbox store was not started")
        return self.shared_engine

    async def open(self, sandbox_id: str) -> tuple[str, Callable[[], AsyncEngine], Optional[str]]:
        """Take the lease, then create the schema if it is missing, in one transaction.

        The lease comes first: its row lock makes a replica deleting this sandbox finish before
        (then the schema is made anew, and the note says why the old one went) or wait until
        the lease is renewed (then it keeps the sandbox). Returns the schema, its engine's
        factory, and why the sandbox was deleted if this is a learner's return to it.
        """
        shared = await self.engine()
        schema = f"qulab_{sandbox_id}"
        async with shared.begin() as connection:
            deleted_because = await self.leases.take(connection, schema)
            await connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted_schema(schema)}"))
        return (
            schema,
            lambda: shared.execution_options(schema_translate_map={None: schema}),
            deleted_because,
        )

    async def renew_lease(self, sandbox: Sandbox) -> bool:
        async with (await self.engine()).begin() as connection:
            return await self.leases.renew(connection, sandbox.location)

    async def trim_wal(self, sandbox: Sandbox) -> None:
        """Nothing: PostgreSQL keeps its own WAL."""

    async def note_cache_missed(self, sandbox: Sandbox) -> None:
        """Keep, in the database, that a write of this sandbox missed Redis: whichever replica
        reaches Redis first sets a new epoch, even if this process dies first."""
        async with (await self.engine()).begin() as connection:
            await self.leases.note_cache_missed(connection, sandbox.location)

    async def cache_missed(self, sandbox: Optional[Sandbox] = None) -> list[tuple[str, Any]]:
        """(sandbox id, noted at) of the sandboxes with writes Redis missed (or this one's)."""
        async with (await self.engine()).begin() as connection:
            rows = await self.leases.cache_missed(
                connection, sandbox.location if sandbox is not None else None
            )
        return [(schema.removeprefix("qulab_"), noted_at) for schema, noted_at in rows]

    async def clear_cache_missed(self, sandbox_id: str, noted_at: Any) -> None:
        async with (await self.engine()).begin() as connection:
            await self.leases.clear_cache_missed(connection, f"qulab_{sandbox_id}", noted_at)

    async def before_sleep(self, sandbox: Sandbox) -> None:
        """Nothing: the schema's connections belong to the shared pool."""

    async def delete(
        self,
        sandbox: Sandbox,
        *,
        only_if_expired: bool,
        reason: Optional[str] = None,
        forget_keys: Optional[KeyDeletion] = None,
    ) -> bool:
        """Drop the schema with its lease and keys, and note why (the reason) for its return.

        only_if_expired keeps it when another replica used it lately. The keys go while the
        lease row is still locked: a replica opening the sandbox meanwhile waits, then starts a
        new one whose keys nothing deletes.
        """
        only_if_unused_for = self.settings.sandbox_idle_seconds if only_if_expired else None
        async with (await self.engine()).begin() as connection:
            lease_ended = await self.leases.end(
                connection, sandbox.location, only_if_unused_for=only_if_unused_for
            )
            if not lease_ended and only_if_expired:
                return False
            if forget_keys is not None:
                await forget_keys()
            await connection.execute(
                text(f"DROP SCHEMA IF EXISTS {quoted_schema(sandbox.location)} CASCADE")
            )
            if reason is not None:
                await self.leases.record_deletion(connection, [sandbox.location], reason)
        return True

    async def reap_abandoned(
        self, *, unused_for_seconds: float, live: set[str], reason: str
    ) -> list[tuple[str, str]]:
        """Drop schemas (and their Redis keys) whose lease expired and that are not live here.

        Returns (sandbox id, schema) of each.
        """
        engine = await self.engine()
        async with engine.begin() as connection:
            await self.leases.lease_orphans(connection)
        async with engine.begin() as connection:
            expired = await self.leases.claim_expired(
                connection,
                seconds=unused_for_seconds,
                live=[f"qulab_{sandbox_id}" for sandbox_id in live],
            )
            reaped = [schema for schema in expired if SANDBOX_SCHEMA_PATTERN.fullmatch(schema)]
            for schema in reaped:  # the keys go while the lease rows are locked, as in delete()
                await key_deletion(self.redis_service, schema.removeprefix("qulab_"))()
                await connection.execute(
                    text(f"DROP SCHEMA IF EXISTS {quoted_schema(schema)} CASCADE")
                )
            if expired:
                await connection.execute(
                    text(f"DELETE FROM {SANDBOX_LEASE_TABLE} WHERE schema_name = ANY(:expired)"),
                    {"expired": expired},
                )
            if reaped:
                await self.leases.record_deletion(connection, reaped, reason)
        return [(schema.removeprefix("qulab_"), schema) for schema in reaped]

    async def close(self) -> None:
        if self.shared_engine is not None:
            await self.connections.leave()
            await self.shared_engine.dispose()
            self.shared_engine = None


async def create_schema(sandbox: Sandbox) -> None:
    """Create the sandbox's tables (the lesson's and the journal) and the outbox's counts, if
    they do not exist yet."""
    async with sandbox.engine.begin() as connection:
        await connection.run_sync(source.Base.metadata.create_all)
        await connection.run_sync(JournalBase.metadata.create_all)
        schema = quoted_schema(sandbox.location) if sandbox.backend == "postgresql" else ""
        await install_outbox_counts(connection, schema)


def note_journal_writes(sandbox: Sandbox) -> Callable[[CommittedChanges], Awaitable[None]]:
    """A commit listener: a bulk write of the journal (a reset) makes its kept reading stale."""

    async def noted(changes: CommittedChanges) -> None:
        if changes.bulk_tables & {JOURNAL_TABLE, "*"}:
            sandbox.journal_generation += 1
            sandbox.progress_read = None  # lines went: the next reading starts from the top
            sandbox.journal_written.clear()

    return noted
