"""The runtime: one background thread running one event loop, owner of every async resource.

Streamlit runs each rerun on a script thread, and async engines and Redis clients belong to the
loop that created them. So nothing async is created per rerun: pages hand coroutines to this
loop and wait (Lab.run). A background task runs the sandboxes' lifecycle (dormant after the grace
period, deleted after the idle limit), and Lab.run journals what each operation proved.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import gc
import logging
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Optional, TypeVar

from classroom.cache.link import RedisService
from classroom.config import Settings, resolve_database_target
from classroom.errors import OperationTimeoutError, as_qulab_error
from classroom.instructor.service import InstructorService
from classroom.outbox.broker import BrokerDurability
from classroom.outbox.status import read_durability_of
from classroom.progress.evidence import run_and_record
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import Sandbox
from classroom.validation import checked_arguments

logger = logging.getLogger("qulab")
T = TypeVar("T")
CACHE_SETTLE_SECONDS = 5.0  # how stale another replica's cache can be after writes Redis missed


class _RaisedTimeout(Exception):
    """An operation's own TimeoutError (a connect timeout), on its way to the calling thread.

    asyncio hands a TimeoutError across as a bare copy, without its traceback or cause, and it
    is the very class run() meets when its own wait runs out: a database that never answered
    would read as "the operation was too slow", and its cause could not be named.
    """

    def __init__(self, error: TimeoutError) -> None:
        super().__init__(str(error))
        self.error = error


async def _carrying_timeouts(coroutine: Awaitable[T]) -> T:
    try:
        return await coroutine
    except TimeoutError as error:
        raise _RaisedTimeout(error) from error


class Runtime:
    """One background thread running one event loop, owner of every engine, client and worker.

    Streamlit runs each rerun on a script thread; async engines and Redis clients belong to the
    loop that created them. So nothing async is created per rerun: pages hand coroutines to
    this loop (run) and wait for the result. A background task runs the sandboxes' lifecycle.
    """

    def __init__(self, settings: Optional[Settings] = None) -> None:
        self.settings = settings or Settings.from_environment()
        resolve_database_target(self.settings.database_url)  # fail fast on a bad DATABASE_URL
        # A click hands work between threads (server, script, this loop, drivers) many times; each
        # hand-over waits up to this long while another thread runs Python. Process-wide.
        sys.setswitchinterval(self.settings.gil_switch_interval_ms / 1000)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="qulab-runtime", daemon=True)
        self._closed = False
        self.redis: RedisService
        self.broker_durability: BrokerDurability
        self.sandboxes: SandboxRegistry
        self.instructor: InstructorService  # the class roster and the instructor's message
        self._lifecycle: Optional[asyncio.Task[None]] = None
        self._settler: Optional[asyncio.Task[None]] = None
        self._thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self._stop_loop()
            raise

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _start(self) -> None:
        self.redis = await RedisService.connect(self.settings)
        # Read now, not on first use: the sidebar and the outbox page say from the first page
        # whether a broker restart could lose events (section 13).
        self.broker_durability = await read_durability_of(self.redis)
        self.sandboxes = SandboxRegistry(self.settings, self.redis)
        self.instructor = InstructorService(self.settings, self.sandboxes)
        await self.instructor.start()
        self._lifecycle = asyncio.get_running_loop().create_task(self._run_sandbox_lifecycle())
        if self.sandboxes.backend == "postgresql":  # replicas share sandboxes and their keys
            self._settler = asyncio.get_running_loop().create_task(self._run_cache_settler())

    @property
    def lifecycle_interval_seconds(self) -> float:
        """How often idle sandboxes are checked: a fraction of the grace period and idle limit."""
        settings = self.settings
        return max(
            0.2,
            min(30.0, settings.sandbox_grace_seconds / 4 or 0.2, settings.sandbox_idle_seconds / 4),
        )

    async def _run_sandbox_lifecycle(self) -> None:
        while True:
            await asyncio.sleep(self.lifecycle_interval_seconds)
            try:
                await self.sandboxes.sweep()
                await self.sandboxes.reap_abandoned()
            except Exception:
                logger.exception("the sandbox lifecycle pass failed")

    async def _run_cache_settler(self) -> None:
        """Every CACHE_SETTLE_SECONDS: writes any replica made while Redis missed them get a new
        cache epoch, so no replica serves a value from before them for longer than that."""
        while True:
            await asyncio.sleep(CACHE_SETTLE_SECONDS)
            try:
                await self.sandboxes.settle_missed_invalidations()
            except Exception:
                logger.warning("settling missed cache invalidations failed", exc_info=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The runtime's event loop (for tests and workers; pages use run())."""
        return self._loop

    @property
    def closed(self) -> bool:
        """True once close() ran (or start-up failed)."""
        return self._closed

    def run(self, coroutine: Awaitable[T], *, timeout: Optional[float] = 120.0) -> T:
        """Run a coroutine on the runtime's loop from any other thread and return its result."""
        if threading.current_thread() is self._thread or self._closed:
            close = getattr(coroutine, "close", None)
            if close is not None:
                close()  # never started: close it so Python does not warn it was never awaited
            if self._closed:
                raise RuntimeError("the runtime is closed")
            raise RuntimeError(
                "Runtime.run() was called from the runtime's own loop; await instead."
            )
        future = asyncio.run_coroutine_threadsafe(_carrying_timeouts(coroutine), self._loop)
        try:
            return future.result(timeout)
        except _RaisedTimeout as carried:
            raise carried.error from carried.error.__cause__
        except concurrent.futures.TimeoutError:
            if future.done():  # it finished just as the wait ran out
                return future.result()
            future.cancel()
            raise OperationTimeoutError(
                f"The operation did not finish within {timeout:g} seconds and was cancelled."
            ) from None

    def lab(self, sandbox_id: str) -> Lab:
        """Open a sandbox from Python, held until lab.close() or close().

        While held it is never put to sleep or deleted. Raises ClassFullError if the class is
        full, like a browser would.
        """
        lab = Lab(self, sandbox_id, holder=f"lab:{uuid.uuid4().hex}")
        try:
            self.run(self.sandboxes.acquire(sandbox_id, holder=lab.holder))
        except Exception as error:
            raise as_qulab_error(error, "Runtime.lab", self.settings) from error
        return lab

    async def sandbox(self, sandbox_id: str, *, holder: Optional[str] = None) -> Sandbox:
        """The awake sandbox with this id, created on first use (call on the runtime's loop)."""
        return await self.sandboxes.acquire(sandbox_id, holder=holder)

    def release_holder(self, holder: str) -> None:
        """Drop a hold from any thread (a browser session's end).

        A closed runtime has nothing to drop.
        """
        if not self._closed:
            try:
                self._loop.call_soon_threadsafe(self.sandboxes.release_holder, holder)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def close(self) -> None:
        """Stop every sandbox, close Redis and stop the loop thread.

        Embedded SQLite files belong to this process and are deleted. PostgreSQL schemas are kept
        (another replica may serve their learners) and reaped once their leases expire; files
        beside DATABASE_URL=sqlite:///path are kept for the next start, whose reaper deletes
        them, with their Redis keys, once unused for the idle limit.
        """
        if self._closed:
            return

        async def shut_down() -> None:
            for task in (self._lifecycle, self._settler):
                if task is not None:
                    task.cancel()
            try:
                await self.sandboxes.close(delete_data=self.sandboxes.target.kind == "embedded")
            finally:
                await self.instructor.close()  # after: the sandboxes' last states are written
            await self.redis.close()

        try:
            self.run(shut_down(), timeout=30)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class Lab:
    """What a page or a script holds: one sandbox plus the runtime that runs its coroutines.

    `lab.run(create_user, email=…, name=…)` calls `create_user(sandbox, email=…, name=…)` on the
    runtime's loop and returns its result. QuLabError subclasses pass through unchanged; any
    other failure is logged with its traceback and re-raised as a QuLabError with a short
    message, so a page never shows a traceback. Every call renews the holder's hold.
    """

    def __init__(self, runtime: Runtime, sandbox_id: str, *, holder: Optional[str] = None) -> None:
        self.runtime = runtime
        self.sandbox_id = sandbox_id
        self.holder = holder

    def run(
        self,
        operation: Callable[..., Awaitable[T]],
        /,
        *,
        timeout: Optional[float] = 120.0,
        **kwargs: Any,
    ) -> T:
        """Run `operation(sandbox, **kwargs)` in this lab's sandbox and return what it returns.

        What the learner typed is checked first (classroom.validation): a refusal raises
        ValidationError before the sandbox is touched.
        """

        async def call(arguments: dict[str, Any]) -> T:
            async with self.runtime.sandboxes.using(self.sandbox_id, holder=self.holder) as sandbox:
                return await run_and_record(operation, sandbox, **arguments)

        try:
            return self.runtime.run(call(checked_arguments(operation, kwargs)), timeout=timeout)
        except Exception as error:
            what = getattr(operation, "__name__", str(operation))
            converted = as_qulab_error(error, what, self.runtime.settings)
            if converted is error:
                raise
            raise converted from error

    def close(self) -> None:
        """Let go of the sandbox.

        It may go dormant after the grace period, and is deleted after the idle limit.
        """
        if self.holder is not None:
            self.runtime.release_holder(self.holder)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


_runtime: Optional[Runtime] = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process-wide runtime, started on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime.closed:
            _runtime = Runtime()
            freeze_startup_heap()
        return _runtime


_heap_frozen = False


def freeze_startup_heap() -> None:
    """Once per process: collect, then move every object alive now out of the collector's reach.

    The first page load has imported Streamlit, SQLAlchemy, pandas and QuLab: about 170,000
    objects that live as long as the process, and Python's full collections walked all of them
    each time, holding the GIL while every learner waits. With 60 simulated learners
    (bench/classroom.py, load average 5-12), full collections took 7.5 s of the server's time,
    440 ms each; with this, 2.5 s, 160 ms each. Objects made later (sandboxes, sessions) are
    collected as usual.
    """
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


def shutdown_runtime() -> None:
    """Close the process-wide runtime (tests, and interpreter exit)."""
    global _runtime
    with _runtime_lock:
        runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.close()


atexit.register(shutdown_runtime)


_source_code_lock = threading.Lock()
_source_code_cache: dict[Any, str] = {}
