"""Fixtures every test shares: settings from the environment, a registry, fresh sandboxes.

The suite runs on whatever DATABASE_URL and REDIS_URL say (the embedded SQLite and fakeredis
when unset), so the same tests cover PostgreSQL and a real Redis in CI.

Tiers (`pytest -m unit`, `-m integration`, `-m pages`, `-m e2e`), set here by where a test lives:
- tests/unit/        the lesson alone (source.py): a SQLite file and fakeredis, no platform
- tests/test_page_*  the pages, through Streamlit's AppTest
- tests/e2e/         the app in Chromium
- tests/test_*       everything else: the classroom platform, its runtime, real servers
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import servers  # noqa: E402
from servers import pytest_runtest_makereport  # noqa: E402,F401  (CI: required servers never skip)

import source  # noqa: E402
from classroom.cache.link import RedisService  # noqa: E402
from classroom.config import Settings  # noqa: E402
from classroom.runtime import Runtime, shutdown_runtime  # noqa: E402
from classroom.sandboxes.registry import SandboxRegistry  # noqa: E402
from classroom.sandboxes.sandbox import Sandbox, new_sandbox_id  # noqa: E402

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each test the marker of its tier, from where it lives."""
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if TESTS / "unit" in path.parents:
            item.add_marker(pytest.mark.unit)
        elif TESTS / "e2e" in path.parents:
            item.add_marker(pytest.mark.e2e)
        elif path.name.startswith("test_page"):
            item.add_marker(pytest.mark.pages)
        else:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def settings() -> Settings:
    """The configured settings (environment), as the app would read them."""
    return Settings.from_environment()


@pytest.fixture
async def registry(settings: Settings) -> AsyncIterator[SandboxRegistry]:
    """A sandbox registry on the test's event loop, with its own Redis service."""
    redis_service = await RedisService.connect(settings)
    sandboxes = SandboxRegistry(settings, redis_service)
    try:
        yield sandboxes
    finally:
        await sandboxes.close()
        await redis_service.close()


@pytest.fixture
async def sandbox(registry: SandboxRegistry) -> Sandbox:
    """A fresh, empty sandbox with its schema created."""
    return await registry.acquire(new_sandbox_id())


@pytest.fixture
async def sandbox_with_users(sandbox: Sandbox) -> Sandbox:
    """A sandbox holding the two sample users."""
    await source.init_db(sandbox, reset=True)
    return sandbox


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    """A runtime of its own (its own loop thread), closed after the test."""
    runtime = Runtime(settings)
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.fixture
def fresh_global_runtime() -> Iterator[None]:
    """For AppTest: the app's process-wide runtime starts fresh and is shut down afterwards."""
    shutdown_runtime()
    try:
        yield
    finally:
        shutdown_runtime()


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
    """A real PostgreSQL: DATABASE_URL's, else a throwaway cluster started here.

    With neither, the test skips.
    """
    configured = servers.configured_postgres_url()
    if configured:
        yield configured
        return
    with servers.postgres_server() as url:
        yield url


@pytest.fixture
async def postgres_registry(
    settings: Settings, postgres_url: str
) -> AsyncIterator[SandboxRegistry]:
    """A sandbox registry on a real PostgreSQL, whatever DATABASE_URL says."""
    on_postgres = Settings(**{**settings.__dict__, "database_url": postgres_url})
    redis_service = await RedisService.connect(on_postgres)
    sandboxes = SandboxRegistry(on_postgres, redis_service)
    try:
        yield sandboxes
    finally:
        await sandboxes.close()
        await redis_service.close()
