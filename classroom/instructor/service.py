"""The instructor's service: the class store, the roster and the board, started and closed with
the runtime (Runtime.instructor)."""

from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta

from sqlalchemy import delete

from classroom.config import Settings
from classroom.errors import BackendUnavailableError
from classroom.instructor.broadcast import ClassBoard
from classroom.instructor.roster import HEARTBEAT_SECONDS, ClassRoster, utc_now
from classroom.instructor.store import ClassStore
from classroom.sandboxes.registry import SandboxRegistry
from classroom.statements import statements_hidden

logger = logging.getLogger("qulab")
# A server row nobody refreshed for this long belongs to a process that is gone.
FORGET_SERVERS_AFTER = timedelta(hours=6)


class InstructorService:
    """The class roster, its store and the board of one process (call start and close on the
    runtime's loop)."""

    def __init__(
        self,
        settings: Settings,
        registry: SandboxRegistry,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = ClassStore(settings, registry.target, registry.budget)
        self.server_id = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"[:64]
        self.roster = ClassRoster(
            self.store, registry, server_id=self.server_id, heartbeat_seconds=heartbeat_seconds
        )
        self.board = ClassBoard(self.store)
        self.store.opened_listeners += [self._server_joins, self.roster.write_everything]

    async def start(self) -> None:
        """Listen to the sandboxes, start beating, open the store (if its database does not
        answer yet, learners carry on: it is tried again on the next use)."""
        self.roster.attach()
        self.roster.start_heartbeat()
        try:
            await self.store.ready()
        except BackendUnavailableError:
            pass  # logged by the store; the class is written once it opens

    async def _server_joins(self) -> None:
        """This server's row, and server rows of processes gone for hours dropped."""
        now = utc_now()
        servers = self.store.tables.servers
        assert self.store.engine is not None
        with statements_hidden():
            async with self.store.engine.begin() as connection:
                await connection.execute(
                    delete(servers).where(servers.c.heartbeat_at < now - FORGET_SERVERS_AFTER)
                )
                await connection.execute(self.roster.server_row(now, started_at=now))

    async def close(self) -> None:
        """Write what is pending, take this server's row away, close the store."""
        try:
            await self.roster.stop()
            if self.store.engine is not None:
                servers = self.store.tables.servers
                with statements_hidden():
                    async with self.store.engine.begin() as connection:
                        await connection.execute(
                            delete(servers).where(servers.c.server_id == self.server_id)
                        )
        except Exception:
            logger.warning("could not take this server off the class roster", exc_info=True)
        finally:
            await self.store.close()
