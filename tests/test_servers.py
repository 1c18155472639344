"""The server fixtures themselves: a real PostgreSQL and Redis answer when asked for."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio

import source
from classroom.sandboxes.sandbox import new_sandbox_id


async def test_real_redis_answers(real_redis_url):
    client = redis_asyncio.from_url(real_redis_url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_postgres_sandboxes_are_schemas(postgres_registry):
    sandbox = await postgres_registry.acquire(new_sandbox_id())
    assert sandbox.backend == "postgresql"
    assert sandbox.location == f"qulab_{sandbox.id}"
    user = await source.create_user(sandbox, email="pg@example.com", name="Postgres User")
    assert [u.id for u in await source.list_users(sandbox)] == [user.id]


INNER_CONFTEST = """
import sys
sys.path.insert(0, {tests_directory!r})
import pytest
from servers import pytest_runtest_makereport

@pytest.fixture
def postgres_url():
    pytest.skip("PostgreSQL is not installed")
"""
INNER_TESTS = """
import pytest

def test_needs_postgres(postgres_url):
    pass

@pytest.mark.e2e
def test_in_the_browser():
    pytest.skip("no Chromium here")

def test_only_for_another_backend():
    pytest.skip("needs SQLite")
"""


@pytest.mark.parametrize(
    ("required", "expected"),
    [
        ("1", "1 failed, 1 skipped, 1 error"),
        ("", "3 skipped"),
    ],  # a fixture's skip fails as an error
)
def test_required_servers_turn_skips_of_server_tests_into_failures(tmp_path, required, expected):
    (tmp_path / "conftest.py").write_text(
        INNER_CONFTEST.format(tests_directory=str(Path(__file__).parent))
    )
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    e2e: browser\n")
    environment = {**os.environ, "QULAB_REQUIRE_SERVERS": required}
    finished = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    summary = finished.stdout.strip().splitlines()[-1]
    assert expected in summary, finished.stdout
    if required:
        assert "needs a server or the browser and skipped: no Chromium here" in finished.stdout
        assert (
            "needs a server or the browser and skipped: PostgreSQL is not installed"
            in finished.stdout
        )
