"""The outbox under a real class's faults, with exact counts: nothing lost, nothing applied twice.

Run from the project root: `python3 bench/outbox_faults.py`. Faults are real: a redis-server on
loopback killed and started again (tests/servers.py RedisProcess), relay processes killed with
SIGKILL. Needs redis-server; the relay faults need PostgreSQL (DATABASE_URL's, else a throwaway
one). The broker outage lasts QULAB_FAULT_OUTAGE_SECONDS (default 30 s; the issue's 4 minutes is
`QULAB_FAULT_OUTAGE_SECONDS=240`): the publisher's backoff is capped at 30 s, so a longer outage
changes how long it waits, not what it delivers.

1. consumer 12,000 events behind          -> 12,000 of 12,000 delivered, each applied once
2. broker down during a burst              -> all delivered after recovery, 0 failed, no manual step
3. broker restarted without persistence    -> the audit republishes what was lost, each applied once
4. relay SIGKILLed mid-batch               -> 0 lost, 0 applied twice
5. 4 relay processes at once               -> 0 events twice in the stream
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))  # first: bench/classroom.py must not hide the classroom package

import outbox_relays as relays  # noqa: E402
import pytest  # noqa: E402  (servers.py skips through pytest when a server is missing)
import servers  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

import source  # noqa: E402
from classroom.cache.link import RedisService  # noqa: E402
from classroom.config import Settings  # noqa: E402
from classroom.demos.eventing import store_airscore_burst  # noqa: E402
from classroom.outbox.relay import OutboxSettings  # noqa: E402
from classroom.outbox.service import outbox_service  # noqa: E402
from classroom.sandboxes.registry import SandboxRegistry  # noqa: E402
from classroom.sandboxes.reset import initialize_sandbox  # noqa: E402
from classroom.sandboxes.sandbox import Sandbox, new_sandbox_id  # noqa: E402

BEHIND = 12_000
BURST = 2_000
OUTAGE_SECONDS = float(os.environ.get("QULAB_FAULT_OUTAGE_SECONDS", "30"))
KILLED_RELAY_EVENTS = 3_000
FOUR_RELAY_EVENTS = 8_000
DEADLINE_SECONDS = 300.0
# Default settings, except that the outbox keeps every event, so each can be counted at the end
# (retention prunes published and consumed events; it has no part in delivering them).
KEEP_ALL = replace(OutboxSettings(), keep_published_events=10**9)


@dataclass(frozen=True)
class FaultResult:
    """One fault and what came of it."""

    fault: str
    counts: str
    met: bool


async def _wait_for(what: str, check: Any, *, timeout: float = DEADLINE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout:g} s")
        await asyncio.sleep(0.1)


async def _counts(sandbox: Sandbox) -> dict[str, int]:
    events = source.DomainEvent
    async with source.get_session(sandbox) as session:
        statuses = select(events.status, func.count()).group_by(events.status)
        by_status = dict((await session.execute(statuses)).all())
        inbox = select(func.count()).select_from(source.ConsumedEvent)
        by_status["inbox"] = await session.scalar(inbox)
        by_status["max_attempts"] = await session.scalar(select(func.max(events.attempts))) or 0
    return by_status


async def _inbox_ids(sandbox: Sandbox) -> list[str]:
    async with source.get_session(sandbox) as session:
        return list((await session.scalars(select(source.ConsumedEvent.event_id))).all())


async def _all_ids(sandbox: Sandbox) -> set[str]:
    async with source.get_session(sandbox) as session:
        return set((await session.scalars(select(source.DomainEvent.id))).all())


class Lab:
    """A registry on the given servers, closed on exit."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __aenter__(self) -> SandboxRegistry:
        self.redis_service = await RedisService.connect(self.settings)
        self.registry = SandboxRegistry(self.settings, self.redis_service)
        return self.registry

    async def __aexit__(self, *exc: Any) -> None:
        await self.registry.close()
        await self.redis_service.close()


def _delivery(sandbox_ids: set[str], inbox: list[str]) -> tuple[int, int, int]:
    """(delivered, lost, applied twice): the inbox has one row per applied event (its primary
    key)."""
    applied = Counter(inbox)
    return (
        len(sandbox_ids & set(applied)),
        len(sandbox_ids - set(applied)),
        sum(n - 1 for n in applied.values()),
    )


async def consumer_far_behind(settings: Settings) -> FaultResult:
    async with Lab(settings) as registry:
        sandbox = await registry.acquire(new_sandbox_id())
        service = outbox_service(sandbox, KEEP_ALL)
        await (
            service.consumer.consume_batch()
        )  # the consumer group exists; then the consumer stops reading
        await relays.add_pending_events(sandbox, BEHIND)
        await relays.drain(service.publisher)
        stream_length = await sandbox.redis.client.xlen(sandbox.redis.key("events"))
        await service.start()
        await _wait_for("12,000 consumed", lambda: _inbox_count_is(sandbox, BEHIND))
        await service.stop()
        delivered, lost, twice = _delivery(await _all_ids(sandbox), await _inbox_ids(sandbox))
        after = await sandbox.redis.client.xlen(sandbox.redis.key("events"))
    counts = (
        f"stream held {stream_length:,} unread entries (none trimmed); "
        f"delivered {delivered:,} of {BEHIND:,}; lost {lost}; applied twice {twice}; "
        f"stream after the consumer caught up: {after:,} entries"
    )
    return FaultResult(
        f"consumer {BEHIND:,} events behind", counts, delivered == BEHIND and lost == twice == 0
    )


async def _inbox_count_is(sandbox: Sandbox, count: int) -> bool:
    return (await _counts(sandbox))["inbox"] >= count


async def broker_down_during_a_burst(
    settings: Settings, redis_process: servers.RedisProcess
) -> FaultResult:
    async with Lab(replace(settings, redis_url=redis_process.url)) as registry:
        sandbox = await registry.acquire(new_sandbox_id())
        await initialize_sandbox(sandbox)
        service = outbox_service(sandbox, KEEP_ALL)
        await service.start()
        burst = asyncio.create_task(store_airscore_burst(sandbox, count=BURST))
        await _wait_for("a first part published", lambda: _published_at_least(sandbox, 200))
        redis_process.stop()  # killed mid-burst
        down_at = time.monotonic()
        result = await burst
        await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        during = await _counts(sandbox)
        redis_process.start()  # the same AOF directory: the stream comes back
        back_at = time.monotonic()
        await _wait_for("all delivered", lambda: _inbox_count_is(sandbox, BURST))
        recovered_in = time.monotonic() - back_at
        await service.stop()
        final = await _counts(sandbox)
        delivered, lost, twice = _delivery(await _all_ids(sandbox), await _inbox_ids(sandbox))
        outages = service.circuit.outages
    counts = (
        f"{result.writes:,} writes committed; broker down {OUTAGE_SECONDS:g} s "
        f"(pending then: {during.get('pending', 0):,}, failed {during.get('failed', 0)}, "
        f"most attempts of any event {during['max_attempts']}); after recovery, with no "
        f"manual step: delivered {delivered:,} of {BURST:,} in {recovered_in:.1f} s, "
        f"failed {final.get('failed', 0)}, lost {lost}, applied twice {twice}; "
        f"outages logged {outages}"
    )
    met = (
        delivered == BURST
        and lost == twice == 0
        and final.get("failed", 0) == 0
        and during["max_attempts"] == 0
    )
    return FaultResult(f"broker down {OUTAGE_SECONDS:g} s during a burst of {BURST:,}", counts, met)


async def _published_at_least(sandbox: Sandbox, count: int) -> bool:
    return (await _counts(sandbox)).get("published", 0) >= count


async def broker_restart_without_persistence(
    settings: Settings, redis_process: servers.RedisProcess
) -> FaultResult:
    async with Lab(replace(settings, redis_url=redis_process.url)) as registry:
        sandbox = await registry.acquire(new_sandbox_id())
        await initialize_sandbox(sandbox)
        service = outbox_service(sandbox, replace(KEEP_ALL, audit_interval_seconds=5.0))
        await service.consumer.consume_batch()
        burst = asyncio.create_task(store_airscore_burst(sandbox, count=BURST))
        await asyncio.sleep(0.5)
        # The relay runs, the consumer is slow to start: entries wait unread in the stream.
        await relays.drain(service.publisher)
        unread = await sandbox.redis.client.xlen(sandbox.redis.key("events"))
        # Killed and started again, nothing saved: the unread entries are gone.
        redis_process.restart()
        await service.start()
        await burst
        await _wait_for("all delivered", lambda: _inbox_count_is(sandbox, BURST))
        await service.stop()
        delivered, lost, twice = _delivery(await _all_ids(sandbox), await _inbox_ids(sandbox))
        republished = service.audit.republished_total
    counts = (
        f"{unread:,} published entries unread when Redis restarted without persistence; "
        f"the audit republished {republished:,}; delivered {delivered:,} of {BURST:,}; "
        f"lost {lost}; applied twice {twice}"
    )
    return FaultResult(
        "broker restarted without persistence mid-burst",
        counts,
        delivered == BURST and lost == twice == 0 and republished > 0,
    )


SLOW_MARK_SECONDS = 0.3


def _doomed_relay(settings: Settings, sandbox_id: str, schema: str, ready: Any) -> None:
    """A relay (the lesson's) that pauses between sending a batch and marking it: SIGKILL finds
    it mid-batch."""

    class SlowToMark(source.OutboxPublisher):
        async def mark_published(self, connection: Any, stream_ids: dict[str, str]) -> int:
            ready.set()
            await asyncio.sleep(SLOW_MARK_SECONDS)
            return await super().mark_published(connection, stream_ids)

    async def run() -> None:
        sandbox = await relays.sandbox_in_this_process(settings, sandbox_id, schema)
        defaults = OutboxSettings()
        publisher = SlowToMark(
            sandbox,
            batch_size=defaults.batch_size,
            lease_seconds=2.0,
            broker_timeout_seconds=defaults.broker_timeout_seconds,
        )
        await relays.drain(publisher)

    asyncio.run(run())


async def relay_killed_mid_batch(registry: SandboxRegistry) -> FaultResult:
    sandbox = await registry.acquire(new_sandbox_id())
    await initialize_sandbox(sandbox)
    await relays.add_pending_events(sandbox, KILLED_RELAY_EVENTS)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    relay = context.Process(
        target=_doomed_relay, args=(registry.settings, sandbox.id, sandbox.location, ready)
    )
    relay.start()
    for _ in range(4):  # the 4th batch: sent to the stream, its mark not yet made
        if not await asyncio.get_running_loop().run_in_executor(None, ready.wait, 60):
            raise AssertionError("the relay to kill never reached a mark")
        ready.clear()
    os.kill(relay.pid, signal.SIGKILL)
    relay.join(10)
    marked = (await _counts(sandbox)).get("published", 0)
    service = outbox_service(
        sandbox, KEEP_ALL
    )  # a surviving relay: takes the dead one's leases once they expire
    await service.start()
    await _wait_for("all delivered", lambda: _inbox_count_is(sandbox, KILLED_RELAY_EVENTS))
    await service.stop()
    in_stream = Counter(await relays.stream_ids(sandbox))
    delivered, lost, twice = _delivery(await _all_ids(sandbox), await _inbox_ids(sandbox))
    sent_twice = sum(n - 1 for n in in_stream.values())
    counts = (
        f"SIGKILL after {marked:,} events were marked published, a batch sent but not marked; "
        f"delivered {delivered:,} of {KILLED_RELAY_EVENTS:,}; lost {lost}; "
        f"applied twice {twice}; sent twice {sent_twice} (the batch in flight), all recognised "
        f"by the consumer's inbox ({service.consumer.duplicates_ignored} duplicates ignored)"
    )
    return FaultResult(
        "relay SIGKILLed mid-batch", counts, delivered == KILLED_RELAY_EVENTS and lost == twice == 0
    )


async def four_relays(registry: SandboxRegistry) -> FaultResult:
    sandbox = await registry.acquire(new_sandbox_id())
    rate, duplicates = await relays.measure_relay_processes(
        registry, sandbox, relays=4, events=FOUR_RELAY_EVENTS
    )
    in_stream = len(await relays.stream_ids(sandbox))
    counts = (
        f"{FOUR_RELAY_EVENTS:,} events, {in_stream:,} stream entries, {duplicates} twice, "
        f"{rate:,.0f} events/s together"
    )
    return FaultResult(
        "4 relay processes at once", counts, duplicates == 0 and in_stream == FOUR_RELAY_EVENTS
    )


async def run_faults(
    settings: Settings, postgres_url: Optional[str], notes: list[str]
) -> list[FaultResult]:
    results: list[FaultResult] = []

    def report(result: FaultResult) -> None:
        results.append(result)
        print(f"[{'ok' if result.met else 'FAILED'}] {result.fault}: {result.counts}", flush=True)

    durable = servers.RedisProcess(persistent=True).start()
    forgetful = servers.RedisProcess(persistent=False).start()
    try:
        embedded = replace(settings, database_url=None, redis_url=durable.url)
        report(await consumer_far_behind(embedded))
        report(await broker_down_during_a_burst(embedded, durable))
        report(await broker_restart_without_persistence(embedded, forgetful))
        if postgres_url:
            async with Lab(
                replace(settings, database_url=postgres_url, redis_url=durable.url)
            ) as registry:
                report(await relay_killed_mid_batch(registry))
                report(await four_relays(registry))
        else:
            notes.append("PostgreSQL not available: the relay-process faults (4 and 5) did not run")
    finally:
        durable.close()
        forgetful.close()
    return results


def main() -> list[FaultResult]:
    """Run every fault and print one line of exact counts each."""
    notes: list[str] = []
    with ExitStack() as stack:
        postgres_url = servers.configured_postgres_url()
        if postgres_url is None:
            try:
                postgres_url = stack.enter_context(servers.postgres_server())
            except pytest.skip.Exception as reason:
                notes.append(f"PostgreSQL not available: {reason}")
        results = asyncio.run(run_faults(Settings.from_environment(), postgres_url, notes))
    for note in notes:
        print(f"note: {note}")
    return results


if __name__ == "__main__":
    main()
