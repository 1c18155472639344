"""PostgreSQL LISTEN/NOTIFY: a commit in any process wakes the publishers of its sandbox at once.

Without it a publisher only hears about commits made in its own process, and one made by another
replica waits for the publisher's idle wait. A statement trigger on each sandbox's domain_events
table calls pg_notify('qulab_outbox', <schema>) (delivered when the transaction commits, never for
a rolled-back one), and each process keeps ONE listening connection for all its sandboxes.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any, Optional

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import URL

logger = logging.getLogger("qulab")

CHANNEL = "qulab_outbox"
RECONNECT_MAX_SECONDS = 30.0


def notify_trigger_statements(schema: str) -> list[str]:
    """DDL for a sandbox schema: a trigger that announces inserted events once they commit."""
    quoted = '"' + schema.replace('"', '""') + '"'
    return [
        f"CREATE OR REPLACE FUNCTION {quoted}.qulab_outbox_notify() "
        "RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_notify('{CHANNEL}', TG_TABLE_SCHEMA); RETURN NULL; END $$",
        f"CREATE OR REPLACE TRIGGER qulab_outbox_notify AFTER INSERT ON {quoted}.domain_events "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {quoted}.qulab_outbox_notify()",
    ]


async def install_notify_trigger(engine: Any, schema: str) -> None:
    """Create (or replace) the trigger in one sandbox schema; idempotent."""
    async with engine.begin() as connection:
        for statement in notify_trigger_statements(schema):
            await connection.execute(text(statement))


class CommitNotifications:
    """One LISTEN connection per process and database, shared by the schemas it serves.

    It routes each notification to its schema's wake-ups. The connection opens with the first
    subscriber and closes with the last, so a process whose publishers are all stopped holds none.
    If it drops, it reconnects with backoff and wakes everyone once (a notification may have been
    missed meanwhile).
    """

    def __init__(self, dsn: str, budget: Any = None) -> None:
        self.dsn = dsn
        self.budget = (
            budget  # the process's ConnectionBudget: the listening connection counts in it
        )
        self._holds_budget = False
        self._subscribers: dict[str, set[Callable[[], None]]] = {}
        self._connection: Optional[asyncpg.Connection] = None
        self._lock = asyncio.Lock()
        self._reconnecting: Optional[asyncio.Task[None]] = None
        self.received = 0

    @property
    def connected(self) -> bool:
        """True while the listening connection is open."""
        return self._connection is not None and not self._connection.is_closed()

    async def subscribe(self, schema: str, wake: Callable[[], None]) -> None:
        """Call wake() whenever a transaction that inserted events into this schema commits."""
        self._subscribers.setdefault(schema, set()).add(wake)
        async with self._lock:
            if not self.connected:
                await self._connect()

    async def unsubscribe(self, schema: str, wake: Callable[[], None]) -> None:
        """Stop waking this callback; the last one out closes the connection."""
        wakes = self._subscribers.get(schema)
        if wakes is not None:
            wakes.discard(wake)
            if not wakes:
                del self._subscribers[schema]
        if not self._subscribers:
            async with self._lock:
                await self._close()

    async def _connect(self) -> None:
        connection = await asyncpg.connect(self.dsn, timeout=5)
        await connection.add_listener(CHANNEL, self._on_notification)
        connection.add_termination_listener(self._on_connection_lost)
        self._connection = connection
        if self.budget is not None and not self._holds_budget:
            self.budget.take(1)
            self._holds_budget = True

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            self._reconnecting = None
        if connection is not None and not connection.is_closed():
            await connection.close(timeout=5)
        if self._holds_budget:
            self._holds_budget = False
            await self.budget.give_back(1)

    def _on_notification(self, connection: Any, pid: int, channel: str, schema: str) -> None:
        self.received += 1
        for wake in list(self._subscribers.get(schema, ())):
            wake()

    def _on_connection_lost(self, connection: Any) -> None:
        if connection is self._connection and self._subscribers and self._reconnecting is None:
            self._connection = None
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.5
        try:
            while self._subscribers:
                try:
                    async with self._lock:
                        await self._connect()
                except (TimeoutError, OSError, asyncpg.PostgresError) as error:
                    logger.warning(
                        "outbox LISTEN connection lost (%s); retrying in %.1f s", error, delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(RECONNECT_MAX_SECONDS, delay * 2)
                    continue
                for wakes in list(self._subscribers.values()):
                    for wake in list(wakes):
                        wake()  # a commit may have been announced while nobody listened
                return
        finally:
            self._reconnecting = None


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, CommitNotifications]] = (
    weakref.WeakKeyDictionary()
)


def commit_notifications(url: URL, budget: Any = None) -> CommitNotifications:
    """This process's listener for one database (per event loop: connections belong to their loop).

    `budget` (the process's ConnectionBudget) is charged one connection while the listener is open.
    """
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    per_loop = _by_loop.setdefault(asyncio.get_running_loop(), {})
    if dsn not in per_loop:
        per_loop[dsn] = CommitNotifications(dsn, budget)
    return per_loop[dsn]
