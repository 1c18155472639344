"""SQLite for asyncio without a thread per connection: aiosqlite connections on shared workers.

aiosqlite gives every connection a thread of its own, parked while the connection is idle. A class
of 200 learners, each with a pooled connection and a publisher, is then 200 to 400 threads that
mostly sleep. Here a connection keeps aiosqlite's API and its promise (its operations run one at a
time, in the order they were asked for), but they run on a pool of workers shared by the whole
process. A worker exists only while there is work: the pool starts one when every worker is busy,
and a worker idle for `idle_seconds` ends. So the number of threads follows how many SQLite
operations run *at the same moment*, not how many learners are connected.

Never a deadlock: a SQLite operation can block for the busy timeout while another connection
holds the write lock, and that holder's next operation needs a worker. The pool may grow to
`max_workers`, which SQLAlchemy's dialect is given as the process's connection budget, so every
open connection can always have a worker of its own.

SQLAlchemy takes it through the aiosqlite dialect's `async_creator_fn` connect argument:

    create_async_engine("sqlite+aiosqlite:///file.db", connect_args={"async_creator_fn": connect})
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Optional

import aiosqlite
from aiosqlite.context import contextmanager as aiosqlite_result
from aiosqlite.core import _STOP_RUNNING_SENTINEL, set_exception, set_result

logger = logging.getLogger("qulab")

__all__ = [
    "FetchingCursor",
    "WorkerPool",
    "SharedWorkerConnection",
    "connect",
    "shared_workers",
]


class _Worker:
    """One worker thread's inbox: the pool hands it its next task here."""

    __slots__ = ("inbox",)

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()


class WorkerPool:
    """Threads that run submitted callables.

    A task goes to the worker that went idle last; a new one is started when none is idle (up to
    `max_workers`, beyond which tasks wait in line); a worker idle for `idle_seconds` ends.
    Handing work to the most recently idle worker is what lets the others end: with one shared
    queue, a trickle of work (a lifecycle pass every few seconds) reached every worker in turn,
    and a pool grown by one busy minute never shrank.
    """

    def __init__(
        self, *, max_workers: int, idle_seconds: float = 30.0, name: str = "qulab-sqlite"
    ) -> None:
        self.max_workers = max_workers
        self.idle_seconds = idle_seconds
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # the last one went idle last: it gets the next task
        self._waiting: collections.deque[Callable[[], None]] = collections.deque()
        self._current = threading.local()  # the calling thread's worker, and if it counted idle
        self.threads = 0
        self.peak_threads = 0

    def submit(self, task: Callable[[], None]) -> None:
        """Run `task` on a worker: the last to go idle, a new one if none is, else the next free.

        A task may count its worker idle itself, before it returns (`count_idle_if`).
        """
        with self._lock:
            if self._idle:
                self._idle.pop().inbox.put(task)
                return
            if self.threads >= self.max_workers:
                self._waiting.append(task)
                return
            self.threads += 1
            self.peak_threads = max(self.peak_threads, self.threads)
            worker = _Worker()
            worker.inbox.put(task)
        threading.Thread(
            target=self._work, args=(worker,), name=f"{self.name}-{self.threads}", daemon=True
        ).start()

    def _work(self, worker: _Worker) -> None:
        current = self._current
        current.worker = worker
        while True:
            try:
                task = worker.inbox.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if worker in self._idle:  # no task was handed to it meanwhile: it may go
                        self._idle.remove(worker)
                        self.threads -= 1
                        return
                continue
            current.counted_idle = False
            try:
                task()
            except BaseException:  # noqa: B036 - a worker outlives a task that fails
                logger.exception("a shared SQLite worker's task failed")
            if not current.counted_idle:
                with self._lock:
                    self._went_idle(worker)

    def _went_idle(self, worker: _Worker) -> None:
        # Under the lock: a task waiting in line is this worker's next; else it joins the idle.
        if self._waiting:
            worker.inbox.put(self._waiting.popleft())
        else:
            self._idle.append(worker)

    def count_idle_if(self, finished: Callable[[], bool]) -> bool:
        """If `finished()`, count the calling worker idle at once and return True.

        Both happen under the pool's one lock, so nobody can see the work finished while its worker
        still looks busy, which would start a needless thread. A task handed to it meanwhile waits
        in its inbox until it is done.
        """
        with self._lock:
            if finished():
                self._went_idle(self._current.worker)
                self._current.counted_idle = True
                return True
            return False


class _SerialQueue:
    """Stands in for a connection's aiosqlite queue.

    Its items run one at a time, in order, on the pool.
    """

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        self._items: collections.deque[tuple[Optional[Any], Callable[[], Any]]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._scheduled = False
        self._stopped = False

    def put_nowait(self, item: tuple[Optional[Any], Callable[[], Any]]) -> None:
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self._pool.submit(self._drain)

    def idle(self) -> bool:
        """Nothing queued or running."""
        with self._lock:
            return not self._scheduled

    def _finished(self) -> bool:
        with self._lock:
            if self._items:
                return False
            self._scheduled = False
            return True

    def _drain(self) -> None:
        if self._pool.count_idle_if(self._finished):
            return
        while True:
            with self._lock:
                future, function = self._items.popleft()
                stopped = self._stopped
            outcome: tuple[Callable[..., None], Any]
            if (
                stopped
            ):  # aiosqlite's thread has ended by now: say so instead of leaving the caller waiting
                outcome = (set_exception, ValueError("Connection closed"))
            else:
                try:
                    result = function()
                    if result is _STOP_RUNNING_SENTINEL:
                        with self._lock:
                            self._stopped = True
                    outcome = (set_result, result)
                except BaseException as error:  # noqa: B036 - handed to the caller, as aiosqlite does
                    outcome = (set_exception, error)
            # Count this worker idle *before* the caller hears back: its next operation (on any
            # connection) must find the worker free, not start another thread.
            idle = self._pool.count_idle_if(self._finished)
            if future is not None:
                try:
                    future.get_loop().call_soon_threadsafe(outcome[0], future, outcome[1])
                except RuntimeError:  # its loop has closed: nobody waits for this answer
                    pass
            if idle:
                return


class _NoThread:
    """What aiosqlite and SQLAlchemy expect in `connection._thread` (start, daemon).

    The pool does the work.
    """

    daemon = True

    def start(self) -> None:
        pass


def _execute_and_fetch(cursor: sqlite3.Cursor, sql: str, parameters: Any) -> list[Any]:
    cursor.execute(sql, parameters)
    return cursor.fetchall() if cursor.description is not None else []


class FetchingCursor(aiosqlite.Cursor):
    """An aiosqlite cursor that costs one trip to a worker per statement, not three or four.

    SQLAlchemy's adapter creates a cursor, executes, fetches every row, and closes the cursor,
    each an awaited trip to the connection's worker and back to the loop (about 0.1 ms each on
    this machine, more than a small statement itself). Here a statement is executed and its rows
    fetched in one trip, and neither creating the cursor nor closing it after that needs one: a
    sqlite3 cursor is a Python object, and once its statement has run to the end there is nothing
    to release (sqlite3 has reset it; the cursor is left to the garbage collector). After any
    other use (executemany, executescript) close is queued behind the connection's operations as
    usual, nobody waiting on it. Every row is fetched with the statement, as SQLAlchemy's adapter
    does for all but server-side cursors (`stream()`, `yield_per`), which QuLab does not use.
    """

    _fetched: Optional[collections.deque[Any]] = (
        None  # the executed statement's rows, not yet fetched
    )

    async def execute(self, sql: str, parameters: Any = None) -> FetchingCursor:
        """Run the statement and fetch every row it returns, in one trip to a worker."""
        rows = await self._execute(
            _execute_and_fetch, self._cursor, sql, () if parameters is None else parameters
        )
        self._fetched = collections.deque(rows)
        return self

    async def executemany(self, sql: str, parameters: Any) -> FetchingCursor:
        """As aiosqlite does it (no rows to fetch); close is then queued as usual."""
        self._fetched = None
        await super().executemany(sql, parameters)
        return self

    async def executescript(self, sql_script: str) -> FetchingCursor:
        """As aiosqlite does it; close is then queued as usual."""
        self._fetched = None
        await super().executescript(sql_script)
        return self

    async def fetchone(self) -> Any:
        if self._fetched is None:
            return await super().fetchone()
        return self._fetched.popleft() if self._fetched else None

    async def fetchmany(self, size: Optional[int] = None) -> list[Any]:
        if self._fetched is None:
            return list(await super().fetchmany(size))
        count = min(self.arraysize if size is None else size, len(self._fetched))
        return [self._fetched.popleft() for _ in range(count)]

    async def fetchall(self) -> list[Any]:
        if self._fetched is None:
            return list(await super().fetchall())
        rows, self._fetched = list(self._fetched), collections.deque()
        return rows

    async def close(self) -> None:
        """Nothing to do after execute(): its statement ran to the end. Else queued, not awaited."""
        if self._fetched is not None:
            self._fetched = collections.deque()
            return
        connection = self._conn
        if connection._running and connection._connection is not None:
            connection._tx.put_nowait((None, self._cursor.close))


class SharedWorkerConnection(aiosqlite.Connection):
    """An aiosqlite connection whose operations run on a shared WorkerPool, not its own thread.

    The cursors its cursor() makes (SQLAlchemy's way in) are FetchingCursors, and a commit or
    rollback with no transaction open (a read, or a connection in autocommit) and nothing queued
    returns at once: sqlite3 would do nothing with it anyway.
    """

    def __init__(
        self, connector: Callable[[], sqlite3.Connection], iter_chunk_size: int, pool: WorkerPool
    ) -> None:
        super().__init__(connector, iter_chunk_size)
        self._tx = _SerialQueue(pool)  # type: ignore[assignment]
        self._thread = _NoThread()  # type: ignore[assignment]

    @aiosqlite_result  # awaitable and an async context manager, as aiosqlite's own
    async def cursor(self) -> FetchingCursor:
        """A cursor, made here: creating a sqlite3 cursor makes no SQLite call."""
        if not self._running or self._connection is None:
            raise ValueError("Connection closed")
        return FetchingCursor(self, self._connection.cursor())

    def _nothing_to_end(self) -> bool:
        # No transaction open and nothing queued that could open one (an operation whose caller
        # stopped waiting still runs): then sqlite3's commit or rollback would do nothing.
        connection = self._connection
        return (
            self._running
            and connection is not None
            and self._tx.idle()  # type: ignore[attr-defined]
            and not connection.in_transaction
        )

    async def commit(self) -> None:
        if not self._nothing_to_end():
            await super().commit()

    async def rollback(self) -> None:
        if not self._nothing_to_end():
            await super().rollback()


_pool_lock = threading.Lock()
_pool: Optional[WorkerPool] = None


def shared_workers(*, max_workers: Optional[int] = None) -> WorkerPool:
    """The process's pool; `max_workers` (the connection budget) can only raise its limit."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool(max_workers=max_workers or 64)
        elif max_workers is not None and max_workers > _pool.max_workers:
            _pool.max_workers = max_workers
        return _pool


def connect(
    database: Any, *, iter_chunk_size: int = 64, max_workers: Optional[int] = None, **kwargs: Any
) -> SharedWorkerConnection:
    """Like aiosqlite.connect, but not bound to one thread.

    The sqlite3 connection moves between workers.
    """
    kwargs["check_same_thread"] = (
        False  # safe: the serial queue never lets two workers use it at once
    )
    connector = functools.partial(sqlite3.connect, database, **kwargs)
    return SharedWorkerConnection(
        connector, iter_chunk_size, shared_workers(max_workers=max_workers)
    )
