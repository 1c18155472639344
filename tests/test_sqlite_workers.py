"""classroom.sqlite: aiosqlite connections on a shared pool of workers, not a thread each.

Real SQLite files and real threads throughout: what is counted is the pool's threads, the rows in
the file, and the order they were written in.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

import classroom.sqlite
import source
from classroom.cache.link import RedisService
from classroom.outbox.status import outbox_status
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import new_sandbox_id


def wait_for(condition, *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition still false"
        time.sleep(0.01)


async def until(condition, *, timeout: float = 10.0) -> None:
    """Wait on the event loop until condition() holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition still false"
        await asyncio.sleep(0.01)


async def open_connection(
    pool: classroom.sqlite.WorkerPool, path: Path, *, on_statement=None, **kwargs
) -> classroom.sqlite.SharedWorkerConnection:
    """A connection on the pool; `on_statement(sql)` runs on its worker as each statement starts."""

    def connect() -> sqlite3.Connection:
        raw = sqlite3.connect(path, check_same_thread=False, **kwargs)
        if on_statement is not None:
            raw.set_trace_callback(on_statement)
        return raw

    return await classroom.sqlite.SharedWorkerConnection(connect, 64, pool)


async def test_forty_open_connections_used_one_after_another_need_one_worker(tmp_path: Path):
    pool = classroom.sqlite.WorkerPool(max_workers=100, idle_seconds=30)
    before = threading.active_count()
    connections = [await open_connection(pool, tmp_path / f"learner{n}.db") for n in range(40)]
    for connection in connections:
        await connection.execute("CREATE TABLE notes (n INTEGER)")
        await connection.execute("INSERT INTO notes VALUES (1)")
        await connection.commit()
    # With aiosqlite alone it would be 40 threads.
    assert pool.peak_threads == 1 and threading.active_count() - before == 1
    for connection in connections:
        await connection.close()


async def test_a_connections_operations_run_in_the_order_they_were_asked_for(tmp_path: Path):
    pool = classroom.sqlite.WorkerPool(max_workers=8, idle_seconds=30)
    connection = await open_connection(pool, tmp_path / "order.db")
    await connection.execute("CREATE TABLE written (n INTEGER)")
    await asyncio.gather(
        *(connection.execute("INSERT INTO written VALUES (?)", (n,)) for n in range(300))
    )
    await connection.commit()
    async with connection.execute("SELECT n FROM written ORDER BY rowid") as cursor:
        assert [n for (n,) in await cursor.fetchall()] == list(range(300))
    await connection.close()


async def test_writers_waiting_on_the_lock_never_starve_its_holder_of_a_worker(tmp_path: Path):
    """Three connections, three workers at most: the holder's COMMIT runs while two others wait."""
    pool = classroom.sqlite.WorkerPool(max_workers=3, idle_seconds=30)
    path = tmp_path / "locked.db"
    holder = await open_connection(pool, path, timeout=20)
    began = [threading.Event() for _ in range(2)]  # set on a waiter's worker as its BEGIN starts

    def beginning(flag: threading.Event):
        return lambda sql: flag.set() if sql == "BEGIN IMMEDIATE" else None

    waiters = [
        await open_connection(pool, path, timeout=20, on_statement=beginning(flag))
        for flag in began
    ]
    await holder.execute("PRAGMA journal_mode=WAL")
    await holder.execute("CREATE TABLE written (who TEXT)")
    await holder.commit()
    await holder.execute("BEGIN IMMEDIATE")
    await holder.execute("INSERT INTO written VALUES ('holder')")

    async def write(connection, who: str) -> None:
        await connection.execute("BEGIN IMMEDIATE")  # waits in SQLite's busy handler, on a worker
        await connection.execute("INSERT INTO written VALUES (?)", (who,))
        await connection.commit()

    waiting = [
        asyncio.create_task(write(connection, f"waiter{n}")) for n, connection in enumerate(waiters)
    ]
    # Both waiters' BEGIN IMMEDIATE run now, each holding a worker while it waits for the lock.
    await until(lambda: all(flag.is_set() for flag in began))
    started = time.monotonic()
    await holder.commit()
    await asyncio.gather(*waiting)
    assert time.monotonic() - started < 10  # not the 20 s busy timeout: nobody starved
    async with holder.execute("SELECT who FROM written ORDER BY who") as cursor:
        assert [who for (who,) in await cursor.fetchall()] == ["holder", "waiter0", "waiter1"]
    for connection in (holder, *waiters):
        await connection.close()


async def test_idle_workers_end_and_come_back_when_work_does(tmp_path: Path):
    pool = classroom.sqlite.WorkerPool(max_workers=8, idle_seconds=0.05)
    connections = [await open_connection(pool, tmp_path / f"burst{n}.db") for n in range(4)]
    await asyncio.gather(*(connection.execute("SELECT 1") for connection in connections))
    assert pool.threads >= 1
    await asyncio.to_thread(wait_for, lambda: pool.threads == 0)
    async with connections[0].execute("SELECT 41 + 1") as cursor:
        assert await cursor.fetchone() == (42,)
    for connection in connections:
        await connection.close()
    await asyncio.to_thread(wait_for, lambda: pool.threads == 0)


def test_a_pool_grown_by_a_burst_shrinks_back_under_a_trickle_of_work():
    """Four workers after a burst; then one small task every 20 ms for longer than the idle
    time: the most recently idle worker takes each, so the three others end."""
    pool = classroom.sqlite.WorkerPool(max_workers=8, idle_seconds=0.3)
    release, started = threading.Event(), threading.Semaphore(0)

    def blocking() -> None:
        started.release()
        release.wait(5)

    for _ in range(4):
        pool.submit(blocking)
    for _ in range(4):
        assert started.acquire(timeout=5)
    assert pool.threads == 4
    release.set()
    ran = []
    deadline = time.monotonic() + 10
    while pool.threads > 1:
        assert time.monotonic() < deadline, f"{pool.threads} workers still alive"
        pool.submit(lambda: ran.append(1))
        time.sleep(0.02)  # the trickle itself, not a wait for a result
    assert ran and pool.threads == 1


def test_a_worker_outlives_a_task_that_fails():
    """One worker: a task that raises must not take it down (the next task would wait forever)."""
    pool = classroom.sqlite.WorkerPool(max_workers=1, idle_seconds=30)
    ran = threading.Event()
    pool.submit(lambda: 1 / 0)
    pool.submit(ran.set)
    assert ran.wait(5)
    assert pool.threads == 1


async def test_an_operation_after_close_fails_instead_of_hanging(tmp_path: Path):
    pool = classroom.sqlite.WorkerPool(max_workers=2, idle_seconds=30)
    connection = await open_connection(pool, tmp_path / "closed.db")
    await connection.close()
    with pytest.raises(ValueError, match="no active connection"):  # aiosqlite's own check
        await asyncio.wait_for(connection.execute("SELECT 1"), 5)
    # One queued behind the stop (a close racing a query).
    late = asyncio.get_running_loop().create_future()
    connection._tx.put_nowait((late, lambda: "ran after the stop"))
    with pytest.raises(ValueError, match="Connection closed"):
        await asyncio.wait_for(late, 5)


async def test_sandbox_engines_use_the_shared_workers(registry):
    """Twenty awake SQLite sandboxes, used in turn, add no thread per sandbox."""
    if registry.backend != "sqlite":
        pytest.skip("SQLite sandboxes only")
    classroom.sqlite.shared_workers()
    sandboxes = [await registry.acquire(new_sandbox_id()) for _ in range(20)]
    before = threading.active_count()
    for sandbox in sandboxes:
        async with sandbox.engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar() == 1
    async with sandboxes[0].engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        assert isinstance(driver, classroom.sqlite.SharedWorkerConnection)
    assert threading.active_count() - before <= 1  # aiosqlite alone: a thread per sandbox, 20 here


async def test_a_statement_one_sandbox_compiled_is_not_compiled_again_for_another(registry):
    """Each SQLite sandbox has its own engine; the SQL they run is compiled once per process."""
    if registry.backend != "sqlite":
        pytest.skip("SQLite sandboxes only (PostgreSQL sandboxes share one engine)")
    first = await registry.acquire(new_sandbox_id())
    second = await registry.acquire(new_sandbox_id())

    async def compile_misses(sandbox: source.Sandbox) -> int:
        misses = []

        def record(conn, cursor, statement, parameters, context, executemany) -> None:
            misses.append(context.cache_hit == context.dialect.CACHE_MISS)

        event.listen(sandbox.engine.sync_engine, "before_cursor_execute", record)
        try:
            await source.init_db(sandbox, reset=True)
            await source.list_users(sandbox)
            await outbox_status(sandbox, limit=10)
        finally:
            event.remove(sandbox.engine.sync_engine, "before_cursor_execute", record)
        assert len(misses) > 10
        return sum(misses)

    await compile_misses(first)  # compiles whatever this process had not compiled yet
    assert await compile_misses(second) == 0
    shared = first.engine.sync_engine.dialect
    assert second.engine.sync_engine.dialect is shared
    # Its dialect-level listener is there once, not once per sandbox: an error runs it once.
    assert len(shared.dispatch.handle_error) == 1


class CountingPool(classroom.sqlite.WorkerPool):
    """A worker pool that counts the trips connections make to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=8, idle_seconds=30)
        self.trips = 0

    def submit(self, task) -> None:
        self.trips += 1
        super().submit(task)


async def test_a_statement_through_sqlalchemy_is_one_trip_to_a_worker(tmp_path: Path):
    """Executing, fetching the rows and closing the cursor: one trip, not four (cursor, execute,
    fetchall, close, each awaited by the loop); a commit or rollback with nothing open: none."""
    pool = CountingPool()

    def connect(*args, **kwargs):
        return classroom.sqlite.SharedWorkerConnection(
            lambda: sqlite3.connect(tmp_path / "trips.db", check_same_thread=False), 64, pool
        )

    engine = create_async_engine("sqlite+aiosqlite://", connect_args={"async_creator_fn": connect})
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE notes (n INTEGER)"))
        await connection.execute(text("INSERT INTO notes VALUES (1), (2), (3)"))
    async with engine.connect() as connection:
        before = pool.trips
        rows = (await connection.execute(text("SELECT n FROM notes ORDER BY n"))).all()
        assert [n for (n,) in rows] == [1, 2, 3]
        assert pool.trips - before == 1
        updated = await connection.execute(text("UPDATE notes SET n = n + 10 WHERE n > 1"))
        assert updated.rowcount == 2 and pool.trips - before == 2
        await connection.commit()  # the UPDATE opened a transaction: the commit is a trip
        assert pool.trips - before == 3
        await connection.execute(text("SELECT count(*) FROM notes"))
        await connection.rollback()  # a read opens no transaction: nothing to roll back
        assert pool.trips - before == 4
    async with engine.connect() as connection:
        rows = (await connection.execute(text("SELECT n FROM notes ORDER BY n"))).all()
        assert [n for (n,) in rows] == [1, 12, 13]  # the commit was real
    await engine.dispose()


async def test_a_class_leaving_at_once_sleeps_without_a_burst_of_sqlite_workers(settings):
    """Thirty learners close their tabs together: one sweep sends every sandbox to sleep, and
    their checkpoints and closes take turns instead of each starting a shared worker thread."""
    if settings.database_url:
        pytest.skip("SQLite sandboxes only: PostgreSQL sandboxes share one engine")
    redis_service = await RedisService.connect(settings)
    registry = SandboxRegistry(replace(settings, sandbox_grace_seconds=0), redis_service)
    try:
        sandboxes = [await registry.acquire(new_sandbox_id(), holder=f"tab {n}") for n in range(30)]
        for sandbox in sandboxes:
            await source.init_db(sandbox, reset=True)
        pool = classroom.sqlite.shared_workers()
        threads_before = pool.threads
        pool.peak_threads = pool.threads  # count from here
        for n in range(30):
            registry.release_holder(f"tab {n}")
        assert len((await registry.sweep())["dormant"]) == 30
        assert all(not sandbox.awake for sandbox in sandboxes)
        assert pool.peak_threads - threads_before <= 3, pool.peak_threads
        woken = await registry.acquire(sandboxes[0].id, holder="back")  # data kept
        assert len(await source.list_users(woken)) == 2
    finally:
        await registry.close()
        await redis_service.close()
