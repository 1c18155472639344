"""One learner's sandbox: a database of its own (a SQLite file or a PostgreSQL schema), an engine
view on it, and a namespace in Redis. It is what the lesson calls a Sandbox (source.Sandbox).

Listeners let the rest of the platform react to its life: commit (what a transaction changed),
reset (emptied), dormant (stop background work and flush: the engine is about to go), wake
(awake again), release (its data is about to be deleted), and state (active, idle, dormant:
told at once, synchronously, on every change; the class roster notes it).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import source
from classroom.cache.link import RedisLink
from classroom.config import Settings
from classroom.engines import CommittedChanges, SandboxSession

if TYPE_CHECKING:
    from classroom.budget import ConnectionBudget

logger = logging.getLogger("qulab")
T = TypeVar("T")

# Always used with fullmatch: `$` alone also matches before a trailing newline ("abcdefgh\n").
SANDBOX_ID_PATTERN = re.compile(r"[a-z0-9]{8,32}")
# PostgreSQL sandboxes are schemas named qulab_<sandbox id>.
SANDBOX_SCHEMA_PATTERN = re.compile(r"qulab_[a-z0-9]{8,32}")
# The states of a sandbox. Active: a browser session or a Python holder has it open; it is never
# released to make room. Idle: awake, nobody holds it; after the grace period it goes dormant.
# Dormant: engine, pool and background tasks freed; its data (SQLite file, PostgreSQL schema,
# Redis keys) kept, and the next use wakes it. Deleted after the idle limit.
SANDBOX_ACTIVE, SANDBOX_IDLE, SANDBOX_DORMANT = "active", "idle", "dormant"
CommitListener = Callable[[CommittedChanges], Awaitable[None]]
SandboxListener = Callable[["Sandbox"], Awaitable[None]]
StateListener = Callable[["Sandbox"], None]


def new_sandbox_id() -> str:
    """A fresh random sandbox id (also a valid PostgreSQL schema suffix and Redis key part)."""
    return secrets.token_hex(8)


def quoted_schema(schema: str) -> str:
    """A sandbox schema name, checked against the issued form and quoted, for raw DDL."""
    if not SANDBOX_SCHEMA_PATTERN.fullmatch(schema):
        raise source.ValidationError("Malformed sandbox schema name.", field="sandbox_id")
    return f'"{schema}"'


@dataclass(eq=False)
class Sandbox:
    """One learner's private world: a database (file or schema), engine view, Redis namespace.

    Listeners let other parts react to its life: commit (what changed), reset (emptied),
    dormant (stop background work and flush: the engine is about to go), wake (awake again),
    release (data about to be deleted).
    """

    id: str
    backend: str  # "sqlite" or "postgresql"
    redis: RedisLink
    settings: Settings
    location: str  # the SQLite file, or the PostgreSQL schema
    open_engine: Callable[[], AsyncEngine]  # builds the engine (view) when the sandbox wakes
    # SQLite sandboxes own their engine and pool; PostgreSQL ones share the store's
    owns_engine: bool
    state: str = SANDBOX_IDLE
    holders: set[str] = field(default_factory=set)  # browser sessions and Labs that have it open
    operations_in_flight: int = 0
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    unheld_since: float = field(default_factory=time.monotonic)
    commit_listeners: list[CommitListener] = field(default_factory=list)
    reset_listeners: list[SandboxListener] = field(default_factory=list)
    dormant_listeners: list[SandboxListener] = field(default_factory=list)
    wake_listeners: list[SandboxListener] = field(default_factory=list)
    release_listeners: list[SandboxListener] = field(default_factory=list)
    state_listeners: list[StateListener] = field(default_factory=list)
    services: dict[str, Any] = field(default_factory=dict)
    notice: Optional[str] = None  # set when this id had a sandbox before that was released
    lease_renewed_at: float = field(default_factory=time.monotonic)  # PostgreSQL: last lease write
    # the process's; experiments reserve from it
    connection_budget: Optional[ConnectionBudget] = None
    # the flush and close of a sleep in progress
    going_dormant: Optional[asyncio.Task[None]] = None
    # bumped by every journal write in this process
    journal_generation: int = 0
    # SQLite: the journal lines this process wrote since progress was last read
    journal_written: list[Any] = field(default_factory=list)
    # bumped by every commit in this process that deleted rows: what "rows gone" depends on
    deletion_generation: int = 0
    # SQLite: the progress last read (classroom.progress.steps.ProgressReading), None to read anew
    progress_read: Any = None
    _engine: Optional[AsyncEngine] = None
    _session_factory: Optional[async_sessionmaker[AsyncSession]] = None

    @property
    def engine(self) -> AsyncEngine:
        """This sandbox's engine; a dormant sandbox builds it again.

        It logs that too: a wake hook was missed.
        """
        if self._engine is None:
            if self.state == SANDBOX_DORMANT:
                logger.warning("sandbox %s used while dormant; reopening its engine", self.id)
            self._engine = self.open_engine()
            self._session_factory = None
        return self._engine

    @property
    def session_factory(self) -> async_sessionmaker[AsyncSession]:
        """SandboxSessions on this sandbox's engine: each commit reaches after_commit."""
        if self._session_factory is None or self._engine is None:
            self._session_factory = source.new_session_factory(
                self.engine, session_class=SandboxSession, info={"on_commit": self.after_commit}
            )
        return self._session_factory

    @property
    def awake(self) -> bool:
        """True unless dormant."""
        return self.state != SANDBOX_DORMANT

    def change_state(self, state: str) -> None:
        """Active, idle or dormant; the state listeners hear of a change (and only of a change)."""
        if state == self.state:
            return
        self.state = state
        for listener in list(self.state_listeners):
            try:
                listener(self)
            except Exception:  # the change stands whatever a listener does
                logger.exception("state listener failed in sandbox %s", self.id)

    def touch(self) -> None:
        """Mark the sandbox as in use now (idle time counts from here)."""
        self.last_used = time.monotonic()

    def service(self, name: str, factory: Callable[[Sandbox], T]) -> T:
        """A per-sandbox helper (cache, publisher, …), created on first use."""
        if name not in self.services:
            self.services[name] = factory(self)
        return self.services[name]

    async def notify_committed(self, changes: CommittedChanges) -> None:
        """Tell listeners what a committed transaction changed.

        A failing listener is logged, not raised.
        """
        for listener in list(self.commit_listeners):
            try:
                await listener(changes)
            except Exception:  # the commit stands whatever a listener does
                logger.exception("commit listener failed in sandbox %s", self.id)

    async def notify(self, listeners: list[SandboxListener], what: str) -> None:
        """Call lifecycle listeners in order; one that fails is logged and the rest still run."""
        for listener in list(listeners):
            try:
                await listener(self)
            except Exception:
                logger.exception("%s listener failed in sandbox %s", what, self.id)

    async def close_engine(self) -> None:
        """Dispose the engine this sandbox owns; a view is just dropped.

        Disposing it ends its connections and driver threads.
        """
        engine, self._engine, self._session_factory = self._engine, None, None
        if engine is not None and self.owns_engine:
            await engine.dispose()

    async def after_commit(self, changes: CommittedChanges) -> None:
        """What SandboxSession calls once a transaction committed: tell the commit listeners."""
        if changes.deleted or changes.bulk_tables:
            self.deletion_generation += 1
        await self.notify_committed(changes)
