"""Progress: each step is done exactly when what it teaches has happened in the sandbox.

Every action below is the real operation a page runs, run the way a page runs it (Lab.run's
run_and_record, which journals what the operation proved); every check reads the sandbox's own
journal. Each test runs on the configured backend (embedded SQLite unless DATABASE_URL says
otherwise) and on a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import collections
import io
import sqlite3
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

import source
from classroom.cache.link import RedisService
from classroom.config import Settings
from classroom.demos.caching import (
    create_cache_demo_user,
    fetch_latest_airscore_cached,
    fetch_user_cached,
    invalidate_user_cache,
    run_cache_experiment,
    set_redis_outage,
)
from classroom.demos.eventing import store_airscore_burst
from classroom.demos.n_plus_one import (
    compare_loading_strategies,
    fetch_eager,
    fetch_naive,
    grow_scale_up_users,
)
from classroom.demos.pooling import run_pool_experiment
from classroom.export import export_sandbox
from classroom.outbox.relay import OutboxSettings
from classroom.outbox.service import (
    outbox_service,
    set_broker_outage,
    start_event_publisher,
    stop_event_publisher,
)
from classroom.progress import steps
from classroom.progress.evidence import run_and_record
from classroom.progress.journal import (
    MAX_LINES_KEPT,
    Evidence,
    JournalBase,
    JournalEntry,
    journal_muted,
    record_evidence,
)
from classroom.progress.steps import STEPS, learner_progress
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.reset import initialize_sandbox, reset_sandbox
from classroom.sandboxes.sandbox import Sandbox, new_sandbox_id
from classroom.statements import capture_statements
from pages.common.progress import HOW, RECAPS
from source import FALLBACK, HIT, MISS

FAST = replace(
    OutboxSettings(),
    idle_wait_seconds=0.02,
    idle_wait_max_seconds=0.1,
    outage_backoff_base_seconds=0.01,
    outage_backoff_max_seconds=0.05,
    stop_timeout_seconds=5,
)
REQUIRED_STEPS = [step.key for step in STEPS if not step.optional]
EXPORTED_TABLES = [*source.Base.metadata.sorted_tables, *JournalBase.metadata.sorted_tables]


@pytest.fixture(params=["configured", "postgresql"])
def backend_registry(request) -> SandboxRegistry:
    """The configured backend's registry, then a real PostgreSQL's."""
    name = "registry" if request.param == "configured" else "postgres_registry"
    return request.getfixturevalue(name)


@pytest.fixture
async def fresh(backend_registry) -> Sandbox:
    """An empty sandbox on each backend, with a quick outbox."""
    sandbox = await backend_registry.acquire(new_sandbox_id())
    outbox_service(sandbox, FAST)
    return sandbox


async def done_steps(sandbox: Sandbox) -> set[str]:
    progress = await learner_progress(sandbox)
    return {status.step.key for status in progress.steps if status.done}


async def eventually(condition, *, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (result := await condition()):
        assert time.monotonic() < deadline, "condition still false"
        await asyncio.sleep(0.02)
    return result


def run(operation, sandbox: Sandbox, **kwargs):
    """The operation as a page runs it: through run_and_record, which journals what it proved."""
    return run_and_record(operation, sandbox, **kwargs)


async def user_named(sandbox: Sandbox, name: str) -> str:
    return next(user.id for user in await source.list_users(sandbox) if user.name == name)


async def test_each_required_step_turns_done_with_its_own_action_in_the_guides_order(fresh):
    sandbox = fresh
    assert await done_steps(sandbox) == set()
    expected: set[str] = set()

    async def after(action, *steps: str) -> None:
        await action
        expected.update(steps)
        assert await done_steps(sandbox) == expected

    await after(
        run(source.create_user, sandbox, email="learner@example.com", name="Learner"),
        "create_user",
    )
    # initialize empties the data, never the journal
    await after(run(initialize_sandbox, sandbox), "initialize")
    alex = await user_named(sandbox, "Alex Smith")
    await after(run(source.add_sample_scores, sandbox, user_id=alex), "add_scores")
    await after(run(fetch_eager, sandbox, user_id=alex), "fetch_eager")
    await after(run(fetch_naive, sandbox, user_id=alex), "fetch_n_plus_one", "compare_fetches")

    demo = await create_cache_demo_user(sandbox)  # Alex: the sandbox has him
    assert demo.user_id == alex
    await after(run(fetch_user_cached, sandbox, user_id=demo.user_id))  # a miss alone
    await after(
        run(fetch_user_cached, sandbox, user_id=demo.user_id), "user_miss_then_hit", "metrics_move"
    )
    await after(run(fetch_latest_airscore_cached, sandbox, user_id=demo.user_id))
    await after(
        run(fetch_latest_airscore_cached, sandbox, user_id=demo.user_id), "score_miss_then_hit"
    )
    await after(run(invalidate_user_cache, sandbox, user_id=demo.user_id))
    await after(run(fetch_user_cached, sandbox, user_id=demo.user_id), "invalidate_then_miss")

    await after(
        run(
            source.calculate_and_store_airscore,
            sandbox,
            user_id=alex,
            occupation_code="15-1252.00",
        ),
        "store_airscore",
    )
    await run(start_event_publisher, sandbox)
    # no click: the background publisher did it
    await eventually(lambda: _has(sandbox, "event_published"))
    await after(asyncio.sleep(0), "start_publisher", "event_published")
    await after(run(stop_event_publisher, sandbox), "stop_publisher")

    progress = await learner_progress(sandbox)
    assert [status.step.key for status in progress.required if status.done] == REQUIRED_STEPS
    assert progress.next_step() is None
    assert all(progress.section_complete(section) for section in range(1, 6))
    evidence = {status.step.key: status.evidence for status in progress.steps}
    recaps = {section: RECAPS[section].format(**evidence) for section in range(1, 6)}
    assert all(recaps.values())
    assert "N+1 ran 5 statements, eager loading 2" in recaps[3]


async def test_a_done_step_is_not_checked_again_as_later_lines_come(fresh, monkeypatch):
    """A click costs the steps not done yet: a done step keeps its evidence, unchecked."""
    sandbox, checked = fresh, collections.Counter()
    run_check = steps._run_check

    def counted(step, journal):
        checked[step.key] += 1
        return run_check(step, journal)

    monkeypatch.setattr(steps, "_run_check", counted)
    await run(source.create_user, sandbox, email="first@example.com", name="First")
    first = await learner_progress(sandbox)
    for number in range(3):  # each adds a journal line, so each reading checks again
        await run(source.create_user, sandbox, email=f"u{number}@example.com", name="Later")
        progress = await learner_progress(sandbox)
    assert len(progress.journal) == 4
    assert checked["create_user"] == 1  # done at the first reading, never checked after
    assert checked["initialize"] == 4  # not done: checked at every reading
    done = {status.step.key: status.evidence for status in progress.steps if status.done}
    assert done == {"create_user": first.steps[0].evidence}


async def test_a_lesson_function_called_directly_is_not_journaled(fresh):
    """Journaling happens where an operation is run (Lab.run), never inside the lesson."""
    sandbox = fresh
    await source.create_user(sandbox, email="direct@example.com", name="Direct")
    await initialize_sandbox(sandbox)
    alex = await user_named(sandbox, "Alex Smith")
    await source.add_sample_scores(sandbox, user_id=alex)
    await fetch_naive(sandbox, user_id=alex)
    await fetch_eager(sandbox, user_id=alex)
    assert (await learner_progress(sandbox)).journal == ()
    assert await done_steps(sandbox) == set()
    await run(fetch_eager, sandbox, user_id=alex)
    assert await done_steps(sandbox) == {"fetch_eager"}


async def _has(sandbox: Sandbox, step: str) -> bool:
    return step in await done_steps(sandbox)


async def test_an_eager_fetch_or_a_fetch_without_scores_does_not_complete_the_n_plus_one_step(
    fresh,
):
    sandbox = fresh
    await run(initialize_sandbox, sandbox)
    jane = await user_named(sandbox, "Jane Doe")
    await run(fetch_naive, sandbox, user_id=jane)  # N = 0: nothing to see yet
    await run(fetch_eager, sandbox, user_id=jane)
    fetch_steps = {"fetch_n_plus_one", "fetch_eager", "compare_fetches"}
    assert not fetch_steps & await done_steps(sandbox)
    await run(source.add_sample_scores, sandbox, user_id=jane)
    await run(fetch_eager, sandbox, user_id=jane)
    assert {"fetch_eager"} == fetch_steps & await done_steps(sandbox)


async def test_reads_during_a_redis_outage_are_fallbacks_not_hits(fresh):
    sandbox = fresh
    demo = await create_cache_demo_user(sandbox)
    await set_redis_outage(sandbox, cut=True)
    reads = [await run(fetch_user_cached, sandbox, user_id=demo.user_id) for _ in range(3)]
    assert [fetch.read.outcome for fetch in reads] == [FALLBACK] * 3
    assert not {"user_miss_then_hit", "metrics_move", "redis_outage"} & await done_steps(sandbox)
    await set_redis_outage(sandbox, cut=False)
    assert (await run(fetch_user_cached, sandbox, user_id=demo.user_id)).read.outcome == MISS
    assert {"redis_outage"} == {"user_miss_then_hit", "redis_outage"} & await done_steps(sandbox)


async def test_the_cache_experiment_and_an_invalidation_of_an_unread_key_complete_no_cache_step(
    fresh,
):
    sandbox = fresh
    demo = await create_cache_demo_user(sandbox)
    await run(run_cache_experiment, sandbox, user_id=demo.user_id, reads=10, hit_ratios=(0.5,))
    # nothing the learner read was cached
    await run(invalidate_user_cache, sandbox, user_id=demo.user_id)
    assert (await run(fetch_user_cached, sandbox, user_id=demo.user_id)).read.outcome == MISS
    assert not {step.key for step in STEPS if step.section == 4} & await done_steps(sandbox)


async def test_a_publisher_that_published_nothing_and_a_burst_complete_no_outbox_step_but_their_own(
    fresh,
):
    sandbox = fresh
    await run(initialize_sandbox, sandbox)
    await run(start_event_publisher, sandbox)
    await run(stop_event_publisher, sandbox)
    assert await done_steps(sandbox) == {"initialize", "start_publisher", "stop_publisher"}
    await run(store_airscore_burst, sandbox, count=20)
    journal = (await learner_progress(sandbox)).journal
    # one line, not one per write
    assert [line.kind for line in journal].count("airscore_burst") == 1
    assert "airscore_stored" not in [line.kind for line in journal]
    assert "store_airscore" not in await done_steps(sandbox)


async def test_the_journal_never_changes_what_a_demo_counts(fresh):
    sandbox = fresh
    await run(initialize_sandbox, sandbox)
    alex = await user_named(sandbox, "Alex Smith")
    await run(source.add_sample_scores, sandbox, user_id=alex)
    with capture_statements() as outer:
        naive = await run(fetch_naive, sandbox, user_id=alex)
    # 1 + 1 + N, N = 3: the journal write is not in it
    assert naive.statements.count == outer.count == 5
    demo = await create_cache_demo_user(sandbox)
    await run(fetch_user_cached, sandbox, user_id=demo.user_id)
    with capture_statements() as outer:
        hit = await run(fetch_user_cached, sandbox, user_id=demo.user_id)
    assert hit.read.outcome == HIT and hit.read.database_statements == 0 and outer.count == 0
    lines = [line.detail for line in (await learner_progress(sandbox)).journal]
    assert "N+1 fetch: 5 statements for N = 3" in " ".join(lines)


async def test_a_journal_write_that_fails_leaves_the_operation_as_it_was(fresh):
    sandbox = fresh
    async with sandbox.engine.begin() as connection:
        await connection.execute(JournalEntry.__table__.delete())
        await connection.run_sync(lambda sync: JournalEntry.__table__.drop(sync))
    user = await run(source.create_user, sandbox, email="still@example.com", name="Still Created")
    assert [u.id for u in await source.list_users(sandbox)] == [user.id]


async def test_muted_operations_write_no_journal(fresh):
    sandbox = fresh
    with journal_muted():
        await run(initialize_sandbox, sandbox)
    assert await done_steps(sandbox) == set()


async def test_optional_steps_pool_scale_up_and_broker_outage(fresh):
    sandbox = fresh
    await run(initialize_sandbox, sandbox)
    await run(run_pool_experiment, sandbox, requests=10, concurrency=2, pool_size=2)
    await grow_scale_up_users(sandbox, target_users=10)
    await run(compare_loading_strategies, sandbox, sizes=[10], repeats=1)
    assert {"pool_experiment", "scale_up"} <= await done_steps(sandbox)

    alex = await user_named(sandbox, "Alex Smith")
    await set_broker_outage(sandbox, cut=True)
    await run(start_event_publisher, sandbox)
    await run(
        source.calculate_and_store_airscore, sandbox, user_id=alex, occupation_code="15-1252.00"
    )

    async def relay_paused() -> bool:
        return outbox_service(sandbox).circuit.is_open

    await eventually(relay_paused)
    assert not {"event_published", "broker_outage"} & await done_steps(sandbox)
    await set_broker_outage(sandbox, cut=False)
    await eventually(lambda: _has(sandbox, "broker_outage"))
    await run(stop_event_publisher, sandbox)
    assert "event_published" in await done_steps(
        sandbox
    )  # published in the background, outage or not


async def test_progress_survives_initialize_and_goes_with_the_sandbox(backend_registry):
    sandbox_id = new_sandbox_id()
    sandbox = await backend_registry.acquire(sandbox_id)
    await run(source.create_user, sandbox, email="kept@example.com", name="Kept")
    await run(initialize_sandbox, sandbox)
    assert await done_steps(sandbox) == {"create_user", "initialize"}
    await backend_registry.release(sandbox_id)
    assert await done_steps(await backend_registry.acquire(sandbox_id)) == set()


async def test_reset_my_sandbox_empties_the_progress_and_a_running_publisher_is_journaled_again(
    fresh,
):
    sandbox = fresh
    await run(initialize_sandbox, sandbox)
    alex = await user_named(sandbox, "Alex Smith")
    await run(start_event_publisher, sandbox)
    await run(
        source.calculate_and_store_airscore, sandbox, user_id=alex, occupation_code="15-1252.00"
    )
    await eventually(lambda: _has(sandbox, "event_published"))
    await reset_sandbox(sandbox)
    assert await done_steps(sandbox) == set()
    await run(initialize_sandbox, sandbox)
    alex = await user_named(sandbox, "Alex Smith")
    await run(
        source.calculate_and_store_airscore, sandbox, user_id=alex, occupation_code="15-1252.00"
    )
    # the same run of the publisher
    await eventually(lambda: _has(sandbox, "event_published"))
    await run(stop_event_publisher, sandbox)


async def test_the_journal_lines_are_read_again_only_after_they_changed(fresh):
    """Progress is read on every rerun: the journal's lines are read once, then only those a
    write added (on PostgreSQL, after a one-statement probe; on SQLite, not even those: the
    process kept what it wrote), and all of them again after a reset."""
    sandbox = fresh
    journal_reads: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith("SELECT") and "lab_journal.kind" in statement:
            journal_reads.append(statement)  # lines read (not the probe's count)

    event.listen(
        Engine, "before_cursor_execute", count
    )  # every engine: PostgreSQL's view is an option engine
    try:
        await done_steps(sandbox)
        await done_steps(sandbox)
        unchanged = len(journal_reads)
        await run(source.create_user, sandbox, email="counted@example.com", name="Counted")
        assert await done_steps(sandbox) == {"create_user"}  # the write is seen at once
        await reset_sandbox(sandbox)
        assert await done_steps(sandbox) == set()  # and so is a reset
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    if sandbox.backend == "sqlite":  # the line it wrote is kept, not read; a reset reads anew
        assert (unchanged, len(journal_reads)) == (1, 2)
    else:  # another replica may have written it: the line after the newest is read
        assert (unchanged, len(journal_reads)) == (1, 3)
        assert "lab_journal.id >" in journal_reads[1]


async def test_a_sqlite_reading_reads_no_line_it_wrote_and_asks_about_rows_after_deletes(fresh):
    """A click adds a line to a journal of hundreds: on SQLite progress keeps the lines this
    process wrote rather than read them back, and asks whether shown rows exist only about a row
    not asked about yet or after a commit that deleted rows."""
    sandbox = fresh
    if sandbox.backend != "sqlite":
        pytest.skip("PostgreSQL probes the journal instead (another replica may write it)")
    reads: list[str] = []

    def note(conn, cursor, statement, parameters, context, executemany):
        if "lab_journal" in statement and statement.lstrip().startswith("SELECT"):
            reads.append("journal")
        elif "FROM users" in statement and " IN (" in statement:
            reads.append("rows")

    user = await run(source.create_user, sandbox, email="gone@example.com", name="Gone")
    event.listen(Engine, "before_cursor_execute", note)
    try:
        assert (await learner_progress(sandbox)).in_section(1)[0].done
        assert reads == ["journal", "rows"]  # the first reading: all of it
        reads.clear()
        for _ in range(2):
            await run(fetch_user_cached, sandbox, user_id=user.id)
        steps = {status.step.key: status for status in (await learner_progress(sandbox)).steps}
        assert steps["user_miss_then_hit"].done  # the two lines it kept
        assert steps["user_miss_then_hit"].evidence.startswith("MISS at ")
        assert reads == []  # nothing read back; the user was seen to exist
        await run(source.delete_user, sandbox, user_id=user.id)
        steps = {status.step.key: status for status in (await learner_progress(sandbox)).steps}
        assert reads == ["rows"]  # a deletion: the shown rows asked about again
        assert steps["create_user"].rows_gone and steps["user_miss_then_hit"].rows_gone
        reads.clear()  # more lines than it keeps between two readings: read from the database
        lines_before = len((await learner_progress(sandbox)).journal)
        for number in range(MAX_LINES_KEPT + 1):
            await record_evidence(sandbox, Evidence("note", f"line {number}"))
        assert len((await learner_progress(sandbox)).journal) == lines_before + MAX_LINES_KEPT + 1
        assert reads == ["journal"]
    finally:
        event.remove(Engine, "before_cursor_execute", note)


async def test_another_replica_opening_the_sandbox_sees_the_same_progress(
    settings, postgres_registry, postgres_url
):
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    await run(source.create_user, sandbox, email="moved@example.com", name="Moved")
    on_postgres = Settings(**{**settings.__dict__, "database_url": postgres_url})
    redis_service = await RedisService.connect(on_postgres)
    replica = SandboxRegistry(on_postgres, redis_service)
    try:
        there = await replica.acquire(sandbox.id)
        assert await done_steps(there) == {"create_user"}
        # what the first replica does next is seen there too, each time it is read
        await run(initialize_sandbox, sandbox)
        assert await done_steps(there) == {"create_user", "initialize"}
        await reset_sandbox(sandbox)
        assert await done_steps(there) == set()
    finally:
        replica._sandboxes.clear()  # leave the schema to the first replica
        await replica.close()
        await redis_service.close()


async def test_the_download_is_a_consistent_copy_with_the_learners_users(fresh, tmp_path: Path):
    sandbox = fresh
    await run(initialize_sandbox, sandbox)
    await run(source.create_user, sandbox, email="takeaway@example.com", name="Take Away")
    export = await export_sandbox(sandbox)
    assert sandbox.id in export.file_name
    if sandbox.backend == "sqlite":
        copy = tmp_path / export.file_name
        copy.write_bytes(export.content)
        # the rows were still in the WAL: the copy has them
        with sqlite3.connect(copy) as connection:
            emails = {row[0] for row in connection.execute("SELECT email FROM users")}
            assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            assert connection.execute("SELECT count(*) FROM lab_journal").fetchone()[0] == 2
            bookkeeping = "SELECT name FROM sqlite_master WHERE name LIKE 'qulab_%'"
            assert connection.execute(bookkeeping).fetchall() == []  # the outbox's counts stayed
    else:
        with zipfile.ZipFile(io.BytesIO(export.content)) as archive:
            assert set(archive.namelist()) == {f"{t.name}.csv" for t in EXPORTED_TABLES}
            users = archive.read("users.csv").decode().splitlines()
        assert users[0].startswith("id,")
        emails = {line.split(",")[1] for line in users[1:]}
    assert emails == {
        "alex.smith@innovateai.example",
        "jane.doe@innovateai.example",
        "takeaway@example.com",
    }


def test_every_step_has_its_instructions_and_every_instruction_names_a_step():
    keys = [step.key for step in STEPS]
    assert len(set(keys)) == len(keys)
    assert set(HOW) == set(keys)
    assert all(HOW[key].strip() for key in keys)
    assert set(RECAPS) == {step.section for step in STEPS}
