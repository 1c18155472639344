"""Configuration: environment parsing, database targets and password masking."""

import inspect
import re
from pathlib import Path

import pytest

import source


def test_defaults_when_environment_is_empty():
    settings = source.Settings.from_environment({})
    assert settings.database_url is None and settings.redis_url is None
    assert (settings.pool_size, settings.max_overflow) == (5, 10)
    assert source.resolve_database_target(None).kind == "embedded"


def test_environment_overrides_pool_settings():
    settings = source.Settings.from_environment({"QULAB_POOL_SIZE": "3", "QULAB_MAX_OVERFLOW": "0"})
    assert (settings.pool_size, settings.max_overflow) == (3, 0)


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "0"])
def test_bad_numbers_are_refused_with_the_variable_named(value):
    with pytest.raises(source.ConfigurationError, match="QULAB_POOL_SIZE"):
        source.Settings.from_environment({"QULAB_POOL_SIZE": value})


@pytest.mark.parametrize(
    "url", ["sqlite+aiosqlite:///:memory:", "sqlite://", "sqlite+aiosqlite:///file:x?mode=memory&cache=shared&uri=true"]
)
def test_in_memory_sqlite_urls_are_replaced_by_the_embedded_files(url):
    target = source.resolve_database_target(url)
    assert target.kind == "embedded"
    assert "StaticPool" in target.note


def test_postgresql_urls_get_the_asyncpg_driver():
    target = source.resolve_database_target("postgresql://u:secret@db:5432/qulab")
    assert target.kind == "postgresql"
    assert target.url.drivername == "postgresql+asyncpg"


def test_sqlite_file_urls_get_the_aiosqlite_driver():
    target = source.resolve_database_target("sqlite:///tmp/qulab.db")
    assert (target.kind, target.url.drivername) == ("sqlite-file", "sqlite+aiosqlite")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url"])
def test_unsupported_database_urls_are_refused(url):
    with pytest.raises(source.ConfigurationError):
        source.resolve_database_target(url)


@pytest.mark.parametrize(
    "url",
    ["postgresql+asyncpg://alex:s3cr3t@db.example:5432/qulab", "redis://:s3cr3t@cache.example:6379/0"],
)
def test_passwords_never_appear_in_displayed_urls(url):
    shown = source.mask_url(url)
    assert "s3cr3t" not in shown
    assert "***" in shown


def test_the_readme_documents_every_environment_variable_with_its_default():
    reader = inspect.getsource(source.Settings.from_environment)
    read = set(re.findall(r'"((?:QULAB|DATABASE|REDIS)_[A-Z_]+)"', reader))
    readme = (Path(source.__file__).parent / "README.md").read_text()
    configuration = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", configuration, re.MULTILINE))
    assert read and read <= rows.keys(), read - rows.keys()
    for variable, field in re.findall(r'number\(\s*"(\w+)",\s*cls\.(\w+)', reader):
        assert rows[variable].strip() == f"`{getattr(source.Settings, field):g}`", variable
