"""Benchmark the outbox: what the event costs the write, how fast the relay moves events, how two
relays share the work, and how soon a committed event is published.

Run from the project root: `python3 bench/outbox.py`. It reads DATABASE_URL and REDIS_URL like the
app; when they are unset it starts a throwaway PostgreSQL and Redis (tests/servers.py) if installed.
SQLite always runs (embedded). Only ratios measured within this one run mean anything: the
machine is shared and timings drift.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402  (servers.py skips through pytest when a server is missing)
from sqlalchemy import select  # noqa: E402

import servers  # noqa: E402
import source  # noqa: E402

WRITES_PER_VARIANT = 600
WARM_UP_WRITES = 20
RELAY_EVENTS = 5000
RELAY_ROUNDS = 5  # QuLab's relay and the minimal one, alternating: the median ratio resists a busy moment
IDLE_SANDBOXES = 200
IDLE_SETTLE_SECONDS = 30.0  # publishers started, then nothing happens: measure after this long...
IDLE_WINDOW_SECONDS = 30.0  # ...over this long
REMOTE_WRITES = 100
TWO_RELAY_EVENTS = 6000
TWO_RELAY_ROUNDS = 3  # 1 relay, 2 relays, alternating: the median ratio resists a busy moment
LATENCY_WRITES = 200


@dataclass(frozen=True)
class Result:
    """One measured number, with the target it is held to (if any)."""

    backend: str
    measurement: str
    value: float
    unit: str
    target: str = ""
    met: Optional[bool] = None


def _server_url(stack: ExitStack, configured: Optional[str], start: Any, name: str, notes: list[str]) -> Optional[str]:
    if configured:
        return configured
    try:
        url = stack.enter_context(start())
    except pytest.skip.Exception as reason:
        notes.append(f"{name} not available: {reason}")
        return None
    notes.append(f"{name}: a throwaway server started for this run")
    return url


@contextmanager
def bench_servers() -> Iterator[tuple[Optional[str], Optional[str], list[str]]]:
    """PostgreSQL and Redis URLs: from the environment, else started here, else None (with a note)."""
    notes: list[str] = []
    with ExitStack() as stack:
        postgres = _server_url(stack, servers.configured_postgres_url(), servers.postgres_server, "PostgreSQL", notes)
        redis_url = _server_url(stack, servers.configured_redis_url(), servers.redis_server, "Redis", notes)
        if redis_url is None:
            notes.append("without a real Redis the relay publishes to fakeredis")
        yield postgres, redis_url, notes


async def _timed_write(sandbox: source.Sandbox, user_id: str, *, with_event: bool) -> float:
    started = time.perf_counter()
    if with_event:
        await source.calculate_and_store_airscore(sandbox, user_id=user_id, occupation_code="15-1252.00")
    else:
        async with source.get_session(sandbox) as session:
            await source.add_calculated_airscore(session, user_id=user_id, occupation_code="15-1252.00")
    return time.perf_counter() - started


async def measure_write_cost(sandbox: source.Sandbox) -> tuple[float, float]:
    """Median seconds per write: score-only and score+event (one transaction each).

    The two kinds alternate write by write (and which goes first alternates too), so a busy
    moment on this shared machine hits both alike; medians ignore the odd stall.
    """
    user_ids = [user.id for user in await source.init_db(sandbox)]
    timings: dict[bool, list[float]] = {False: [], True: []}
    for number in range(WARM_UP_WRITES + WRITES_PER_VARIANT):
        order = (False, True) if number % 2 == 0 else (True, False)
        for with_event in order:
            seconds = await _timed_write(sandbox, user_ids[number % len(user_ids)], with_event=with_event)
            if number >= WARM_UP_WRITES:
                timings[with_event].append(seconds)
    return statistics.median(timings[False]), statistics.median(timings[True])


async def _add_pending_events(sandbox: source.Sandbox, count: int) -> None:
    for start in range(0, count, 1000):
        async with source.get_session(sandbox) as session:
            session.add_all(
                source.DomainEvent(
                    event_type="BenchEvent",
                    aggregate_type="Bench",
                    aggregate_id=source._new_id(),
                    payload={"n": n, "air_score": 71.5, "parameter_version": source.AIR_PARAMETER_VERSION},
                )
                for n in range(start, min(count, start + 1000))
            )


async def _stream_ids(sandbox: source.Sandbox) -> list[str]:
    """Event ids in stream order, read 1,000 entries at a time (one XRANGE of 10,000 can outlast a socket timeout)."""
    ids: list[str] = []
    start = "-"
    while entries := await sandbox.redis.client.xrange(sandbox.redis.key("events"), min=start, count=1000):
        ids += [fields["event_id"] for _, fields in entries]
        start = "(" + entries[-1][0]
    return ids


async def _drain(publisher: source.OutboxPublisher) -> None:
    """Publish until nothing is left, as the running publisher does: each backlog on one connection."""
    while True:
        claimed = 0
        async for report in publisher.publish_backlog():
            claimed += report.claimed
        if not claimed:
            return


class MinimalRelay:
    """The least a relay must do, hand-written, for comparison: on ONE connection held for the whole
    drain, lease 100 with UPDATE … RETURNING, XADD them in one pipeline, mark them in one UPDATE.
    It sends the same message; it keeps no lease time, checks no lease on the mark, keeps no
    stream ids, handles no error: what QuLab's relay adds on top of this is what the ratio measures."""

    def __init__(self, sandbox: source.Sandbox, batch_size: int = 100) -> None:
        self.sandbox = sandbox
        self.batch_size = batch_size
        events = source.DomainEvent.__table__.c
        due = (
            select(events.id)
            .where(events.status == "pending", events.claimed_by.is_(None))
            .order_by(events.created_at)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        self.claim = (
            source.update(source.DomainEvent.__table__)
            .where(events.id.in_(due))
            .values(claimed_by="minimal")
            .returning(
                events.id,
                events.event_type,
                events.aggregate_type,
                events.aggregate_id,
                events.created_at,
                source.cast(events.payload, source.Text),
            )
        )
        self.events = events

    async def drain(self) -> None:
        """Publish every pending event."""
        client, stream = self.sandbox.redis.client, self.sandbox.redis.key("events")
        engine = self.sandbox.engine.execution_options(isolation_level="AUTOCOMMIT")
        async with engine.connect() as connection:
            while rows := (await connection.execute(self.claim)).all():
                pipeline = client.pipeline(transaction=False)
                for event_id, event_type, aggregate_type, aggregate_id, created_at, payload in rows:
                    message = {  # the same message QuLab's relay sends
                        "event_id": event_id,
                        "event_type": event_type,
                        "aggregate_type": aggregate_type,
                        "aggregate_id": aggregate_id,
                        "occurred_at": created_at.isoformat(),
                        "payload": payload,
                    }
                    pipeline.xadd(stream, message)
                await pipeline.execute()
                mark = (
                    source.update(source.DomainEvent.__table__)
                    .where(self.events.id.in_([row[0] for row in rows]))
                    .values(status="published", published_at=source.utc_now())
                )
                await connection.execute(mark)


async def measure_relay_against_minimal(sandbox: source.Sandbox, *, events: int) -> tuple[float, float, list[float]]:
    """Events/s of QuLab's relay and of MinimalRelay, alternating rounds; the median round's pair and every ratio."""
    rounds = []
    for _ in range(RELAY_ROUNDS):
        ours, _ = await measure_relay(sandbox, relays=1, events=events)
        await source.init_db(sandbox)
        await _add_pending_events(sandbox, events)
        started = time.perf_counter()
        await MinimalRelay(sandbox).drain()
        minimal = events / (time.perf_counter() - started)
        if len(set(await _stream_ids(sandbox))) != events:
            raise AssertionError("the minimal relay did not publish every event")
        rounds.append((ours / minimal, ours, minimal))
    ratio, ours, minimal = sorted(rounds)[len(rounds) // 2]
    return ours, minimal, [round_[0] for round_ in rounds]


async def measure_idle_cost(settings: source.Settings) -> tuple[float, int]:
    """Share of one core this process spends while IDLE_SANDBOXES sandboxes' publishers sit idle."""
    redis_service = await source.RedisService.connect(settings)
    registry = source.SandboxRegistry(replace(settings, max_sandboxes=IDLE_SANDBOXES + 5), redis_service)
    try:
        sandboxes = [await registry.acquire(source.new_sandbox_id()) for _ in range(IDLE_SANDBOXES)]
        for sandbox in sandboxes:
            await source.start_event_publisher(sandbox)
        await asyncio.sleep(IDLE_SETTLE_SECONDS)
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        await asyncio.sleep(IDLE_WINDOW_SECONDS)
        share = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
        running = sum(source.outbox_service(sandbox).running for sandbox in sandboxes)
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
            f'INSERT INTO "{schema}".domain_events (id, event_type, aggregate_type, aggregate_id, payload, status,'
            ' attempts, next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7, $7)',
            str(uuid.uuid4()), "Remote", "Bench", str(uuid.uuid4()), json.dumps({"n": 1}), "pending", now,
        )
        await asyncio.sleep(0.02)
    await connection.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def measure_remote_commit_latency(sandbox: source.Sandbox) -> tuple[float, float]:
    """Median and p95 ms from a commit made by ANOTHER process to its publication (PostgreSQL: LISTEN/NOTIFY)."""
    await source.init_db(sandbox)
    service = source.outbox_service(sandbox)
    await service.start()
    try:
        dsn = sandbox.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITE_FROM_ANOTHER_PROCESS, dsn, sandbox.location, str(REMOTE_WRITES)
        )
        if await writer.wait() != 0:
            raise AssertionError("the writing process failed")
        await _wait_until_published(sandbox, REMOTE_WRITES)
    finally:
        await service.stop()
    return await _commit_to_publish_latencies(sandbox)


PANEL_SMALL, PANEL_LARGE, PANEL_READS = 100, 20_000, 30


async def _panel_seconds(sandbox: source.Sandbox, events: int) -> float:
    """Median seconds of one status-panel reading after `events` events were published and consumed."""
    await source.init_db(sandbox)
    await _add_pending_events(sandbox, events)
    service = source.outbox_service(sandbox)
    await _drain(service.publisher)
    while (await service.consumer.consume_batch()).received:
        pass
    while await source.prune_delivered_events(
        sandbox, keep=service.settings.keep_published_events, inbox_retention_seconds=service.settings.inbox_retention_seconds
    ):
        pass  # what the running publisher does after each audit
    timings = []
    for _ in range(PANEL_READS):
        started = time.perf_counter()
        await source.outbox_status(sandbox, limit=10)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


async def measure_panel_cost(sandbox: source.Sandbox) -> tuple[float, float]:
    """Status panel reading at PANEL_LARGE events ÷ at PANEL_SMALL (and the small one's ms)."""
    small = await _panel_seconds(sandbox, PANEL_SMALL)
    large = await _panel_seconds(sandbox, PANEL_LARGE)
    return large / small, small * 1000


async def measure_relay(sandbox: source.Sandbox, *, relays: int, events: int) -> tuple[float, int]:
    """Events per second for `relays` publishers draining `events` pending events; and duplicates."""
    await source.init_db(sandbox)
    await _add_pending_events(sandbox, events)
    settings = source.OutboxSettings()
    publishers = [source.OutboxPublisher(sandbox, settings) for _ in range(relays)]
    started = time.perf_counter()
    await asyncio.gather(*(_drain(publisher) for publisher in publishers))
    seconds = time.perf_counter() - started
    in_stream = await _stream_ids(sandbox)
    if len(set(in_stream)) != events:
        raise AssertionError(f"{len(set(in_stream))} of {events} events reached the stream")
    return events / seconds, len(in_stream) - len(set(in_stream))


def _relay_process(settings: source.Settings, sandbox_id: str, schema: str, start_together: Any, results: Any) -> None:
    """One relay in its own process, as relays are deployed: its own loop, pool and Redis client."""
    asyncio.run(_relay_in_this_process(settings, sandbox_id, schema, start_together, results))


async def sandbox_in_this_process(settings: source.Settings, sandbox_id: str, schema: str) -> source.Sandbox:
    """Another process's view of an existing PostgreSQL sandbox: its own engine, pool and Redis client."""
    redis_service = await source.RedisService.connect(settings)
    target = source.resolve_database_target(settings.database_url)
    engine = source.create_engine_for(target.url, settings).execution_options(schema_translate_map={None: schema})
    return source.Sandbox(
        id=sandbox_id,
        backend="postgresql",
        redis=source.RedisLink(redis_service, sandbox_id),
        settings=settings,
        location=schema,
        open_engine=lambda: engine,
        owns_engine=False,
    )


async def close_sandbox_in_this_process(sandbox: source.Sandbox) -> None:
    """Dispose what sandbox_in_this_process opened."""
    await sandbox.engine.dispose()
    await sandbox.redis.service.close()


async def _relay_in_this_process(
    settings: source.Settings, sandbox_id: str, schema: str, start_together: Any, results: Any
) -> None:
    sandbox = await sandbox_in_this_process(settings, sandbox_id, schema)
    publisher = source.OutboxPublisher(sandbox, source.OutboxSettings())
    try:
        async with sandbox.engine.connect():  # open the pool's first connection before the clock starts
            await sandbox.redis.client.ping()
        await asyncio.get_running_loop().run_in_executor(None, start_together.wait)
        await _drain(publisher)
        results.put(time.monotonic())
    finally:
        await close_sandbox_in_this_process(sandbox)


async def measure_relay_processes(
    registry: source.SandboxRegistry, sandbox: source.Sandbox, *, relays: int, events: int
) -> tuple[float, int]:
    """Events per second for `relays` relay processes draining `events` pending events; and duplicates."""
    await source.init_db(sandbox)
    await _add_pending_events(sandbox, events)
    context = multiprocessing.get_context("spawn")
    start_together, results = context.Barrier(relays + 1), context.Queue()
    processes = [
        context.Process(
            target=_relay_process, args=(registry.settings, sandbox.id, sandbox.location, start_together, results)
        )
        for _ in range(relays)
    ]
    for process in processes:
        process.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, start_together.wait)
    started = time.monotonic()
    finished = [await loop.run_in_executor(None, results.get, True, 120) for _ in processes]
    for process in processes:
        process.join(30)
    seconds = max(finished) - started
    in_stream = await _stream_ids(sandbox)
    if len(set(in_stream)) != events:
        raise AssertionError(f"{len(set(in_stream))} of {events} events reached the stream")
    return events / seconds, len(in_stream) - len(set(in_stream))


async def measure_latency(sandbox: source.Sandbox) -> tuple[float, float]:
    """Median and p95 ms from an event's write to its publication, with the publisher running."""
    user_ids = [user.id for user in await source.init_db(sandbox)]
    service = source.outbox_service(sandbox)
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


async def bench_backend(label: str, settings: source.Settings, *, two_relays: bool) -> list[Result]:
    """Every measurement on one backend (one registry, fresh sandboxes)."""
    redis_service = await source.RedisService.connect(settings)
    registry = source.SandboxRegistry(settings, redis_service)
    results: list[Result] = []
    try:
        backend = f"{label} + {'Redis' if redis_service.mode == 'redis' else 'fakeredis'}"
        sandbox = await registry.acquire(source.new_sandbox_id())
        score_only, with_event = await measure_write_cost(sandbox)
        ratio = with_event / score_only
        results += [
            Result(backend, "score-only write, median", score_only * 1000, "ms"),
            Result(backend, "score+event write (one transaction), median", with_event * 1000, "ms"),
            Result(backend, "score+event ÷ score-only", ratio, "×", "≤ 1.3", ratio <= 1.3),
        ]
        one_rate, minimal_rate, ratios = await measure_relay_against_minimal(sandbox, events=RELAY_EVENTS)
        spread = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        results += [
            Result(backend, "relay throughput, 1 relay", one_rate, "events/s", "≥ 5,000", one_rate >= 5000),
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
                single, _ = await measure_relay_processes(registry, sandbox, relays=1, events=TWO_RELAY_EVENTS)
                double, duplicates = await measure_relay_processes(registry, sandbox, relays=2, events=TWO_RELAY_EVENTS)
                rounds.append((double / single, single, double, duplicates))
            ratio, single, double, _ = sorted(rounds)[len(rounds) // 2]
            duplicates = sum(round_[3] for round_ in rounds)
            spread = ", ".join(f"{round_[0]:.2f}" for round_ in rounds)
            results += [
                Result(backend, f"1 relay process, {TWO_RELAY_EVENTS} events (median round)", single, "events/s"),
                Result(backend, f"2 relay processes, {TWO_RELAY_EVENTS} events (median round)", double, "events/s"),
                Result(backend, f"2 relays ÷ 1 relay, median of rounds {spread}", ratio, "×", "≥ 1.2", ratio >= 1.2),
                Result(backend, "events in the stream twice (2 relays, all rounds)", duplicates, "", "= 0", duplicates == 0),
            ]
        panel_ratio, panel_ms = await measure_panel_cost(await registry.acquire(source.new_sandbox_id()))
        results += [
            Result(backend, f"status panel reading at {PANEL_SMALL} events", panel_ms, "ms"),
            Result(backend, f"status panel at {PANEL_LARGE:,} events ÷ at {PANEL_SMALL}", panel_ratio, "×", "≤ 2", panel_ratio <= 2),
        ]
        median, p95 = await measure_latency(sandbox)
        results += [
            Result(backend, "commit-to-publish latency, median", median, "ms", "< 100", median < 100),
            Result(backend, "commit-to-publish latency, p95", p95, "ms"),
        ]
        if registry.backend == "postgresql":
            median, p95 = await measure_remote_commit_latency(await registry.acquire(source.new_sandbox_id()))
            results += [
                Result(backend, "commit in another process to publish, median", median, "ms", "< 100", median < 100),
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
        value = f"{result.value:,.2f} {result.unit}".strip() if result.value < 100 else f"{result.value:,.0f} {result.unit}"
        met = "" if result.met is None else ("yes" if result.met else "NO")
        rows.append((result.backend, result.measurement, value, result.target, met))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    for note in notes:
        print(f"note: {note}")


def main() -> list[Result]:
    """Run every measurement on SQLite and (when available) PostgreSQL; print and return the results."""
    results: list[Result] = []
    # The pattern is timed bare: the learner's journal (source.py 6a) is no part of what is measured.
    with bench_servers() as (postgres_url, redis_url, notes), source.journal_muted():
        base = source.Settings.from_environment()
        plans = [("SQLite", replace(base, database_url=None, redis_url=redis_url), False)]
        if postgres_url:
            plans.append(("PostgreSQL", replace(base, database_url=postgres_url, redis_url=redis_url), True))
        for label, settings, two_relays in plans:
            results += asyncio.run(bench_backend(label, settings, two_relays=two_relays))
        if "--no-idle" not in sys.argv:
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



async def _wait_until_published(sandbox: source.Sandbox, count: int, *, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while (status := await source.outbox_status(sandbox)).published < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {status.published} of {count} published after {seconds:g} s")
        await asyncio.sleep(0.01)


async def _commit_to_publish_latencies(sandbox: source.Sandbox) -> tuple[float, float]:
    """Median and p95 of created_at -> published_at over the sandbox's events, in ms."""
    async with source.get_session(sandbox) as session:
        rows = (await session.execute(select(source.DomainEvent.created_at, source.DomainEvent.published_at))).all()
    latencies = sorted((published - created).total_seconds() * 1000 for created, published in rows)
    return statistics.median(latencies), latencies[int(len(latencies) * 0.95)]

if __name__ == "__main__":
    main()
