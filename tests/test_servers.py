"""The server fixtures themselves: a real PostgreSQL and Redis answer when asked for."""

import redis.asyncio as redis_asyncio

import source


async def test_real_redis_answers(real_redis_url):
    client = redis_asyncio.from_url(real_redis_url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_postgres_sandboxes_are_schemas(postgres_registry):
    sandbox = await postgres_registry.acquire(source.new_sandbox_id())
    assert sandbox.backend == "postgresql"
    assert sandbox.location == f"qulab_{sandbox.id}"
    user = await source.create_user(sandbox, email="pg@example.com", name="Postgres User")
    assert [u.id for u in await source.list_users(sandbox)] == [user.id]
