"""Engine and sessions: the unit of work, and concurrent writers that never lose a row."""

import asyncio

import pytest
from sqlalchemy import func, select

import source
from classroom.engines import (
    SQLITE_WAL_LIMIT_BYTES,
    CommittedChanges,
    engine_connection_limit,
    engine_pre_pings,
)
from source import User, get_session


async def _user_count(sandbox) -> int:
    async with get_session(sandbox) as session:
        return await session.scalar(select(func.count()).select_from(User))


async def test_get_session_commits_when_the_block_succeeds(sandbox):
    async with get_session(sandbox) as session:
        session.add(User(email="a@example.com", name="A"))
    assert await _user_count(sandbox) == 1


async def test_get_session_rolls_back_when_the_block_raises(sandbox):
    with pytest.raises(RuntimeError, match="boom"):
        async with get_session(sandbox) as session:
            session.add(User(email="a@example.com", name="A"))
            await session.flush()  # the row reached the database inside the transaction
            raise RuntimeError("boom")
    assert await _user_count(sandbox) == 0


async def test_get_session_returns_its_connection_to_the_pool(sandbox):
    with pytest.raises(RuntimeError):
        async with get_session(sandbox) as session:
            await session.execute(select(1))
            assert source.pool_status(sandbox.engine)["checkedout"] == 1
            raise RuntimeError
    assert source.pool_status(sandbox.engine)["checkedout"] == 0


async def test_twenty_concurrent_two_insert_transactions_keep_all_forty_rows(sandbox):
    async def transaction(number: int) -> None:
        async with get_session(sandbox) as session:
            session.add(User(email=f"first{number}@example.com", name="First"))
            await session.flush()
            await asyncio.sleep(0)  # let the other transactions interleave
            session.add(User(email=f"second{number}@example.com", name="Second"))

    results = await asyncio.gather(
        *(transaction(number) for number in range(20)), return_exceptions=True
    )
    assert [result for result in results if result is not None] == []
    assert await _user_count(sandbox) == 40


async def test_commit_listeners_hear_committed_changes_only(sandbox):
    heard: list[CommittedChanges] = []

    async def listener(changes: CommittedChanges) -> None:
        heard.append(changes)

    sandbox.commit_listeners.append(listener)
    with pytest.raises(RuntimeError):
        async with get_session(sandbox) as session:
            session.add(User(email="rolled@example.com", name="Rolled Back"))
            await session.flush()
            raise RuntimeError
    assert heard == []
    async with get_session(sandbox) as session:
        session.add(User(email="kept@example.com", name="Kept"))
    assert [user.email for user in heard[0].of_type(User)] == ["kept@example.com"]


async def test_a_failing_commit_listener_does_not_undo_the_commit(sandbox):
    async def broken_listener(changes):
        raise RuntimeError("listener failed")

    sandbox.commit_listeners.append(broken_listener)
    async with get_session(sandbox) as session:
        session.add(User(email="a@example.com", name="A"))
    assert await _user_count(sandbox) == 1


async def test_sqlite_sandboxes_use_wal_and_enforce_foreign_keys(sandbox):
    if sandbox.backend != "sqlite":
        pytest.skip("SQLite pragmas only apply to the SQLite backend")
    async with sandbox.engine.connect() as connection:
        assert (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
        assert (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
        assert (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar() > 0
        assert (
            await connection.exec_driver_sql("PRAGMA journal_size_limit")
        ).scalar() == SQLITE_WAL_LIMIT_BYTES


async def test_engines_use_a_real_queue_pool_with_the_configured_size(sandbox, settings):
    status = source.pool_status(sandbox.engine)
    assert status["pool_class"] == "AsyncAdaptedQueuePool"
    if sandbox.backend == "sqlite":  # one learner's file: a small pool, no pre-ping
        assert status["size"] == settings.sqlite_pool_size
        assert (
            engine_connection_limit(sandbox.engine)
            == settings.sqlite_pool_size + settings.sqlite_max_overflow
        )
        assert not engine_pre_pings(sandbox.engine)
    else:  # the shared PostgreSQL pool, pre-pinged: server restarts do kill connections
        assert status["size"] == settings.pool_size
        assert engine_pre_pings(sandbox.engine)
