"""Configuration: environment parsing, database targets and password masking."""

import inspect
import re
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

import source
from classroom.config import (
    ConfigurationError,
    Settings,
    logger,
    mask_url,
    resolve_database_target,
)
from classroom.errors import BackendUnavailableError


def test_defaults_when_environment_is_empty():
    settings = Settings.from_environment({})
    assert settings.database_url is None and settings.redis_url is None
    assert (settings.pool_size, settings.max_overflow) == (5, 10)
    assert resolve_database_target(None).kind == "embedded"


def test_environment_overrides_pool_settings():
    settings = Settings.from_environment({"QULAB_POOL_SIZE": "3", "QULAB_MAX_OVERFLOW": "0"})
    assert (settings.pool_size, settings.max_overflow) == (3, 0)


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "0"])
def test_bad_numbers_are_refused_with_the_variable_named(value):
    with pytest.raises(ConfigurationError, match="QULAB_POOL_SIZE"):
        Settings.from_environment({"QULAB_POOL_SIZE": value})


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite:///:memory:",
        "sqlite://",
        "sqlite+aiosqlite:///file:x?mode=memory&cache=shared&uri=true",
    ],
)
def test_in_memory_sqlite_urls_are_replaced_by_the_embedded_files(url):
    target = resolve_database_target(url)
    assert target.kind == "embedded"
    assert "StaticPool" in target.note


def test_postgresql_urls_get_the_asyncpg_driver():
    target = resolve_database_target("postgresql://u:secret@db:5432/qulab")
    assert target.kind == "postgresql"
    assert target.url.drivername == "postgresql+asyncpg"


def test_sqlite_file_urls_get_the_aiosqlite_driver():
    target = resolve_database_target("sqlite:///tmp/qulab.db")
    assert (target.kind, target.url.drivername) == ("sqlite-file", "sqlite+aiosqlite")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url"])
def test_unsupported_database_urls_are_refused(url):
    with pytest.raises(ConfigurationError):
        resolve_database_target(url)


# Every form in which SQLAlchemy or redis-py accept a password, with the secret each one carries.
SECRET_URLS = [
    ("postgresql+asyncpg://alex:s3cr3t-pw@db.example:5432/qulab", "s3cr3t-pw"),
    ("postgresql://alex@db.example/qulab?password=s3cr3t-pw", "s3cr3t-pw"),
    (
        "postgresql+asyncpg://alex@db.example/qulab?sslpassword=s3cr3t-pw&application_name=lab",
        "s3cr3t-pw",
    ),
    ("postgresql+asyncpg://alex:p%40ss%2Fw0rd@db.example/qulab", "p%40ss%2Fw0rd"),
    ("redis://:s3cr3t-pw@cache.example:6379/0", "s3cr3t-pw"),
    ("redis://default:s3cr3t-pw@cache.example:6379/0", "s3cr3t-pw"),
    ("redis://cache.example:6379/0?password=s3cr3t-pw", "s3cr3t-pw"),
    ("rediss://cache.example:6380/0?username=u&password=s3cr3t-pw", "s3cr3t-pw"),
    ("redis://:p@ss@w0rd@cache.example:6379/0", "p@ss@w0rd"),  # an unencoded @ in the password
    ("redis://:pa/ss@cache.example:6379/0", "pa/ss"),
    ("unix://:s3cr3t-pw@/run/redis.sock?db=0", "s3cr3t-pw"),
    ("redis://cache.example:6379/0?api_token=s3cr3t-pw", "s3cr3t-pw"),
]


@pytest.mark.parametrize(("url", "secret"), SECRET_URLS)
def test_passwords_never_appear_in_displayed_urls(url, secret):
    shown = mask_url(url)
    assert "***" in shown
    for part in {secret, *secret.split("@"), *secret.split("/")} - {""}:
        if len(part) >= 3:
            assert part not in shown, shown
    assert "example" in shown or "redis.sock" in shown  # the host is still there to read


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://alex@db.example:5432/qulab?application_name=lab&ssl=require",
        "redis://alex@cache.example:6379/0?client_name=a@b",
        "sqlite+aiosqlite:////var/lib/qulab/qulab.db",
    ],
)
def test_masking_keeps_what_is_not_secret(url):
    assert mask_url(url) == url


def test_a_password_in_the_query_really_is_read_by_the_drivers():
    """The forms above are real: the libraries do send these query passwords to the server."""
    from redis.connection import parse_url

    assert parse_url("redis://h:6379/0?password=s3cr3t-pw")["password"] == "s3cr3t-pw"
    assert make_url("postgresql://u@h/db?password=s3cr3t-pw").query["password"] == "s3cr3t-pw"


def test_secrets_of_configured_urls_are_removed_from_errors_and_log_lines(caplog):
    Settings(redis_url="redis://h:6379/0?password=Zq9-log-secret")
    error = BackendUnavailableError("connect to redis://h:6379/0?password=Zq9-log-secret failed")
    assert "Zq9-log-secret" not in str(error)
    with caplog.at_level("WARNING", logger="qulab"):
        try:
            raise RuntimeError("dsn password=Zq9-log-secret refused")
        except RuntimeError:
            logger.exception("could not reach %s", "redis://:Zq9-log-secret@h")
    logged = "\n".join(caplog.text.splitlines())
    assert "could not reach" in logged and "refused" in logged
    assert "Zq9-log-secret" not in logged


@pytest.mark.parametrize("text", ["not a url", "Zq9 with no scheme"])
def test_text_that_is_not_a_url_is_not_shown(text):
    assert mask_url(text) == "***"


def test_the_operations_guide_documents_every_environment_variable_with_its_default():
    reader = inspect.getsource(Settings.from_environment)
    read = set(re.findall(r'"((?:QULAB|DATABASE|REDIS)_[A-Z_]+)"', reader))
    guide = (Path(source.__file__).parent / "docs" / "operations.md").read_text()
    configuration = guide.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", configuration, re.MULTILINE))
    assert read and read <= rows.keys(), read - rows.keys()
    for variable, field in re.findall(r'number\(\s*"(\w+)",\s*cls\.(\w+)', reader):
        assert rows[variable].strip() == f"`{getattr(Settings, field):g}`", variable


def _everything_shown(app) -> str:
    from pagetools import texts

    return texts(app) + "\n" + "\n".join(str(block.value) for block in app.code)


def test_the_sidebar_never_shows_a_redis_password(fresh_global_runtime, monkeypatch):
    from pagetools import open_server_details, start_app

    # Nothing listens on port 1: the app falls back to fakeredis and says which URL failed.
    monkeypatch.setenv("REDIS_URL", "redis://:Pw-user-7Qx@127.0.0.1:1/0?password=Pw-query-7Qx")
    app = open_server_details(start_app())  # the details name the URL: drawn while open
    shown = _everything_shown(app)
    assert "127.0.0.1:1" in shown  # the URL is shown, so the assertion below means something
    assert "Pw-user-7Qx" not in shown and "Pw-query-7Qx" not in shown


def test_the_sidebar_never_shows_a_database_password(
    fresh_global_runtime, monkeypatch, postgres_url
):
    from pagetools import open_server_details, start_app

    separator = "&" if "?" in postgres_url else "?"
    monkeypatch.setenv("DATABASE_URL", f"{postgres_url}{separator}password=Pw-db-7Qx")
    app = open_server_details(start_app())  # the details name the URL: drawn while open
    shown = _everything_shown(app)
    assert "PostgreSQL" in shown and "password=***" in shown
    assert "Pw-db-7Qx" not in shown
