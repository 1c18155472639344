"""Settings read from the environment in one place, and secrets kept out of every text shown.

Everything configurable is read once, at start-up (Settings.from_environment); unset or empty
means the default, and a value that is not a number, or is below its minimum, stops the app
with a message naming the variable. Passwords and tokens in DATABASE_URL and REDIS_URL are
remembered, so that mask_url and redact_secrets keep them out of every page, log line and error.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qsl, quote, quote_plus, unquote, unquote_plus, urlsplit

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

import source

logger = logging.getLogger("qulab")

RAM_BACKED_DIRECTORY = Path("/dev/shm")
CLASS_NAME_PATTERN = re.compile(r"[a-z0-9_]{1,24}")


class ConfigurationError(source.QuLabError):
    """The environment asks for something QuLab cannot do (any secret in the message is masked)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_secrets(message))


@dataclass(frozen=True)
class Settings:
    """Everything configurable, read from the environment in one place (see README)."""

    database_url: Optional[str] = None  # None: an embedded SQLite file per sandbox
    redis_url: Optional[str] = None  # None: an in-process fakeredis
    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout_seconds: float = 30.0
    sqlite_busy_timeout_seconds: float = 30.0
    sandbox_idle_seconds: float = 1800.0  # a sandbox nobody holds is deleted after this long
    sandbox_grace_seconds: float = 60.0  # ... and goes dormant (data kept) after this long
    max_sandboxes: int = 200  # at most this many awake sandboxes, whatever the budget allows
    memory_budget_mb: float = 1024.0  # memory this process may spend on awake sandboxes
    connection_budget: int = 800  # connections (SQLite: driver threads) this process may open
    # the fewest app processes each assumes share its PostgreSQL; each counts those it sees
    replicas: int = 1
    sqlite_pool_size: int = 1  # one learner's sandbox: one connection kept, a few more in a burst
    sqlite_max_overflow: int = 2
    sandbox_directory: Optional[str] = None  # None: /dev/shm when writable, else the temp dir
    redis_connect_timeout_seconds: float = 1.0
    # How long one Redis command may take before it counts as a failure (and the breaker opens):
    # the wait of the first read after Redis hangs. Counted on the time the loop was listening
    # (classroom.cache.deadline), so a class that keeps the loop busy does not trip it.
    redis_command_timeout_seconds: float = 0.25
    # A server that takes the TCP connection and never answers (a wrong port, a hung host) fails
    # after this long, with a message, instead of hanging the page for asyncpg's 60 s.
    database_connect_timeout_seconds: float = 10.0
    gil_switch_interval_ms: float = (
        1.0  # how long a busy thread keeps the GIL from one that waits (Python's: 5 ms)
    )
    stuck_minutes: float = 10.0  # the instructor's page: on one step longer than this is stuck
    class_name: str = ""  # several classes on one PostgreSQL: each its own roster tables

    def __post_init__(self) -> None:
        for url in (
            self.database_url,
            self.redis_url,
        ):  # so no log line or error text can show them
            if url:
                remember_secrets_of_url(url)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read settings from environment variables; unset or empty means the default."""

        def number(name: str, default: float, *, minimum: float) -> float:
            raw = environ.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigurationError(f"{name} must be a number, got {raw!r}.") from None
            if not math.isfinite(value) or value < minimum:
                raise ConfigurationError(f"{name} must be at least {minimum:g}, got {raw!r}.")
            return value

        return cls(
            database_url=environ.get("DATABASE_URL", "").strip() or None,
            redis_url=environ.get("REDIS_URL", "").strip() or None,
            pool_size=int(number("QULAB_POOL_SIZE", cls.pool_size, minimum=1)),
            max_overflow=int(number("QULAB_MAX_OVERFLOW", cls.max_overflow, minimum=0)),
            pool_timeout_seconds=number(
                "QULAB_POOL_TIMEOUT", cls.pool_timeout_seconds, minimum=0.1
            ),
            sqlite_busy_timeout_seconds=number(
                "QULAB_SQLITE_BUSY_TIMEOUT", cls.sqlite_busy_timeout_seconds, minimum=0.1
            ),
            sandbox_idle_seconds=number(
                "QULAB_SANDBOX_IDLE_SECONDS", cls.sandbox_idle_seconds, minimum=1
            ),
            sandbox_grace_seconds=number(
                "QULAB_SANDBOX_GRACE_SECONDS", cls.sandbox_grace_seconds, minimum=0
            ),
            max_sandboxes=int(number("QULAB_MAX_SANDBOXES", cls.max_sandboxes, minimum=1)),
            memory_budget_mb=number("QULAB_MEMORY_BUDGET_MB", cls.memory_budget_mb, minimum=16),
            connection_budget=int(
                number("QULAB_CONNECTION_BUDGET", cls.connection_budget, minimum=4)
            ),
            replicas=int(number("QULAB_REPLICAS", cls.replicas, minimum=1)),
            sqlite_pool_size=int(number("QULAB_SQLITE_POOL_SIZE", cls.sqlite_pool_size, minimum=1)),
            sqlite_max_overflow=int(
                number("QULAB_SQLITE_MAX_OVERFLOW", cls.sqlite_max_overflow, minimum=0)
            ),
            sandbox_directory=environ.get("QULAB_SANDBOX_DIR", "").strip() or None,
            gil_switch_interval_ms=number(
                "QULAB_GIL_SWITCH_INTERVAL_MS", cls.gil_switch_interval_ms, minimum=0.1
            ),
            database_connect_timeout_seconds=number(
                "QULAB_DATABASE_CONNECT_TIMEOUT", cls.database_connect_timeout_seconds, minimum=0.1
            ),
            redis_command_timeout_seconds=number(
                "QULAB_REDIS_TIMEOUT", cls.redis_command_timeout_seconds, minimum=0.01
            ),
            stuck_minutes=number("QULAB_STUCK_MINUTES", cls.stuck_minutes, minimum=0.01),
            class_name=_class_name(environ.get("QULAB_CLASS", "")),
        )


def _class_name(raw: str) -> str:
    """QULAB_CLASS: lower-case letters, digits and _, up to 24 (it names tables)."""
    name = raw.strip()
    if name and not CLASS_NAME_PATTERN.fullmatch(name):
        raise ConfigurationError(
            f"QULAB_CLASS must be up to 24 lower-case letters, digits or _, got {name!r}."
        )
    return name


@dataclass(frozen=True)
class DatabaseTarget:
    """Where sandboxes live: 'embedded' SQLite files, SQLite files beside a path, or PostgreSQL."""

    kind: str  # "embedded" | "sqlite-file" | "postgresql"
    url: Optional[URL]  # the normalised URL (None for embedded)
    note: str = ""  # why the configured URL was adjusted, if it was


def resolve_database_target(database_url: Optional[str]) -> DatabaseTarget:
    """Turn DATABASE_URL into a target, refusing URLs that would lose data under concurrency."""
    if database_url is None:
        return DatabaseTarget("embedded", None)
    try:
        url = make_url(database_url)
    except ArgumentError:
        raise ConfigurationError("DATABASE_URL is not a valid database URL.") from None
    backend = url.get_backend_name()
    if backend in {"postgresql", "postgres"}:
        return DatabaseTarget("postgresql", url.set(drivername="postgresql+asyncpg"))
    if backend == "sqlite":
        database = url.database or ""
        if database in {"", ":memory:"} or "mode=memory" in str(url):
            # An in-memory URL gets SQLAlchemy's StaticPool: one connection shared by every
            # session, so concurrent transactions interleave and silently lose rows.
            return DatabaseTarget(
                "embedded",
                None,
                note="in-memory SQLite URL replaced by the embedded RAM-backed files "
                "(StaticPool shares one connection and loses concurrent writes)",
            )
        return DatabaseTarget("sqlite-file", url.set(drivername="sqlite+aiosqlite"))
    raise ConfigurationError(
        f"DATABASE_URL uses {backend!r}; "
        "QuLab supports PostgreSQL (postgresql+asyncpg://…) and SQLite."
    )


# A query parameter whose name contains one of these words carries a secret (password=,
# sslpassword=, token=, api_key=, auth=, …); its value is never shown.
_SECRET_PARAMETER_NAME = re.compile(r"pass|pwd|secret|token|key|auth|cred|sig", re.IGNORECASE)
# What may follow the userinfo's '@': a host (name, IPv4, [IPv6]) and a port,
# up to / ? # or the end.
_HOST_AFTER_USERINFO = re.compile(r"@[A-Za-z0-9.\-\[\]:%_]*(?=[/?#]|$)")
_known_secrets: set[str] = set()
_MIN_SECRET_LENGTH = 3  # shorter ones are hidden by the URL's structure, not searched for in text


def mask_url(url: str | URL | None) -> str:
    """Render a URL for display with every secret it carries replaced by ***.

    Hidden: the password of the user info (even one holding an unencoded @, / or ?), every
    query parameter that names a secret (password=, sslpassword=, token=, …) and the fragment.
    The secrets are also remembered, so redact_secrets() removes them from log lines and
    error texts. A text that is not a URL at all is not shown.
    """
    if url is None:
        return "(none)"
    text_form = url.render_as_string(hide_password=False) if isinstance(url, URL) else str(url)
    remember_secrets_of_url(text_form)
    scheme, separator, rest = text_form.partition("://")
    if not separator:
        return "***"
    userinfo, rest = _split_userinfo(rest)
    if userinfo is not None:
        user, has_password, _ = userinfo.partition(":")
        rest = f"{user}{':***' if has_password else ''}@{rest}"
    rest, _, fragment = rest.partition("#")
    rest, has_query, query = rest.partition("?")
    if has_query:
        rest += "?" + "&".join(_mask_parameter(parameter) for parameter in query.split("&"))
    if fragment:
        rest += "#***"
    return redact_secrets(f"{scheme}://{rest}")


def _split_userinfo(rest: str) -> tuple[Optional[str], str]:
    """(userinfo, what follows its '@'), or (None, rest) when the URL has no user info.

    The user info ends at the last '@' before the query; when there is none, at the last '@'
    followed by something shaped like a host, since a password may hold an unencoded '?'.
    """
    before_query = rest.split("?", 1)[0].split("#", 1)[0]
    at = before_query.rfind("@")
    if at < 0:
        hosts = list(_HOST_AFTER_USERINFO.finditer(rest))
        if not hosts:
            return None, rest
        at = hosts[-1].start()
    return rest[:at], rest[at + 1 :]


def _mask_parameter(parameter: str) -> str:
    name, has_value, _ = parameter.partition("=")
    return (
        f"{name}=***"
        if has_value and _SECRET_PARAMETER_NAME.search(unquote_plus(name))
        else parameter
    )


def remember_secrets_of_url(url: str) -> None:
    """Remember the passwords a URL carries, as SQLAlchemy, redis-py and urllib would read them."""
    found: set[str] = set()
    try:
        if url.lower().startswith(("redis", "unix")):
            raise ValueError("redis-py reads these URLs with urllib, below")
        parsed = make_url(url)
        found.add(parsed.password or "")
        found.update(
            str(value)
            for name, value in parsed.query.items()
            if _SECRET_PARAMETER_NAME.search(name)
        )
    except (ArgumentError, ValueError, TypeError):
        pass
    try:
        split = urlsplit(url)
        found.add(split.password or "")
        found.update(
            value for name, value in parse_qsl(split.query) if _SECRET_PARAMETER_NAME.search(name)
        )
    except ValueError:
        pass
    scheme, separator, rest = url.partition("://")
    userinfo, _ = _split_userinfo(rest) if separator else (None, rest)
    if userinfo and ":" in userinfo:
        found.add(userinfo.partition(":")[2])
        found.add(unquote(userinfo.partition(":")[2]))
    for secret in found:
        if len(secret) >= _MIN_SECRET_LENGTH:
            _known_secrets.update({secret, quote(secret, safe=""), quote_plus(secret)})


def redact_secrets(text_value: str) -> str:
    """The text with every remembered secret replaced by ***; for log lines and error messages."""
    for secret in sorted(_known_secrets, key=len, reverse=True):
        if secret in text_value:
            text_value = text_value.replace(secret, "***")
    return text_value


class _RedactSecretsFilter(logging.Filter):
    """Removes remembered secrets from QuLab's log records, tracebacks included."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _known_secrets:
            record.msg, record.args = redact_secrets(record.getMessage()), None
            if record.exc_info and not record.exc_text:
                record.exc_text = redact_secrets(
                    logging.Formatter().formatException(record.exc_info)
                )
        return True


logger.addFilter(_RedactSecretsFilter())


def sandbox_directory(settings: Settings) -> Path:
    """Where embedded sandbox files live: QULAB_SANDBOX_DIR, else /dev/shm (RAM), else temp."""
    if settings.sandbox_directory:
        directory = Path(settings.sandbox_directory)
        directory.mkdir(parents=True, exist_ok=True)
        return directory
    if RAM_BACKED_DIRECTORY.is_dir() and os.access(RAM_BACKED_DIRECTORY, os.W_OK):
        return RAM_BACKED_DIRECTORY
    return Path(tempfile.gettempdir())
