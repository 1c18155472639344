"""A PostgreSQL QuLab cannot use: the error names the cause and what to check, never a secret.

Every case is real: a PostgreSQL that checks passwords (a cluster of the test's own), the test's
PostgreSQL asked for a database and a role it does not have (by URL only: its configuration is
never touched), a Redis port given as the database, a socket that accepts and never answers, and
a URL parameter the driver does not take. Through the API (Runtime.lab); the page's message is
in tests/test_page_startup_errors.py.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import servers
from sqlalchemy.engine import make_url

from classroom.config import ConfigurationError, Settings
from classroom.errors import BackendUnavailableError
from classroom.runtime import Runtime
from classroom.sandboxes.sandbox import new_sandbox_id

RIGHT_PASSWORD = "Right-pw-4Qz"
SECRET = "Wrong-pw-7Zq"  # whatever a case puts in the URL as a secret: never shown, never logged
CONNECT_TIMEOUT_SECONDS = 1.0


@pytest.fixture(scope="module")
def password_checking_postgres() -> Iterator[str]:
    """A PostgreSQL of this module's own that checks passwords (scram-sha-256)."""
    with servers.postgres_server(password=RIGHT_PASSWORD) as url:
        yield url


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # the listener closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


def startup_error(database_url: str) -> tuple[Exception, float]:
    """What opening a sandbox raises with this DATABASE_URL, and how long it took."""
    settings = Settings(
        database_url=database_url, database_connect_timeout_seconds=CONNECT_TIMEOUT_SECONDS
    )
    started = time.monotonic()
    runtime = Runtime(settings)
    try:
        with pytest.raises(Exception) as raised:
            runtime.lab(new_sandbox_id())
    finally:
        runtime.close()
    return raised.value, time.monotonic() - started


def assert_no_secret(error: Exception, caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    logged = caplog.text + "".join(str(record.exc_text or "") for record in caplog.records)
    for secret in (SECRET, *secrets):
        assert secret not in str(error), error
        assert secret not in logged


def test_a_wrong_password_is_named(password_checking_postgres, caplog):
    url = make_url(password_checking_postgres).set(password=SECRET)
    with caplog.at_level(logging.INFO):
        error, _ = startup_error(url.render_as_string(hide_password=False))
    message = str(error)
    assert isinstance(error, ConfigurationError), message
    assert 'refused the password of user "postgres"' in message
    assert f"127.0.0.1:{url.port}" in message and "DATABASE_URL" in message
    assert "postgres:***@" in message  # the URL is shown, masked
    assert_no_secret(error, caplog, RIGHT_PASSWORD)


def test_a_database_that_does_not_exist_is_named(postgres_url, caplog):
    url = make_url(postgres_url).set(database="qulab_no_such_database")
    with caplog.at_level(logging.INFO):
        error, _ = startup_error(url.render_as_string(hide_password=False))
    message = str(error)
    assert isinstance(error, ConfigurationError), message
    assert 'has no database "qulab_no_such_database"' in message and "createdb" in message
    assert "DATABASE_URL" in message
    assert_no_secret(error, caplog)


def test_a_role_that_does_not_exist_is_named(postgres_url, caplog):
    url = make_url(postgres_url).set(username="qulab_no_such_role", password=SECRET)
    with caplog.at_level(logging.INFO):
        error, _ = startup_error(url.render_as_string(hide_password=False))
    message = str(error)
    assert isinstance(error, ConfigurationError), message
    assert 'has no role (user) "qulab_no_such_role"' in message and "createuser" in message
    assert "qulab_no_such_role:***@" in message
    assert_no_secret(error, caplog)


def test_a_port_that_is_not_postgresql_is_named(real_redis_url, caplog):
    redis_port = make_url(real_redis_url).port or 6379
    url = f"postgresql+asyncpg://qulab:{SECRET}@127.0.0.1:{redis_port}/qulab"
    with caplog.at_level(logging.INFO):
        error, seconds = startup_error(url)
    message = str(error)
    assert isinstance(error, BackendUnavailableError), message
    assert f"127.0.0.1:{redis_port}" in message and "answers like Redis" in message
    assert "did not answer as PostgreSQL within 1 s" in message and "DATABASE_URL" in message
    assert seconds < 30, f"bounded by the connect timeout, took {seconds:.1f} s"
    assert_no_secret(error, caplog)


def test_a_server_that_accepts_and_never_answers_is_named_within_the_timeout(silent_port, caplog):
    url = f"postgresql+asyncpg://qulab:{SECRET}@127.0.0.1:{silent_port}/qulab"
    with caplog.at_level(logging.INFO):
        error, seconds = startup_error(url)
    message = str(error)
    assert isinstance(error, BackendUnavailableError), message
    assert f"127.0.0.1:{silent_port}" in message and "answers nothing at all" in message
    assert "QULAB_DATABASE_CONNECT_TIMEOUT" in message and "within 1 s" in message
    # start-up (the class roster's store) and the sandbox each wait the timeout once, then the
    # diagnosis probes for at most 2 s: asyncpg's own default would be 60 s each
    assert seconds < 30, f"bounded by the connect timeout, took {seconds:.1f} s"
    assert_no_secret(error, caplog)


def test_a_url_parameter_the_driver_does_not_take_is_named(postgres_url, caplog):
    url = make_url(postgres_url).update_query_dict({"sslpassword": SECRET})
    with caplog.at_level(logging.INFO):
        error, _ = startup_error(url.render_as_string(hide_password=False))
    message = str(error)
    assert isinstance(error, ConfigurationError), message
    assert "does not take: sslpassword" in message and "sslpassword=***" in message
    assert_no_secret(error, caplog)
