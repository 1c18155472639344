"""The outbox over a whole class: lagging consumers, outages, lost entries, dormant sandboxes.

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
import redis.asyncio
import redis.exceptions
import servers
from sqlalchemy import event, func, insert, select, text
from test_outbox import (
    FAST,
    add_pending_events,
    counts_by_status,
    drain,
    drain_consumer,
    eventually,
    inbox_event_ids,
    new_consumer,
    new_publisher,
    stream_event_ids,
    watch_idle_waits,
)

import source
from classroom.cache.link import RedisService
from classroom.config import Settings
from classroom.outbox.audit import PublishedEventAudit
from classroom.outbox.broker import (
    is_broker_wide_refusal,
    read_broker_durability,
    read_stream_backlog,
    trim_acknowledged_entries,
)
from classroom.outbox.service import OutboxService, outbox_service, set_broker_outage
from classroom.outbox.status import OutboxStatus, broker_durability, outbox_status
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import new_sandbox_id
from classroom.statements import capture_statements
from source import DomainEvent, get_session


async def test_retention_never_trims_entries_the_consumer_group_has_not_acknowledged(sandbox):
    settings = replace(FAST, batch_size=100, stream_trim_above=50, consumer_batch_size=40)
    consumer = new_consumer(sandbox, settings)
    await consumer.consume_batch()  # the group exists before anything is published
    ids = await add_pending_events(sandbox, 300)
    await drain(new_publisher(sandbox, settings))  # the consumer is 300 behind
    client, stream = sandbox.redis.client, sandbox.redis.key("events")
    trimmed = await trim_acknowledged_entries(client, stream, keep_at_least=50)
    assert trimmed == 0, "nothing was read yet"
    await consumer.consume_batch()  # reads 40 (acknowledged)
    # read, never acknowledged
    await client.xreadgroup(source.EVENT_CONSUMER_GROUP, "slow", {stream: ">"}, count=10)
    assert await trim_acknowledged_entries(client, stream, keep_at_least=50) == 40
    assert await client.xlen(stream) == 260  # 10 unacknowledged + 250 unread stay

    async def everything_recorded() -> bool:  # the rest, and the 10 reclaimed from "slow" once idle
        await drain_consumer(consumer)
        return sorted(await inbox_event_ids(sandbox)) == sorted(ids)

    await eventually(everything_recorded)
    backlog = await read_stream_backlog(client, stream, source.EVENT_CONSUMER_GROUP)
    assert backlog.lag == 0


async def test_a_consumer_far_behind_gets_every_event_once(sandbox):
    settings = replace(FAST, batch_size=100, stream_trim_above=100, consumer_batch_size=100)
    service = outbox_service(sandbox, settings)
    await service.consumer.consume_batch()  # the group exists, then the consumer falls behind
    ids = await add_pending_events(sandbox, 1200)
    await drain(service.publisher)
    assert set(await stream_event_ids(sandbox)) == set(ids), "retention dropped unread entries"
    await service.start()
    await eventually(lambda: _all_delivered(sandbox, ids), timeout=30)
    await service.stop()
    assert Counter(await inbox_event_ids(sandbox)) == Counter(ids)
    assert await counts_by_status(sandbox) == {"published": 1200}
    # read entries were trimmed
    assert len(await stream_event_ids(sandbox)) <= 100 + settings.consumer_batch_size


async def _all_delivered(sandbox: source.Sandbox, ids: list[str]) -> bool:
    return len(await inbox_event_ids(sandbox)) == len(ids)


async def test_an_outage_pauses_the_relay_is_logged_once_and_spends_no_attempts(sandbox, caplog):
    backoff = replace(FAST, outage_backoff_base_seconds=0.01, outage_backoff_max_seconds=0.03)
    service = outbox_service(sandbox, backoff)
    await service.start()
    await set_broker_outage(sandbox, cut=True)
    ids = await add_pending_events(sandbox, 30)
    with caplog.at_level(logging.WARNING, logger="qulab"):
        # ten failed probes: ten passes at least
        await eventually(lambda: _circuit_probed(service, 10))
    paused_lines = [line for line in service.activity.lines if "relay paused" in line]
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(paused_lines) == 1 and len(warnings) == 1, (paused_lines, warnings)
    async with get_session(sandbox) as session:
        assert await session.scalar(select(func.max(DomainEvent.attempts))) == 0
    assert await counts_by_status(sandbox) == {"pending": 30}

    # recovery: no retry button, no manual step
    await set_broker_outage(sandbox, cut=False)
    await eventually(lambda: _all_delivered(sandbox, ids))
    assert await counts_by_status(sandbox) == {"published": 30}
    assert sum("answers again" in line for line in service.activity.lines) == 1
    await service.stop()


async def _circuit_probed(service: OutboxService, probes: int) -> bool:
    return service.circuit.probes_failed >= probes


async def test_a_broker_wide_refusal_pauses_like_an_outage_and_a_message_refusal_fails_the_event():
    out_of_memory = "OOM command not allowed when used memory > 'maxmemory'"
    assert is_broker_wide_refusal(redis.exceptions.ResponseError(out_of_memory))
    loading = "LOADING Redis is loading the dataset in memory"
    assert is_broker_wide_refusal(redis.exceptions.ResponseError(loading))
    assert is_broker_wide_refusal(redis.exceptions.ConnectionError("reset by peer"))
    not_a_float = "ERR value is not a valid float"
    assert not is_broker_wide_refusal(redis.exceptions.ResponseError(not_a_float))


async def test_the_audit_republishes_published_events_the_broker_lost_and_each_is_applied_once(
    sandbox,
):
    settings = replace(FAST, audit_interval_seconds=0.05)
    service = outbox_service(sandbox, settings)
    consumed_first = await add_pending_events(sandbox, 20)
    await service.start()
    await eventually(lambda: _all_delivered(sandbox, consumed_first))
    await service.stop()
    lost = await add_pending_events(sandbox, 30)
    # published, then the broker forgets them before anyone reads them
    await drain(service.publisher)
    await sandbox.redis.client.delete(sandbox.redis.key("events"))
    assert await counts_by_status(sandbox) == {"published": 50}

    await service.start()
    everything = consumed_first + lost
    await eventually(lambda: _all_delivered(sandbox, everything))
    await service.stop()
    # each applied exactly once
    assert Counter(await inbox_event_ids(sandbox)) == Counter(everything)
    assert service.audit.republished_total == 30 and service.audit.last is not None
    status = await outbox_status(sandbox)
    assert status.republished_by_audits == 30 and status.published == 50
    assert status.delivered == 50


async def test_the_audit_leaves_events_that_are_only_unread_alone(sandbox):
    await new_consumer(sandbox).consume_batch()
    await add_pending_events(sandbox, 10)
    await drain(new_publisher(sandbox))
    report = await PublishedEventAudit(sandbox, FAST).run()
    assert (report.checked, report.missing, report.republished) == (10, 0, 0)
    assert await counts_by_status(sandbox) == {"published": 10}


async def test_a_dormant_sandbox_publishes_what_is_pending_then_stops_and_resumes_on_return(
    sandbox,
):
    slow = replace(FAST, batch_size=100, idle_wait_seconds=60, idle_wait_max_seconds=60)
    service = outbox_service(sandbox, slow)
    first_pass = asyncio.Event()
    publish = service.publisher.publish_due_batch

    async def publish_and_tell():
        report = await publish()
        first_pass.set()
        return report

    service.publisher.publish_due_batch = publish_and_tell
    # creates the group now: its creation would wake the publisher
    await service.consumer.consume_batch()
    await service.start()
    await asyncio.wait_for(first_pass.wait(), 10)  # now idle for a minute
    rows = [
        {
            "event_type": "T",
            "aggregate_type": "T",
            "aggregate_id": source.new_id(),
            "payload": {"n": n},
        }
        for n in range(250)
    ]
    async with sandbox.engine.begin() as connection:  # written by another process: no wake-up
        if sandbox.backend == "postgresql":  # not even LISTEN/NOTIFY's
            await connection.execute(
                text(f'DROP TRIGGER qulab_outbox_notify ON "{sandbox.location}".domain_events')
            )
        await connection.execute(insert(DomainEvent), rows)
    flushed = await service.publish_pending_and_stop()
    assert flushed == 250, list(service.activity.lines)
    assert not service.running and service.resume_on_return
    assert await counts_by_status(sandbox) == {"published": 250}
    assert len(set(await stream_event_ids(sandbox))) == 250
    assert await service.resume() is True and service.running
    assert await service.resume() is False
    await service.stop()


async def test_a_sandbox_whose_publisher_was_off_stays_off_after_it_wakes(sandbox):
    service = outbox_service(sandbox, FAST)
    assert await service.publish_pending_and_stop() == 0
    assert await service.resume() is False
    assert not outbox_service(sandbox).running


async def test_fakeredis_says_its_stream_lives_in_the_process(sandbox):
    durability = await broker_durability(sandbox)
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
        f'INSERT INTO "{schema}".domain_events (id, event_type, aggregate_type, aggregate_id,'
        ' payload, status, attempts, next_attempt_at, created_at, updated_at)'
        ' VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7, $7)',
        [
            (event_id, "Remote", "Test", str(uuid.uuid4()),
             json.dumps({"from": "another process"}), "pending", now)
            for event_id in ids
        ],
    )
    await connection.close()
    print(" ".join(ids))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_a_commit_in_another_process_wakes_the_publisher_through_listen_notify(
    postgres_registry, monkeypatch
):
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    slow = replace(FAST, idle_wait_seconds=120, idle_wait_max_seconds=120)
    service = outbox_service(sandbox, slow)
    await service.consumer.consume_batch()  # the group exists: nothing else wakes the publisher
    idle_waits = watch_idle_waits(monkeypatch)
    await service.start()
    # both workers settle into their idle wait: two minutes at least for the publisher
    await eventually(lambda: idle_waits.settled(service, at_least=120))
    dsn = sandbox.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        INSERT_FROM_ANOTHER_PROCESS,
        dsn,
        sandbox.location,
        "3",
        stdout=asyncio.subprocess.PIPE,
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


async def test_a_broker_restart_without_persistence_is_caught_by_the_audit(
    settings, restartable_redis
):
    on_redis = replace(settings, redis_url=restartable_redis.url)
    redis_service = await RedisService.connect(on_redis)
    registry = SandboxRegistry(on_redis, redis_service)
    try:
        assert redis_service.mode == "redis"
        sandbox = await registry.acquire(new_sandbox_id())
        assert (await broker_durability(sandbox)).kind == "none"
        service = outbox_service(sandbox, replace(FAST, audit_interval_seconds=0.1))
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
        # each applied exactly once
        assert Counter(await inbox_event_ids(sandbox)) == Counter(everything)
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
    client = redis.asyncio.from_url(real_redis_url, decode_responses=True)
    try:
        durability = await read_broker_durability(client, in_process=False)
    finally:
        await client.aclose()
    assert durability.kind == "aof" and not durability.restart_can_lose_events


class EngineStatements:
    """Counts the statements an engine runs while attached."""

    def __init__(self, engine) -> None:
        self.engine = engine.sync_engine
        self.count = 0

    def _record(self, *args) -> None:
        self.count += 1

    def __enter__(self) -> EngineStatements:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)


async def test_through_the_sandbox_lifecycle_a_dormant_publisher_flushes_and_a_woken_one_runs_on_the_new_engine(  # noqa: E501
    settings,
):
    no_grace = Settings(**{**settings.__dict__, "sandbox_grace_seconds": 0})
    redis_service = await RedisService.connect(no_grace)
    registry = SandboxRegistry(no_grace, redis_service)
    try:
        sandbox = await registry.acquire(new_sandbox_id(), holder="tab-1")
        service = outbox_service(sandbox, FAST)
        await service.start()
        before = await add_pending_events(sandbox, 40)
        await eventually(lambda: _published(sandbox, 40))
        closed_engine = sandbox.engine
        registry.release_holder("tab-1")  # the tab closed: after the grace period it sleeps
        assert sandbox.id in (await registry.sweep())["dormant"]
        assert not service.running and service.resume_on_return

        with EngineStatements(closed_engine) as on_the_closed_engine:
            again = await registry.acquire(sandbox.id, holder="tab-2")  # the learner is back
            assert again is sandbox and service.running
            after = await add_pending_events(sandbox, 40)
            await eventually(lambda: _published(sandbox, 80))
            await eventually(lambda: _all_delivered(sandbox, before + after))
        # the woken publisher ran on the new engine, not on the one that was closed
        assert sandbox.engine is not closed_engine and on_the_closed_engine.count == 0
        await service.stop()
    finally:
        await registry.close()
        await redis_service.close()


async def _panel_statements(sandbox: source.Sandbox) -> tuple[OutboxStatus, list[str]]:
    with capture_statements() as log:
        status = await outbox_status(sandbox, limit=10)
    return status, log.sql()


async def test_the_status_panel_stays_bounded_as_history_grows(sandbox):
    settings = replace(FAST, batch_size=10, keep_published_events=30, audit_interval_seconds=0.01)
    service = outbox_service(sandbox, settings)
    await service.start()
    first = await add_pending_events(sandbox, 45)
    await eventually(lambda: _pruned(service, 10))
    small, small_sql = await _panel_statements(sandbox)
    more = await add_pending_events(sandbox, 400)
    # pruned down to the newest 30 (and the rest of their batch), and the last batch consumed: the
    # audit prunes between batches, so the count alone can be reached before the consumer is done
    pruned_down = 445 - 30 - settings.batch_size
    large, large_sql = await eventually(lambda: _settled_panel(service, sandbox, pruned_down))
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
                explained = await connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + statement, _dummy_parameters(statement)
                )
                plan = " | ".join(row[-1] for row in explained.all())
                assert "SCAN domain_events" not in plan or "INDEX" in plan, (statement, plan)


def _dummy_parameters(statement: str) -> tuple:
    return tuple("pending" for _ in range(statement.count("?")))


async def _pruned(service: OutboxService, count: int) -> bool:
    return service.pruned_total >= count


async def _settled_panel(service: OutboxService, sandbox: source.Sandbox, pruned: int):
    """The panel and its statements, once `pruned` events went and every one left was consumed."""
    if service.pruned_total < pruned:
        return None
    status, statements = await _panel_statements(sandbox)
    return (status, statements) if status.published == status.delivered else None


# A bare lesson relay in another process, on the same database and stream as the sandbox.
RELAY_TO_KILL = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import source

async def main(root, database_url, schema, redis_url, key_prefix):
    engine = source.create_engine(database_url)
    if schema:  # PostgreSQL: the sandbox is a schema
        engine = engine.execution_options(schema_translate_map={None: schema})
    redis = source.RedisNamespace(source.redis_client(redis_url), key_prefix)
    sandbox = source.LocalSandbox(engine, redis)

    class SlowToMark(source.OutboxPublisher):
        async def mark_published(self, connection, stream_ids):
            print("sent", len(stream_ids), flush=True)  # sent, not yet marked: the parent kills us
            await asyncio.sleep(60)

    await SlowToMark(sandbox, lease_seconds=1.0, batch_size=50).publish_due_batch()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_relay_killed_with_sigkill_mid_batch_loses_nothing_and_nothing_is_applied_twice(
    settings, real_redis_url
):
    on_redis = replace(settings, redis_url=real_redis_url)
    redis_service = await RedisService.connect(on_redis)
    registry = SandboxRegistry(on_redis, redis_service)
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        ids = await add_pending_events(sandbox, 300)
        root = str(Path(__file__).resolve().parent.parent)
        database_url = sandbox.engine.url.render_as_string(hide_password=False)
        schema = sandbox.location if sandbox.backend == "postgresql" else ""
        relay = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            RELAY_TO_KILL,
            root,
            database_url,
            schema,
            real_redis_url,
            sandbox.redis.key(),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            line = await asyncio.wait_for(relay.stdout.readline(), 60)
            assert line.decode().strip() == "sent 50"
        finally:
            relay.send_signal(signal.SIGKILL)
            await relay.wait()
        assert relay.returncode == -signal.SIGKILL
        assert len(await stream_event_ids(sandbox)) == 50
        assert await counts_by_status(sandbox) == {"pending": 300}

        # takes the 50 over once the dead relay's lease expires
        survivor = new_publisher(sandbox)
        await eventually(lambda: _drained_to(survivor, sandbox, 300))
        consumer = new_consumer(sandbox)
        assert await drain_consumer(consumer) == 350
        # 0 lost, 0 applied twice
        assert Counter(await inbox_event_ids(sandbox)) == Counter(ids)
        assert consumer.duplicates_ignored == 50
    finally:
        await registry.close()
        await redis_service.close()


async def _drained_to(publisher: source.OutboxPublisher, sandbox: source.Sandbox, count: int):
    await drain(publisher)
    return (await counts_by_status(sandbox)).get("published") == count


async def test_four_relays_at_once_never_put_an_event_in_the_stream_twice(sandbox):
    ids = await add_pending_events(sandbox, 600)
    settings = replace(FAST, batch_size=25)
    totals = await asyncio.gather(*(drain(new_publisher(sandbox, settings)) for _ in range(4)))
    in_stream = await stream_event_ids(sandbox)
    assert len(in_stream) == 600 and set(in_stream) == set(ids) and sum(totals) == 600


async def test_an_outage_the_consumer_meets_first_sets_the_publisher_probing(sandbox, monkeypatch):
    # The publisher sleeps until a commit (its own look is an hour away) when the consumer, woken
    # to read, finds the broker gone: the publisher must still probe, or nothing would notice the
    # broker coming back by itself, and the consumer would stay paused.
    idle_waits = watch_idle_waits(monkeypatch)
    service = outbox_service(sandbox, replace(FAST, quiet_look_seconds=3600))
    assert await service.start()
    await eventually(lambda: idle_waits.settled(service, at_least=3600))
    sandbox.redis.cut()  # the broker goes away; no switch, so nothing wakes anyone
    service.consumer_wake.set()  # as a published batch would
    await eventually(lambda: _circuit_open(service))
    await sandbox.redis.restore()  # the broker is back by itself
    await eventually(lambda: _circuit_closed(service))
    assert sum("answers again" in line for line in service.activity.lines) == 1
    await service.stop()


async def _circuit_open(service: OutboxService) -> bool:
    return service.circuit.is_open


async def _circuit_closed(service: OutboxService) -> bool:
    return not service.circuit.is_open
