"""Statement log: counts exactly what ran, and only what this task ran."""

import asyncio

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from classroom.statements import _STARTED_AT_KEY, capture_statements
from source import User, get_session


async def test_every_statement_is_recorded_in_order_with_its_duration(sandbox):
    with capture_statements() as log:
        async with get_session(sandbox) as session:
            session.add(User(email="a@example.com", name="A"))
            await session.flush()
            await session.execute(select(User))
    assert log.count == 2
    assert log.sql()[0].startswith("INSERT INTO") and log.sql()[1].startswith("SELECT")
    assert all(statement.duration_ms >= 0 for statement in log.statements)


async def test_statements_outside_the_block_are_not_recorded(sandbox):
    with capture_statements() as log:
        pass
    async with get_session(sandbox) as session:
        await session.execute(select(User))
    assert log.count == 0


async def test_concurrent_tasks_do_not_see_each_others_statements(sandbox):
    async def run_queries(count: int) -> int:
        with capture_statements() as log:
            for _ in range(count):
                async with get_session(sandbox) as session:
                    await session.execute(select(User))
                await asyncio.sleep(0)
        return log.count

    assert await asyncio.gather(run_queries(3), run_queries(7)) == [3, 7]


async def test_nested_logs_both_record(sandbox):
    with capture_statements() as outer:
        async with get_session(sandbox) as session:
            await session.execute(select(User))
            with capture_statements() as inner:
                await session.execute(select(User))
    assert (outer.count, inner.count) == (2, 1)


async def test_a_failed_statement_does_not_corrupt_timing(sandbox):
    """A statement that raises never reaches after_cursor_execute, so its start time must be dropped
    (the handle_error listener): otherwise every failure leaves a stale start time on the pooled
    connection, and the stack that pairs each statement with its own start grows for ever."""
    with capture_statements() as log:
        async with sandbox.engine.connect() as connection:
            started_at = connection.sync_connection.info
            for _ in range(3):
                with pytest.raises(DBAPIError):  # "no such table" / "relation does not exist"
                    await connection.execute(text("SELECT * FROM no_such_table"))
                await connection.rollback()
                assert started_at.get(_STARTED_AT_KEY) == []  # nothing left behind by the failure
            await connection.execute(select(User))
            assert started_at.get(_STARTED_AT_KEY) == []
    # the failures are not counted as run
    assert log.count == 1 and log.sql()[0].startswith("SELECT")
