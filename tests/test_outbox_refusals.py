"""A broker that answers but takes no writes: full (OOM) or a read-only replica (READONLY).

Real refusals from a real redis-server of the test's own: one started with `maxmemory 1mb` and
`noeviction` and filled until it refuses writes, or one made a replica of an address where
nothing listens. Such a refusal is the broker's, not any event's: the relay pauses and probes
(one outage, no event failed or charged an attempt), and once the broker takes writes again
everything pending goes out with no manual step. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
import redis
import servers
from sqlalchemy import func, select
from test_outbox import FAST, add_pending_events, counts_by_status, eventually, inbox_event_ids

from classroom.cache.link import RedisService
from classroom.outbox.circuit import BrokerCircuit
from classroom.outbox.service import OutboxService, outbox_service
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import new_sandbox_id
from source import DomainEvent, get_session

EVENTS = 6
PROBING = replace(FAST, outage_backoff_base_seconds=0.01, outage_backoff_max_seconds=0.05)


@pytest.fixture(params=["out-of-memory", "read-only"])
def refusal(request) -> str:
    return request.param


@pytest.fixture
def broker(refusal) -> Iterator[servers.RedisProcess]:
    """A redis-server of this test's own; for the out-of-memory case at most 1 MB of data and
    no eviction."""
    options = ["--maxmemory", "1mb", "--maxmemory-policy", "noeviction"]
    if refusal != "out-of-memory":
        options = []
    process = servers.RedisProcess(persistent=False, options=options).start()
    try:
        yield process
    finally:
        process.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def registry_on_broker(request, settings, broker) -> AsyncIterator[SandboxRegistry]:
    """A registry on the embedded SQLite files or on PostgreSQL, with the test's own broker."""
    database_url = (
        request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    )
    on_broker = replace(settings, database_url=database_url, redis_url=broker.url)
    redis_service = await RedisService.connect(on_broker)
    assert redis_service.mode == "redis", redis_service.reason
    registry = SandboxRegistry(on_broker, redis_service)
    try:
        yield registry
    finally:
        await registry.close()
        await redis_service.close()


def fill_until_out_of_memory(client: redis.Redis) -> int:
    """Write 10 KB values until the server refuses one (OOM: a fresh redis-server with its
    clients may be past 1 MB already); then push it well past its limit, so that no write
    squeezes through while its memory hovers at the edge."""
    written = 0
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        while written < 10_000:
            client.set(f"filler:{written}", "x" * 10_000)
            written += 1
    client.config_set("maxmemory", "4mb")
    for more in range(200):
        client.set(f"filler:more:{more}", "x" * 10_000)
    client.config_set("maxmemory", "1mb")
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("one-more", "x")
    return written


def refuse_writes(client: redis.Redis, refusal: str) -> None:
    if refusal == "out-of-memory":
        fill_until_out_of_memory(client)
    else:  # a replica of a master that is not there: it answers reads, refuses every write
        client.replicaof("127.0.0.1", servers.free_port())
        with pytest.raises(redis.exceptions.ReadOnlyError):
            client.set("one-more", "x")


def take_writes_again(client: redis.Redis, refusal: str) -> None:
    if refusal == "out-of-memory":
        client.config_set("maxmemory", "0")
    else:
        client.replicaof("NO", "ONE")
    assert client.set("one-more", "x")


async def _paused_and_probing(outbox: OutboxService) -> bool:
    # Either the relay pauses (probes keep failing) or it flaps (outages pile up): both end it.
    return outbox.circuit.probes_failed >= 3 or outbox.circuit.outages >= 3


async def test_a_broker_that_refuses_writes_pauses_the_relay_and_everything_goes_out_after(
    registry_on_broker, broker, refusal, caplog
):
    sandbox = await registry_on_broker.acquire(new_sandbox_id())
    outbox = outbox_service(sandbox, PROBING)
    await outbox.start()
    client = redis.Redis.from_url(broker.url)
    try:
        refuse_writes(client, refusal)
        with caplog.at_level(logging.WARNING, logger="qulab"):
            ids = await add_pending_events(sandbox, EVENTS)  # the commit wakes the publisher
            await eventually(lambda: _paused_and_probing(outbox))

            # Paused, not flapping: one outage, probing with backoff; no event charged.
            assert outbox.circuit.is_open and outbox.circuit.outages == 1, (
                f"{outbox.circuit.outages} outages: the relay kept resuming into the refusal"
            )
            assert await counts_by_status(sandbox) == {"pending": EVENTS}
            async with get_session(sandbox) as session:
                assert await session.scalar(select(func.max(DomainEvent.attempts))) == 0
            unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(unreachable) == 1, [r.getMessage() for r in unreachable]

        take_writes_again(client, refusal)  # no retry button, no restart
        await eventually(lambda: _all_consumed(sandbox, ids), timeout=30)
        assert await counts_by_status(sandbox) == {"published": EVENTS}
        assert not outbox.circuit.is_open
    finally:
        await outbox.stop()
        client.close()


async def _all_consumed(sandbox, ids: list[str]) -> bool:
    return sorted(await inbox_event_ids(sandbox)) == sorted(ids)


def test_an_outage_that_starts_soon_after_the_last_goes_on_with_its_backoff():
    """A broker at the edge may take a probe and refuse the next batch: the relay must not go
    back to its shortest wait each time (a probe every few milliseconds, an outage logged each)."""
    circuit = BrokerCircuit(base_seconds=1, max_seconds=8)
    circuit.open(ConnectionError("OOM"))
    circuit.probes_failed = 3  # three probes refused
    circuit.close()  # the fourth went through
    assert circuit.open(ConnectionError("OOM again")) is True  # a new outage, reported
    assert circuit.probes_failed == 4 and circuit.seconds_until_probe() >= 4  # 16 s capped at 8
    circuit.close()
    circuit.closed_at -= circuit.max_seconds  # long enough ago: a fresh outage
    circuit.open(ConnectionError("refused"))
    assert circuit.probes_failed == 0
