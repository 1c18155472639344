"""PostgreSQL sandbox leases: schemas left by a process that died are dropped by any replica.

These tests share a PostgreSQL with other test runs, so they only ever expire their own schemas
(by moving their lease into the past) and check what happened to those.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import source
from classroom.cache.link import RedisLink, RedisService
from classroom.config import Settings
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import new_sandbox_id
from classroom.sandboxes.stores import SANDBOX_LEASE_TABLE

AN_HOUR = 3600.0


async def shared_engine(registry: SandboxRegistry) -> AsyncEngine:
    """The PostgreSQL store's shared engine, the store started first if nothing used it yet."""
    await registry.store.start(registry.budget)  # does nothing once started
    return await registry.store.engine()


async def lease_of(registry: SandboxRegistry, schema: str):
    """(last_used, holder) of a schema's lease row, or None."""
    engine = await shared_engine(registry)
    async with engine.connect() as connection:
        row = await connection.execute(
            text(
                f"SELECT last_used, holder FROM {SANDBOX_LEASE_TABLE} WHERE schema_name = :schema"
            ),
            {"schema": schema},
        )
        return row.first()


async def schema_exists(registry: SandboxRegistry, schema: str) -> bool:
    engine = await shared_engine(registry)
    async with engine.connect() as connection:
        found = await connection.execute(
            text("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = :schema"),
            {"schema": schema},
        )
        return found.first() is not None


async def age_lease(registry: SandboxRegistry, schema: str, *, seconds: float) -> None:
    """Pretend the schema was last used this many seconds ago."""
    engine = await shared_engine(registry)
    async with engine.begin() as connection:
        await connection.execute(
            text(
                f"UPDATE {SANDBOX_LEASE_TABLE} "
                "SET last_used = now() - make_interval(secs => :seconds) "
                "WHERE schema_name = :schema"
            ),
            {"schema": schema, "seconds": seconds},
        )


@pytest.fixture
async def other_replica(settings, postgres_url):
    """A second replica: another registry on the same PostgreSQL."""
    on_postgres = Settings(**{**settings.__dict__, "database_url": postgres_url})
    redis_service = await RedisService.connect(on_postgres)
    replica = SandboxRegistry(on_postgres, redis_service)
    yield replica
    await replica.close()  # drops whatever a test left alive; already-dropped schemas are skipped
    await redis_service.close()


async def die(replica: SandboxRegistry) -> None:
    """What a killed process leaves: its connections close, nothing is released.

    Closing without deleting data leaves the database as a kill would (every schema and lease
    in place, its Redis keys too); the registry forgets its sandboxes, so if it is used again
    it is the replica restarted.
    """
    assert replica.store.shared_engine is not None
    await replica.close(delete_data=False)
    assert replica.all() == [] and replica.store.shared_engine is None


async def test_a_sandbox_schema_holds_a_lease_until_it_is_released(postgres_registry):
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    lease = await lease_of(postgres_registry, sandbox.location)
    assert lease is not None and lease.holder.endswith(f":{os.getpid()}")

    await postgres_registry.release(sandbox.id)

    assert await lease_of(postgres_registry, sandbox.location) is None
    assert not await schema_exists(postgres_registry, sandbox.location)


async def test_schemas_of_a_other_replica_are_dropped_once_their_lease_expires(
    postgres_registry, other_replica
):
    abandoned = await other_replica.acquire(new_sandbox_id())
    await source.create_user(abandoned, email="left@example.com", name="Left Behind")
    recent = await other_replica.acquire(new_sandbox_id())
    await die(other_replica)

    await age_lease(postgres_registry, abandoned.location, seconds=2 * AN_HOUR)
    reaped = await postgres_registry.reap_abandoned_schemas(expired_after_seconds=AN_HOUR)

    assert abandoned.location in reaped and recent.location not in reaped
    assert not await schema_exists(postgres_registry, abandoned.location)
    assert await lease_of(postgres_registry, abandoned.location) is None
    assert await schema_exists(postgres_registry, recent.location)  # used a moment ago: kept


async def test_this_replicas_live_sandboxes_are_never_reaped(postgres_registry):
    live = await postgres_registry.acquire(new_sandbox_id())
    await age_lease(postgres_registry, live.location, seconds=2 * AN_HOUR)

    assert live.location not in await postgres_registry.reap_abandoned_schemas(
        expired_after_seconds=AN_HOUR
    )
    assert await schema_exists(postgres_registry, live.location)


async def test_a_schema_without_a_lease_gets_one_and_goes_one_idle_period_later(postgres_registry):
    schema = f"qulab_{new_sandbox_id()}"
    engine = await shared_engine(postgres_registry)
    async with engine.begin() as connection:
        # As a process without leases left it.
        await connection.execute(text(f'CREATE SCHEMA "{schema}"'))

    assert schema not in await postgres_registry.reap_abandoned_schemas(
        expired_after_seconds=AN_HOUR
    )
    assert await lease_of(postgres_registry, schema) is not None

    await age_lease(postgres_registry, schema, seconds=2 * AN_HOUR)
    assert schema in await postgres_registry.reap_abandoned_schemas(expired_after_seconds=AN_HOUR)
    assert not await schema_exists(postgres_registry, schema)


async def test_use_renews_the_lease_at_most_once_per_renewal_interval(postgres_registry):
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    await age_lease(postgres_registry, sandbox.location, seconds=30)
    aged = (await lease_of(postgres_registry, sandbox.location)).last_used

    await postgres_registry.acquire(sandbox.id)  # renewed moments ago: no write
    assert (await lease_of(postgres_registry, sandbox.location)).last_used == aged

    sandbox.lease_renewed_at -= postgres_registry.lease_renewal_seconds
    await postgres_registry.acquire(sandbox.id)
    assert (await lease_of(postgres_registry, sandbox.location)).last_used > aged


async def test_a_sandbox_whose_schema_another_replica_reaped_starts_afresh_with_a_notice(
    postgres_registry, other_replica
):
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    await source.create_user(sandbox, email="gone@example.com", name="Gone")
    await age_lease(postgres_registry, sandbox.location, seconds=2 * AN_HOUR)
    # The other replica does not hold this sandbox, so to it the expired lease means abandoned.
    assert sandbox.location in await other_replica.reap_abandoned_schemas(
        expired_after_seconds=AN_HOUR
    )

    sandbox.lease_renewed_at -= postgres_registry.lease_renewal_seconds  # next use renews the lease
    again = await postgres_registry.acquire(sandbox.id)

    assert again is not sandbox
    assert "deleted because it was idle for more than" in again.notice
    assert await source.list_users(again) == []
    assert await lease_of(postgres_registry, again.location) is not None


async def test_two_replicas_reaping_at_once_drop_each_schema_exactly_once(
    postgres_registry, other_replica
):
    abandoned = [await other_replica.acquire(new_sandbox_id()) for _ in range(4)]
    await die(other_replica)
    for sandbox in abandoned:
        await age_lease(postgres_registry, sandbox.location, seconds=2 * AN_HOUR)

    first, second = await asyncio.gather(
        postgres_registry.reap_abandoned_schemas(expired_after_seconds=AN_HOUR),
        other_replica.reap_abandoned_schemas(expired_after_seconds=AN_HOUR),
    )

    ours = {sandbox.location for sandbox in abandoned}
    assert not set(first) & set(second)
    assert ours <= set(first) | set(second)
    for schema in ours:
        assert not await schema_exists(postgres_registry, schema)


async def test_sqlite_sandboxes_have_no_schemas_to_reap(settings):
    embedded = Settings(**{**settings.__dict__, "database_url": None})
    redis_service = await RedisService.connect(embedded)
    registry = SandboxRegistry(embedded, redis_service)
    try:
        await registry.acquire(new_sandbox_id())
        assert await registry.reap_abandoned_schemas(expired_after_seconds=0) == []
    finally:
        await registry.close()
        await redis_service.close()


async def test_another_replica_serving_the_same_sandbox_id_finds_its_data(
    postgres_registry, other_replica
):
    # The sandbox id travels in the page URL: after a reload on (or a failover to) another
    # replica, that replica opens the same schema, with everything the learner stored.
    sandbox_id = new_sandbox_id()
    here = await postgres_registry.acquire(sandbox_id)
    user = await source.create_user(here, email="stays@example.com", name="Stays Put")

    there = await other_replica.acquire(sandbox_id)

    assert there is not here and there.location == here.location
    assert [u.id for u in await source.list_users(there)] == [user.id]


async def test_an_idle_sandbox_another_replica_now_serves_is_never_dropped(
    postgres_registry, other_replica
):
    sandbox_id = new_sandbox_id()
    here = await postgres_registry.acquire(sandbox_id, holder="tab-here")
    user = await source.create_user(here, email="moved@example.com", name="Moved Over")
    postgres_registry.release_holder("tab-here")  # the learner reloads on the other replica
    there = await other_replica.acquire(sandbox_id, holder="tab-there")
    here.last_used -= 2 * AN_HOUR  # to this replica, the sandbox looks long idle

    report = await postgres_registry.sweep()

    assert sandbox_id in report["kept"] and sandbox_id not in report["deleted"]
    assert postgres_registry.get_existing(sandbox_id) is None  # forgotten here...
    # ...but its data stays for the other
    assert await schema_exists(postgres_registry, here.location)
    assert [u.id for u in await source.list_users(there)] == [user.id]


async def test_reaping_a_schema_also_deletes_its_redis_keys(postgres_registry, other_replica):
    abandoned = await other_replica.acquire(new_sandbox_id())
    kept = await postgres_registry.acquire(new_sandbox_id())
    # Replicas share one Redis (here: this registry's).
    shared_redis = postgres_registry.redis_service
    left_behind = RedisLink(shared_redis, abandoned.id)
    await left_behind.client.set(left_behind.key("cache", "x"), "1")
    await kept.redis.client.set(kept.redis.key("cache", "x"), "1")
    await die(other_replica)
    await age_lease(postgres_registry, abandoned.location, seconds=2 * AN_HOUR)

    assert abandoned.location in await postgres_registry.reap_abandoned_schemas(
        expired_after_seconds=AN_HOUR
    )

    assert await shared_redis.client.get(left_behind.key("cache", "x")) is None
    assert await shared_redis.client.get(kept.redis.key("cache", "x")) == "1"
