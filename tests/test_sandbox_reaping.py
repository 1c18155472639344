"""What a stopped process leaves is reaped; what a live process holds never is.

A real QuLab process (tests/sandbox_process.py) makes sandboxes with rows and Redis keys and is
then killed with SIGKILL, or shut down cleanly; a second one stays alive holding its own. A new
runtime with a short idle limit must delete everything the first left (SQLite files and their
lock files, PostgreSQL schemas, Redis keys) and nothing of the second's, on every backend.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from databases import fresh_database

import source
from classroom.cache.link import RedisService
from classroom.config import Settings
from classroom.demos.eventing import list_learner_users
from classroom.runtime import Runtime
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import new_sandbox_id

HELPER = Path(__file__).resolve().parent / "sandbox_process.py"
IDLE_SECONDS = 3.0  # every process of a class shares one idle limit, as in production
START_SECONDS = 90.0  # a process importing everything on a busy machine
REAPED_WITHIN_SECONDS = 60.0  # bounded polling: the idle limit plus many lifecycle passes


@dataclass
class Backend:
    """One backend a class can run on, and how to look at what a process left there."""

    name: str
    environment: dict[str, str]
    redis_url: str | None = None  # a real Redis the processes share (None: each its fakeredis)
    postgres_url: str | None = None
    directory: Path | None = None  # where the SQLite files are
    notes: list[str] = field(default_factory=list)

    def leftovers(self, sandboxes: list[dict]) -> list[str]:
        """What of these sandboxes still exists: files, lock files, schemas, Redis keys."""
        found = []
        for sandbox in sandboxes:
            if self.postgres_url is None:
                for suffix in ("", "-wal", "-shm", ".lock"):
                    if Path(sandbox["location"] + suffix).exists():
                        found.append(sandbox["location"] + suffix)
            if self.redis_url is not None:
                client = redis.Redis.from_url(self.redis_url)
                try:
                    found += [key.decode() for key in client.scan_iter(f"qulab:{sandbox['id']}:*")]
                finally:
                    client.close()
        if self.postgres_url is not None:
            found += asyncio.run(existing_schemas(self.postgres_url, sandboxes))
        return found


async def existing_schemas(url: str, sandboxes: list[dict]) -> list[str]:
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        rows = await connection.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY($1)",
            [sandbox["location"] for sandbox in sandboxes],
        )
    finally:
        await connection.close()
    return [row["nspname"] for row in rows]


@pytest.fixture(params=["embedded", "embedded + Redis", "sqlite:///path + Redis", "PostgreSQL"])
def backend(request, tmp_path) -> Iterator[Backend]:
    environment = {
        "QULAB_SANDBOX_IDLE_SECONDS": str(IDLE_SECONDS),
        "QULAB_SANDBOX_GRACE_SECONDS": "0",
        "QULAB_SANDBOX_DIR": str(tmp_path),  # never another test run's files in /dev/shm
    }
    chosen = Backend(request.param, environment, directory=tmp_path)
    if request.param != "embedded":
        chosen.redis_url = request.getfixturevalue("real_redis_url")
        environment["REDIS_URL"] = chosen.redis_url
    if request.param.startswith("sqlite:///"):
        environment["DATABASE_URL"] = f"sqlite:///{tmp_path}/class.db"
    if request.param != "PostgreSQL":
        yield chosen
        return
    # A database of its own: a reaper with this idle limit drops every expired schema it sees.
    with fresh_database(request.getfixturevalue("postgres_url")) as url:
        chosen.postgres_url = environment["DATABASE_URL"] = url
        yield chosen


class QuLabProcess:
    """tests/sandbox_process.py in hold mode: sandboxes held until it is closed or killed."""

    def __init__(self, backend: Backend, count: int, log: Path) -> None:
        environment = {
            name: value
            for name, value in os.environ.items()
            if name not in {"DATABASE_URL", "REDIS_URL", "QULAB_REPLICAS"}
        }
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(HELPER), "hold", str(count)],
            env={**environment, **backend.environment},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.sandboxes: list[dict] = self._read_line()["sandboxes"]

    def _read_line(self) -> dict:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_SECONDS)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            self.kill()
            raise AssertionError(f"the QuLab process said nothing; see {self.log.name}")
        return json.loads(line)

    def close(self) -> None:
        """A clean shutdown, as Ctrl-C or a deploy's stop."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"close\n")
        self.process.stdin.flush()
        assert self._read_line() == {"closed": True}
        self.process.wait(30)

    def kill(self) -> None:
        """A crash: SIGKILL, nothing runs on the way out."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)


def settings_for(backend: Backend) -> Settings:
    return Settings.from_environment(
        {
            name: value
            for name, value in {**os.environ, **backend.environment}.items()
            if name not in {"DATABASE_URL", "REDIS_URL"} or name in backend.environment
        }
    )


@pytest.mark.parametrize("ending", ["SIGKILL", "clean shutdown"])
def test_what_a_stopped_process_left_is_reaped_after_the_idle_limit_and_a_live_ones_never(
    backend, ending, tmp_path
):
    live = QuLabProcess(backend, 1, tmp_path / "live.log")
    stopped = QuLabProcess(backend, 3, tmp_path / "stopped.log")
    try:
        # What the live process holds, less SQLite's -wal and -shm (a checkpoint may take them).
        held = [item for item in backend.leftovers(live.sandboxes) if "-wal" not in item]
        held = [item for item in held if "-shm" not in item]
        if ending == "SIGKILL":
            stopped.kill()
            assert backend.leftovers(stopped.sandboxes)  # ...and a crash leaves everything
        else:
            stopped.close()

        runtime = Runtime(settings_for(backend))  # the next start, with the class's idle limit
        try:
            deadline = time.monotonic() + REAPED_WITHIN_SECONDS
            while backend.leftovers(stopped.sandboxes) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = backend.leftovers(stopped.sandboxes)
        finally:
            runtime.close()

        assert left == [], f"{backend.name}, after {ending}: still there {left}"
        # The live process's sandbox, made before the others and so unused by the time they
        # went, is held: nothing of it went (file and lock file, or schema; its Redis keys).
        assert set(held) <= set(backend.leftovers(live.sandboxes))
        location = live.sandboxes[0]["location"]
        expected = {location} if backend.postgres_url else {location, location + ".lock"}
        assert expected <= set(held)
        if backend.redis_url is not None:
            assert any(item.startswith(f"qulab:{live.sandboxes[0]['id']}:") for item in held)
    finally:
        stopped.kill()
        live.close()


async def test_a_sandbox_file_another_registry_holds_is_never_reaped_even_dormant(
    settings, tmp_path
):
    embedded = Settings(
        **{**settings.__dict__, "database_url": None, "sandbox_directory": str(tmp_path)}
    )
    holding_service = await RedisService.connect(embedded)
    reaping_service = await RedisService.connect(embedded)
    holding = SandboxRegistry(embedded, holding_service)
    reaping = SandboxRegistry(embedded, reaping_service)
    try:
        sandbox = await holding.acquire(new_sandbox_id())
        await source.create_user(sandbox, email="kept@example.com", name="Kept")
        await holding.dormancy.sleep(sandbox)  # dormant: no engine, no connection, only the lock
        old = time.time() - 10 * embedded.sandbox_idle_seconds
        for suffix in ("", "-wal", "-shm", ".lock"):
            if Path(sandbox.location + suffix).exists():
                os.utime(sandbox.location + suffix, (old, old))

        assert await reaping.reap_abandoned(expired_after_seconds=0) == []
        assert Path(sandbox.location).exists()

        await holding.close(delete_data=False)  # its process lets go: the files stay, unheld
        reaped = await reaping.reap_abandoned(expired_after_seconds=0)

        assert reaped == [(sandbox.id, sandbox.location)]
        assert not Path(sandbox.location).exists()
        assert not Path(sandbox.location + ".lock").exists()
    finally:
        await holding.close()
        await reaping.close()
        await holding_service.close()
        await reaping_service.close()


def test_a_killed_processs_sandbox_opens_with_its_data_on_another_process(tmp_path):
    """Embedded, several processes on one machine (behind HAProxy): the learner a dead process
    leaves is sent to another process, which adopts the sandbox's files (nobody holds them) and
    shows the learner's rows. A live process's sandbox is never taken from it."""
    backend = Backend(
        "embedded",
        {"QULAB_SANDBOX_DIR": str(tmp_path), "QULAB_SANDBOX_GRACE_SECONDS": "0"},
        directory=tmp_path,
    )
    live = QuLabProcess(backend, 1, tmp_path / "live.log")
    killed = QuLabProcess(backend, 1, tmp_path / "killed.log")
    try:
        killed.kill()
        runtime = Runtime(settings_for(backend))
        try:
            [sandbox] = killed.sandboxes
            users = runtime.lab(sandbox["id"]).run(list_learner_users)
            adopted = runtime.sandboxes.get_existing(sandbox["id"])
            assert adopted is not None and adopted.location != sandbox["location"]
            [taken] = live.sandboxes
            others = runtime.lab(taken["id"]).run(list_learner_users)
        finally:
            runtime.close()
        assert {user.name for user in users} >= {"Alex Smith", "Jane Doe"}
        assert not Path(sandbox["location"]).exists()  # moved, not copied
        assert not Path(sandbox["location"] + ".lock").exists()
        assert others == []  # held by a live process: this one got a new, empty file
        assert Path(taken["location"]).exists() and Path(taken["location"] + ".lock").exists()
    finally:
        killed.kill()
        live.close()
