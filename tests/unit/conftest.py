"""The unit tier: the lesson (source.py) alone, on a temporary SQLite file and fakeredis.

No runtime, no sandbox registry, no Streamlit and no server: what a learner would run at a Python
prompt with source.LocalSandbox. These fixtures replace the root conftest's platform sandboxes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from sqlalchemy import event

import source


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[source.LocalSandbox]:
    """A LocalSandbox: a SQLite file in WAL mode with foreign keys on, and its own fakeredis."""
    engine = source.create_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'lesson.sqlite3'}", pool_size=2, pre_ping=False
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()

    redis = source.RedisNamespace(fakeredis.FakeAsyncRedis(decode_responses=True), "lesson:")
    local = source.LocalSandbox(engine, redis)
    await source.create_tables(local)
    try:
        yield local
    finally:
        await engine.dispose()
        await redis.client.aclose()


@pytest.fixture
async def sandbox_with_users(sandbox: source.LocalSandbox) -> source.LocalSandbox:
    """The LocalSandbox with the two sample users."""
    await source.init_db(sandbox)
    return sandbox


class StatementCounter:
    """Counts the statements an engine sends (before_cursor_execute, as SQLAlchemy's FAQ does)."""

    def __init__(self, engine: Any) -> None:
        self.statements: list[str] = []
        event.listen(engine.sync_engine, "before_cursor_execute", self._count)

    def _count(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    def reset(self) -> None:
        """Forget what was counted."""
        self.statements.clear()


@pytest.fixture
def statements(sandbox: source.LocalSandbox) -> StatementCounter:
    """Every statement the sandbox's engine sends from now on."""
    return StatementCounter(sandbox.engine)
