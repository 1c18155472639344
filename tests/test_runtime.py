"""Runtime: one loop thread serves every caller; errors reach pages as QuLabErrors only."""

import asyncio
import dataclasses
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import source
from classroom import validation
from classroom.browser import (
    SANDBOX_STATE_KEY,
    SANDBOX_URL_PARAMETER,
    lab_for_browser_session,
    switch_to_new_sandbox,
)
from classroom.cache.link import RedisService
from classroom.config import Settings
from classroom.errors import BackendUnavailableError, OperationTimeoutError, UnexpectedError
from classroom.runtime import Lab, Runtime, get_runtime
from classroom.sandboxes.admission import ClassFullError
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import SANDBOX_ACTIVE, SANDBOX_DORMANT, new_sandbox_id
from classroom.status import runtime_status
from pages.common import source_code


def test_the_runtime_serves_calls_from_many_threads(runtime):
    lab = runtime.lab(new_sandbox_id())
    loop_threads: set[str] = set()

    async def remember_thread(sandbox):
        loop_threads.add(threading.current_thread().name)

    def create(number: int) -> str:
        lab.run(remember_thread)
        return lab.run(
            source.create_user, email=f"user{number}@example.com", name=f"User {number}"
        ).id

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = list(pool.map(create, range(64)))

    assert len(set(ids)) == 64
    assert len(lab.run(source.list_users, limit=1000)) == 64
    assert loop_threads == {"qulab-runtime"}


def test_each_lab_has_its_own_sandbox(runtime):
    first, second = runtime.lab(new_sandbox_id()), runtime.lab(new_sandbox_id())
    first.run(source.create_user, email="a@example.com", name="A")
    assert second.run(source.list_users) == []


def test_qulab_errors_pass_through_unchanged(runtime):
    lab = runtime.lab(new_sandbox_id())
    with pytest.raises(validation.InvalidEmailError, match="Email is required"):
        lab.run(source.create_user, email="", name="A")


def test_unexpected_errors_become_a_short_message_without_internals(runtime):
    async def broken(sandbox):
        raise KeyError("internal detail")

    with pytest.raises(UnexpectedError) as raised:
        runtime.lab(new_sandbox_id()).run(broken)
    assert "internal detail" not in str(raised.value)
    assert "KeyError" in str(raised.value)


def test_a_slow_operation_times_out_and_is_cancelled(runtime):
    cancelled = threading.Event()

    async def slow(sandbox):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def nothing(sandbox):
        return None

    lab = runtime.lab(new_sandbox_id())
    # The sandbox exists first: creating it (a schema on PostgreSQL) is not what times out.
    lab.run(nothing)
    with pytest.raises(OperationTimeoutError):
        lab.run(slow, timeout=0.2)
    assert cancelled.wait(5)


@pytest.mark.parametrize("configured", ["nothing", "servers"])
def test_status_describes_backends(configured, request):
    """Each configuration has one right answer: nothing set means SQLite files and fakeredis; a
    PostgreSQL and a Redis URL mean those servers, each sandbox in a schema of its own."""
    settings = Settings.from_environment()
    if configured == "nothing":
        settings = dataclasses.replace(settings, database_url=None, redis_url=None)
        expected = ("sqlite", "fakeredis")
    else:
        database_url, redis_url = (
            request.getfixturevalue("postgres_url"),
            request.getfixturevalue("real_redis_url"),
        )
        settings = dataclasses.replace(settings, database_url=database_url, redis_url=redis_url)
        expected = ("postgresql", "redis")
    runtime = Runtime(settings)
    try:
        status = runtime_status(runtime.lab(new_sandbox_id()))
    finally:
        runtime.close()
    assert (status.backend, status.redis_mode) == expected
    assert status.redis_reason
    assert status.sandbox_id in status.sandbox_location  # the sandbox's own file, or its own schema
    assert status.sandbox_location.endswith(".sqlite3") == (expected[0] == "sqlite")


async def test_the_database_shown_in_the_status_never_carries_its_password():
    settings = Settings(database_url="postgresql://alex:s3cr3t@db.example:5432/qulab")
    redis_service = await RedisService.connect(settings)
    try:
        shown = SandboxRegistry(settings, redis_service).describe_database()  # connects to nothing
    finally:
        await redis_service.close()
    assert "s3cr3t" not in shown and "alex" in shown and "db.example" in shown


def test_unreachable_redis_url_is_kept_not_answering_and_says_why():
    """Never fakeredis instead: tests/test_redis_startup.py starts the server and sees it used."""
    settings = Settings(redis_url="redis://127.0.0.1:1/0", redis_connect_timeout_seconds=0.5)
    runtime = Runtime(settings)
    try:
        status = runtime_status(runtime.lab(new_sandbox_id()))
        assert status.redis_mode == "redis" and not status.redis_answers
        assert "did not answer" in status.redis_reason
    finally:
        runtime.close()


def test_run_from_the_loop_thread_is_refused(runtime):
    async def nested():
        runtime.run(asyncio.sleep(0))

    with pytest.raises(UnexpectedError):
        runtime.lab(new_sandbox_id()).run(lambda sandbox: nested())


def wait_until(condition, *, attempts: int = 200) -> bool:
    for _ in range(attempts):
        if condition():
            return True
        threading.Event().wait(0.05)
    return condition()


def test_a_closed_lab_goes_dormant_in_the_background_and_is_deleted_after_the_idle_limit(settings):
    quick = Settings(**{**settings.__dict__, "sandbox_idle_seconds": 1, "sandbox_grace_seconds": 0})
    runtime = Runtime(quick)
    try:
        lab = runtime.lab(new_sandbox_id())
        lab.run(source.create_user, email="a@example.com", name="A")
        threading.Event().wait(1.5)  # longer than the idle limit, but held: kept
        assert runtime.sandboxes.get_existing(lab.sandbox_id).state == SANDBOX_ACTIVE
        sandbox = runtime.sandboxes.get_existing(lab.sandbox_id)
        lab.close()
        # On PostgreSQL deletion also waits for the lease (test_sandbox_leases.py).
        if runtime.sandboxes.backend == "postgresql":

            def gone_or_asleep() -> bool:
                return runtime.sandboxes.get_existing(lab.sandbox_id) is None or not sandbox.awake

            assert wait_until(gone_or_asleep) and sandbox._engine is None
            return
        assert wait_until(lambda: runtime.sandboxes.get_existing(lab.sandbox_id) is None)
        again = runtime.lab(lab.sandbox_id)
        assert again.run(source.list_users) == []
        assert "idle" in runtime_status(again).sandbox_notice
    finally:
        runtime.close()


def test_a_lab_holds_its_place_until_closed_and_the_same_capacity_rules_apply(settings):
    one_place = Settings(**{**settings.__dict__, "max_sandboxes": 1})
    runtime = Runtime(one_place)
    try:
        first = runtime.lab(new_sandbox_id())
        first.run(source.create_user, email="first@example.com", name="First")
        with pytest.raises(ClassFullError):
            runtime.lab(new_sandbox_id())
        first.close()
        assert wait_until(lambda: not runtime.sandboxes.get_existing(first.sandbox_id).holders)
        second = runtime.lab(new_sandbox_id())  # the closed lab's sandbox went dormant to make room
        assert runtime.sandboxes.get_existing(first.sandbox_id).state == SANDBOX_DORMANT
        with second:
            assert second.run(source.list_users) == []
        assert wait_until(lambda: not runtime.sandboxes.get_existing(second.sandbox_id).holders)
        with runtime.lab(first.sandbox_id) as back:  # wakes, with its data
            assert [u.email for u in back.run(source.list_users)] == ["first@example.com"]
    finally:
        runtime.close()


def test_an_unreachable_database_at_start_up_gives_a_clear_message_with_the_password_masked():
    settings = Settings(database_url="postgresql+asyncpg://alex:s3cr3t@127.0.0.1:1/qulab")
    runtime = Runtime(settings)
    try:
        with pytest.raises(BackendUnavailableError) as raised:
            runtime_status(Lab(runtime, new_sandbox_id()))
    finally:
        runtime.close()
    message = str(raised.value)
    assert "did not answer" in message and "127.0.0.1:1" in message and "DATABASE_URL" in message
    assert "s3cr3t" not in message


def test_lab_for_browser_session_keeps_one_sandbox_per_session(fresh_global_runtime):
    state: dict = {}
    first = lab_for_browser_session(state)
    again = lab_for_browser_session(state)
    other = lab_for_browser_session({})
    assert first.sandbox_id == again.sandbox_id == state[SANDBOX_STATE_KEY]
    assert other.sandbox_id != first.sandbox_id


def test_source_code_is_the_live_source_and_safe_to_read_from_many_threads():
    shown = [source.Base, source.TimestampMixin, *source.MODEL_CLASSES, source.get_session]
    with ThreadPoolExecutor(max_workers=4) as pool:
        read = list(pool.map(source_code, shown * 4))
    assert read == [inspect.getsource(code_object) for code_object in shown * 4]
    assert read[2].startswith("class User(Base, TimestampMixin):")


def test_the_sandbox_id_in_the_url_survives_a_reload(fresh_global_runtime):
    url: dict = {}
    first_visit = lab_for_browser_session({}, url)
    assert url[SANDBOX_URL_PARAMETER] == first_visit.sandbox_id
    after_reload = lab_for_browser_session({}, dict(url))  # new session state, same URL
    assert after_reload.sandbox_id == first_visit.sandbox_id


@pytest.mark.parametrize("bad", ["", "../etc", "x" * 200, "ABC;drop"])
def test_a_malformed_sandbox_id_in_the_url_is_replaced(fresh_global_runtime, bad):
    url = {SANDBOX_URL_PARAMETER: bad}
    lab = lab_for_browser_session({}, url)
    assert lab.sandbox_id != bad and url[SANDBOX_URL_PARAMETER] == lab.sandbox_id


def test_new_sandbox_gives_the_session_a_fresh_id_and_the_old_one_keeps_its_data(
    fresh_global_runtime,
):
    state, url = {}, {}
    old = lab_for_browser_session(state, url)
    old.run(source.create_user, email="kept@example.com", name="Kept")

    new_id = switch_to_new_sandbox(state, url)
    new = lab_for_browser_session(state, url)

    assert new.sandbox_id == new_id != old.sandbox_id and url[SANDBOX_URL_PARAMETER] == new_id
    assert new.run(source.list_users) == []
    assert [u.email for u in old.run(source.list_users)] == ["kept@example.com"]


def test_the_first_runtime_moves_the_startup_heap_out_of_the_collectors_reach(fresh_global_runtime):
    """Full collections then skip the ~170,000 objects imports made (see freeze_startup_heap)."""
    import gc

    get_runtime()
    assert gc.get_freeze_count() > 10_000
