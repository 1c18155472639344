"""What the sidebar shows about where this learner's data lives and how the class stands.

Read on the runtime's loop in one call per rerun (RuntimeStatus), with no database or Redis
round trip: every figure is in the process's memory already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from classroom.engines import engine_pre_pings
from classroom.outbox.broker import BrokerDurability
from classroom.outbox.status import broker_durability
from classroom.runtime import Lab, Runtime
from classroom.sandboxes.sandbox import Sandbox


@dataclass(frozen=True)
class RuntimeStatus:
    """What the sidebar shows.

    Backends, pool settings, Redis mode, this session's sandbox and the class.
    """

    database: str
    backend: str
    database_note: str
    pool_size: int
    max_overflow: int
    pool_timeout_seconds: float
    pool_pre_ping: bool
    redis_mode: str
    redis_reason: str
    redis_answers: bool  # a probe shared with every page drawn meanwhile (RedisService.reading)
    redis_degraded: bool
    redis_cut_off: bool
    redis_last_error: str
    redis_breaker: str  # the Redis breaker's state in one line (closed / open / half-open)
    sandbox_id: str
    sandbox_location: str
    sandbox_notice: Optional[str]
    live_sandboxes: int  # awake (active + idle)
    sandbox_states: dict[str, int]
    capacity: int
    capacity_limited_by: str
    connections_in_use: int
    connection_budget: int
    sandbox_idle_minutes: float
    sandbox_grace_seconds: float
    broker_durability: BrokerDurability  # read in the same round trip: one per rerun


def runtime_status(lab: Lab) -> RuntimeStatus:
    """The sidebar's status for this lab's sandbox, with the broker's durability: one call."""
    runtime = lab.runtime

    async def collect(sandbox: Sandbox) -> RuntimeStatus:
        durability = await broker_durability(sandbox)
        # No await between the reading and the breaker's line: both describe the same moment.
        answers = (await runtime.redis.reading()).answers and not sandbox.redis.cut_off
        return _collect_status(runtime, sandbox, durability, answers)

    return lab.run(collect, timeout=30)


def _collect_status(
    runtime: Runtime, sandbox: Sandbox, durability: BrokerDurability, redis_answers: bool
) -> RuntimeStatus:
    registry, settings = runtime.sandboxes, runtime.settings
    capacity = registry.capacity()
    counts = registry.counts()
    notice, sandbox.notice = sandbox.notice, None  # shown once
    pool_size, max_overflow = (
        (settings.sqlite_pool_size, settings.sqlite_max_overflow)
        if registry.backend == "sqlite"
        else (settings.pool_size, settings.max_overflow)
    )
    return RuntimeStatus(
        database=registry.describe_database(),
        backend=registry.backend,
        database_note=registry.target.note,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout_seconds=settings.pool_timeout_seconds,
        pool_pre_ping=engine_pre_pings(sandbox.engine),
        redis_mode=runtime.redis.mode,
        redis_reason=runtime.redis.reason,
        redis_answers=redis_answers,
        redis_degraded=sandbox.redis.health.degraded,
        redis_cut_off=sandbox.redis.cut_off,
        redis_last_error=sandbox.redis.health.last_error,
        redis_breaker=sandbox.redis.breaker.describe(),
        sandbox_id=sandbox.id,
        sandbox_location=sandbox.location,
        sandbox_notice=notice,
        live_sandboxes=len(registry),
        sandbox_states=counts,
        capacity=capacity.sandboxes,
        capacity_limited_by=capacity.limited_by,
        connections_in_use=registry.budget.in_use,
        connection_budget=registry.budget.total,
        sandbox_idle_minutes=settings.sandbox_idle_seconds / 60,
        sandbox_grace_seconds=settings.sandbox_grace_seconds,
        broker_durability=durability,
    )
