"""Throwaway Redis and PostgreSQL servers for tests that need a real one.

A test that needs a server asks for the `real_redis_url` or `postgres_url` fixture. The fixture
uses the server the environment names (REDIS_URL, DATABASE_URL), else starts one on a free
loopback port when its program is installed, else skips with the reason. Under
QULAB_REQUIRE_SERVERS=1 (set by CI) it fails instead of skipping, so CI cannot go green by
skipping what it was meant to test.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest


def servers_required() -> bool:
    """True when a missing server must fail the run rather than skip."""
    return os.environ.get("QULAB_REQUIRE_SERVERS", "") == "1"


def unavailable(reason: str) -> None:
    """Skip the test, or fail it when servers are required."""
    if servers_required():
        pytest.fail(f"QULAB_REQUIRE_SERVERS=1 but {reason}")
    pytest.skip(reason)


# Tests that use one of these fixtures, or carry the e2e marker, need a server or the browser.
SERVER_FIXTURES = frozenset(
    {
        "real_redis_url",
        "freezable_redis",
        "postgres_url",
        "postgres_registry",
        "browser",
        "app_server",
    }
)


def needs_a_server(item: pytest.Item) -> bool:
    """True when the test needs a real PostgreSQL, Redis or Chromium to mean anything."""
    uses = set(getattr(item, "fixturenames", ()))
    return bool(uses & SERVER_FIXTURES) or item.get_closest_marker("e2e") is not None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under QULAB_REQUIRE_SERVERS=1, a skipped test that needs a server or the browser fails.

    unavailable() already fails instead of skipping; this catches every other way such a test
    can skip (an importorskip, a skip written in a test, a fixture from a later section).
    tests/conftest.py imports it, which is how pytest finds it.
    """
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and servers_required()
        and needs_a_server(item)
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = (
            "QULAB_REQUIRE_SERVERS=1, but this test needs a server or the browser and skipped: "
            f"{reason}"
        )
    return report


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} after {seconds:g} s")


@contextmanager
def redis_server() -> Iterator[str]:
    """Start redis-server on a free loopback port; yields its URL, shuts it down afterwards."""
    with redis_server_process() as (url, _process):
        yield url


@contextmanager
def redis_server_process() -> Iterator[tuple[str, subprocess.Popen]]:
    """Like redis_server, also yielding the process (fault tests freeze it with SIGSTOP)."""
    program = shutil.which("redis-server")
    if program is None:
        unavailable("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="qulab-redis-") as directory:
        # one option and its value a line (test_outbox_faults reads the appendonly line)
        process = subprocess.Popen(
            [
                program,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes",
                "--dir", directory,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_for_port(port)
            yield f"redis://127.0.0.1:{port}/0", process
        finally:
            process.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            process.terminate()
            process.wait(10)


class RedisProcess:
    """A redis-server on loopback that a fault test can stop and start again on the same port.

    persistent=False runs it as a cache would (--save '' --appendonly no): a restart forgets
    every stream. options are more of redis-server's (["--maxmemory", "1mb"]). Start, stop and
    restart are bounded in time; close() always stops it.
    """

    def __init__(self, *, persistent: bool, options: Sequence[str] = ()) -> None:
        program = shutil.which("redis-server")
        if program is None:
            unavailable("redis-server is not installed (apt-get install redis-server)")
        self.program = program
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.persistent = persistent
        self.options = list(options)
        self.directory = tempfile.mkdtemp(prefix="qulab-redis-fault-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProcess:
        """Start the server and wait until it accepts connections."""
        appendonly = "yes" if self.persistent else "no"
        self.process = subprocess.Popen(
            [
                self.program,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", appendonly,
                "--dir", self.directory,
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for_port(self.port)
        return self

    def stop(self) -> None:
        """Stop the server at once (SIGKILL: nothing is saved on the way out)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        """Kill the server and start a new one on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextmanager
def postgres_server(*, password: str | None = None) -> Iterator[str]:
    """Start a throwaway PostgreSQL cluster on a free loopback port; yields an asyncpg URL.

    With a password, the cluster checks it (scram-sha-256) instead of trusting every client.
    """
    bin_directory = _postgres_bin()
    if bin_directory is None:
        unavailable("PostgreSQL is not installed (apt-get install postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            unavailable("running as root without runuser to start PostgreSQL as the postgres user")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    directory = tempfile.mkdtemp(prefix="qulab-pg-")
    os.chmod(directory, 0o755)
    if as_user:
        shutil.chown(directory, user="postgres")
    data = os.path.join(directory, "data")
    pg_ctl = [*as_user, str(bin_directory / "pg_ctl"), "-D", data]
    authentication = ["-A", "trust"]
    if password is not None:
        password_file = os.path.join(directory, "password")
        Path(password_file).write_text(password + "\n")
        if as_user:
            shutil.chown(password_file, user="postgres")
        authentication = ["-A", "scram-sha-256", f"--pwfile={password_file}"]
    try:
        subprocess.run(
            [
                *as_user,
                str(bin_directory / "initdb"),
                "-D",
                data,
                *authentication,
                "-U",
                "postgres",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*pg_ctl, "-l", os.path.join(directory, "log"), "-o", options, "-w", "start"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        try:
            user = "postgres" if password is None else f"postgres:{password}"
            yield f"postgresql+asyncpg://{user}@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                [*pg_ctl, "-m", "immediate", "stop"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def configured_postgres_url() -> str | None:
    """DATABASE_URL when it names PostgreSQL."""
    url = os.environ.get("DATABASE_URL", "")
    return url if url.startswith(("postgresql", "postgres:")) else None


def configured_redis_url() -> str | None:
    """REDIS_URL when set."""
    return os.environ.get("REDIS_URL") or None
