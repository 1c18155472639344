"""The outbox when nothing happens: an idle publisher waits for its wake-up instead of polling,
an event another relay left leased is still published when the lease ends, and a whole class of
consumers looking at once never takes the client's full connection pool for a broker outage.

No timings are asserted: each test counts statements or checks what was delivered.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import servers
from sqlalchemy import event, select
from test_outbox import (
    FAST,
    add_pending_events,
    counts_by_status,
    eventually,
    inbox_event_ids,
    new_consumer,
    new_publisher,
    watch_idle_waits,
)

import source
from classroom.cache.link import RedisService
from classroom.outbox import watch
from classroom.outbox.relay import GuardedConsumer
from classroom.outbox.service import outbox_service
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import new_sandbox_id
from source import DomainEvent, get_session


class EventStatements:
    """Each statement on domain_events the sandbox's engine runs (any connection) while attached."""

    def __init__(self, sandbox: source.Sandbox) -> None:
        self.engine = sandbox.engine.sync_engine
        self.statements: list[str] = []

    def _record(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if "domain_events" in statement:
            self.statements.append(statement)

    def __enter__(self) -> EventStatements:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)


async def test_an_idle_publisher_waits_for_the_commit_without_polling_the_database(
    sandbox_with_users, monkeypatch
):
    # FAST's backoff (0.02 s doubling to 0.2 s) would claim about five times a second if it polled.
    idle_waits = watch_idle_waits(monkeypatch)
    service = outbox_service(sandbox_with_users, FAST)
    assert await service.start()
    assert service.every_commit_wakes_the_publisher  # in-process on SQLite; LISTEN on PostgreSQL
    # its first looks found nothing pending (and nothing to audit): it waits for a commit now,
    # looking on its own only every quiet_look_seconds
    await eventually(lambda: idle_waits.settled(service, at_least=FAST.quiet_look_seconds))
    with EventStatements(sandbox_with_users) as idle:
        await asyncio.sleep(1.5)  # time passes on purpose: a polling publisher would query
    assert idle.statements == []
    user = (await source.list_users(sandbox_with_users))[0]
    stored = await source.calculate_and_store_airscore(
        sandbox_with_users, user_id=user.id, occupation_code="15-1252"
    )
    await eventually(lambda: inbox_event_ids(sandbox_with_users))  # the commit woke it
    assert await inbox_event_ids(sandbox_with_users) == [stored.event.id]
    assert await service.stop()


async def test_an_event_left_leased_by_a_dead_relay_is_published_when_its_lease_ends(sandbox):
    ids = await add_pending_events(sandbox, 3)
    dead = new_publisher(sandbox, replace(FAST, lease_seconds=1.0), name="publisher-that-died")
    async with sandbox.engine.connect() as connection:
        leased = await dead.claim_due_events(connection)
        await connection.commit()
    assert len(leased) == 3  # ...and it dies before sending them
    # No commit will wake this publisher and its safety look is an hour away: only the lease end
    # can.
    service = outbox_service(sandbox, replace(FAST, quiet_look_seconds=3600))
    assert await service.start()
    await eventually(lambda: _all_published(sandbox, 3), timeout=20)
    async with get_session(sandbox) as session:
        statement = select(DomainEvent.id).where(DomainEvent.status == "published")
        published = (await session.scalars(statement)).all()
    assert sorted(published) == sorted(ids)
    assert await service.stop()


async def _all_published(sandbox: source.Sandbox, count: int) -> bool:
    return (await counts_by_status(sandbox)).get("published") == count


async def test_a_publisher_looks_ahead_to_when_the_next_event_can_be_claimed(sandbox):
    publisher = outbox_service(sandbox, FAST).publisher
    assert await publisher.seconds_until_claimable() == float("inf")  # nothing pending
    await add_pending_events(sandbox, 2)
    assert await publisher.seconds_until_claimable() == 0.0
    other = new_publisher(sandbox, replace(FAST, lease_seconds=300), name="another-relay")
    async with sandbox.engine.connect() as connection:
        assert len(await other.claim_due_events(connection)) == 2
        await connection.commit()
    ahead = await publisher.seconds_until_claimable()
    assert 0 < ahead <= 300


async def test_a_class_of_consumers_looking_at_once_is_not_taken_for_a_broker_outage(
    settings, real_redis_url
):
    # redis-py's pool holds 100 connections; 150 consumers reading at once used to get
    # MaxConnectionsError, a ConnectionError, which the relay treats as the broker being down.
    # The consumers are the ones a sandbox's outbox runs: their broker calls take turns.
    on_redis = replace(settings, redis_url=real_redis_url)
    redis_service = await RedisService.connect(on_redis)
    registry = SandboxRegistry(on_redis, redis_service)
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        assert (await new_consumer(sandbox).consume_batch()).group_created
        await add_pending_events(sandbox, 1)
        assert (await new_publisher(sandbox).publish_due_batch()).published == 1
        outbox = outbox_service(sandbox, FAST)
        consumers = [GuardedConsumer(outbox) for _ in range(150)]
        reports = await asyncio.gather(
            *(consumer.consume_batch() for consumer in consumers), return_exceptions=True
        )
        for consumer in consumers:
            consumer.stop_watching()
        assert [report for report in reports if isinstance(report, BaseException)] == []
        # a guarded consumer takes a broker error for an outage rather than raising it: none was
        assert not outbox.circuit.is_open, outbox.circuit.error
        assert not any("error" in line for line in outbox.activity.lines), outbox.activity.lines
        assert sum(report.recorded for report in reports) == 1  # one of them got the event, once
    finally:
        await registry.close()
        await redis_service.close()


async def test_an_idle_consumer_is_woken_by_the_process_wide_look_for_entries_another_process_added(  # noqa: E501
    sandbox,
):
    # Its own safety look is an hour away: only the shared look (every idle_wait_max_seconds)
    # can wake it.
    service = outbox_service(sandbox, replace(FAST, quiet_look_seconds=3600))
    assert await service.start()
    await eventually(lambda: _watched(sandbox))
    foreign = source.new_id()  # published by a relay in another process: no wake-up here
    stream = sandbox.redis.key("events")
    await sandbox.redis.client.xadd(stream, {"event_id": foreign, "event_type": "Remote"})
    await eventually(lambda: inbox_event_ids(sandbox))
    assert await inbox_event_ids(sandbox) == [foreign]
    assert await service.stop()


async def _watched(sandbox: source.Sandbox) -> bool:
    return any(stream.watching for watches in source_watches() for stream in watches)


def source_watches():
    return [list(per_loop.values()) for per_loop in watch._by_loop.values()]


async def test_idle_consumers_of_many_sandboxes_share_one_look_instead_of_reading_each(settings):
    with servers.redis_server() as url:
        on_redis = replace(settings, redis_url=url)
        redis_service = await RedisService.connect(on_redis)
        registry = SandboxRegistry(on_redis, redis_service)
        try:
            sandboxes = [await registry.acquire(new_sandbox_id()) for _ in range(10)]
            quiet = replace(FAST, quiet_look_seconds=3600)
            services = [outbox_service(sandbox, quiet) for sandbox in sandboxes]
            for service in services:
                assert await service.start()
            shared = await eventually(lambda: _watch_of(redis_service.client, count=10))
            await redis_service.client.config_resetstat()
            looks = (
                shared.looks
            )  # a look under way at the reset counts only in part: wait for 3 more
            await eventually(lambda: _looked(shared, looks + 4))
            stats = await redis_service.client.info("commandstats")
            calls = {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in stats.items()}
            # nobody polled on their own...
            assert calls.get("xreadgroup", 0) == 0 and calls.get("xautoclaim", 0) == 0
            # ...the shared look asked about every stream each time
            assert calls.get("xinfo|groups", 0) >= 3 * 10
            for service in services:
                assert await service.stop()
        finally:
            await registry.close()
            await redis_service.close()


async def _watch_of(client, *, count: int):
    for watches in source_watches():
        for shared in watches:
            if shared.client is client and shared.watching == count:
                return shared
    return None


async def _looked(shared, looks: int) -> bool:
    return shared.looks >= looks
