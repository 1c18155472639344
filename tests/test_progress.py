"""Progress: each step is done exactly when what it teaches has happened in the sandbox.

Every action below is the real operation a page calls; every check reads the sandbox's own
journal, written by those operations. Each test runs on the configured backend (embedded SQLite
unless DATABASE_URL says otherwise) and on a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import io
import sqlite3
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

import source
from source import CACHE_FALLBACK, CACHE_HIT, CACHE_MISS

FAST = replace(
    source.OutboxSettings(),
    idle_wait_seconds=0.02,
    idle_wait_max_seconds=0.1,
    outage_backoff_base_seconds=0.01,
    outage_backoff_max_seconds=0.05,
    stop_timeout_seconds=5,
)
REQUIRED_STEPS = [step.key for step in source.STEPS if not step.optional]


@pytest.fixture(params=["configured", "postgresql"])
def backend_registry(request) -> source.SandboxRegistry:
    """The configured backend's registry, then a real PostgreSQL's."""
    return request.getfixturevalue("registry" if request.param == "configured" else "postgres_registry")


@pytest.fixture
async def fresh(backend_registry) -> source.Sandbox:
    """An empty sandbox on each backend, with a quick outbox."""
    sandbox = await backend_registry.acquire(source.new_sandbox_id())
    source.outbox_service(sandbox, FAST)
    return sandbox


async def done_steps(sandbox: source.Sandbox) -> set[str]:
    progress = await source.learner_progress(sandbox)
    return {status.step.key for status in progress.steps if status.done}


async def eventually(condition, *, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (result := await condition()):
        assert time.monotonic() < deadline, "condition still false"
        await asyncio.sleep(0.02)
    return result


async def user_named(sandbox: source.Sandbox, name: str) -> str:
    return next(user.id for user in await source.list_users(sandbox) if user.name == name)


async def test_each_required_step_turns_done_with_its_own_action_in_the_guides_order(fresh):
    sandbox = fresh
    assert await done_steps(sandbox) == set()
    expected: set[str] = set()

    async def after(action, *steps: str) -> None:
        await action
        expected.update(steps)
        assert await done_steps(sandbox) == expected

    await after(source.create_user(sandbox, email="learner@example.com", name="Learner"), "create_user")
    await after(source.init_db(sandbox), "initialize")  # initialize empties the data, never the journal
    alex = await user_named(sandbox, "Alex Smith")
    await after(source.add_sample_scores(sandbox, user_id=alex), "add_scores")
    await after(source.fetch_user_and_scores_eager(sandbox, user_id=alex), "fetch_eager")
    await after(source.fetch_user_and_scores_naive(sandbox, user_id=alex), "fetch_n_plus_one", "compare_fetches")

    demo = await source.prepare_cache_demo(sandbox)
    await after(source.fetch_user_cached(sandbox, user_id=demo.user_id))  # a miss alone
    await after(source.fetch_user_cached(sandbox, user_id=demo.user_id), "user_miss_then_hit", "metrics_move")
    await after(source.fetch_latest_airscore_cached(sandbox, user_id=demo.user_id))
    await after(source.fetch_latest_airscore_cached(sandbox, user_id=demo.user_id), "score_miss_then_hit")
    await after(source.invalidate_user_cache(sandbox, user_id=demo.user_id))
    await after(source.fetch_user_cached(sandbox, user_id=demo.user_id), "invalidate_then_miss")

    await after(source.calculate_and_store_airscore(sandbox, user_id=alex, occupation_code="15-1252.00"), "store_airscore")
    await source.start_event_publisher(sandbox)
    await eventually(lambda: _has(sandbox, "event_published"))  # no click: the background publisher did it
    await after(asyncio.sleep(0), "start_publisher", "event_published")
    await after(source.stop_event_publisher(sandbox), "stop_publisher")

    progress = await source.learner_progress(sandbox)
    assert [status.step.key for status in progress.required if status.done] == REQUIRED_STEPS
    assert progress.next_step() is None
    assert all(progress.recap(section) for section in range(1, 6))
    assert "N+1 ran 5 statements, eager loading 2" in progress.recap(3)


async def _has(sandbox: source.Sandbox, step: str) -> bool:
    return step in await done_steps(sandbox)


async def test_an_eager_fetch_or_a_fetch_without_scores_does_not_complete_the_n_plus_one_step(fresh):
    sandbox = fresh
    await source.init_db(sandbox)
    jane = await user_named(sandbox, "Jane Doe")
    await source.fetch_user_and_scores_naive(sandbox, user_id=jane)  # N = 0: nothing to see yet
    await source.fetch_user_and_scores_eager(sandbox, user_id=jane)
    assert not {"fetch_n_plus_one", "fetch_eager", "compare_fetches"} & await done_steps(sandbox)
    await source.add_sample_scores(sandbox, user_id=jane)
    await source.fetch_user_and_scores_eager(sandbox, user_id=jane)
    assert {"fetch_eager"} == {"fetch_n_plus_one", "fetch_eager", "compare_fetches"} & await done_steps(sandbox)


async def test_reads_during_a_redis_outage_are_fallbacks_not_hits(fresh):
    sandbox = fresh
    demo = await source.prepare_cache_demo(sandbox)
    await source.set_redis_outage(sandbox, cut=True)
    reads = [await source.fetch_user_cached(sandbox, user_id=demo.user_id) for _ in range(3)]
    assert [read.outcome for read in reads] == [CACHE_FALLBACK] * 3
    assert not {"user_miss_then_hit", "metrics_move", "redis_outage"} & await done_steps(sandbox)
    await source.set_redis_outage(sandbox, cut=False)
    assert (await source.fetch_user_cached(sandbox, user_id=demo.user_id)).outcome == CACHE_MISS
    assert {"redis_outage"} == {"user_miss_then_hit", "redis_outage"} & await done_steps(sandbox)


async def test_the_cache_experiment_and_an_invalidation_of_an_unread_key_complete_no_cache_step(fresh):
    sandbox = fresh
    demo = await source.prepare_cache_demo(sandbox)
    await source.run_cache_experiment(sandbox, user_id=demo.user_id, reads=10, hit_ratios=(0.5,))
    await source.invalidate_user_cache(sandbox, user_id=demo.user_id)  # nothing the learner read was cached
    assert (await source.fetch_user_cached(sandbox, user_id=demo.user_id)).outcome == CACHE_MISS
    assert not {step.key for step in source.STEPS if step.section == 4} & await done_steps(sandbox)


async def test_a_publisher_that_published_nothing_and_a_burst_complete_no_outbox_step_but_their_own(fresh):
    sandbox = fresh
    await source.init_db(sandbox)
    await source.start_event_publisher(sandbox)
    await source.stop_event_publisher(sandbox)
    assert await done_steps(sandbox) == {"initialize", "start_publisher", "stop_publisher"}
    await source.store_airscore_burst(sandbox, count=20)
    journal = (await source.learner_progress(sandbox)).journal
    assert [line.kind for line in journal].count("airscore_burst") == 1  # one line, not one per write
    assert "airscore_stored" not in [line.kind for line in journal]
    assert "store_airscore" not in await done_steps(sandbox)


async def test_the_journal_never_changes_what_a_demo_counts(fresh):
    sandbox = fresh
    await source.init_db(sandbox)
    alex = await user_named(sandbox, "Alex Smith")
    await source.add_sample_scores(sandbox, user_id=alex)
    with source.capture_statements() as outer:
        naive = await source.fetch_user_and_scores_naive(sandbox, user_id=alex)
    assert naive.statements.count == outer.count == 5  # 1 + 1 + N, N = 3: the journal write is not in it
    demo = await source.prepare_cache_demo(sandbox)
    await source.fetch_user_cached(sandbox, user_id=demo.user_id)
    with source.capture_statements() as outer:
        hit = await source.fetch_user_cached(sandbox, user_id=demo.user_id)
    assert hit.outcome == CACHE_HIT and hit.database_statements == 0 and outer.count == 0
    lines = [line.detail for line in (await source.learner_progress(sandbox)).journal]
    assert "N+1 fetch: 5 statements for N = 3" in " ".join(lines)


async def test_a_journal_write_that_fails_leaves_the_operation_as_it_was(fresh):
    sandbox = fresh
    async with sandbox.engine.begin() as connection:
        await connection.execute(source.JournalEntry.__table__.delete())
        await connection.run_sync(lambda sync: source.JournalEntry.__table__.drop(sync))
    user = await source.create_user(sandbox, email="still@example.com", name="Still Created")
    assert [u.id for u in await source.list_users(sandbox)] == [user.id]


async def test_muted_operations_write_no_journal(fresh):
    sandbox = fresh
    with source.journal_muted():
        await source.init_db(sandbox)
    assert await done_steps(sandbox) == set()


async def test_optional_steps_pool_scale_up_and_broker_outage(fresh):
    sandbox = fresh
    await source.init_db(sandbox)
    await source.run_pool_experiment(sandbox, requests=10, concurrency=2, pool_size=2)
    await source.grow_scale_up_users(sandbox, target_users=10)
    await source.compare_loading_strategies(sandbox, sizes=[10], repeats=1)
    assert {"pool_experiment", "scale_up"} <= await done_steps(sandbox)

    alex = await user_named(sandbox, "Alex Smith")
    await source.set_broker_outage(sandbox, cut=True)
    await source.start_event_publisher(sandbox)
    await source.calculate_and_store_airscore(sandbox, user_id=alex, occupation_code="15-1252.00")

    async def relay_paused() -> bool:
        return source.outbox_service(sandbox).circuit.is_open

    await eventually(relay_paused)
    assert not {"event_published", "broker_outage"} & await done_steps(sandbox)
    await source.set_broker_outage(sandbox, cut=False)
    await eventually(lambda: _has(sandbox, "broker_outage"))
    await source.stop_event_publisher(sandbox)
    assert "event_published" in await done_steps(sandbox)  # published in the background, outage or not


async def test_progress_survives_initialize_and_goes_with_the_sandbox(backend_registry):
    sandbox_id = source.new_sandbox_id()
    sandbox = await backend_registry.acquire(sandbox_id)
    await source.create_user(sandbox, email="kept@example.com", name="Kept")
    await source.init_db(sandbox)
    assert await done_steps(sandbox) == {"create_user", "initialize"}
    await backend_registry.release(sandbox_id)
    assert await done_steps(await backend_registry.acquire(sandbox_id)) == set()


async def test_reset_my_sandbox_empties_the_progress_and_a_running_publisher_is_journaled_again(fresh):
    sandbox = fresh
    await source.init_db(sandbox)
    alex = await user_named(sandbox, "Alex Smith")
    await source.start_event_publisher(sandbox)
    await source.calculate_and_store_airscore(sandbox, user_id=alex, occupation_code="15-1252.00")
    await eventually(lambda: _has(sandbox, "event_published"))
    await source.reset_sandbox(sandbox)
    assert await done_steps(sandbox) == set()
    await source.init_db(sandbox)
    alex = await user_named(sandbox, "Alex Smith")
    await source.calculate_and_store_airscore(sandbox, user_id=alex, occupation_code="15-1252.00")
    await eventually(lambda: _has(sandbox, "event_published"))  # the same run of the publisher
    await source.stop_event_publisher(sandbox)


async def test_the_journal_is_read_again_only_after_it_changed_on_sqlite_and_every_time_on_postgresql(fresh):
    """The sidebar reads progress on every rerun: a SQLite sandbox reuses its last reading until a journal write."""
    sandbox = fresh
    journal_reads: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith("SELECT") and "lab_journal" in statement:
            journal_reads.append(statement)

    source.event.listen(Engine, "before_cursor_execute", count)  # every engine: PostgreSQL's view is an option engine
    try:
        await done_steps(sandbox)
        await done_steps(sandbox)
        unchanged = len(journal_reads)
        await source.create_user(sandbox, email="counted@example.com", name="Counted")
        assert await done_steps(sandbox) == {"create_user"}  # the write is seen at once
        await source.reset_sandbox(sandbox)
        assert await done_steps(sandbox) == set()  # and so is a reset
    finally:
        source.event.remove(Engine, "before_cursor_execute", count)
    if sandbox.backend == "sqlite":
        assert (unchanged, len(journal_reads)) == (1, 3)
    else:  # another replica may have written it
        assert (unchanged, len(journal_reads)) == (2, 4)


async def test_another_replica_opening_the_sandbox_sees_the_same_progress(settings, postgres_registry, postgres_url):
    sandbox = await postgres_registry.acquire(source.new_sandbox_id())
    await source.create_user(sandbox, email="moved@example.com", name="Moved")
    on_postgres = source.Settings(**{**settings.__dict__, "database_url": postgres_url})
    redis_service = await source.RedisService.connect(on_postgres)
    replica = source.SandboxRegistry(on_postgres, redis_service)
    try:
        assert await done_steps(await replica.acquire(sandbox.id)) == {"create_user"}
    finally:
        replica._sandboxes.clear()  # leave the schema to the first replica
        await replica.close()
        await redis_service.close()


async def test_the_download_is_a_consistent_copy_with_the_learners_users(fresh, tmp_path: Path):
    sandbox = fresh
    await source.init_db(sandbox)
    await source.create_user(sandbox, email="takeaway@example.com", name="Take Away")
    export = await source.export_sandbox(sandbox)
    assert sandbox.id in export.file_name
    if sandbox.backend == "sqlite":
        copy = tmp_path / export.file_name
        copy.write_bytes(export.content)
        with sqlite3.connect(copy) as connection:  # the rows were still in the WAL: the copy has them
            emails = {row[0] for row in connection.execute("SELECT email FROM users")}
            assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            assert connection.execute("SELECT count(*) FROM lab_journal").fetchone()[0] == 2
    else:
        with zipfile.ZipFile(io.BytesIO(export.content)) as archive:
            assert set(archive.namelist()) == {f"{t.name}.csv" for t in source.Base.metadata.sorted_tables}
            users = archive.read("users.csv").decode().splitlines()
        assert users[0].startswith("id,")
        emails = {line.split(",")[1] for line in users[1:]}
    assert emails == {"alex.smith@innovateai.example", "jane.doe@innovateai.example", "takeaway@example.com"}
