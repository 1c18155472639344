"""Long experiments, run so that one learner's experiment never stalls another learner's click.

Every learner's clicks share one Python process and one GIL. The loading-strategy comparison
and the pooling experiment are seconds of CPU-bound Python: they run in the experiment process
(classroom.worker), one at a time, each on an engine of its own on the learner's database; the
statements they count are the same ones. The cache experiment and the burst use this process's
own Redis client, engine and outbox, so they stay here and take turns instead (HeavyWorkPacer).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import source
from classroom.config import Settings, remember_secrets_of_url
from classroom.errors import UnexpectedError, as_qulab_error
from classroom.worker import ExperimentWorker, WorkerLostError

logger = logging.getLogger("qulab")
T = TypeVar("T")

_experiment_worker = ExperimentWorker()
atexit.register(_experiment_worker.close)


def experiment_worker() -> ExperimentWorker:
    """The process that runs the long experiments.

    It starts on first use; `queued` says how many wait.
    """
    return _experiment_worker


async def run_experiment_elsewhere(
    experiment: Callable[..., Awaitable[T]], /, **kwargs: Any
) -> tuple[T, float]:
    """`await experiment(**kwargs)` in the experiment process; returns (result, seconds in line).

    The arguments and the result cross a process boundary (pickled, between this process and
    its own child): plain values, URLs, Settings, dataclasses.
    """
    try:
        return await _experiment_worker.run(
            _run_in_experiment_process, experiment=experiment, kwargs=kwargs
        )
    except WorkerLostError as error:
        logger.error("the experiment process died: %s", error)
        raise UnexpectedError(
            "The experiment process stopped before it finished; nothing was changed. Try again."
        ) from None


def _run_in_experiment_process(
    *, experiment: Callable[..., Awaitable[T]], kwargs: dict[str, Any]
) -> T:
    settings = kwargs.get("settings")
    if isinstance(settings, Settings):
        for url in (settings.database_url, settings.redis_url):  # this process's own secret list
            if url:
                remember_secrets_of_url(url)
    try:
        return asyncio.run(experiment(**kwargs))
    except source.QuLabError:
        raise
    except Exception as error:  # driver errors may not survive pickling: send QuLab's own
        what = getattr(experiment, "__name__", "experiment")
        raise as_qulab_error(error, what, settings or Settings()) from None


class HeavyWorkPacer:
    """Lets a long experiment that must stay in this process give way to other learners' clicks.

    Each unit of its work (a read, a write) runs through `async with pacer.unit()`: after
    `slice_seconds` of work, the units in flight finish, then the experiment rests `rest_ratio`
    times as long, leaving the loop and the GIL to everyone else. Rests are counted in
    `rested_seconds`, so a result can leave them out of what it measured.
    """

    # Rest twice as long as the slice worked: the experiment takes at most a third of the loop.
    # Resting as long as it worked (1.0) kept walking learners' p95 within 2× of quiet while
    # their clicks cost ~40 ms; once they cost less, the cache experiment measured 2.46×.
    def __init__(self, *, slice_seconds: float = 0.02, rest_ratio: float = 2.0) -> None:
        self.slice_seconds = slice_seconds
        self.rest_ratio = rest_ratio
        self.rested_seconds = 0.0
        self.rests = 0
        self.resting = False
        self._slice_started = time.monotonic()
        self._gate = asyncio.Lock()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[None]:
        """One unit of work; it starts only when the experiment is not resting."""
        async with self._gate:
            if time.monotonic() - self._slice_started >= self.slice_seconds:
                await self._idle.wait()  # the units already running finish: a rest is a real pause
                rest = (time.monotonic() - self._slice_started) * self.rest_ratio
                started, self.resting = time.monotonic(), True
                await asyncio.sleep(rest)
                self.rested_seconds += time.monotonic() - started
                self.rests, self.resting = self.rests + 1, False
                self._slice_started = time.monotonic()
            self._in_flight += 1
            self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
