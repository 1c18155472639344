"""The class's PostgreSQL connections as the server counts them: replicas see each other there.

Every replica's shared engine connects with an application_name of its own ("qulab-replica
<token> <host>:<pid>"), so pg_stat_activity lists the replicas connected right now; one that
dies, even by SIGKILL, loses its connections and drops out of the count at once. Each replica
takes an equal share of max_connections (less the superuser reserve) among the replicas it sees,
or among QULAB_REPLICAS if that is more: the share caps the largest pool experiment it allows.

Shares alone can still overflow while replicas come and go (a replica that reserved under a
larger share keeps it until its experiment ends), so every reservation is also granted by the
server: a small table says how many connections each replica may have open (its pools plus its
reservations), and a reservation is granted, under an advisory lock, only if the claims of every
replica connected now, this one's and the connections of other clients fit in max_connections.
Otherwise the learner waits (classroom.budget). Rows of replicas no longer connected are deleted.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any, Optional

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from classroom.budget import ConnectionBudget
from classroom.config import Settings
from classroom.engines import QULAB_APPLICATION_NAME

logger = logging.getLogger("qulab")

REPLICA_TABLE = "qulab_replica_connections"
REPLICA_APPLICATION_PREFIX = "qulab-replica "
POSTGRES_RESERVED_CONNECTIONS = 3  # superuser_reserved_connections' default: never ours to spend
_CLAIMS_LOCK_KEY = (
    0x7175_6C61_64  # pg_advisory_xact_lock key ("qulad"): one grant at a time, class-wide
)
APPLICATION_NAME_LIMIT = 63  # PostgreSQL keeps NAMEDATALEN - 1 bytes of it

# One round trip: the replicas connected now, and the client connections that are not QuLab's
# (psql sessions, other applications, QuLab of another database): they count against the limit.
_SERVER_READING = text(
    "SELECT "
    "(SELECT coalesce(array_agg(DISTINCT application_name), '{}') FROM pg_stat_activity "
    " WHERE application_name LIKE :replicas) AS replicas, "
    "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
    " AND NOT (datname IS NOT DISTINCT FROM current_database() "
    "          AND application_name LIKE :ours)) AS other_clients"
)


def replica_application_name() -> str:
    """A name for this process's connections, unique to it (a token: containers share pids)."""
    name = f"{REPLICA_APPLICATION_PREFIX}{secrets.token_hex(4)} {os.uname().nodename}:{os.getpid()}"
    return name[:APPLICATION_NAME_LIMIT]


class ReplicaConnections:
    """This replica's share of max_connections, and its claims beside every other replica's."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = replica_application_name()
        self.engine: Optional[AsyncEngine] = None
        self.max_connections = 100
        self.replicas_seen = 1
        self.other_clients = 0

    @property
    def limit(self) -> int:
        """Connections every replica together may open (the superuser reserve stays free)."""
        return max(1, self.max_connections - POSTGRES_RESERVED_CONNECTIONS)

    async def create_table(self, connection: Any) -> None:
        """The claims table (the caller holds the advisory lock that serialises creation)."""
        await connection.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {REPLICA_TABLE} ("
                "replica text PRIMARY KEY, connections integer NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            )
        )

    async def start(
        self, engine: AsyncEngine, max_connections: int, budget: ConnectionBudget
    ) -> None:
        """Begin following the server: recount now, record what the pools took."""
        self.engine, self.max_connections = engine, max_connections
        budget.server = self
        await self.recount(budget)
        await self.settle(budget)

    async def _read(self, connection: Any) -> set[str]:
        reading = (
            await connection.execute(
                _SERVER_READING,
                {
                    "replicas": f"{REPLICA_APPLICATION_PREFIX}%",
                    "ours": f"{QULAB_APPLICATION_NAME}%",
                },
            )
        ).one()
        live = set(reading.replicas) | {self.name}
        self.other_clients = int(reading.other_clients)
        self._note_replicas(len(live))
        return live

    def _note_replicas(self, seen: int) -> None:
        if seen != self.replicas_seen:
            logger.info(
                "PostgreSQL shows %d QuLab replicas (was %d): this one's share of %d connections "
                "is now %d",
                seen,
                self.replicas_seen,
                self.limit,
                self.limit // max(self.settings.replicas, seen),
            )
        self.replicas_seen = seen

    def _set_share(self, budget: ConnectionBudget) -> None:
        share = self.limit // max(self.settings.replicas, self.replicas_seen)
        budget.total = max(1, min(self.settings.connection_budget, share))
        if budget.taken > budget.total:
            logger.warning(
                "%d replicas share %d PostgreSQL connections, %d each, but this replica's pools "
                "alone may open %d: raise max_connections or lower QULAB_POOL_SIZE",
                self.replicas_seen,
                self.limit,
                budget.total,
                budget.taken,
            )

    async def recount(self, budget: ConnectionBudget) -> None:
        """Set budget.total to this replica's share among the replicas connected now."""
        assert self.engine is not None
        async with self.engine.connect() as connection:
            await self._read(connection)
        self._set_share(budget)

    async def claim(self, budget: ConnectionBudget) -> bool:
        """True, and recorded, when budget.in_use connections fit beside every live claim."""
        assert self.engine is not None
        async with self.engine.begin() as connection:
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CLAIMS_LOCK_KEY}
            )
            live = await self._read(connection)
            self._set_share(budget)
            claims = (
                await connection.execute(text(f"SELECT replica, connections FROM {REPLICA_TABLE}"))
            ).all()
            gone = [row.replica for row in claims if row.replica not in live]
            if gone:  # replicas that stopped or died: their connections went with them
                await connection.execute(
                    text(f"DELETE FROM {REPLICA_TABLE} WHERE replica = ANY(:gone)"), {"gone": gone}
                )
            others = sum(
                row.connections
                for row in claims
                if row.replica in live and row.replica != self.name
            )
            if others + budget.in_use + self.other_clients > self.limit:
                return False
            await self._record(connection, budget.in_use)
        return True

    async def settle(self, budget: ConnectionBudget) -> None:
        """Record what this replica may have open now (never raises: a claim only overstates)."""
        if self.engine is None:
            return
        try:
            async with self.engine.begin() as connection:
                await self._record(connection, budget.in_use)
        except Exception:
            logger.warning("could not record this replica's connections", exc_info=True)

    async def _record(self, connection: Any, connections: int) -> None:
        await connection.execute(
            text(
                f"INSERT INTO {REPLICA_TABLE} (replica, connections) VALUES (:name, :connections) "
                "ON CONFLICT (replica) DO UPDATE "
                "SET connections = excluded.connections, updated_at = now()"
            ),
            {"name": self.name, "connections": connections},
        )

    async def leave(self) -> None:
        """A clean stop: this replica's row goes (a dead one's goes at the next claim)."""
        if self.engine is None:
            return
        try:
            async with self.engine.begin() as connection:
                await connection.execute(
                    text(f"DELETE FROM {REPLICA_TABLE} WHERE replica = :name"), {"name": self.name}
                )
        except Exception:
            logger.warning("could not remove this replica's connection claims", exc_info=True)
        self.engine = None
