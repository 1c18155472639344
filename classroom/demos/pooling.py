"""Section 2's demos as the page runs them: the engine's pool, live, and the pooling experiment.

The experiment's code is the lesson's (source.compare_pooling). What the platform adds: it runs
in the experiment process (thousands of queries are seconds of CPU that would stall everyone
else's clicks), on fresh engines on the learner's own database, and it reserves its
connections from the class's budget first (on PostgreSQL, granted against every replica's
connections as the server counts them), so learners who run it at its maximum together take
turns instead of meeting "too many clients".

On PostgreSQL it also opens NullPool's connections one at a time. Starting a connection costs
the server a process and a few milliseconds of CPU at the server's own priority, which the
experiment process's lower priority does not reach: fifty opening at once took both of this
machine's cores from the rest of the class (bench/sandboxes.py, 2026-12-08: another learner's
list_users p95 5.15× quiet; one at a time 2.04×, a bare-asyncpg control 2.09×; NullPool's
throughput 0.85× what it was).
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any, Optional

import asyncpg
from sqlalchemy.engine import URL

import source
from classroom.budget import ConnectionBudget
from classroom.config import Settings, mask_url
from classroom.engines import engine_connection_limit, engine_pre_pings, open_engine
from classroom.experiments import run_experiment_elsewhere
from classroom.sandboxes.admission import MAX_POOL_EXPERIMENT_CONCURRENCY
from classroom.sandboxes.sandbox import Sandbox

MAX_POOL_EXPERIMENT_REQUESTS = 2000
POSTGRESQL_OPENS_AT_ONCE = 1  # NullPool's connections being opened at the same moment, at most


@dataclass(frozen=True)
class EngineReport:
    """What section 2 shows about the sandbox's engine and pool."""

    backend: str
    url: str  # password masked
    location: str  # the SQLite file, or the PostgreSQL schema
    pool: dict[str, Any]
    configured_pool_size: int
    configured_max_overflow: int
    pool_timeout_seconds: float
    pool_pre_ping: bool


async def describe_engine(sandbox: Sandbox) -> EngineReport:
    """The engine's URL (password hidden), pool class and live pool counters."""
    engine = sandbox.engine
    pool = source.pool_status(engine)
    size = int(pool.get("size", 0))
    return EngineReport(
        backend=sandbox.backend,
        url=mask_url(engine.url),
        location=sandbox.location,
        pool=pool,
        configured_pool_size=size,
        configured_max_overflow=max(0, engine_connection_limit(engine) - size),
        pool_timeout_seconds=float(pool.get("timeout", sandbox.settings.pool_timeout_seconds)),
        pool_pre_ping=engine_pre_pings(engine),
    )


@dataclass(frozen=True)
class PoolExperiment:
    """The two trials of one run, and what the class's budget did to it."""

    pooled: source.PoolTrial
    unpooled: source.PoolTrial
    waited_seconds: float  # in line for the experiment process and the connection budget
    capped_by_budget: bool  # C and P were lowered to what the budget can ever grant
    opened_at_once: Optional[int] = None  # the most connections opened together; None: no gate

    @property
    def speedup(self) -> float:
        """Pooled throughput ÷ NullPool throughput."""
        return self.pooled.throughput / self.unpooled.throughput

    @property
    def trials(self) -> tuple[source.PoolTrial, source.PoolTrial]:
        """Both trials, pooled first."""
        return self.pooled, self.unpooled


async def run_pool_experiment(
    sandbox: Sandbox, *, requests: int = 200, concurrency: int = 20, pool_size: int = 5
) -> PoolExperiment:
    """Time R queries, C at a time, through a pool of P connections and through NullPool."""
    for label, value, upper in (
        ("Requests", requests, MAX_POOL_EXPERIMENT_REQUESTS),
        ("Concurrency", concurrency, MAX_POOL_EXPERIMENT_CONCURRENCY),
        ("Pool size", pool_size, MAX_POOL_EXPERIMENT_CONCURRENCY),
    ):
        source.validate_whole_number(value, label=label, low=1, high=upper)
    budget = sandbox.connection_budget or ConnectionBudget(MAX_POOL_EXPERIMENT_CONCURRENCY)
    await budget.refresh()  # PostgreSQL: this replica's share among the replicas it shows now
    granted = min(max(pool_size, concurrency), budget.most_one_reservation_gets)
    capped = granted < max(pool_size, concurrency)
    concurrency, pool_size = min(concurrency, granted), min(pool_size, granted)
    translate = sandbox.engine.get_execution_options().get("schema_translate_map")
    timeout = 3 * sandbox.settings.pool_timeout_seconds
    async with budget.reserve(granted, timeout_seconds=timeout) as waited:
        (trials, opened_at_once), queued = await run_experiment_elsewhere(
            compare_pooling_on,
            url=sandbox.engine.url,
            settings=sandbox.settings,
            translate=translate,
            requests=requests,
            concurrency=concurrency,
            pool_size=pool_size,
        )
    return PoolExperiment(trials[0], trials[1], waited + queued, capped, opened_at_once)


class OpeningGate:
    """asyncpg's connect, with at most `limit` connections being opened at once."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._opening = 0
        self.most_at_once = 0  # the most seen opening together

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        """`asyncpg.connect(*args, **kwargs)` once a slot is free."""
        async with self._slots:
            self._opening += 1
            self.most_at_once = max(self.most_at_once, self._opening)
            try:
                return await asyncpg.connect(*args, **kwargs)
            finally:
                self._opening -= 1


def _engine_on(
    url: URL,
    settings: Settings,
    translate: Optional[dict[Any, Any]],
    gate: Optional[OpeningGate],
    **pooling: Any,
) -> Any:
    if gate is not None:
        pooling["connect_args"] = {"async_creator_fn": gate.connect}
    engine = open_engine(url, settings, pre_ping=False, pool_timeout=60, **pooling)
    return engine.execution_options(schema_translate_map=translate) if translate else engine


async def compare_pooling_on(
    *,
    url: URL,
    settings: Settings,
    translate: Optional[dict[Any, Any]],
    requests: int,
    concurrency: int,
    pool_size: int,
    opens_at_once: Optional[int] = POSTGRESQL_OPENS_AT_ONCE,
) -> tuple[list[source.PoolTrial], Optional[int]]:
    """In the experiment process: the lesson's compare_pooling on engines of its own.

    Returns the trials and, on PostgreSQL with a limit, the most connections opened at once.
    """
    postgresql = url.get_backend_name() == "postgresql"
    gate = OpeningGate(opens_at_once) if postgresql and opens_at_once else None
    trials = await source.compare_pooling(
        functools.partial(_engine_on, url, settings, translate, gate),
        requests=requests,
        concurrency=concurrency,
        pool_size=pool_size,
    )
    return trials, gate.most_at_once if gate is not None else None
