"""Sandboxes: each learner's data is private, and idle sandboxes give their storage back."""

import os
from pathlib import Path

import pytest
from sqlalchemy import text

import source


async def test_resetting_one_sandbox_leaves_another_intact(registry):
    first = await registry.acquire(source.new_sandbox_id())
    second = await registry.acquire(source.new_sandbox_id())
    await source.create_user(first, email="mine@example.com", name="Mine")
    await source.create_user(second, email="theirs@example.com", name="Theirs")
    await second.redis.client.set(second.redis.key("note"), "kept")

    await source.init_db(first, reset=True)

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


async def test_init_db_clears_the_sandbox_redis_namespace(sandbox):
    await sandbox.redis.client.set(sandbox.redis.key("stale"), "x")
    await source.init_db(sandbox, reset=True)
    assert await sandbox.redis.client.get(sandbox.redis.key("stale")) is None


async def test_acquire_returns_the_same_sandbox_for_the_same_id(registry):
    sandbox_id = source.new_sandbox_id()
    assert await registry.acquire(sandbox_id) is await registry.acquire(sandbox_id)


@pytest.mark.parametrize("sandbox_id", ["", "../../etc", "UPPER", "a;drop", "x" * 100])
async def test_malformed_sandbox_ids_are_refused(registry, sandbox_id):
    with pytest.raises(source.ValidationError):
        await registry.acquire(sandbox_id)


async def test_idle_sandboxes_are_released_with_their_storage_and_keys(registry):
    idle = await registry.acquire(source.new_sandbox_id())
    busy = await registry.acquire(source.new_sandbox_id())
    await source.create_user(idle, email="a@example.com", name="A")
    await idle.redis.client.set(idle.redis.key("k"), "v")
    idle.last_used -= 3600

    assert await registry.release_idle(idle_seconds=60) == [idle.id]

    assert registry.get_existing(idle.id) is None and registry.get_existing(busy.id) is busy
    assert await idle.redis.client.get(idle.redis.key("k")) is None
    if idle.backend == "sqlite":
        assert not Path(idle.location).exists()
        assert not Path(idle.location + "-wal").exists()
    else:
        async with busy.engine.connect() as connection:
            found = await connection.execute(
                text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :name"), {"name": idle.location}
            )
            assert found.first() is None


async def test_a_released_sandbox_comes_back_empty_with_a_notice(registry):
    sandbox_id = source.new_sandbox_id()
    sandbox = await registry.acquire(sandbox_id)
    await source.create_user(sandbox, email="a@example.com", name="A")
    await registry.release(sandbox_id, "it was idle for more than 30 minutes")

    again = await registry.acquire(sandbox_id)

    assert again is not sandbox
    assert await source.list_users(again) == []
    assert "idle for more than 30 minutes" in again.notice


async def test_the_sandbox_limit_releases_the_least_recently_used(settings):
    limited = source.Settings(**{**settings.__dict__, "max_sandboxes": 2})
    redis_service = await source.RedisService.connect(limited)
    registry = source.SandboxRegistry(limited, redis_service)
    try:
        oldest = await registry.acquire(source.new_sandbox_id())
        oldest.last_used -= 100
        newer = await registry.acquire(source.new_sandbox_id())
        newest = await registry.acquire(source.new_sandbox_id())
        assert len(registry) == 2
        assert registry.get_existing(oldest.id) is None
        assert registry.get_existing(newer.id) is newer and registry.get_existing(newest.id) is newest
    finally:
        await registry.close()
        await redis_service.close()


async def test_embedded_sandbox_files_are_ram_backed_when_the_os_offers_it(sandbox):
    if sandbox.backend != "sqlite" or os.environ.get("QULAB_SANDBOX_DIR"):
        pytest.skip("only the embedded default chooses its directory")
    if source.RAM_BACKED_DIRECTORY.is_dir() and os.access(source.RAM_BACKED_DIRECTORY, os.W_OK):
        assert Path(sandbox.location).parent == source.RAM_BACKED_DIRECTORY
    assert Path(sandbox.location).exists()
