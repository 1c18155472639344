"""Fixtures every test shares: settings from the environment, a registry, fresh sandboxes.

The suite runs on whatever DATABASE_URL and REDIS_URL say (the embedded SQLite and fakeredis
when unset), so the same tests cover PostgreSQL and a real Redis in CI.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import source  # noqa: E402
import servers  # noqa: E402
from servers import pytest_runtest_makereport  # noqa: E402,F401  (CI: required servers never skip)


@pytest.fixture
def settings() -> source.Settings:
    """The configured settings (environment), as the app would read them."""
    return source.Settings.from_environment()


@pytest.fixture
async def registry(settings: source.Settings) -> AsyncIterator[source.SandboxRegistry]:
    """A sandbox registry on the test's event loop, with its own Redis service."""
    redis_service = await source.RedisService.connect(settings)
    sandboxes = source.SandboxRegistry(settings, redis_service)
    try:
        yield sandboxes
    finally:
        await sandboxes.close()
        await redis_service.close()


@pytest.fixture
async def sandbox(registry: source.SandboxRegistry) -> source.Sandbox:
    """A fresh, empty sandbox with its schema created."""
    return await registry.acquire(source.new_sandbox_id())


@pytest.fixture
async def sandbox_with_users(sandbox: source.Sandbox) -> source.Sandbox:
    """A sandbox holding the two sample users."""
    await source.init_db(sandbox, reset=True)
    return sandbox


@pytest.fixture
def runtime(settings: source.Settings) -> Iterator[source.Runtime]:
    """A runtime of its own (its own loop thread), closed after the test."""
    runtime = source.Runtime(settings)
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.fixture
def fresh_global_runtime() -> Iterator[None]:
    """For AppTest: the app's process-wide runtime starts fresh and is shut down afterwards."""
    source.shutdown_runtime()
    try:
        yield
    finally:
        source.shutdown_runtime()


@pytest.fixture(scope="session")
def real_redis_url() -> Iterator[str]:
    """A real Redis server: REDIS_URL's, else one started here, else the test skips."""
    configured = servers.configured_redis_url()
    if configured:
        yield configured
        return
    with servers.redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL: DATABASE_URL's, else a throwaway cluster started here, else the test skips."""
    configured = servers.configured_postgres_url()
    if configured:
        yield configured
        return
    with servers.postgres_server() as url:
        yield url


@pytest.fixture
async def postgres_registry(settings: source.Settings, postgres_url: str) -> AsyncIterator[source.SandboxRegistry]:
    """A sandbox registry on a real PostgreSQL, whatever DATABASE_URL says."""
    on_postgres = source.Settings(**{**settings.__dict__, "database_url": postgres_url})
    redis_service = await source.RedisService.connect(on_postgres)
    sandboxes = source.SandboxRegistry(on_postgres, redis_service)
    try:
        yield sandboxes
    finally:
        await sandboxes.close()
        await redis_service.close()
