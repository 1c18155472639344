"""Benchmark the outbox: what the event costs the write, how fast the relay moves events, how two
relays share the work, and how soon a committed event is published.

Run from the project root: `python3 bench/outbox.py`. It reads DATABASE_URL and REDIS_URL like the
app; when they are unset it starts a throwaway PostgreSQL and Redis (tests/servers.py) if installed.
SQLite always runs (embedded). Only ratios measured within this one run mean anything: the
machine is shared and timings drift. `--panel` measures only the status panel's cost with
history; `--triggers` only what the panel's count triggers cost the writers (two sandboxes, one
with its triggers dropped, alternating round by round).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from outbox_relays import (  # noqa: E402
    MinimalRelay,
    add_pending_events,
    bench_servers,
    drain,
    measure_relay_processes,
    stream_ids,
)
from sqlalchemy import select  # noqa: E402

import source  # noqa: E402
from classroom.cache.link import RedisService  # noqa: E402
from classroom.config import Settings  # noqa: E402
from classroom.outbox.counts import counts_removal  # noqa: E402
from classroom.outbox.relay import GuardedPublisher  # noqa: E402
from classroom.outbox.service import outbox_service, start_event_publisher  # noqa: E402
from classroom.outbox.status import outbox_status  # noqa: E402
from classroom.progress.journal import journal_muted  # noqa: E402
from classroom.sandboxes.registry import SandboxRegistry  # noqa: E402
from classroom.sandboxes.reset import initialize_sandbox  # noqa: E402
from classroom.sandboxes.sandbox import Sandbox, new_sandbox_id, quoted_schema  # noqa: E402

WRITES_PER_VARIANT = 600
WARM_UP_WRITES = 20
RELAY_EVENTS = 5000
# QuLab's relay and the minimal one, alternating: the median ratio resists a busy moment.
RELAY_ROUNDS = 7
IDLE_SANDBOXES = 200
IDLE_SETTLE_SECONDS = 30.0  # publishers started, then nothing happens: measure after this long...
IDLE_WINDOW_SECONDS = 30.0  # ...over this long
REMOTE_WRITES = 100
TWO_RELAY_EVENTS = 6000
TWO_RELAY_ROUNDS = 3  # 1 relay, 2 relays, alternating: the median ratio resists a busy moment
LATENCY_WRITES = 200
TRIGGER_ROUNDS, TRIGGER_WRITES, TRIGGER_EVENTS = 5, 100, 3000  # the count triggers' cost


@dataclass(frozen=True)
class Result:
    """One measured number, with the target it is held to (if any)."""

    backend: str
    measurement: str
    value: float
    unit: str
    target: str = ""
    met: Optional[bool] = None


async def store_score_only(sandbox: Sandbox, *, user_id: str, occupation_code: str) -> None:
    """source.calculate_and_store_airscore without its event: the same score, alone, in one
    transaction (the score-only write the event's cost is measured against)."""
    async with source.get_session(sandbox) as session:
        user = await source.UserRepository(session).get(user_id)
        assessments = await source.AssessmentRepository(session).list_for_user(user.id)
        calculation = source.calculate_airscore(
            occupation_code=occupation_code,
            education_level=user.education_level,
            years_experience=user.years_experience,
            abilities=tuple(assessment.current_ability for assessment in assessments),
        )
        scores = source.AIRScoreRepository(session)
        await scores.create(user_id=user.id, occupation_code=occupation_code, **calculation)


async def _timed_write(sandbox: Sandbox, user_id: str, *, with_event: bool) -> float:
    started = time.perf_counter()
    write = source.calculate_and_store_airscore if with_event else store_score_only
    await write(sandbox, user_id=user_id, occupation_code="15-1252.00")
    return time.perf_counter() - started


async def measure_write_cost(sandbox: Sandbox) -> tuple[float, float]:
    """Median seconds per write: score-only and score+event (one transaction each).

    The two kinds alternate write by write (and which goes first alternates too), so a busy
    moment on this shared machine hits both alike; medians ignore the odd stall.
    """
    user_ids = [user.id for user in await initialize_sandbox(sandbox)]
    timings: dict[bool, list[float]] = {False: [], True: []}
    for number in range(WARM_UP_WRITES + WRITES_PER_VARIANT):
        order = (False, True) if number % 2 == 0 else (True, False)
        for with_event in order:
            seconds = await _timed_write(
                sandbox, user_ids[number % len(user_ids)], with_event=with_event
            )
            if number >= WARM_UP_WRITES:
                timings[with_event].append(seconds)
    return statistics.median(timings[False]), statistics.median(timings[True])


async def measure_relay_against_minimal(
    sandbox: Sandbox, *, events: int
) -> tuple[float, float, list[float]]:
    """Events/s of QuLab's relay and of MinimalRelay, alternating rounds; the median round's pair
    and every ratio."""

    async def minimal_rate() -> float:
        await initialize_sandbox(sandbox)
        await add_pending_events(sandbox, events)
        started = time.perf_counter()
        await MinimalRelay(sandbox).drain()
        rate = events / (time.perf_counter() - started)
        if len(set(await stream_ids(sandbox))) != events:
            raise AssertionError("the minimal relay did not publish every event")
        return rate

    rounds = []
    for number in range(RELAY_ROUNDS):  # which goes first alternates: A B, B A, A B…
        if number % 2 == 0:
            ours, _ = await measure_relay(sandbox, relays=1, events=events)
            minimal = await minimal_rate()
        else:
            minimal = await minimal_rate()
            ours, _ = await measure_relay(sandbox, relays=1, events=events)
        rounds.append((ours / minimal, ours, minimal))
    ratio, ours, minimal = sorted(rounds)[len(rounds) // 2]
    return ours, minimal, [round_[0] for round_ in rounds]


async def measure_idle_cost(settings: Settings) -> tuple[float, int]:
    """Share of one core this process spends while IDLE_SANDBOXES sandboxes' publishers sit idle."""
    redis_service = await RedisService.connect(settings)
    registry = SandboxRegistry(replace(settings, max_sandboxes=IDLE_SANDBOXES + 5), redis_service)
    try:
        sandboxes = [await registry.acquire(new_sandbox_id()) for _ in range(IDLE_SANDBOXES)]
        for sandbox in sandboxes:
            await start_event_publisher(sandbox)
        await asyncio.sleep(IDLE_SETTLE_SECONDS)
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        await asyncio.sleep(IDLE_WINDOW_SECONDS)
        share = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
        running = sum(outbox_service(sandbox).running for sandbox in sandboxes)
    finally:
        await registry.close()
        await redis_service.close()
    return share, running


WRITE_FROM_ANOTHER_PROCESS = """
import asyncio, datetime, json, sys, time, uuid
import asyncpg

async def main(dsn, schema, count):
    connection = await asyncpg.connect(dsn)
    for _ in range(count):
        now = datetime.datetime.now(datetime.timezone.utc)
        await connection.execute(
            f'INSERT INTO "{schema}".domain_events (id, event_type, aggregate_type, aggregate_id,'
            ' payload, status, attempts, next_attempt_at, created_at, updated_at)'
            ' VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7, $7)',
            str(uuid.uuid4()), "Remote", "Bench", str(uuid.uuid4()), json.dumps({"n": 1}),
            "pending", now,
        )
        await asyncio.sleep(0.02)
    await connection.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def measure_remote_commit_latency(sandbox: Sandbox) -> tuple[float, float]:
    """Median and p95 ms from a commit made by ANOTHER process to its publication (PostgreSQL:
    LISTEN/NOTIFY)."""
    await initialize_sandbox(sandbox)
    service = outbox_service(sandbox)
    await service.start()
    try:
        dsn = sandbox.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        writer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITE_FROM_ANOTHER_PROCESS,
            dsn,
            sandbox.location,
            str(REMOTE_WRITES),
        )
        if await writer.wait() != 0:
            raise AssertionError("the writing process failed")
        await _wait_until_published(sandbox, REMOTE_WRITES)
    finally:
        await service.stop()
    return await _commit_to_publish_latencies(sandbox)


PANEL_SMALL, PANEL_LARGE = 100, 20_000
PANEL_ROUNDS, PANEL_READS = 7, 10  # readings per sandbox per round; the rounds alternate


async def _published_and_consumed(sandbox: Sandbox, events: int) -> None:
    """`events` events published and consumed, none pruned yet: the table as full as a class
    makes it between two audits (the audit prunes to the newest keep_published_events)."""
    await initialize_sandbox(sandbox)
    await add_pending_events(sandbox, events)
    service = outbox_service(sandbox)
    await drain(service.publisher)
    while (await service.consumer.consume_batch()).received:
        pass


async def _panel_seconds(sandbox: Sandbox) -> float:
    """Median seconds of PANEL_READS status-panel readings."""
    timings = []
    for _ in range(PANEL_READS):
        started = time.perf_counter()
        await outbox_status(sandbox, limit=10)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


async def measure_panel_cost(registry: SandboxRegistry) -> tuple[list[float], float]:
    """Status panel reading at PANEL_LARGE unpruned events ÷ at PANEL_SMALL, per round (the two
    sandboxes alternate, round by round), and the small one's median ms."""
    small = await registry.acquire(new_sandbox_id())
    large = await registry.acquire(new_sandbox_id())
    await _published_and_consumed(small, PANEL_SMALL)
    await _published_and_consumed(large, PANEL_LARGE)
    ratios, small_ms = [], []
    for _ in range(PANEL_ROUNDS):
        small_seconds = await _panel_seconds(small)
        large_seconds = await _panel_seconds(large)
        ratios.append(large_seconds / small_seconds)
        small_ms.append(small_seconds * 1000)
    return ratios, statistics.median(small_ms)


async def measure_relay(sandbox: Sandbox, *, relays: int, events: int) -> tuple[float, int]:
    """Events per second for `relays` publishers draining `events` pending events; and duplicates.

    The publishers are the relay QuLab runs (GuardedPublisher), the sandbox's and more like it.
    """
    await initialize_sandbox(sandbox)
    await add_pending_events(sandbox, events)
    service = outbox_service(sandbox)
    publishers = [service.publisher, *(GuardedPublisher(service) for _ in range(relays - 1))]
    started = time.perf_counter()
    await asyncio.gather(*(drain(publisher) for publisher in publishers))
    seconds = time.perf_counter() - started
    in_stream = await stream_ids(sandbox)
    if len(set(in_stream)) != events:
        raise AssertionError(f"{len(set(in_stream))} of {events} events reached the stream")
    return events / seconds, len(in_stream) - len(set(in_stream))


async def measure_latency(sandbox: Sandbox) -> tuple[float, float]:
    """Median and p95 ms from an event's write to its publication, with the publisher running."""
    user_ids = [user.id for user in await initialize_sandbox(sandbox)]
    service = outbox_service(sandbox)
    await service.start()
    try:
        for number in range(LATENCY_WRITES):
            await source.calculate_and_store_airscore(
                sandbox, user_id=user_ids[number % len(user_ids)], occupation_code="15-1252.00"
            )
            await asyncio.sleep(0.002)  # a steady stream of writes, not one burst
        await _wait_until_published(sandbox, LATENCY_WRITES)
    finally:
        await service.stop()
    return await _commit_to_publish_latencies(sandbox)


async def drop_counts_triggers(sandbox: Sandbox) -> None:
    """Take the status panel's count triggers off a sandbox (what the writers would cost
    without them); the panel of that sandbox is wrong from then on."""
    schema = quoted_schema(sandbox.location) if sandbox.backend == "postgresql" else ""
    async with sandbox.engine.begin() as connection:
        for statement in counts_removal(sandbox.backend, schema, keep_table=True):
            await connection.exec_driver_sql(statement)


async def measure_trigger_cost(registry: SandboxRegistry) -> tuple[list[float], list[float]]:
    """What the count triggers cost the writers, per round: (score+event write with ÷ without,
    relay events/s with ÷ without). Two sandboxes, one without the triggers, alternating."""
    counted = await registry.acquire(new_sandbox_id())
    bare = await registry.acquire(new_sandbox_id())
    users = {}
    for sandbox in (counted, bare):
        users[sandbox.id] = [user.id for user in await initialize_sandbox(sandbox)]
    await drop_counts_triggers(bare)
    write_ratios, relay_ratios = [], []
    for round_number in range(TRIGGER_ROUNDS):
        pair = (counted, bare) if round_number % 2 == 0 else (bare, counted)
        medians = {}
        for sandbox in pair:
            ids = users[sandbox.id]
            times = [
                await _timed_write(sandbox, ids[n % len(ids)], with_event=True)
                for n in range(TRIGGER_WRITES)
            ]
            medians[sandbox.id] = statistics.median(times)
        write_ratios.append(medians[counted.id] / medians[bare.id])
        rates = {}
        for sandbox in pair:
            rates[sandbox.id], _ = await measure_relay(sandbox, relays=1, events=TRIGGER_EVENTS)
            users[sandbox.id] = [user.id for user in await source.list_users(sandbox)]
        relay_ratios.append(rates[counted.id] / rates[bare.id])
    return write_ratios, relay_ratios


async def panel_results(backend: str, registry: SandboxRegistry) -> list[Result]:
    """The status panel's cost with history, as rows of the table."""
    ratios, panel_ms = await measure_panel_cost(registry)
    median, low, high = statistics.median(ratios), min(ratios), max(ratios)
    return [
        Result(backend, f"status panel reading at {PANEL_SMALL} events", panel_ms, "ms"),
        Result(
            backend,
            f"status panel at {PANEL_LARGE:,} unpruned events ÷ at {PANEL_SMALL}, median of "
            f"{PANEL_ROUNDS} interleaved rounds (min {low:.2f}, max {high:.2f})",
            median,
            "×",
            "≤ 2",
            median <= 2,
        ),
    ]


async def trigger_results(backend: str, registry: SandboxRegistry) -> list[Result]:
    """What the panel's count triggers cost the writers, as rows of the table."""
    write_ratios, relay_ratios = await measure_trigger_cost(registry)
    rows = []
    for what, ratios in (
        ("score+event write time", write_ratios),
        ("relay events/s", relay_ratios),
    ):
        spread = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        measure = f"{what} with the panel's count triggers ÷ without, median of rounds {spread}"
        rows.append(Result(backend, measure, statistics.median(ratios), "×"))
    return rows


async def bench_one(label: str, settings: Settings, measure: Any) -> list[Result]:
    """`--panel` or `--triggers`: one measurement on one backend."""
    redis_service = await RedisService.connect(settings)
    registry = SandboxRegistry(settings, redis_service)
    try:
        backend = f"{label} + {'Redis' if redis_service.mode == 'redis' else 'fakeredis'}"
        return await measure(backend, registry)
    finally:
        await registry.close()
        await redis_service.close()


async def bench_backend(label: str, settings: Settings, *, two_relays: bool) -> list[Result]:
    """Every measurement on one backend (one registry, fresh sandboxes)."""
    redis_service = await RedisService.connect(settings)
    registry = SandboxRegistry(settings, redis_service)
    results: list[Result] = []
    try:
        backend = f"{label} + {'Redis' if redis_service.mode == 'redis' else 'fakeredis'}"
        sandbox = await registry.acquire(new_sandbox_id())
        score_only, with_event = await measure_write_cost(sandbox)
        ratio = with_event / score_only
        results += [
            Result(backend, "score-only write, median", score_only * 1000, "ms"),
            Result(backend, "score+event write (one transaction), median", with_event * 1000, "ms"),
            Result(backend, "score+event ÷ score-only", ratio, "×", "≤ 1.3", ratio <= 1.3),
        ]
        results += await trigger_results(backend, registry)
        one_rate, minimal_rate, ratios = await measure_relay_against_minimal(
            sandbox, events=RELAY_EVENTS
        )
        spread = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        results += [
            Result(
                backend,
                "relay throughput, 1 relay",
                one_rate,
                "events/s",
                "≥ 5,000",
                one_rate >= 5000,
            ),
            Result(backend, "minimal hand-written relay, same run", minimal_rate, "events/s"),
            Result(
                backend,
                f"relay ÷ minimal relay, median of rounds {spread}",
                one_rate / minimal_rate,
                "×",
                "≥ 0.8",
                one_rate / minimal_rate >= 0.8,
            ),
        ]
        if two_relays:
            rounds = []
            for _ in range(TWO_RELAY_ROUNDS):
                single, _ = await measure_relay_processes(
                    registry, sandbox, relays=1, events=TWO_RELAY_EVENTS
                )
                double, duplicates = await measure_relay_processes(
                    registry, sandbox, relays=2, events=TWO_RELAY_EVENTS
                )
                rounds.append((double / single, single, double, duplicates))
            ratio, single, double, _ = sorted(rounds)[len(rounds) // 2]
            duplicates = sum(round_[3] for round_ in rounds)
            spread = ", ".join(f"{round_[0]:.2f}" for round_ in rounds)
            results += [
                Result(
                    backend,
                    f"1 relay process, {TWO_RELAY_EVENTS} events (median round)",
                    single,
                    "events/s",
                ),
                Result(
                    backend,
                    f"2 relay processes, {TWO_RELAY_EVENTS} events (median round)",
                    double,
                    "events/s",
                ),
                Result(
                    backend,
                    f"2 relays ÷ 1 relay, median of rounds {spread}",
                    ratio,
                    "×",
                    "≥ 1.2",
                    ratio >= 1.2,
                ),
                Result(
                    backend,
                    "events in the stream twice (2 relays, all rounds)",
                    duplicates,
                    "",
                    "= 0",
                    duplicates == 0,
                ),
            ]
        results += await panel_results(backend, registry)
        median, p95 = await measure_latency(sandbox)
        results += [
            Result(
                backend, "commit-to-publish latency, median", median, "ms", "< 100", median < 100
            ),
            Result(backend, "commit-to-publish latency, p95", p95, "ms"),
        ]
        if registry.backend == "postgresql":
            median, p95 = await measure_remote_commit_latency(
                await registry.acquire(new_sandbox_id())
            )
            results += [
                Result(
                    backend,
                    "commit in another process to publish, median",
                    median,
                    "ms",
                    "< 100",
                    median < 100,
                ),
                Result(backend, "commit in another process to publish, p95", p95, "ms"),
            ]
    finally:
        await registry.close()
        await redis_service.close()
    return results


def print_table(results: list[Result], notes: list[str]) -> None:
    """The results as a plain-text table."""
    rows = [("backend", "measurement", "value", "target", "met")]
    for result in results:
        value = (
            f"{result.value:,.2f} {result.unit}".strip()
            if result.value < 100
            else f"{result.value:,.0f} {result.unit}"
        )
        met = "" if result.met is None else ("yes" if result.met else "NO")
        rows.append((result.backend, result.measurement, value, result.target, met))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    for note in notes:
        print(f"note: {note}")


def main() -> list[Result]:
    """Run every measurement on SQLite and (when available) PostgreSQL; print and return the
    results."""
    results: list[Result] = []
    # The pattern is timed bare: the learner's journal is no part of what is measured (nothing here
    # runs through Lab.run; the background publisher would journal its first publication).
    with bench_servers() as (postgres_url, redis_url, notes), journal_muted():
        base = Settings.from_environment()
        plans = [("SQLite", replace(base, database_url=None, redis_url=redis_url), False)]
        if postgres_url:
            plans.append(
                ("PostgreSQL", replace(base, database_url=postgres_url, redis_url=redis_url), True)
            )
        for label, settings, two_relays in plans:
            if "--panel" in sys.argv:
                results += asyncio.run(bench_one(label, settings, panel_results))
            elif "--triggers" in sys.argv:
                results += asyncio.run(bench_one(label, settings, trigger_results))
            else:
                results += asyncio.run(bench_backend(label, settings, two_relays=two_relays))
        if not {"--no-idle", "--panel", "--triggers"} & set(sys.argv):
            label, settings, _ = plans[-1]
            share, running = asyncio.run(measure_idle_cost(settings))
            backend = f"{label} + {'Redis' if settings.redis_url else 'fakeredis'}"
            results.append(
                Result(
                    backend,
                    f"{running} idle started publishers, CPU share of one core "
                    f"({IDLE_WINDOW_SECONDS:g} s, after {IDLE_SETTLE_SECONDS:g} s idle)",
                    share * 100,
                    "%",
                    "< 2",
                    share * 100 < 2,
                )
            )
    print_table(results, notes)
    return results


async def _wait_until_published(sandbox: Sandbox, count: int, *, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while (status := await outbox_status(sandbox)).published < count:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"only {status.published} of {count} published after {seconds:g} s"
            )
        await asyncio.sleep(0.01)


async def _commit_to_publish_latencies(sandbox: Sandbox) -> tuple[float, float]:
    """Median and p95 of created_at -> published_at over the sandbox's events, in ms."""
    async with source.get_session(sandbox) as session:
        rows = (
            await session.execute(
                select(source.DomainEvent.created_at, source.DomainEvent.published_at)
            )
        ).all()
    latencies = sorted((published - created).total_seconds() * 1000 for created, published in rows)
    return statistics.median(latencies), latencies[int(len(latencies) * 0.95)]


if __name__ == "__main__":
    main()
