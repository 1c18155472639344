"""Sandboxes: each learner's data is private, and idle sandboxes give their storage back."""

import asyncio
import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

import source
from classroom.cache.coherent import cache_coherence
from classroom.cache.link import RedisService
from classroom.config import RAM_BACKED_DIRECTORY, Settings
from classroom.demos.caching import create_cache_demo_user, rename_user
from classroom.sandboxes.admission import ClassFullError
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.reset import initialize_sandbox, reset_sandbox
from classroom.sandboxes.sandbox import SANDBOX_ACTIVE, SANDBOX_DORMANT, new_sandbox_id
from classroom.sandboxes.stores import SANDBOX_LEASE_TABLE


async def test_resetting_one_sandbox_leaves_another_intact(registry):
    first = await registry.acquire(new_sandbox_id())
    second = await registry.acquire(new_sandbox_id())
    await source.create_user(first, email="mine@example.com", name="Mine")
    await source.create_user(second, email="theirs@example.com", name="Theirs")
    await second.redis.client.set(second.redis.key("note"), "kept")

    await initialize_sandbox(first)

    assert sorted(u.email for u in await source.list_users(first)) == [
        "alex.smith@innovateai.example",
        "jane.doe@innovateai.example",
    ]
    assert [u.email for u in await source.list_users(second)] == ["theirs@example.com"]
    assert await second.redis.client.get(second.redis.key("note")) == "kept"


async def test_init_db_twice_gives_exactly_the_two_sample_users(sandbox):
    await source.init_db(sandbox, reset=True)
    await source.create_user(sandbox, email="extra@example.com", name="Extra")
    users = await source.init_db(sandbox, reset=True)
    assert [u.name for u in users] == ["Alex Smith", "Jane Doe"]
    assert (await source.count_rows(sandbox))["users"] == 2


async def test_initialize_clears_the_sandbox_redis_namespace(sandbox):
    await sandbox.redis.client.set(sandbox.redis.key("stale"), "x")
    await initialize_sandbox(sandbox)
    assert await sandbox.redis.client.get(sandbox.redis.key("stale")) is None


async def test_acquire_returns_the_same_sandbox_for_the_same_id(registry):
    sandbox_id = new_sandbox_id()
    assert await registry.acquire(sandbox_id) is await registry.acquire(sandbox_id)


@pytest.mark.parametrize("sandbox_id", ["", "../../etc", "UPPER", "a;drop", "x" * 100])
async def test_malformed_sandbox_ids_are_refused(registry, sandbox_id):
    with pytest.raises(source.ValidationError):
        await registry.acquire(sandbox_id)


async def age(registry, sandbox, *, seconds: float) -> None:
    """Pretend nobody used the sandbox for this long (here, and in its PostgreSQL lease)."""
    sandbox.last_used -= seconds
    sandbox.unheld_since -= seconds
    if sandbox.backend == "postgresql":
        engine = await registry.store.engine()
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    f"UPDATE {SANDBOX_LEASE_TABLE} "
                    "SET last_used = now() - make_interval(secs => :seconds) "
                    "WHERE schema_name = :schema"
                ),
                {"schema": sandbox.location, "seconds": seconds},
            )


async def storage_exists(registry, sandbox) -> bool:
    if sandbox.backend == "sqlite":
        return Path(sandbox.location).exists()
    engine = await registry.store.engine()
    async with engine.connect() as connection:
        found = await connection.execute(
            text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :name"),
            {"name": sandbox.location},
        )
        return found.first() is not None


@pytest.fixture
async def small_class(settings):
    """A registry with room for two awake sandboxes and no grace period."""
    limited = Settings(**{**settings.__dict__, "max_sandboxes": 2, "sandbox_grace_seconds": 0})
    redis_service = await RedisService.connect(limited)
    registry = SandboxRegistry(limited, redis_service)
    try:
        yield registry
    finally:
        await registry.close()
        await redis_service.close()


async def test_idle_sandboxes_are_released_with_their_storage_and_keys(registry):
    idle = await registry.acquire(new_sandbox_id())
    busy = await registry.acquire(new_sandbox_id())
    await source.create_user(idle, email="a@example.com", name="A")
    await idle.redis.client.set(idle.redis.key("k"), "v")
    idle.last_used -= 3600

    assert await registry.release_idle(idle_seconds=60) == [idle.id]

    assert registry.get_existing(idle.id) is None and registry.get_existing(busy.id) is busy
    assert await idle.redis.client.get(idle.redis.key("k")) is None
    assert not await storage_exists(registry, idle)
    if idle.backend == "sqlite":
        assert not Path(idle.location + "-wal").exists()


async def test_a_released_sandbox_comes_back_empty_with_a_notice(registry):
    sandbox_id = new_sandbox_id()
    sandbox = await registry.acquire(sandbox_id)
    await source.create_user(sandbox, email="a@example.com", name="A")
    await registry.release(sandbox_id, "it was idle for more than 30 minutes")

    again = await registry.acquire(sandbox_id)

    assert again is not sandbox
    assert await source.list_users(again) == []
    assert "idle for more than 30 minutes" in again.notice


async def test_at_capacity_an_unheld_sandbox_goes_dormant_with_its_data_kept(small_class):
    oldest = await small_class.acquire(new_sandbox_id())
    await source.create_user(oldest, email="kept@example.com", name="Kept")
    oldest.last_used -= 100
    newer = await small_class.acquire(new_sandbox_id(), holder="tab-1")
    newest = await small_class.acquire(new_sandbox_id(), holder="tab-2")

    assert oldest.state == SANDBOX_DORMANT and oldest._engine is None
    assert len(small_class) == 2 and newer.awake and newest.awake
    assert await storage_exists(small_class, oldest)


async def test_connected_learners_are_never_released_and_a_newcomer_gets_class_full(small_class):
    first = await small_class.acquire(new_sandbox_id(), holder="tab-1")
    second = await small_class.acquire(new_sandbox_id(), holder="tab-2")
    await source.create_user(first, email="first@example.com", name="First")
    await source.create_user(second, email="second@example.com", name="Second")
    first.last_used -= 3600  # connected but quiet for an hour: still in class

    with pytest.raises(ClassFullError) as full:
        await small_class.acquire(new_sandbox_id(), holder="tab-3")

    assert full.value.in_class == 2 and full.value.capacity == 2
    assert "class is full" in str(full.value)
    assert [u.email for u in await source.list_users(first)] == ["first@example.com"]
    assert [u.email for u in await source.list_users(second)] == ["second@example.com"]
    assert first.state == second.state == SANDBOX_ACTIVE


async def test_a_page_load_that_leaves_frees_its_place_for_the_next(small_class):
    await small_class.acquire(new_sandbox_id(), holder="tab-1")
    await small_class.acquire(new_sandbox_id(), holder="tab-2")
    small_class.release_holder("tab-2")  # that browser tab was closed

    newcomer = await small_class.acquire(new_sandbox_id(), holder="tab-3")

    assert newcomer.state == SANDBOX_ACTIVE
    assert small_class.counts() == {"active": 2, "idle": 0, "dormant": 1}


async def settled_thread_count() -> int:
    """Threads now, after closed connections' worker threads have had a moment to finish."""
    for _ in range(50):
        count = threading.active_count()
        await asyncio.sleep(0.02)
        if threading.active_count() == count:
            return count
    return threading.active_count()


async def test_a_disconnected_sandbox_goes_dormant_after_the_grace_period_and_wakes_with_its_data(
    small_class,
):
    before = await settled_thread_count()
    sandbox = await small_class.acquire(new_sandbox_id(), holder="tab-1")
    await source.create_user(sandbox, email="back@example.com", name="Comes Back")
    await sandbox.redis.client.set(sandbox.redis.key("note"), "kept")
    dormant_calls, wake_calls = [], []
    sandbox.dormant_listeners.append(lambda s: _record(dormant_calls, s))
    sandbox.wake_listeners.append(lambda s: _record(wake_calls, s))

    assert (await small_class.sweep())["dormant"] == []  # held: stays active
    small_class.release_holder("tab-1")
    assert sandbox.id in (await small_class.sweep())["dormant"]

    assert (
        sandbox.state == SANDBOX_DORMANT
        and sandbox._engine is None
        and dormant_calls == [sandbox.id]
    )
    if sandbox.backend == "sqlite":
        assert await settled_thread_count() <= before  # its driver threads are gone
        assert Path(sandbox.location).exists()
        wal = Path(sandbox.location + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0
    assert await sandbox.redis.client.get(sandbox.redis.key("note")) == "kept"

    again = await small_class.acquire(sandbox.id, holder="tab-after-reload")
    assert again is sandbox and again.state == SANDBOX_ACTIVE and wake_calls == [sandbox.id]
    assert [u.email for u in await source.list_users(again)] == ["back@example.com"]


async def _record(calls, sandbox):
    calls.append(sandbox.id)


async def test_after_the_idle_limit_its_data_and_redis_keys_are_deleted(small_class):
    sandbox = await small_class.acquire(new_sandbox_id(), holder="tab-1")
    await source.create_user(sandbox, email="gone@example.com", name="Gone")
    await sandbox.redis.client.set(sandbox.redis.key("note"), "x")
    small_class.release_holder("tab-1")
    await small_class.sweep()
    await age(small_class, sandbox, seconds=small_class.settings.sandbox_idle_seconds + 60)

    assert sandbox.id in (await small_class.sweep())["deleted"]

    assert small_class.get_existing(sandbox.id) is None
    assert not await storage_exists(small_class, sandbox)
    assert await sandbox.redis.client.get(sandbox.redis.key("note")) is None


async def test_a_held_sandbox_is_never_deleted_however_long_it_sits(small_class):
    sandbox = await small_class.acquire(new_sandbox_id(), holder="tab-1")
    await age(small_class, sandbox, seconds=10 * small_class.settings.sandbox_idle_seconds)
    report = await small_class.sweep()
    assert sandbox.id not in report["deleted"] + report["dormant"]
    assert sandbox.state == SANDBOX_ACTIVE and await storage_exists(small_class, sandbox)


async def test_reset_sandbox_empties_it_and_keeps_its_id(sandbox_with_users):
    await sandbox_with_users.redis.client.set(sandbox_with_users.redis.key("k"), "v")
    counts = await reset_sandbox(sandbox_with_users)
    assert set(counts.values()) == {0}
    assert await sandbox_with_users.redis.client.get(sandbox_with_users.redis.key("k")) is None
    assert await source.list_users(sandbox_with_users) == []


async def test_embedded_sandbox_files_are_ram_backed_when_the_os_offers_it(sandbox):
    if sandbox.backend != "sqlite" or os.environ.get("QULAB_SANDBOX_DIR"):
        pytest.skip("only the embedded default chooses its directory")
    if RAM_BACKED_DIRECTORY.is_dir() and os.access(RAM_BACKED_DIRECTORY, os.W_OK):
        assert Path(sandbox.location).parent == RAM_BACKED_DIRECTORY
    assert Path(sandbox.location).exists()


async def test_sqlite_file_sandboxes_are_deleted_on_release_and_stale_ones_at_start(
    settings, tmp_path
):
    on_file = Settings(**{**settings.__dict__, "database_url": f"sqlite:///{tmp_path}/qulab.db"})
    redis_service = await RedisService.connect(on_file)
    registry = SandboxRegistry(on_file, redis_service)
    stale = tmp_path / "qulab-abcdefgh12345678.db"
    stale.write_bytes(b"")
    os.utime(stale, (0, 0))  # last touched in 1970
    fresh_other = tmp_path / "qulab-fedcba9876543210.db"
    fresh_other.write_bytes(b"")
    # Old main file, recent commits in its WAL.
    written_lately = tmp_path / "qulab-0123456789abcdef.db"
    written_lately.write_bytes(b"")
    Path(f"{written_lately}-wal").write_bytes(b"recent commits")
    os.utime(written_lately, (0, 0))
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        await source.create_user(sandbox, email="a@example.com", name="A")
        assert Path(sandbox.location).parent == tmp_path and Path(sandbox.location).exists()
        assert not stale.exists() and fresh_other.exists()  # the start-up swept only the stale one
        # Its WAL is recent: kept.
        assert written_lately.exists() and Path(f"{written_lately}-wal").exists()

        await registry.release(sandbox.id)

        assert not Path(sandbox.location).exists() and not Path(sandbox.location + "-wal").exists()
    finally:
        await registry.close()
        await redis_service.close()


async def test_a_dormant_sandbox_keeps_no_cache_settler_running_and_resumes_it_on_wake(small_class):
    sandbox = await small_class.acquire(new_sandbox_id(), holder="tab-1")
    alex = (await create_cache_demo_user(sandbox)).user_id
    # Redis misses the rename: an invalidation is left pending, settled in the background.
    sandbox.redis.cut()
    await rename_user(sandbox, user_id=alex, name="Alex Renamed")
    coherence = cache_coherence(sandbox)
    assert coherence.pending_writes == 1 and not coherence._settler.done()

    small_class.release_holder("tab-1")
    assert sandbox.id in (await small_class.sweep())["dormant"]
    assert coherence._settler.done()  # idle costs nothing: no task retries while nobody is there
    assert coherence.pending_writes == 1  # still counted, since Redis is still cut off

    await sandbox.redis.restore()
    await small_class.acquire(sandbox.id, holder="tab-2")
    for _ in range(300):  # the resumed settler sends the new epoch once Redis answers
        if coherence.pending_writes == 0:
            break
        await asyncio.sleep(0.05)
    assert coherence.pending_writes == 0


async def test_a_release_racing_a_returning_learner_never_flushes_with_the_registry_locked(
    registry,
):
    """The learner wakes the sandbox while its release waits; the release puts it back to sleep
    outside the lock."""
    sandbox = await registry.acquire(new_sandbox_id())
    first_flush_may_end, second_flush_may_end = asyncio.Event(), asyncio.Event()
    second_flush_began = asyncio.Event()
    flushes = 0

    async def slow_flush(_sandbox) -> None:  # as a flush to a slow broker
        nonlocal flushes
        flushes += 1
        if flushes == 2:
            second_flush_began.set()
        await (first_flush_may_end if flushes == 1 else second_flush_may_end).wait()

    sandbox.dormant_listeners.append(slow_flush)
    async with registry._lock:  # a sweep puts it to sleep
        sleeping = registry.dormancy.begin_sleep(sandbox)
    back = asyncio.create_task(registry.acquire(sandbox.id, holder="learner"))
    release = asyncio.create_task(registry.release(sandbox.id, "the learner asked for it"))
    await asyncio.sleep(0)
    first_flush_may_end.set()
    await sleeping
    assert await back is sandbox  # woken for the learner...
    # ...then the release puts it to sleep again.
    await asyncio.wait_for(second_flush_began.wait(), 10)
    newcomer = await asyncio.wait_for(registry.acquire(new_sandbox_id(), holder="someone else"), 10)
    assert newcomer.awake and not release.done()  # got in while the release's flush still waits
    second_flush_may_end.set()
    assert await release is True and registry.get_existing(sandbox.id) is None


async def test_a_connected_learners_grown_wal_is_trimmed_by_the_next_pass(registry):
    """A burst leaves a WAL of hundreds of KB in RAM; the sandbox stays awake while its learner
    is connected, so the lifecycle pass checkpoints it (TRUNCATE) once nothing runs in it."""
    if registry.backend != "sqlite":
        pytest.skip("PostgreSQL keeps its own WAL")
    sandbox = await registry.acquire(new_sandbox_id(), holder="a connected tab")
    async with source.get_session(sandbox) as session:
        session.add_all(
            source.User(email=f"burst{n}@example.com", name=f"Burst {n}") for n in range(3000)
        )
    wal = Path(sandbox.location + "-wal")
    assert wal.stat().st_size > 128 * 1024

    await registry.sweep()

    assert wal.stat().st_size == 0 and sandbox.awake
    async with source.get_session(sandbox) as session:  # nothing lost by the checkpoint
        assert len(await source.UserRepository(session).list(limit=5000)) == 3000
