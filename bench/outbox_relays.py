"""The relays the outbox benchmarks run, and the events they drain (bench/outbox.py and
bench/outbox_faults.py).

- bench_servers: PostgreSQL and Redis, from the environment or started for the run;
- add_pending_events, stream_ids, drain: fill the outbox, read the stream, publish it all;
- MinimalRelay: the least a relay must do, hand-written, to compare QuLab's relay with;
- relays in processes of their own (spawned), on another process's view of a PostgreSQL sandbox.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))  # first: bench/classroom.py must not hide the classroom package

import pytest  # noqa: E402  (servers.py skips through pytest when a server is missing)
import servers  # noqa: E402
from sqlalchemy import Text, cast, select, update  # noqa: E402

import source  # noqa: E402
from classroom.cache.link import RedisLink, RedisService  # noqa: E402
from classroom.config import Settings, resolve_database_target  # noqa: E402
from classroom.engines import open_engine  # noqa: E402
from classroom.outbox.relay import OutboxSettings  # noqa: E402
from classroom.outbox.service import outbox_service  # noqa: E402
from classroom.progress.journal import journal_muted  # noqa: E402
from classroom.sandboxes.registry import SandboxRegistry  # noqa: E402
from classroom.sandboxes.reset import initialize_sandbox  # noqa: E402
from classroom.sandboxes.sandbox import Sandbox  # noqa: E402


def _server_url(
    stack: ExitStack, configured: Optional[str], start: Any, name: str, notes: list[str]
) -> Optional[str]:
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
    """PostgreSQL and Redis URLs: from the environment, else started here, else None (noted)."""
    notes: list[str] = []
    with ExitStack() as stack:
        postgres = _server_url(
            stack, servers.configured_postgres_url(), servers.postgres_server, "PostgreSQL", notes
        )
        redis_url = _server_url(
            stack, servers.configured_redis_url(), servers.redis_server, "Redis", notes
        )
        if redis_url is None:
            notes.append("without a real Redis the relay publishes to fakeredis")
        yield postgres, redis_url, notes


async def add_pending_events(sandbox: Sandbox, count: int) -> None:
    for start in range(0, count, 1000):
        async with source.get_session(sandbox) as session:
            session.add_all(
                source.DomainEvent(
                    event_type="BenchEvent",
                    aggregate_type="Bench",
                    aggregate_id=source.new_id(),
                    payload={
                        "n": n,
                        "air_score": 71.5,
                        "parameter_version": source.AIR_PARAMETER_VERSION,
                    },
                )
                for n in range(start, min(count, start + 1000))
            )


async def stream_ids(sandbox: Sandbox) -> list[str]:
    """Event ids in stream order, read 1,000 entries at a time (one XRANGE of 10,000 can outlast
    a socket timeout)."""
    ids: list[str] = []
    start = "-"
    while entries := await sandbox.redis.client.xrange(
        sandbox.redis.key("events"), min=start, count=1000
    ):
        ids += [fields["event_id"] for _, fields in entries]
        start = "(" + entries[-1][0]
    return ids


async def drain(publisher: source.OutboxPublisher) -> None:
    """Publish until nothing is left, batch after batch, as the running publisher does."""
    while (await publisher.publish_due_batch()).claimed:
        pass


class MinimalRelay:
    """The least a relay must do, hand-written, for comparison: on ONE connection held for the
    whole drain, lease 100 with UPDATE … RETURNING, XADD them in one pipeline, mark them in one
    UPDATE. It sends the same message; it keeps no lease time, checks no lease on the mark, keeps
    no stream ids, handles no error: what QuLab's relay adds on top of this is what the ratio
    measures."""

    def __init__(self, sandbox: Sandbox, batch_size: int = 100) -> None:
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
            update(source.DomainEvent.__table__)
            .where(events.id.in_(due))
            .values(claimed_by="minimal")
            .returning(
                events.id,
                events.event_type,
                events.aggregate_type,
                events.aggregate_id,
                events.created_at,
                cast(events.payload, Text),
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
                    update(source.DomainEvent.__table__)
                    .where(self.events.id.in_([row[0] for row in rows]))
                    .values(status="published", published_at=source.utc_now())
                )
                await connection.execute(mark)


def _relay_process(
    settings: Settings, sandbox_id: str, schema: str, start_together: Any, results: Any
) -> None:
    """One relay (the one QuLab runs) in its own process, as relays are deployed: its own loop,
    pool and Redis client; bare, as in the parent process: its journal muted."""
    with journal_muted():
        asyncio.run(_relay_in_this_process(settings, sandbox_id, schema, start_together, results))


async def sandbox_in_this_process(settings: Settings, sandbox_id: str, schema: str) -> Sandbox:
    """Another process's view of an existing PostgreSQL sandbox: its own engine, pool and Redis
    client."""
    redis_service = await RedisService.connect(settings)
    target = resolve_database_target(settings.database_url)
    engine = open_engine(target.url, settings)
    engine = engine.execution_options(schema_translate_map={None: schema})
    return Sandbox(
        id=sandbox_id,
        backend="postgresql",
        redis=RedisLink(redis_service, sandbox_id),
        settings=settings,
        location=schema,
        open_engine=lambda: engine,
        owns_engine=False,
    )


async def close_sandbox_in_this_process(sandbox: Sandbox) -> None:
    """Dispose what sandbox_in_this_process opened."""
    await sandbox.engine.dispose()
    await sandbox.redis.service.close()


async def _relay_in_this_process(
    settings: Settings, sandbox_id: str, schema: str, start_together: Any, results: Any
) -> None:
    sandbox = await sandbox_in_this_process(settings, sandbox_id, schema)
    publisher = outbox_service(sandbox, OutboxSettings()).publisher
    try:
        # Open the pool's first connection before the clock starts.
        async with sandbox.engine.connect():
            await sandbox.redis.client.ping()
        await asyncio.get_running_loop().run_in_executor(None, start_together.wait)
        await drain(publisher)
        results.put(time.monotonic())
    finally:
        await close_sandbox_in_this_process(sandbox)


async def measure_relay_processes(
    registry: SandboxRegistry, sandbox: Sandbox, *, relays: int, events: int
) -> tuple[float, int]:
    """Events per second for `relays` relay processes draining `events` pending events; and
    duplicates."""
    await initialize_sandbox(sandbox)
    await add_pending_events(sandbox, events)
    context = multiprocessing.get_context("spawn")
    start_together, results = context.Barrier(relays + 1), context.Queue()
    processes = [
        context.Process(
            target=_relay_process,
            args=(registry.settings, sandbox.id, sandbox.location, start_together, results),
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
    in_stream = await stream_ids(sandbox)
    if len(set(in_stream)) != events:
        raise AssertionError(f"{len(set(in_stream))} of {events} events reached the stream")
    return events / seconds, len(in_stream) - len(set(in_stream))
