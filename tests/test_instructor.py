"""The instructor's view, beneath the page: the roster, the overview, the message, the key.

Learners do real steps, run as a page runs them (run_and_record journals what each proved), and
their progress is read as the sidebar reads it (learner_progress): the roster hears of it from
there. Each test runs on the configured backend and on a real PostgreSQL, each in a class of
its own (QULAB_CLASS), so a suite running beside it on the same server never mixes in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select

import source
from classroom.cache.link import RedisService
from classroom.instructor.access import (
    PROCESS_TRIES_PER_MINUTE,
    TRIES_PER_MINUTE,
    ProcessTries,
    try_instructor_key,
)
from classroom.instructor.broadcast import MESSAGE_MAX, ClassBoard
from classroom.instructor.overview import class_overview, learner_view, progress_csv
from classroom.instructor.roster import (
    checked_display_name,
    default_display_name,
    set_display_name,
    utc_now,
)
from classroom.instructor.service import InstructorService
from classroom.progress.evidence import run_and_record
from classroom.progress.steps import STEPS, learner_progress
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.reset import initialize_sandbox
from classroom.sandboxes.sandbox import Sandbox, new_sandbox_id


@pytest.fixture(params=["configured", "postgresql"])
def backend_registry(request) -> SandboxRegistry:
    """The configured backend's registry, then a real PostgreSQL's."""
    name = "registry" if request.param == "configured" else "postgres_registry"
    return request.getfixturevalue(name)


def class_settings(registry: SandboxRegistry, class_name: str):
    return replace(registry.settings, class_name=class_name)


async def drop_class(service: InstructorService) -> None:
    """A class of the test's own: its tables go (PostgreSQL; a SQLite class file goes on close)."""
    if service.store.shared and service.store.engine is not None:
        async with service.store.engine.begin() as connection:
            await connection.run_sync(service.store.tables.metadata.drop_all)


@pytest.fixture
async def instructor(backend_registry):
    """The instructor's service on the backend's registry, in a class of its own."""
    service = InstructorService(
        class_settings(backend_registry, f"t{secrets.token_hex(4)}"), backend_registry
    )
    await service.start()
    try:
        yield service
    finally:
        await service.roster.flush()
        await drop_class(service)
        await service.close()


class StatementCounter:
    """Every statement the class store's engine sends (SQLAlchemy's cursor event)."""

    def __init__(self, service: InstructorService) -> None:
        self.sql: list[str] = []
        engine = service.store.engine.sync_engine
        event.listen(engine, "before_cursor_execute", self._heard)

    def _heard(self, connection, cursor, statement, parameters, context, executemany) -> None:
        self.sql.append(statement)

    def about(self, table: str) -> list[str]:
        return [sql for sql in self.sql if table in sql]


async def learner(registry: SandboxRegistry, *, held: bool = True) -> Sandbox:
    return await registry.acquire(
        new_sandbox_id(), holder=f"browser:{new_sandbox_id()}" if held else None
    )


async def done_steps(sandbox: Sandbox) -> set[str]:
    progress = await learner_progress(sandbox)  # as the sidebar reads it: the roster hears
    return {status.step.key for status in progress.steps if status.done}


async def create_user(sandbox: Sandbox, email: str) -> None:
    await run_and_record(source.create_user, sandbox, email=email, name="Someone")


async def test_the_funnel_counts_exactly_the_steps_each_learner_has_checked(
    instructor, backend_registry
):
    first, second, third = [await learner(backend_registry) for _ in range(3)]
    await create_user(first, "first@example.com")
    await create_user(second, "second@example.com")
    await run_and_record(initialize_sandbox, second)
    alex = next(u.id for u in await source.list_users(second) if u.name == "Alex Smith")
    await run_and_record(source.add_sample_scores, second, user_id=alex)
    checked = [await done_steps(sandbox) for sandbox in (first, second, third)]
    assert checked == [
        {"create_user"},
        {"create_user", "initialize", "add_scores"},
        set(),
    ]

    overview = await class_overview(instructor)

    assert {line.key: line.completed for line in overview.funnel} == {
        step.key: sum(step.key in done for done in checked) for step in STEPS
    }
    assert [line.key for line in overview.funnel] == [step.key for step in STEPS]  # guide order
    assert overview.states == {"active": 3, "idle": 0, "dormant": 0}
    assert len(overview.learners) == 3
    assert overview.funnel[0].median_seconds is not None  # from joining to the first step


async def test_an_unchanged_reading_writes_nothing_and_a_new_step_writes_one_row(
    instructor, backend_registry
):
    sandbox = await learner(backend_registry)
    await create_user(sandbox, "one@example.com")
    await done_steps(sandbox)
    await instructor.roster.flush()
    counter = StatementCounter(instructor)
    roster_table = instructor.store.tables.roster.name

    for _ in range(5):  # every rerun of every page reads progress: these cost the roster nothing
        await done_steps(sandbox)
    await instructor.roster.flush()
    assert counter.about(roster_table) == []

    await run_and_record(initialize_sandbox, sandbox)
    assert "initialize" in await done_steps(sandbox)
    await done_steps(sandbox)
    await instructor.roster.flush()
    written = counter.about(roster_table)
    assert len(written) == 1 and written[0].lstrip().upper().startswith("INSERT"), written


async def test_the_row_follows_the_sandbox_active_idle_then_gone(instructor, backend_registry):
    holder = f"browser:{new_sandbox_id()}"
    sandbox = await backend_registry.acquire(new_sandbox_id(), holder=holder)

    async def shown_state() -> str:
        return (await learner_view(sandbox)).line.state

    assert await shown_state() == "active"
    backend_registry.release_holder(holder)
    assert await shown_state() == "idle"
    await backend_registry.release(sandbox.id)
    await instructor.roster.flush()
    assert (await class_overview(instructor)).learners == ()


async def test_a_learner_on_one_step_past_the_threshold_is_stuck_and_only_while_active(
    instructor, backend_registry
):
    stuck, idle = await learner(backend_registry), await learner(backend_registry, held=False)
    for sandbox, email in ((stuck, "stuck@example.com"), (idle, "idle@example.com")):
        await create_user(sandbox, email)
        await done_steps(sandbox)
    await set_display_name(stuck, name="Grace")
    later = utc_now() + timedelta(seconds=5)

    overview = await class_overview(instructor, stuck_after_minutes=0.05, now=later)  # 3 s

    assert [(who.display_name, who.step) for who in overview.stuck] == [
        ("Grace", "Initialize and see the two sample users")
    ]
    assert overview.stuck[0].seconds >= 5
    assert (await class_overview(instructor, stuck_after_minutes=10, now=later)).stuck == ()


async def test_an_active_row_whose_server_stopped_answering_shows_idle(
    instructor, backend_registry
):
    await learner(backend_registry)
    await instructor.roster.flush()
    soon = utc_now() + timedelta(seconds=1)
    assert (await class_overview(instructor, now=soon)).states["active"] == 1
    gone_quiet = utc_now() + instructor.roster.stale_after + timedelta(seconds=1)

    overview = await class_overview(instructor, now=gone_quiet)

    assert overview.states == {"active": 0, "idle": 1, "dormant": 0}
    assert overview.learners[0].server_stopped_answering
    assert not any(server.answering for server in overview.servers)


async def test_the_heartbeat_writes_once_per_beat_and_only_while_sandboxes_are_held(
    instructor, backend_registry
):
    held = [await learner(backend_registry) for _ in range(3)]
    await learner(backend_registry, held=False)
    await instructor.roster.flush()
    counter = StatementCounter(instructor)
    await instructor.roster.beat([sandbox.id for sandbox in held])
    assert len(counter.about(instructor.store.tables.roster.name)) == 1  # one, for all three
    assert instructor.roster.heartbeats_written == 1
    later = utc_now() + instructor.roster.stale_after - timedelta(seconds=1)
    assert (await class_overview(instructor, now=later)).states["active"] == 3


async def test_display_names_are_plain_text_of_1_to_40_characters(instructor, backend_registry):
    sandbox = await learner(backend_registry)
    default = default_display_name(sandbox.id)
    assert default == "Learner " + hashlib.sha256(sandbox.id.encode()).hexdigest()[:6]
    assert (await learner_view(sandbox)).line.display_name == default
    assert checked_display_name("  Ada Lovelace  ") == "Ada Lovelace"
    assert checked_display_name("x" * 40) == "x" * 40
    for bad in ("", "   ", "x" * 41, "Ada\nLovelace", "Ada\x00", "Tab\there", "zero\u200bwidth"):
        with pytest.raises(source.ValidationError):
            await set_display_name(sandbox, name=bad)
    view = await learner_view(sandbox)
    assert (view.line.display_name, view.named) == (default, False)  # refused: nothing changed

    assert await set_display_name(sandbox, name="  Ada  ") == "Ada"
    view = await learner_view(sandbox)
    assert (view.line.display_name, view.named) == ("Ada", True)
    assert [line.display_name for line in (await class_overview(instructor)).learners] == ["Ada"]


async def test_the_message_is_limited_replaced_and_cleared_and_read_at_most_every_2_s(
    instructor,
):
    board = instructor.board
    assert await board.current() is None
    with pytest.raises(source.ValidationError, match="at most 280"):
        await board.post("x" * (MESSAGE_MAX + 1))
    with pytest.raises(source.ValidationError):
        await board.post("   ")
    elsewhere = ClassBoard(instructor.store, refresh_seconds=0)  # another replica, no copy kept
    assert await elsewhere.current() is None  # nothing was written

    first = await board.post("x" * MESSAGE_MAX)
    assert (await elsewhere.current()).text == "x" * MESSAGE_MAX
    second = await board.post("  Break until 11:00  ")
    seen = await elsewhere.current()
    assert (seen.text, seen.id) == ("Break until 11:00", second.id) and second.id != first.id
    await board.clear()
    assert await elsewhere.current() is None and await board.current() is None

    cached = ClassBoard(instructor.store)  # learners' pages: one read per 2 s per process
    for _ in range(20):
        await cached.current()
    assert cached.reads == 1


async def test_the_csv_has_one_line_per_completed_step(instructor, backend_registry):
    ada, bob = await learner(backend_registry), await learner(backend_registry)
    await create_user(ada, "ada@example.com")
    await run_and_record(initialize_sandbox, ada)
    await set_display_name(ada, name="Ada")
    await create_user(bob, "bob@example.com")
    await set_display_name(bob, name="=HYPERLINK(1)")
    for sandbox in (ada, bob):
        await done_steps(sandbox)

    overview = await class_overview(instructor)
    lines = progress_csv(overview).splitlines()

    assert lines[0] == "display name,step,completed at"
    assert [line.rsplit(",", 1)[0] for line in lines[1:]] == [
        "'=HYPERLINK(1),Create a user",  # a spreadsheet shows it, never runs it as a formula
        "Ada,Create a user",
        "Ada,Initialize and see the two sample users",
    ]
    ada_line = next(line for line in overview.learners if line.display_name == "Ada")
    assert lines[2].rsplit(",", 1)[1] == ada_line.completed[0][1].isoformat()
    assert lines[2].endswith("+00:00")
    assert "ada@example.com" not in progress_csv(overview) and ada.id not in progress_csv(overview)


async def test_one_select_reads_the_class_whatever_its_size(instructor, backend_registry):
    await learner(backend_registry)
    await instructor.roster.flush()
    counts = []
    for size in (2, 200):
        rows = await roster_rows(instructor)
        await add_synthetic_learners(instructor, size - rows)
        counter = StatementCounter(instructor)
        overview = await class_overview(instructor)
        assert len(overview.learners) == size
        counts.append(len(counter.sql))
    assert counts == [1, 1]


async def roster_rows(service: InstructorService) -> int:
    async with service.store.engine.connect() as connection:
        return await connection.scalar(
            select(func.count()).select_from(service.store.tables.roster)
        )


async def add_synthetic_learners(service: InstructorService, count: int) -> None:
    """Rows as the roster writes them, without sandboxes behind them (cheap, for size alone)."""
    now = utc_now()
    async with service.store.engine.begin() as connection:
        for _ in range(count):
            values = {
                "sandbox_id": new_sandbox_id(),
                "display_name": None,
                "joined_at": now,
                "state": "active",
                "state_at": now,
                "heartbeat_at": now,
                "next_step": "initialize",
                "step_since": now,
                "completed": json.dumps({"create_user": now.isoformat()}),
            }
            await connection.execute(
                service.store.upsert(service.store.tables.roster, values, update=("state",))
            )


async def test_on_postgresql_two_replicas_learners_appear_in_one_overview(
    postgres_registry, settings
):
    class_name = f"t{secrets.token_hex(4)}"
    on_postgres = postgres_registry.settings
    redis_service = await RedisService.connect(on_postgres)
    other_registry = SandboxRegistry(on_postgres, redis_service)
    replicas = [
        InstructorService(replace(on_postgres, class_name=class_name), registry)
        for registry in (postgres_registry, other_registry)
    ]
    try:
        for service in replicas:
            await service.start()
        here, there = await learner(postgres_registry), await learner(other_registry)
        await create_user(here, "here@example.com")
        for sandbox in (here, there):
            await done_steps(sandbox)
        await replicas[1].roster.flush()

        overview = await class_overview(replicas[0])

        assert overview.every_server
        assert overview.states["active"] == 2 and len(overview.servers) == 2
        assert {line.key: line.completed for line in overview.funnel}["create_user"] == 1
        assert overview.capacity == sum(server.capacity for server in overview.servers)
    finally:
        await other_registry.close()
        await replicas[1].close()
        await replicas[0].roster.flush()
        await drop_class(replicas[0])
        await replicas[0].close()
        await redis_service.close()


def test_the_key_is_compared_in_constant_time_five_tries_a_minute(caplog):
    tries: list[float] = []
    everyone = ProcessTries()
    caplog.set_level(logging.WARNING, logger="qulab")

    def attempt(typed: str, now: float):
        return try_instructor_key(
            typed, configured="s3cret-key", tries=tries, now=now, every_session=everyone
        )

    for moment in range(TRIES_PER_MINUTE):
        check = attempt("wrong guess", moment)
        assert not check.accepted and check.wait_seconds == 0
    sixth = attempt("s3cret-key", 10)
    assert not sixth.accepted and sixth.wait_seconds == 50 and "Wait 50 s" in sixth.message
    assert len(tries) == TRIES_PER_MINUTE  # not compared, not counted
    assert attempt("s3cret-key", 61).accepted
    logged = caplog.text
    assert "refused" in logged and "s3cret-key" not in logged and "wrong guess" not in logged


def test_new_sessions_do_not_buy_more_tries_than_the_process_allows():
    """A reload (a new session, with no tries of its own) must not reset the count: every
    session of the process together gets PROCESS_TRIES_PER_MINUTE a minute."""
    everyone = ProcessTries()
    for moment in range(PROCESS_TRIES_PER_MINUTE):
        session: list[float] = []  # each guess from a fresh session
        check = try_instructor_key(
            "guess", configured="s3cret-key", tries=session, now=moment, every_session=everyone
        )
        assert not check.accepted and check.wait_seconds == 0
    refused = try_instructor_key(
        "s3cret-key", configured="s3cret-key", tries=[], now=40, every_session=everyone
    )
    assert not refused.accepted and refused.wait_seconds == 20
    assert "on this server" in refused.message
    later = try_instructor_key(
        "s3cret-key", configured="s3cret-key", tries=[], now=61, every_session=everyone
    )
    assert later.accepted


def test_a_killed_process_class_file_is_removed_by_the_next_start(tmp_path):
    """An embedded class file belongs to its process; one whose process died (SIGKILL: no
    close) is removed when a process next opens its own, a live process's never."""
    import os
    import signal
    import subprocess
    import sys

    from classroom.instructor.store import remove_dead_processes_class_files

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    dead = [
        tmp_path / f"qulab-{victim.pid}-class-ab12cd34.sqlite3{suffix}" for suffix in ("", "-wal")
    ]
    alive = tmp_path / f"qulab-{os.getpid()}-class-ef56ab78.sqlite3"
    for path in (*dead, alive):
        path.write_bytes(b"x")
    remove_dead_processes_class_files(tmp_path)
    assert [path.exists() for path in dead] == [False, False] and alive.exists()
