"""The outbox over a whole class: lagging consumers, outages, lost stream entries, dormant sandboxes.

Each fault is real where it can be: fakeredis's own outage switch, a real redis-server stopped and
started again, entries really gone from the stream. Timings are shrunk through OutboxSettings.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sqlalchemy import func, select

import servers
import source
from source import DomainEvent, OutboxPublisher, StreamConsumer, get_session
from test_outbox import FAST, add_pending_events, counts_by_status, drain, drain_consumer, eventually, inbox_event_ids, stream_event_ids


async def test_retention_never_trims_entries_the_consumer_group_has_not_acknowledged(sandbox):
    settings = replace(FAST, batch_size=100, stream_trim_above=50, consumer_batch_size=40)
    consumer = StreamConsumer(sandbox, settings)
    await consumer.consume_batch()  # the group exists before anything is published
    ids = await add_pending_events(sandbox, 300)
    await drain(OutboxPublisher(sandbox, settings))  # the consumer is 300 behind
    client, stream = sandbox.redis.client, sandbox.redis.key("events")
    assert await source.trim_acknowledged_entries(client, stream, keep_at_least=50) == 0, "nothing was read yet"
    await consumer.consume_batch()  # reads 40 (acknowledged)
    await client.xreadgroup(source.EVENT_CONSUMER_GROUP, "slow", {stream: ">"}, count=10)  # read, never acknowledged
    assert await source.trim_acknowledged_entries(client, stream, keep_at_least=50) == 40
    assert await client.xlen(stream) == 260  # 10 unacknowledged + 250 unread stay
    async def everything_recorded() -> bool:  # the rest, and the 10 reclaimed from "slow" once idle
        await drain_consumer(consumer)
        return sorted(await inbox_event_ids(sandbox)) == sorted(ids)

    await eventually(everything_recorded)
    backlog = await source.read_stream_backlog(client, stream, source.EVENT_CONSUMER_GROUP)
    assert backlog.lag == 0


async def test_a_consumer_far_behind_gets_every_event_once(sandbox):
    settings = replace(FAST, batch_size=100, stream_trim_above=100, consumer_batch_size=100)
    service = source.outbox_service(sandbox, settings)
    await service.consumer.consume_batch()  # the group exists, then the consumer falls behind
    ids = await add_pending_events(sandbox, 1200)
    await drain(service.publisher)
    assert set(await stream_event_ids(sandbox)) == set(ids), "retention dropped unread entries"
    await service.start()
    await eventually(lambda: _all_delivered(sandbox, ids), timeout=30)
    await service.stop()
    assert Counter(await inbox_event_ids(sandbox)) == Counter(ids)
    assert await counts_by_status(sandbox) == {"published": 1200}
    assert len(await stream_event_ids(sandbox)) <= 100 + settings.consumer_batch_size  # read entries were trimmed


async def _all_delivered(sandbox: source.Sandbox, ids: list[str]) -> bool:
    return len(await inbox_event_ids(sandbox)) == len(ids)


async def test_an_outage_pauses_the_relay_is_logged_once_and_spends_no_attempts(sandbox, caplog):
    service = source.outbox_service(sandbox, replace(FAST, outage_backoff_base_seconds=0.01, outage_backoff_max_seconds=0.03))
    await service.start()
    await source.set_broker_outage(sandbox, cut=True)
    ids = await add_pending_events(sandbox, 30)
    with caplog.at_level(logging.WARNING, logger="qulab"):
        await eventually(lambda: _circuit_probed(service, 10))  # ten failed probes: ten passes at least
    paused_lines = [line for line in service.activity if "relay paused" in line]
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(paused_lines) == 1 and len(warnings) == 1, (paused_lines, [r.getMessage() for r in warnings])
    async with get_session(sandbox) as session:
        assert await session.scalar(select(func.max(DomainEvent.attempts))) == 0
    assert await counts_by_status(sandbox) == {"pending": 30}

    await source.set_broker_outage(sandbox, cut=False)  # recovery: no retry button, no manual step
    await eventually(lambda: _all_delivered(sandbox, ids))
    assert await counts_by_status(sandbox) == {"published": 30}
    assert sum("answers again" in line for line in service.activity) == 1
    await service.stop()


async def _circuit_probed(service: source.OutboxService, probes: int) -> bool:
    return service.circuit.probes_failed >= probes


async def test_a_broker_wide_refusal_pauses_like_an_outage_and_a_message_refusal_fails_the_event():
    import redis.exceptions

    assert source.is_broker_wide_refusal(redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'"))
    assert source.is_broker_wide_refusal(redis.exceptions.ResponseError("LOADING Redis is loading the dataset in memory"))
    assert source.is_broker_wide_refusal(redis.exceptions.ConnectionError("reset by peer"))
    assert not source.is_broker_wide_refusal(redis.exceptions.ResponseError("ERR value is not a valid float"))


async def test_the_audit_republishes_published_events_the_broker_lost_and_each_is_applied_once(sandbox):
    settings = replace(FAST, audit_interval_seconds=0.05)
    service = source.outbox_service(sandbox, settings)
    consumed_first = await add_pending_events(sandbox, 20)
    await service.start()
    await eventually(lambda: _all_delivered(sandbox, consumed_first))
    await service.stop()
    lost = await add_pending_events(sandbox, 30)
    await drain(service.publisher)  # published, then the broker forgets them before anyone reads them
    await sandbox.redis.client.delete(sandbox.redis.key("events"))
    assert await counts_by_status(sandbox) == {"published": 50}

    await service.start()
    everything = consumed_first + lost
    await eventually(lambda: _all_delivered(sandbox, everything))
    await service.stop()
    assert Counter(await inbox_event_ids(sandbox)) == Counter(everything)  # each applied exactly once
    assert service.audit.republished_total == 30 and service.audit.last is not None
    status = await source.outbox_status(sandbox)
    assert status.republished_by_audits == 30 and status.published == 50 and status.delivered == 50


async def test_the_audit_leaves_events_that_are_only_unread_alone(sandbox):
    await StreamConsumer(sandbox, FAST).consume_batch()
    await add_pending_events(sandbox, 10)
    await drain(OutboxPublisher(sandbox, FAST))
    report = await source.PublishedEventAudit(sandbox, FAST).run()
    assert (report.checked, report.missing, report.republished) == (10, 0, 0)
    assert await counts_by_status(sandbox) == {"published": 10}


async def test_a_dormant_sandbox_publishes_what_is_pending_then_stops_and_resumes_on_return(sandbox):
    service = source.outbox_service(sandbox, replace(FAST, batch_size=100, idle_wait_seconds=60, idle_wait_max_seconds=60))
    first_pass = asyncio.Event()
    publish = service.publisher.publish_due_batch

    async def publish_and_tell(*connection):
        report = await publish(*connection)
        first_pass.set()
        return report

    service.publisher.publish_due_batch = publish_and_tell
    await service.consumer.consume_batch()  # creates the group now: its creation would wake the publisher
    await service.start()
    await asyncio.wait_for(first_pass.wait(), 10)  # now idle for a minute
    rows = [{"event_type": "T", "aggregate_type": "T", "aggregate_id": source._new_id(), "payload": {"n": n}} for n in range(250)]
    async with sandbox.engine.begin() as connection:  # written by another process: no wake-up here
        if sandbox.backend == "postgresql":  # not even LISTEN/NOTIFY's
            await connection.execute(source.text(f'DROP TRIGGER qulab_outbox_notify ON "{sandbox.location}".domain_events'))
        await connection.execute(source.insert(DomainEvent), rows)
    flushed = await source.publish_pending_and_stop(sandbox)
    assert flushed == 250, list(service.activity)
    assert not service.running and service.resume_on_return
    assert await counts_by_status(sandbox) == {"published": 250}
    assert len(set(await stream_event_ids(sandbox))) == 250
    assert await source.resume_event_publisher(sandbox) is True and service.running
    assert await source.resume_event_publisher(sandbox) is False
    await service.stop()


async def test_a_sandbox_whose_publisher_was_off_stays_off_after_it_wakes(sandbox):
    source.outbox_service(sandbox, FAST)
    assert await source.publish_pending_and_stop(sandbox) == 0
    assert await source.resume_event_publisher(sandbox) is False
    assert not source.outbox_service(sandbox).running


async def test_fakeredis_says_its_stream_lives_in_the_process(sandbox):
    durability = await source.broker_durability(sandbox)
    if sandbox.redis.service.mode == "fakeredis":
        assert durability.kind == "in-process" and durability.restart_can_lose_events
    else:  # what the server itself says (CI's and the fixtures' Redis run with appendonly yes)
        appendonly = (await sandbox.redis.client.config_get("appendonly"))["appendonly"]
        assert (durability.kind == "aof") == (appendonly == "yes") and durability.kind != "unknown"
        assert durability.restart_can_lose_events == (appendonly != "yes")


INSERT_FROM_ANOTHER_PROCESS = """
import asyncio, json, sys, uuid, datetime
import asyncpg

async def main(dsn, schema, count):
    connection = await asyncpg.connect(dsn)
    now = datetime.datetime.now(datetime.timezone.utc)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    await connection.executemany(
        f'INSERT INTO "{schema}".domain_events (id, event_type, aggregate_type, aggregate_id, payload, status,'
        ' attempts, next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7, $7)',
        [(event_id, "Remote", "Test", str(uuid.uuid4()), json.dumps({"from": "another process"}), "pending", now) for event_id in ids],
    )
    await connection.close()
    print(" ".join(ids))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_a_commit_in_another_process_wakes_the_publisher_through_listen_notify(postgres_registry):
    sandbox = await postgres_registry.acquire(source.new_sandbox_id())
    service = source.outbox_service(sandbox, replace(FAST, idle_wait_seconds=120, idle_wait_max_seconds=120))
    await service.consumer.consume_batch()  # the group exists: nothing else wakes the publisher
    await service.start()
    await asyncio.sleep(0.2)  # let both workers settle into their two-minute idle wait
    dsn = sandbox.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", INSERT_FROM_ANOTHER_PROCESS, dsn, sandbox.location, "3", stdout=asyncio.subprocess.PIPE
    )
    output, _ = await process.communicate()
    assert process.returncode == 0
    ids = output.decode().split()
    # Only the notification can wake it this soon: its idle wait is two minutes.
    await eventually(lambda: _published(sandbox, 3), timeout=20)
    assert sorted(await stream_event_ids(sandbox)) == sorted(ids)
    listener = service._notifications
    assert listener is not None and listener.received >= 1 and listener.connected
    budget = sandbox.connection_budget
    in_use = budget.in_use if budget is not None else None
    await service.stop()  # the last subscriber out closes the one listening connection
    assert not service._notifications and not listener.connected
    if budget is not None:  # it was counted in the process's connection budget, and is given back
        assert budget.in_use == in_use - 1


async def _published(sandbox: source.Sandbox, count: int) -> bool:
    return (await counts_by_status(sandbox)).get("published") == count


@pytest.fixture
def restartable_redis() -> Iterator[servers.RedisProcess]:
    """A real redis-server without persistence that the test may kill and start again."""
    redis_process = servers.RedisProcess(persistent=False).start()
    try:
        yield redis_process
    finally:
        redis_process.close()


async def test_a_broker_restart_without_persistence_is_caught_by_the_audit(settings, restartable_redis):
    on_redis = replace(settings, redis_url=restartable_redis.url)
    redis_service = await source.RedisService.connect(on_redis)
    registry = source.SandboxRegistry(on_redis, redis_service)
    try:
        assert redis_service.mode == "redis"
        sandbox = await registry.acquire(source.new_sandbox_id())
        assert (await source.broker_durability(sandbox)).kind == "none"
        service = source.outbox_service(sandbox, replace(FAST, audit_interval_seconds=0.1))
        await service.start()
        delivered_before = await add_pending_events(sandbox, 20)
        await eventually(lambda: _all_delivered(sandbox, delivered_before))
        await service.stop()
        sent_not_read = await add_pending_events(sandbox, 200)
        await drain(service.publisher)  # in the stream, marked published, read by nobody yet
        restartable_redis.restart()  # killed: the stream and its consumer group are gone

        await service.start()
        everything = delivered_before + sent_not_read
        await eventually(lambda: _all_delivered(sandbox, everything), timeout=30)
        await service.stop()
        assert Counter(await inbox_event_ids(sandbox)) == Counter(everything)  # each applied exactly once
        assert service.audit.republished_total == 200
        assert await counts_by_status(sandbox) == {"published": 220}
    finally:
        await registry.close()
        await redis_service.close()


def test_ci_and_the_fixtures_run_redis_with_an_append_only_file():
    root = Path(__file__).resolve().parent.parent
    assert "--appendonly yes" in (root / ".ci" / "run").read_text()
    assert '"--appendonly", "yes"' in (root / "tests" / "servers.py").read_text()


async def test_a_redis_with_an_append_only_file_says_so(real_redis_url):
    client = source.redis_asyncio.from_url(real_redis_url, decode_responses=True)
    try:
        durability = await source.read_broker_durability(client, in_process=False)
    finally:
        await client.aclose()
    assert durability.kind == "aof" and not durability.restart_can_lose_events


async def test_through_the_sandbox_lifecycle_a_dormant_publisher_flushes_and_a_woken_one_runs_on_the_new_engine(settings):
    no_grace = source.Settings(**{**settings.__dict__, "sandbox_grace_seconds": 0})
    redis_service = await source.RedisService.connect(no_grace)
    registry = source.SandboxRegistry(no_grace, redis_service)
    try:
        sandbox = await registry.acquire(source.new_sandbox_id(), holder="tab-1")
        service = source.outbox_service(sandbox, FAST)
        await service.start()
        before = await add_pending_events(sandbox, 40)
        await eventually(lambda: _published(sandbox, 40))
        registry.release_holder("tab-1")  # the tab closed: after the grace period the sandbox sleeps
        assert sandbox.id in (await registry.sweep())["dormant"]
        assert not service.running and service.resume_on_return

        again = await registry.acquire(sandbox.id, holder="tab-2")  # the learner is back
        assert again is sandbox and service.running
        after = await add_pending_events(sandbox, 40)
        await eventually(lambda: _published(sandbox, 80))
        await eventually(lambda: _all_delivered(sandbox, before + after))
        assert service.publisher._autocommit_view[0] is sandbox.engine  # not the engine that was closed
        await service.stop()
    finally:
        await registry.close()
        await redis_service.close()


async def _panel_statements(sandbox: source.Sandbox) -> tuple[source.OutboxStatus, list[str]]:
    with source.capture_statements() as log:
        status = await source.outbox_status(sandbox, limit=10)
    return status, log.sql()


async def test_the_status_panel_stays_bounded_as_history_grows(sandbox):
    settings = replace(FAST, batch_size=10, keep_published_events=30, audit_interval_seconds=0.01)
    service = source.outbox_service(sandbox, settings)
    await service.start()
    first = await add_pending_events(sandbox, 45)
    await eventually(lambda: _pruned(service, 10))
    small, small_sql = await _panel_statements(sandbox)
    more = await add_pending_events(sandbox, 400)
    await eventually(lambda: _pruned(service, 445 - 30 - settings.batch_size))
    large, large_sql = await _panel_statements(sandbox)
    await service.stop()

    assert len(large_sql) == len(small_sql)  # the same statements, whatever the history
    kept = (await source.count_rows(sandbox))["domain_events"]
    assert 30 <= kept <= 30 + settings.batch_size  # the newest 30 (and the rest of their batch)
    assert large.published == large.delivered == kept and large.pruned == 445 - kept
    assert len(large.published_events) == 10 and large.published_events[0]["id"] == more[-1]
    assert len(await inbox_event_ids(sandbox)) == 445  # the consumer still remembers every id
    assert first[0] not in {row["id"] for row in large.published_events}
    if sandbox.backend == "sqlite":  # every panel query on domain_events goes through an index
        async with sandbox.engine.connect() as connection:
            for statement in large_sql:
                if "domain_events" not in statement:
                    continue
                plan = " | ".join(row[-1] for row in (await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, _dummy_parameters(statement))).all())
                assert "SCAN domain_events" not in plan or "INDEX" in plan, (statement, plan)


def _dummy_parameters(statement: str) -> tuple:
    return tuple("pending" for _ in range(statement.count("?")))


async def _pruned(service: source.OutboxService, count: int) -> bool:
    return service.pruned_total >= count


RELAY_TO_KILL = """
import asyncio, sys
from dataclasses import replace
sys.path.insert(0, sys.argv[1])
import source

async def main(root, database_url, redis_url, sandbox_id, location, backend):
    settings = replace(source.Settings(), database_url=database_url or None, redis_url=redis_url)
    redis_service = await source.RedisService.connect(settings)
    if backend == "sqlite":
        engine = source.create_engine_for(source.URL.create("sqlite+aiosqlite", database=location), settings)
    else:
        url = source.resolve_database_target(database_url).url
        engine = source.create_engine_for(url, settings).execution_options(schema_translate_map={None: location})
    sandbox = source.Sandbox(id=sandbox_id, backend=backend, redis=source.RedisLink(redis_service, sandbox_id),
                             settings=settings, location=location, open_engine=lambda: engine, owns_engine=False)

    class SlowToMark(source.OutboxPublisher):
        async def _mark_published(self, connection, stream_ids):
            print("sent", len(stream_ids), flush=True)  # sent, not yet marked: the parent kills us now
            await asyncio.sleep(60)

    await SlowToMark(sandbox, replace(source.OutboxSettings(), lease_seconds=1.0, batch_size=50)).publish_due_batch()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_relay_killed_with_sigkill_mid_batch_loses_nothing_and_nothing_is_applied_twice(settings, real_redis_url):
    on_redis = replace(settings, redis_url=real_redis_url)
    redis_service = await source.RedisService.connect(on_redis)
    registry = source.SandboxRegistry(on_redis, redis_service)
    try:
        sandbox = await registry.acquire(source.new_sandbox_id())
        ids = await add_pending_events(sandbox, 300)
        root = str(Path(__file__).resolve().parent.parent)
        relay = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RELAY_TO_KILL, root, on_redis.database_url or "", real_redis_url, sandbox.id,
            sandbox.location, sandbox.backend, stdout=asyncio.subprocess.PIPE,
        )
        try:
            line = await asyncio.wait_for(relay.stdout.readline(), 60)
            assert line.decode().strip() == "sent 50"
        finally:
            relay.send_signal(signal.SIGKILL)
            await relay.wait()
        assert relay.returncode == -signal.SIGKILL
        assert len(await stream_event_ids(sandbox)) == 50 and await counts_by_status(sandbox) == {"pending": 300}

        survivor = OutboxPublisher(sandbox, FAST)  # takes the 50 over once the dead relay's lease expires
        await eventually(lambda: _drained_to(survivor, sandbox, 300))
        consumer = StreamConsumer(sandbox, FAST)
        assert await drain_consumer(consumer) == 350
        assert Counter(await inbox_event_ids(sandbox)) == Counter(ids)  # 0 lost, 0 applied twice
        assert consumer.duplicates_ignored == 50
    finally:
        await registry.close()
        await redis_service.close()


async def _drained_to(publisher: OutboxPublisher, sandbox: source.Sandbox, count: int) -> bool:
    await drain(publisher)
    return (await counts_by_status(sandbox)).get("published") == count


async def test_four_relays_at_once_never_put_an_event_in_the_stream_twice(sandbox):
    ids = await add_pending_events(sandbox, 600)
    settings = replace(FAST, batch_size=25)
    totals = await asyncio.gather(*(drain(OutboxPublisher(sandbox, settings)) for _ in range(4)))
    in_stream = await stream_event_ids(sandbox)
    assert len(in_stream) == 600 and set(in_stream) == set(ids) and sum(totals) == 600
