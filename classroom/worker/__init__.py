"""One process of its own for the long experiments.

With it, one learner's experiment never stalls another's click.

Every learner's clicks share one Python process: Streamlit's server thread, a script thread per
rerun, and QuLab's runtime loop, all taking turns on one GIL. The loading-strategy comparison
(thousands of ORM objects per run) and the pooling experiment (thousands of queries) are
CPU-bound Python. On the shared loop they stall it; on a thread or loop of their own they still
take the GIL from every other learner's click (measured: 3.1× another learner's p95 with the
pool experiment on a loop of its own). In a process of their own they use the machine's other
core and take nothing from the app's.

`await ExperimentWorker().run(function, **kwargs)` calls a module-level function in that
process, one call at a time: others wait in line (`queued` says how many). The process is a
plain `python -m classroom.worker` reading pickled calls on its stdin (pickles only ever pass
between this process and its own child). It does not re-import the app's entry script, as
multiprocessing's spawn does. It runs at a lower CPU priority (nice 10), so on a busy
machine the app's threads get the cores first. It starts on first use, and again after it
died; a call it did not answer raises WorkerLostError. It exits when its stdin closes (the
app exited or closed it).

Nothing here imports the lesson or the rest of the platform.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Optional, TypeVar

T = TypeVar("T")
NICENESS = 10  # the process runs at this nice level: the app's own threads get the CPU first


class WorkerLostError(RuntimeError):
    """The experiment process died (killed, out of memory) before it answered."""


class ExperimentWorker:
    """A child process that runs one long experiment at a time; the rest wait in line."""

    def __init__(self) -> None:
        self._process: Optional[subprocess.Popen[bytes]] = None
        # One thread talks to the process, so calls queue here without holding other threads.
        self._caller = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="qulab-experiments"
        )
        self._lock = threading.Lock()
        self.queued = 0  # calls submitted and not finished (the one running included)
        self.started_processes = 0

    async def run(self, function: Callable[..., T], /, **kwargs: Any) -> tuple[T, float]:
        """`function(**kwargs)` in the worker process; returns (result, seconds waited in line)."""
        submitted = time.monotonic()
        self.queued += 1
        try:
            started, value = await asyncio.get_running_loop().run_in_executor(
                self._caller, self._call, function, kwargs
            )
        finally:
            self.queued -= 1
        return value, started - submitted

    @property
    def process_id(self) -> Optional[int]:
        """The worker's process id while it runs (for tests and benchmarks)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def close(self) -> None:
        """Stop the process now; the next run starts a new one.

        A call in flight gets WorkerLostError.
        """
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=5)

    def _call(self, function: Callable[..., T], kwargs: dict[str, Any]) -> tuple[float, T]:
        with self._lock:
            started = time.monotonic()
            process = self._running_process()
            assert process.stdin is not None and process.stdout is not None
            try:
                pickle.dump((function, kwargs), process.stdin)
                process.stdin.flush()
                failed, value = pickle.load(process.stdout)
            except (EOFError, OSError, pickle.UnpicklingError) as error:
                self._stop()
                raise WorkerLostError(
                    f"the experiment process stopped before it answered ({error!r})"
                ) from None
        if failed:
            raise value
        return started, value

    def _running_process(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            self._stop()  # a process that died: close its pipes
            environment = dict(os.environ)
            here = str(Path(__file__).resolve().parents[2])  # the project root
            environment["PYTHONPATH"] = os.pathsep.join(
                filter(None, [here, environment.get("PYTHONPATH")])
            )
            self._process = subprocess.Popen(
                [sys.executable, "-m", "classroom.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=environment,
            )
            self.started_processes += 1
            assert self._process.stdin is not None
            pickle.dump(
                list(sys.path), self._process.stdin
            )  # so it imports what this process imports
        return self._process

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The worker process's loop, until EOF: read (function, kwargs), answer.

    The answer is (failed, result or exception).
    """
    for path in reversed(pickle.load(requests)):
        if path not in sys.path:
            sys.path.insert(0, path)
    while True:
        try:
            function, kwargs = pickle.load(requests)
        except EOFError:
            return
        try:
            answer = pickle.dumps((False, function(**kwargs)))
        except Exception as error:  # sent back and raised in the caller
            try:
                answer = pickle.dumps((True, error))
            except Exception:
                answer = pickle.dumps((True, RuntimeError(f"{type(error).__name__}: {error}")))
        answers.write(answer)
        answers.flush()
