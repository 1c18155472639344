"""QuLab's data layer: everything the codelab's pages demonstrate, in one module.

The pages only render; every model, query, cache read and event lives here, so what a learner
sees on a page is the code below, running for real.

Contents (each a headed section below):
 1. Configuration        - settings read from the environment, with safe defaults
 2. Errors               - exceptions whose messages can be shown to a learner as they are
 3. Validation           - checks for user input, run before anything touches the database
 4. Models               - User, Assessment, AIRScore, DomainEvent
 5. Engine and sessions  - one async engine per database, get_session() as the unit of work
 6. Statement log        - records the SQL that really ran, for the pages to show and count
 6a. Learning journal   - what each demo measured, written by the demo into the sandbox's database
 7. Repositories         - UserRepository, AssessmentRepository, AIRScoreRepository
 8. Redis                - a real server or fakeredis, one namespaced link per sandbox
 9. Sandboxes            - each browser session gets its own database and Redis namespace
10. Data models and connectivity - the use cases behind sections 1 and 2 of the codelab
11. N+1 and eager loading - section 3: the statements each loading strategy really issues
12. Cache                - section 4: a Redis read-through cache with measured hits and misses
                           (how it survives faults - epochs, fences, single flight, the Redis
                           breaker - lives in the qulab_redis package beside this module)
13. Outbox               - section 5: events committed with the change, published in the background
13a. Progress            - the learner's steps, each checked against the sandbox's journal and rows,
                           and "Download my sandbox"
14. Runtime              - one background event loop that owns every async resource, and the
                           small synchronous facade (Lab) that Streamlit pages call
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import functools
import gc
import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qsl, quote, quote_plus, unquote, unquote_plus, urlsplit
from typing import Any, Generic, Optional, TypeVar

import fakeredis
import qulab_redis
import qulab_sqlite
import qulab_worker
import redis.asyncio as redis_asyncio
import redis.exceptions
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from sqlalchemy import (
    JSON,
    any_,
    DateTime,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    bindparam,
    cast,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY as PostgresArray
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncAttrs,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
)
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.types import TypeDecorator

from qulab_outbox import (
    BrokerCircuit,
    BrokerDurability,
    StreamBacklog,
    is_broker_wide_refusal,
    read_broker_durability,
    read_stream_backlog,
    trim_acknowledged_entries,
)
from qulab_outbox.notify import CommitNotifications, commit_notifications, install_notify_trigger
from qulab_outbox.watch import stream_watch
from qulab_sqlite.compilation import share_compilation

import sandbox_export

logger = logging.getLogger("qulab")

T = TypeVar("T")


# =============================================================================================
# 1. Configuration
# =============================================================================================

RAM_BACKED_DIRECTORY = Path("/dev/shm")


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
    replicas: int = 1  # app processes sharing one PostgreSQL: each takes 1/replicas of max_connections
    sqlite_pool_size: int = 1  # one learner's sandbox: one connection kept, a few more in a burst
    sqlite_max_overflow: int = 2
    sandbox_directory: Optional[str] = None  # None: /dev/shm when writable, else the temp dir
    redis_connect_timeout_seconds: float = 1.0
    gil_switch_interval_ms: float = 1.0  # how long a busy thread keeps the GIL from one that waits (Python's: 5 ms)

    def __post_init__(self) -> None:
        for url in (self.database_url, self.redis_url):  # so no log line or error text can show them
            if url:
                remember_secrets_of_url(url)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
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
            pool_timeout_seconds=number("QULAB_POOL_TIMEOUT", cls.pool_timeout_seconds, minimum=0.1),
            sqlite_busy_timeout_seconds=number(
                "QULAB_SQLITE_BUSY_TIMEOUT", cls.sqlite_busy_timeout_seconds, minimum=0.1
            ),
            sandbox_idle_seconds=number("QULAB_SANDBOX_IDLE_SECONDS", cls.sandbox_idle_seconds, minimum=1),
            sandbox_grace_seconds=number("QULAB_SANDBOX_GRACE_SECONDS", cls.sandbox_grace_seconds, minimum=0),
            max_sandboxes=int(number("QULAB_MAX_SANDBOXES", cls.max_sandboxes, minimum=1)),
            memory_budget_mb=number("QULAB_MEMORY_BUDGET_MB", cls.memory_budget_mb, minimum=16),
            connection_budget=int(number("QULAB_CONNECTION_BUDGET", cls.connection_budget, minimum=4)),
            replicas=int(number("QULAB_REPLICAS", cls.replicas, minimum=1)),
            sqlite_pool_size=int(number("QULAB_SQLITE_POOL_SIZE", cls.sqlite_pool_size, minimum=1)),
            sqlite_max_overflow=int(number("QULAB_SQLITE_MAX_OVERFLOW", cls.sqlite_max_overflow, minimum=0)),
            sandbox_directory=environ.get("QULAB_SANDBOX_DIR", "").strip() or None,
            gil_switch_interval_ms=number("QULAB_GIL_SWITCH_INTERVAL_MS", cls.gil_switch_interval_ms, minimum=0.1),
        )


@dataclass(frozen=True)
class DatabaseTarget:
    """Where sandboxes live: 'embedded' SQLite files, SQLite files beside a given path, or PostgreSQL."""

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
        f"DATABASE_URL uses {backend!r}; QuLab supports PostgreSQL (postgresql+asyncpg://…) and SQLite."
    )


# A query parameter whose name contains one of these words carries a secret (password=,
# sslpassword=, token=, api_key=, auth=, …); its value is never shown.
_SECRET_PARAMETER_NAME = re.compile(r"pass|pwd|secret|token|key|auth|cred|sig", re.IGNORECASE)
# What may follow the userinfo's '@': a host (name, IPv4, [IPv6]) and a port, up to / ? # or the end.
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
    return f"{name}=***" if has_value and _SECRET_PARAMETER_NAME.search(unquote_plus(name)) else parameter


def remember_secrets_of_url(url: str) -> None:
    """Remember the passwords a URL carries, as SQLAlchemy, redis-py and urllib would read them."""
    found: set[str] = set()
    try:
        if url.lower().startswith(("redis", "unix")):
            raise ValueError("redis-py reads these URLs with urllib, below")
        parsed = make_url(url)
        found.add(parsed.password or "")
        found.update(str(value) for name, value in parsed.query.items() if _SECRET_PARAMETER_NAME.search(name))
    except (ArgumentError, ValueError, TypeError):
        pass
    try:
        split = urlsplit(url)
        found.add(split.password or "")
        found.update(value for name, value in parse_qsl(split.query) if _SECRET_PARAMETER_NAME.search(name))
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
                record.exc_text = redact_secrets(logging.Formatter().formatException(record.exc_info))
        return True


logger.addFilter(_RedactSecretsFilter())


def _sandbox_directory(settings: Settings) -> Path:
    if settings.sandbox_directory:
        directory = Path(settings.sandbox_directory)
        directory.mkdir(parents=True, exist_ok=True)
        return directory
    if RAM_BACKED_DIRECTORY.is_dir() and os.access(RAM_BACKED_DIRECTORY, os.W_OK):
        return RAM_BACKED_DIRECTORY
    return Path(tempfile.gettempdir())


# =============================================================================================
# 2. Errors
# =============================================================================================


class QuLabError(Exception):
    """Base of every error a page may show; its message is written for the learner (secrets removed)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact_secrets(arg) if isinstance(arg, str) else arg for arg in args))


class ConfigurationError(QuLabError):
    """The environment asks for something QuLab cannot do."""


class ValidationError(QuLabError, ValueError):
    """Input was refused before anything was written."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class InvalidEmailError(ValidationError):
    """The email address is empty, too long or not an address."""


class MalformedIdError(ValidationError):
    """An id is not a UUID."""


class DuplicateEmailError(QuLabError):
    """Another user already has this email (compared case-insensitively)."""


class NotFoundError(QuLabError, LookupError):
    """No row has this id."""


class UserNotFoundError(NotFoundError):
    """No user has this id."""


class BackendUnavailableError(QuLabError):
    """The database could not be reached or stayed busy too long."""


class OperationTimeoutError(QuLabError):
    """An operation took longer than the page is willing to wait."""


class UnexpectedError(QuLabError):
    """Something failed that QuLab did not foresee; the details are in the server log."""


# =============================================================================================
# 3. Validation
# =============================================================================================

MAX_EMAIL_LENGTH = 255
MAX_NAME_LENGTH = 255
MAX_ID_INPUT_LENGTH = 64
MAX_ROWS_PER_PAGE = 10_000
# An assessment's ability estimate on the IRT logit scale; real estimates stay well inside ±10.
ABILITY_BOUNDS = (-10.0, 10.0)
EDUCATION_LEVELS = (
    "High school",
    "Associate degree",
    "Bachelor's degree",
    "Master's degree",
    "Doctorate",
    "Other",
)
_EMAIL_PATTERN = re.compile(
    r"^(?=[^@]{1,64}@)[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
# SOC (15-1252) or O*NET-SOC (15-1252.00) occupation codes.
# ASCII digits only: Python's \d also matches Arabic-Indic or full-width digits.
_OCCUPATION_CODE_PATTERN = re.compile(r"[0-9]{2}-[0-9]{4}(?:\.[0-9]{2})?")
_NAME_PUNCTUATION = set(" .,'-\u2019")


def _required_text(value: Any, *, label: str, max_length: int, field_name: str) -> str:
    if value is None or not isinstance(value, str):
        raise ValidationError(f"{label} is required.", field=field_name)
    cleaned = " ".join(value.split())
    if not cleaned:
        raise ValidationError(f"{label} is required; it cannot be blank.", field=field_name)
    if len(cleaned) > max_length:
        raise ValidationError(
            f"{label} is too long: {len(cleaned)} characters, the limit is {max_length}.", field=field_name
        )
    if "<" in cleaned or ">" in cleaned:
        raise ValidationError(f"{label} must not contain markup such as < or >.", field=field_name)
    return cleaned


def validate_email(value: Any) -> str:
    """Return the trimmed email, or raise InvalidEmailError saying what is wrong with it."""
    if value is None or not isinstance(value, str) or not value.strip():
        raise InvalidEmailError("Email is required.", field="email")
    email = value.strip()
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidEmailError(
            f"Email is too long: {len(email)} characters, the limit is {MAX_EMAIL_LENGTH}.", field="email"
        )
    if not _EMAIL_PATTERN.fullmatch(email):
        raise InvalidEmailError(
            "That is not a valid email address; expected something like alex.smith@example.com.",
            field="email",
        )
    return email


def validate_name(value: Any) -> str:
    """Return the name with runs of whitespace collapsed; only letters, digits and . , ' - allowed."""
    name = _required_text(value, label="Name", max_length=MAX_NAME_LENGTH, field_name="name")
    for character in name:
        category = unicodedata.category(character)
        if character not in _NAME_PUNCTUATION and category[0] not in {"L", "M", "N"}:
            raise ValidationError(
                "Name may contain only letters, digits, spaces and . , ' - "
                f"(found {unicodedata.name(character, 'a control character')}).",
                field="name",
            )
    if not any(unicodedata.category(character)[0] == "L" for character in name):
        raise ValidationError("Name must contain at least one letter.", field="name")
    return name


def validate_occupation_code(value: Any, *, required: bool = False) -> Optional[str]:
    """Return an SOC / O*NET-SOC code such as 15-1252 or 15-1252.00, or None when optional and blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValidationError("Occupation code is required, e.g. 15-1252.00.", field="occupation_code")
        return None
    if not isinstance(value, str) or not _OCCUPATION_CODE_PATTERN.fullmatch(value.strip()):
        raise ValidationError(
            "Occupation code must look like 15-1252 or 15-1252.00 (an SOC / O*NET-SOC code).",
            field="occupation_code",
        )
    return value.strip()


def validate_education_level(value: Any) -> Optional[str]:
    """Return one of EDUCATION_LEVELS, or None when blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if value not in EDUCATION_LEVELS:
        raise ValidationError(
            f"Education level must be one of: {', '.join(EDUCATION_LEVELS)}.", field="education_level"
        )
    return value


def validate_years_experience(value: Any) -> Optional[float]:
    """Return years of experience between 0 and 80, or None when not given."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        if not value.strip().isascii():
            raise ValidationError("Years of experience must be written with the digits 0-9.", field="years_experience")
        try:
            value = float(value)
        except ValueError:
            raise ValidationError("Years of experience must be a number.", field="years_experience") from None
    return validate_number(value, label="Years of experience", low=0, high=80, field="years_experience")


def validate_number(value: Any, *, label: str, low: float, high: float, field: str = "") -> float:
    """Return a finite number between low and high; booleans, NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{label} must be a number.", field=field or label.lower())
    if not math.isfinite(value) or not low <= value <= high:
        raise ValidationError(f"{label} must be between {low:g} and {high:g}.", field=field or label.lower())
    return float(value)


def validate_whole_number(value: Any, *, label: str, low: int, high: int, field: str = "") -> int:
    """Return an int between low and high; booleans (True is 1 to Python) and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"{label} must be a whole number from {low:,} to {high:,}.", field=field or label.lower())
    return value


def parse_entity_id(value: Any, *, what: str = "user") -> str:
    """Return the canonical lowercase UUID text, or raise MalformedIdError naming what was expected."""
    if value is None or not isinstance(value, str) or not value.strip():
        raise MalformedIdError(f"Enter a {what} id.", field=f"{what}_id")
    text_value = value.strip()
    if len(text_value) > MAX_ID_INPUT_LENGTH:
        raise MalformedIdError(f"That is not a valid {what} id: it is far too long for a UUID.", field=f"{what}_id")
    try:
        return str(uuid.UUID(text_value))
    except ValueError:
        raise MalformedIdError(
            f"That is not a valid {what} id: expected a UUID such as 3f2b9c1e-8d4a-4c7e-9b1f-2a6d5e8c0f11.",
            field=f"{what}_id",
        ) from None


# =============================================================================================
# 4. Models
# =============================================================================================

_last_timestamp = datetime.min.replace(tzinfo=timezone.utc)
_timestamp_lock = threading.Lock()


def utc_now() -> datetime:
    """Current UTC time, strictly increasing within this process, so created_at orders rows."""
    global _last_timestamp
    with _timestamp_lock:
        now = datetime.now(timezone.utc)
        if now <= _last_timestamp:
            now = _last_timestamp + timedelta(microseconds=1)
        _last_timestamp = now
        return now


def _new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores none, so UTC is re-attached)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass a timezone-aware datetime")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(AsyncAttrs, DeclarativeBase):
    """Declarative base; AsyncAttrs lets lazy relationships be awaited (user.awaitable_attrs.scores)."""

    type_annotation_map = {datetime: UTCDateTime()}


class TimestampMixin:
    """created_at / updated_at in UTC, set by the application so every backend agrees."""

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now)


class User(Base, TimestampMixin):
    """A learner on the assessment platform."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_new_id)
    email: Mapped[str] = mapped_column(String(255), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(255))
    occupation_code: Mapped[Optional[str]] = mapped_column(String(20))
    education_level: Mapped[Optional[str]] = mapped_column(String(50))
    years_experience: Mapped[Optional[float]] = mapped_column(Float)
    assessments: Mapped[list["Assessment"]] = relationship(back_populates="user", cascade="all, delete-orphan")
    scores: Mapped[list["AIRScore"]] = relationship(back_populates="user", cascade="all, delete-orphan")


# Emails are unique whatever their letter case: Alex@X.com and alex@x.com are one person.
Index("ux_users_email_lower", func.lower(User.email), unique=True)


class Assessment(Base, TimestampMixin):
    """One assessment session of a user."""

    __tablename__ = "assessments"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="in_progress")
    component: Mapped[str] = mapped_column(String(50))
    current_ability: Mapped[float] = mapped_column(Float, default=0.0)
    items_administered: Mapped[int] = mapped_column(default=0)
    user: Mapped["User"] = relationship(back_populates="assessments")


class AIRScore(Base, TimestampMixin):
    """An AI-Readiness score calculated for a user, with its parts and confidence interval."""

    __tablename__ = "air_scores"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    occupation_code: Mapped[str] = mapped_column(String(20))
    air_score: Mapped[float] = mapped_column(Float)
    vr_score: Mapped[float] = mapped_column(Float)
    hr_score: Mapped[float] = mapped_column(Float)
    synergy_score: Mapped[float] = mapped_column(Float)
    ci_lower: Mapped[float] = mapped_column(Float)
    ci_upper: Mapped[float] = mapped_column(Float)
    parameter_version: Mapped[str] = mapped_column(String(20))
    calculation_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    user: Mapped["User"] = relationship(back_populates="scores")


class DomainEvent(Base, TimestampMixin):
    """A fact other services must hear about, written in the same transaction as the change (outbox)."""

    __tablename__ = "domain_events"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_new_id)
    event_type: Mapped[str] = mapped_column(String(100), nullable=False, index=True)
    aggregate_type: Mapped[str] = mapped_column(String(100), nullable=False)
    aggregate_id: Mapped[str] = mapped_column(String(36), nullable=False, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | published | failed
    published_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    # What delivery needs (section 5): failed attempts so far, the last broker error, when to try
    # again (exponential backoff), and the lease a publisher holds while it publishes the event.
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[Optional[str]] = mapped_column(String(500))
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    claimed_by: Mapped[Optional[str]] = mapped_column(String(64))
    claimed_until: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    stream_id: Mapped[Optional[str]] = mapped_column(String(40))  # the broker's entry id, once published
    __table_args__ = (
        Index("ix_events_status_created", "status", "created_at"),
        Index("ix_events_status_published", "status", "published_at"),  # the panel and the audit
    )


MODEL_CLASSES: tuple[type[Base], ...] = (User, Assessment, AIRScore, DomainEvent)  # the guide's four


def all_models() -> list[type[Base]]:
    """Every model mapped on Base: the guide's four, then the others (the consumer's inbox of section 5,
    and any added later), read from the live registry so page 1 names every table its diagram draws."""
    others = sorted(
        (mapper.class_ for mapper in Base.registry.mappers if mapper.class_ not in MODEL_CLASSES),
        key=lambda model: model.__tablename__,
    )
    return [*MODEL_CLASSES, *others]


@functools.cache  # the metadata is fixed once source.py is imported; section 1 draws it on every rerun
def entity_relationship_dot() -> str:
    """A Graphviz diagram of the tables, their columns and foreign keys, read from the live metadata."""
    lines = [
        "digraph models {",
        '  rankdir=LR; node [shape=plaintext, fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    for table in Base.metadata.sorted_tables:
        rows = "".join(
            f'<tr><td align="left">{"<b>PK</b> " if column.primary_key else ""}{column.name}</td>'
            f'<td align="left"><font color="#555555">{column.type.compile()}</font></td></tr>'
            for column in table.columns
        )
        lines.append(
            f'  {table.name} [label=<<table border="0" cellborder="1" cellspacing="0">'
            f'<tr><td colspan="2" bgcolor="#e8eefc"><b>{table.name}</b></td></tr>{rows}</table>>];'
        )
    for table in Base.metadata.sorted_tables:
        for foreign_key in table.foreign_keys:
            lines.append(
                f'  {foreign_key.column.table.name} -> {table.name} '
                f'[label="1 : many\\n{table.name}.{foreign_key.parent.name}"];'
            )
    lines.append("}")
    return "\n".join(lines)


# =============================================================================================
# 5. Engine and sessions
# =============================================================================================


SQLITE_WAL_LIMIT_BYTES = 512 * 1024  # a checkpoint truncates the WAL back to this (RAM under /dev/shm)
SQLITE_WAL_CHECKPOINT_PAGES = 200  # checkpoint every ~800 KB of WAL instead of SQLite's 4 MB


def _sqlite_connection_setup(busy_timeout_seconds: float) -> Callable[[Any, Any], None]:
    def configure(dbapi_connection: Any, connection_record: Any) -> None:
        # WAL lets readers run beside one writer; the busy timeout makes writers queue instead
        # of failing; SQLite ignores foreign keys unless each connection asks for them; the
        # journal size limit keeps a burst's WAL from staying in RAM after its checkpoint.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT_BYTES}")
        cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_CHECKPOINT_PAGES}")
        cursor.close()

    return configure


def create_engine_for(url: URL, settings: Settings, **overrides: Any) -> AsyncEngine:
    """An async engine with explicit pool settings; SQLite gets WAL, a busy timeout and foreign keys.

    A SQLite sandbox serves one learner: a pool of one connection and no pre-ping (a local file
    does not drop connections). Its connections share the process's SQLite workers
    (qulab_sqlite), so threads follow the operations running at once, not the learners.
    PostgreSQL's shared pool pre-pings, because a server restart or a network cut does kill
    pooled connections.
    """
    is_sqlite = url.get_backend_name() == "sqlite"
    options: dict[str, Any] = {
        "pool_size": settings.sqlite_pool_size if is_sqlite else settings.pool_size,
        "max_overflow": settings.sqlite_max_overflow if is_sqlite else settings.max_overflow,
        "pool_timeout": settings.pool_timeout_seconds,
        "pool_pre_ping": not is_sqlite,
    }
    options.update(overrides)
    if options.get("poolclass") is NullPool:
        for pool_only in ("pool_size", "max_overflow", "pool_timeout"):
            options.pop(pool_only, None)
    if is_sqlite:  # no thread per connection: its operations run on the process's shared SQLite workers
        creator = functools.partial(qulab_sqlite.connect, max_workers=settings.connection_budget)
        options.setdefault("connect_args", {"timeout": settings.sqlite_busy_timeout_seconds, "async_creator_fn": creator})
    engine = create_async_engine(url, **options)
    if is_sqlite:
        event.listen(engine.sync_engine, "connect", _sqlite_connection_setup(settings.sqlite_busy_timeout_seconds))
        share_compilation(engine)  # each statement compiled once per process, not once per sandbox
    install_statement_log(engine)
    return engine


class QuLabSyncSession(Session):
    """The ORM session behind QuLabSession: the listeners below hear QuLab's sessions only.

    Listening on SQLAlchemy's global Session class would run them for every session in the
    process, any library's; a subclass of our own keeps them to ours.
    """


class QuLabSession(AsyncSession):
    """QuLab's async session (what get_session yields); its sync_session_class carries the listeners."""

    sync_session_class = QuLabSyncSession


def engine_connection_limit(engine: AsyncEngine) -> int:
    """The most connections this engine's pool opens at once (pool size + overflow; NullPool: 0 = unbounded)."""
    pool = engine.pool
    size, overflow = getattr(pool, "size", None), getattr(pool, "_max_overflow", 0)
    return int(size()) + max(0, int(overflow)) if callable(size) else 0


def engine_pre_pings(engine: AsyncEngine) -> bool:
    """Whether the engine's pool tests each connection before lending it out."""
    return bool(getattr(engine.pool, "_pre_ping", False))


class ConnectionBudget:
    """The connections this process may hold open at once, shared by every engine it builds.

    On PostgreSQL it is this replica's share of max_connections; on SQLite, where each
    connection is a driver thread, a thread budget. Sandbox pools take their share when they
    wake (capacity admits them); experiments reserve theirs and wait while the class is busy.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_use = 0
        self.taken = 0  # of in_use: held without waiting (pools), as opposed to reservations
        self.waiting = 0
        self.waited_in_total = 0.0  # seconds reservations spent waiting, summed
        self.reservations_that_waited = 0
        self.peak_in_use = 0
        self._changed: Optional[asyncio.Condition] = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    @property
    def available(self) -> int:
        """Connections nobody holds right now."""
        return max(0, self.total - self.in_use)

    def take(self, count: int) -> None:
        """Hold connections without waiting (a sandbox pool the capacity check admitted)."""
        self.in_use += count
        self.taken += count
        self.peak_in_use = max(self.peak_in_use, self.in_use)

    @property
    def most_one_reservation_gets(self) -> int:
        """The largest reservation that can ever be granted: what the pools leave."""
        return max(1, self.total - self.taken)

    async def give_back(self, count: int, *, taken: bool = True) -> None:
        """Return connections and wake whoever waits for them."""
        self.in_use = max(0, self.in_use - count)
        if taken:
            self.taken = max(0, self.taken - count)
        condition = self._condition()
        async with condition:
            condition.notify_all()

    @asynccontextmanager
    async def reserve(self, count: int, *, timeout_seconds: float) -> AsyncIterator[float]:
        """Hold `count` connections for a block, waiting while the budget is spent; yields seconds waited."""
        started = time.monotonic()
        condition = self._condition()
        self.waiting += 1
        try:
            async with condition:
                if self.in_use + count > self.total:
                    self.reservations_that_waited += 1
                await asyncio.wait_for(condition.wait_for(lambda: self.in_use + count <= self.total), timeout_seconds)
                self.in_use += count  # still under the lock: nobody else can count these as free
                self.peak_in_use = max(self.peak_in_use, self.in_use)
        except asyncio.TimeoutError:
            raise BackendUnavailableError(
                f"The class's connection budget stayed busy for {timeout_seconds:g} s; try again in a moment."
            ) from None
        finally:
            self.waiting -= 1
        self.waited_in_total += time.monotonic() - started
        try:
            yield time.monotonic() - started
        finally:
            await self.give_back(count, taken=False)


@dataclass
class CommittedChanges:
    """What one committed transaction changed: ORM objects (detached), and tables written in bulk."""

    inserted: list[Any] = field(default_factory=list)
    updated: list[Any] = field(default_factory=list)
    deleted: list[Any] = field(default_factory=list)
    # Tables a bulk INSERT/UPDATE/DELETE wrote (rows unknown to the ORM); "*" when it can't tell.
    bulk_tables: set[str] = field(default_factory=set)

    def of_type(self, model: type[T]) -> list[T]:
        """Every changed object of one model class."""
        return [obj for obj in (*self.inserted, *self.updated, *self.deleted) if isinstance(obj, model)]


_CHANGES_KEY = "qulab_changes"


@event.listens_for(QuLabSyncSession, "after_flush")
def _collect_flushed_changes(session: Session, flush_context: Any) -> None:
    # after_flush still sees the pre-flush new/dirty/deleted sets; keep them until commit so
    # the unit of work can tell caches and the outbox publisher what changed.
    changes: CommittedChanges = session.info.setdefault(_CHANGES_KEY, CommittedChanges())
    changes.inserted.extend(session.new)
    changes.updated.extend(obj for obj in session.dirty if session.is_modified(obj))
    changes.deleted.extend(session.deleted)


@event.listens_for(QuLabSyncSession, "do_orm_execute")
def _collect_bulk_writes(execute_state: Any) -> None:
    # session.execute(delete(User).where(...)) and friends never pass through the flush: note
    # the tables they write, so the commit can tell the cache (which then drops the whole epoch).
    tables = _tables_written(execute_state.statement)
    if tables:
        changes: CommittedChanges = execute_state.session.info.setdefault(_CHANGES_KEY, CommittedChanges())
        changes.bulk_tables.update(tables)


def _tables_written(statement: Any) -> set[str]:
    if getattr(statement, "is_dml", False):
        return {getattr(statement.table, "name", "*")}
    if isinstance(statement, TextClause) and not statement.text.lstrip().upper().startswith(("SELECT", "WITH", "PRAGMA")):
        return {"*"}  # raw SQL that may write anything
    return set()


@event.listens_for(QuLabSyncSession, "after_rollback")
def _forget_rolled_back_changes(session: Session) -> None:
    session.info.pop(_CHANGES_KEY, None)


def new_session_factory(engine: AsyncEngine) -> async_sessionmaker[QuLabSession]:
    """Sessions of QuLab's own class on this engine; objects stay readable after commit."""
    return async_sessionmaker(engine, class_=QuLabSession, expire_on_commit=False)


@asynccontextmanager
async def get_session(sandbox: "Sandbox") -> AsyncIterator[AsyncSession]:
    """A unit of work: commits if the block succeeds, rolls back if it raises, always releases.

    After a successful commit, the cache drops what the transaction changed (always, before
    anyone else hears of it: the invalidation is part of the unit of work, not a listener that
    must be installed first), then the sandbox's commit listeners (publisher wake-up) hear it.
    Nothing runs for a rolled-back transaction.
    """
    async with sandbox.session_factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
        changes = session.info.pop(_CHANGES_KEY, None)
    if changes is not None:
        if changes.bulk_tables & {JournalEntry.__tablename__, "*"}:  # a reset emptied the journal
            sandbox.journal_generation += 1
        await invalidate_cached_changes(sandbox, changes)
        await sandbox.notify_committed(changes)


def pool_status(engine: AsyncEngine) -> dict[str, Any]:
    """A snapshot of the engine's pool: its class and, for a queue pool, its live counters."""
    pool = engine.pool
    status: dict[str, Any] = {"pool_class": type(pool).__name__}
    for counter in ("size", "checkedin", "checkedout", "overflow"):
        method = getattr(pool, counter, None)
        if callable(method):
            status[counter] = method()
    timeout = getattr(pool, "timeout", None)
    if callable(timeout):
        status["timeout_seconds"] = timeout()
    return status


# =============================================================================================
# 6. Statement log
# =============================================================================================


@dataclass(frozen=True)
class ExecutedStatement:
    """One SQL statement as the driver received it, and how long it took."""

    sql: str
    parameters: Any
    duration_ms: float
    executemany: bool = False


@dataclass
class StatementLog:
    """The statements executed inside one capture_statements() block, in order."""

    statements: list[ExecutedStatement] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many statements ran."""
        return len(self.statements)

    @property
    def total_ms(self) -> float:
        """Time spent in the database driver, summed over statements."""
        return sum(statement.duration_ms for statement in self.statements)

    def sql(self) -> list[str]:
        """The SQL text of each statement."""
        return [statement.sql for statement in self.statements]


_active_statement_logs: contextvars.ContextVar[tuple[StatementLog, ...]] = contextvars.ContextVar(
    "qulab_active_statement_logs", default=()
)


@contextmanager
def capture_statements() -> Iterator[StatementLog]:
    """Record every statement this task runs (on any engine) until the block ends.

    A context variable scopes the log to the current asyncio task, so statements of other
    sessions, the background publisher or other learners never leak into it.
    """
    log = StatementLog()
    token = _active_statement_logs.set((*_active_statement_logs.get(), log))
    try:
        yield log
    finally:
        _active_statement_logs.reset(token)


_STARTED_AT_KEY = "qulab_statement_started_at"


def _before_cursor_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
    conn.info.setdefault(_STARTED_AT_KEY, []).append(time.perf_counter())


def _after_cursor_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
    started = conn.info[_STARTED_AT_KEY].pop()
    logs = _active_statement_logs.get()
    if logs:
        executed = ExecutedStatement(statement, parameters, (time.perf_counter() - started) * 1000, many)
        for log in logs:
            log.statements.append(executed)


def _forget_failed_statement(context: Any) -> None:
    started = context.connection.info.get(_STARTED_AT_KEY) if context.connection is not None else None
    if started:
        started.pop()


def install_statement_log(engine: AsyncEngine) -> None:
    """Attach the statement listeners to an engine (listeners live on the sync engine)."""
    sync_engine = engine.sync_engine
    if not event.contains(sync_engine, "before_cursor_execute", _before_cursor_execute):
        event.listen(sync_engine, "before_cursor_execute", _before_cursor_execute)
        event.listen(sync_engine, "after_cursor_execute", _after_cursor_execute)
    # handle_error is a dialect event, and every SQLite engine shares one dialect
    # (qulab_sqlite.compilation): listened to per engine, one error ran it once per sandbox.
    dialect = sync_engine.dialect
    if not event.contains(dialect, "handle_error", _forget_failed_statement):
        event.listen(dialect, "handle_error", _forget_failed_statement)


# =============================================================================================
# 6a. Learning journal
# =============================================================================================
#
# What each demo measured ("N+1 fetch: 5 statements for N = 3"), written by the demo itself into
# the sandbox's own database, so the Progress section (13a) can tell which steps a learner has
# really done, across reloads and replicas. An entry is written after the operation returned:
# outside every capture_statements block and off every timed path, so the counts and times a page
# shows are exactly what they would be without it.


class JournalEntry(Base):
    """What a demo measured in this sandbox, for the progress checks (QuLab's own; kept by initialize)."""

    __tablename__ = "lab_journal"
    __table_args__ = {"info": {"kept_by_initialize": True}}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    kind: Mapped[str] = mapped_column(String(40))
    detail: Mapped[str] = mapped_column(String(300))
    facts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


@dataclass(frozen=True)
class Evidence:
    """What one operation measured: a kind the checks look for, a sentence, and the numbers."""

    kind: str
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)


_inside_journaled_operation: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "qulab_inside_journaled_operation", default=False
)
_journal_muted: contextvars.ContextVar[bool] = contextvars.ContextVar("qulab_journal_muted", default=False)
OperationT = TypeVar("OperationT", bound=Callable[..., Awaitable[Any]])


def journaled(kind: str) -> Callable[[OperationT], OperationT]:
    """Decorator: once the operation has returned, journal what it measured (see describe_evidence).

    Only the outermost journaled operation writes: a burst of 200 stored scores is one entry.
    """

    def decorate(operation: OperationT) -> OperationT:
        @functools.wraps(operation)
        async def run_then_record(sandbox: "Sandbox", *args: Any, **kwargs: Any) -> Any:
            if _inside_journaled_operation.get():
                return await operation(sandbox, *args, **kwargs)
            token = _inside_journaled_operation.set(True)
            try:
                result = await operation(sandbox, *args, **kwargs)
            finally:
                _inside_journaled_operation.reset(token)
            await record_evidence(sandbox, describe_evidence(kind, sandbox, result, kwargs))
            return result

        return run_then_record  # type: ignore[return-value]

    return decorate


def tables_emptied_by_initialize() -> list[Any]:
    """Every table initialize empties, children first: all but the learning journal."""
    return [table for table in reversed(Base.metadata.sorted_tables) if not table.info.get("kept_by_initialize")]


@contextmanager
def journal_muted() -> Iterator[None]:
    """Write no journal entries in this block (benchmarks time the operations bare)."""
    token = _journal_muted.set(True)
    try:
        yield
    finally:
        _journal_muted.reset(token)


async def record_evidence(sandbox: "Sandbox", evidence: Optional[Evidence]) -> None:
    """Append one entry to the sandbox's journal; never counted by a statement log, never raises."""
    if evidence is None or _journal_muted.get():
        return
    hidden = _active_statement_logs.set(())
    try:
        async with sandbox.engine.begin() as connection:
            await connection.execute(
                insert(JournalEntry.__table__),
                {"recorded_at": utc_now(), "kind": evidence.kind, "detail": evidence.detail[:300], "facts": evidence.facts},
            )
    except Exception:  # the demo already succeeded; a lost journal line must not undo it
        logger.warning("could not journal %s in sandbox %s", evidence.kind, sandbox.id, exc_info=True)
    finally:
        _active_statement_logs.reset(hidden)
        sandbox.journal_generation += 1


# =============================================================================================
# 7. Repositories
# =============================================================================================

ModelT = TypeVar("ModelT", bound=Base)


class Repository(Generic[ModelT]):
    """Data access for one model through one session; it flushes, the unit of work commits."""

    model: type[ModelT]
    id_label = "record"

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def find(self, entity_id: str) -> Optional[ModelT]:
        """The row with this id, or None; a malformed id raises MalformedIdError."""
        return await self.session.get(self.model, parse_entity_id(entity_id, what=self.id_label))

    async def get(self, entity_id: str) -> ModelT:
        """The row with this id; raises NotFoundError when there is none."""
        entity = await self.find(entity_id)
        if entity is None:
            raise self._not_found(entity_id)
        return entity

    async def list(self, *, limit: int = 100, offset: int = 0) -> list[ModelT]:
        """Rows newest first, a page at a time."""
        validate_whole_number(limit, label="Limit", low=0, high=MAX_ROWS_PER_PAGE)
        validate_whole_number(offset, label="Offset", low=0, high=2**31 - 1)
        statement = (
            select(self.model)
            .order_by(self.model.created_at.desc(), self.model.id)  # type: ignore[attr-defined]
            .limit(limit)
            .offset(offset)
        )
        return list((await self.session.scalars(statement)).all())

    async def count(self) -> int:
        """How many rows the table holds."""
        return int(await self.session.scalar(select(func.count()).select_from(self.model)) or 0)

    async def add(self, entity: ModelT) -> ModelT:
        """Stage a new row and flush it, so database constraints are checked now."""
        self.session.add(entity)
        await self.session.flush()
        return entity

    async def delete(self, entity: ModelT) -> None:
        """Delete a row (and, through cascades, what it owns)."""
        await self.session.delete(entity)
        await self.session.flush()

    def _not_found(self, entity_id: str) -> NotFoundError:
        return NotFoundError(f"No {self.id_label} has the id {entity_id.strip()}.")


class UserRepository(Repository[User]):
    """Users: created only through validation, unique by email whatever its letter case."""

    model = User
    id_label = "user"

    def _not_found(self, entity_id: str) -> NotFoundError:
        return UserNotFoundError(f"No user has the id {entity_id.strip()} in your sandbox.")

    async def create(
        self,
        *,
        email: str,
        name: str,
        occupation_code: Optional[str] = None,
        education_level: Optional[str] = None,
        years_experience: Optional[float] = None,
    ) -> User:
        """Validate every field, then insert; a taken email raises DuplicateEmailError."""
        user = User(
            email=validate_email(email),
            name=validate_name(name),
            occupation_code=validate_occupation_code(occupation_code),
            education_level=validate_education_level(education_level),
            years_experience=validate_years_experience(years_experience),
        )
        try:
            await self.add(user)
        except IntegrityError as error:
            if "email" in str(error.orig).lower():
                raise DuplicateEmailError(
                    f"A user with the email `{user.email}` already exists (emails are compared "
                    "ignoring letter case)."
                ) from None
            raise
        return user

    async def get_by_email(self, email: str) -> Optional[User]:
        """The user with this email in any letter case, or None."""
        statement = select(User).where(func.lower(User.email) == validate_email(email).lower())
        return await self.session.scalar(statement)

    async def require(self, user_id: str) -> User:
        """Like get(), named for call sites that check a user exists before writing for it."""
        return await self.get(user_id)

    async def get_user_with_scores_eager(self, user_id: str) -> User:
        """The user with every score loaded up front: selectinload issues 2 statements, whatever N is."""
        statement = select(User).where(User.id == parse_entity_id(user_id)).options(selectinload(User.scores))
        user = await self.session.scalar(statement)
        if user is None:
            raise self._not_found(user_id)
        return user


class UserOwnedRepository(Repository[ModelT]):
    """Rows that belong to a user (a user_id column): listed per user, oldest first."""

    async def list_for_user(self, user_id: str) -> list[ModelT]:
        """The user's rows, oldest first."""
        model: Any = self.model
        statement = (
            select(model).where(model.user_id == parse_entity_id(user_id)).order_by(model.created_at, model.id)
        )
        return list((await self.session.scalars(statement)).all())


class AssessmentRepository(UserOwnedRepository[Assessment]):
    """Assessments, always for an existing user."""

    model = Assessment
    id_label = "assessment"

    async def create(self, *, user_id: str, component: str, current_ability: float = 0.0) -> Assessment:
        """Start an assessment for an existing user."""
        user = await UserRepository(self.session).require(user_id)
        component_name = _required_text(component, label="Component", max_length=50, field_name="component")
        ability = validate_number(current_ability, label="Current ability", low=ABILITY_BOUNDS[0], high=ABILITY_BOUNDS[1])
        return await self.add(Assessment(user_id=user.id, component=component_name, current_ability=ability))


class AIRScoreRepository(UserOwnedRepository[AIRScore]):
    """AI-Readiness scores, always for an existing user."""

    model = AIRScore
    id_label = "score"

    async def create(
        self,
        *,
        user_id: str,
        occupation_code: str,
        air_score: float,
        vr_score: float,
        hr_score: float,
        synergy_score: float,
        ci_lower: float,
        ci_upper: float,
        parameter_version: str,
        calculation_metadata: Optional[dict[str, Any]] = None,
    ) -> AIRScore:
        """Insert a score for an existing user; an unknown user raises UserNotFoundError."""
        user = await UserRepository(self.session).require(user_id)
        values = {"air_score": air_score, "vr_score": vr_score, "hr_score": hr_score, "synergy_score": synergy_score}
        for label, value in {**values, "ci_lower": ci_lower, "ci_upper": ci_upper}.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 100:
                raise ValidationError(f"{label} must be a number between 0 and 100.", field=label)
        if not ci_lower <= air_score <= ci_upper:
            raise ValidationError("The confidence interval must contain the AIR score.", field="ci_lower")
        return await self.add(
            AIRScore(
                user_id=user.id,
                occupation_code=validate_occupation_code(occupation_code, required=True),
                ci_lower=ci_lower,
                ci_upper=ci_upper,
                parameter_version=_required_text(
                    parameter_version, label="Parameter version", max_length=20, field_name="parameter_version"
                ),
                calculation_metadata=dict(calculation_metadata or {}),
                **values,
            )
        )

    async def list_ids_for_user(self, user_id: str) -> list[str]:
        """The ids of a user's scores, oldest first (ids only, so no score enters the session)."""
        statement = (
            select(AIRScore.id)
            .where(AIRScore.user_id == parse_entity_id(user_id))
            .order_by(AIRScore.created_at, AIRScore.id)
        )
        return list((await self.session.scalars(statement)).all())

    async def latest_for_user(self, user_id: str) -> Optional[AIRScore]:
        """A user's most recent score, or None."""
        statement = (
            select(AIRScore)
            .where(AIRScore.user_id == parse_entity_id(user_id))
            .order_by(AIRScore.created_at.desc(), AIRScore.id.desc())
            .limit(1)
        )
        return await self.session.scalar(statement)


# =============================================================================================
# 8. Redis
# =============================================================================================

# Every way a Redis call can fail (a skipped call, while the breaker is open, is a ConnectionError).
REDIS_ERRORS = qulab_redis.REDIS_ERRORS
REDIS_COMMAND_TIMEOUT_SECONDS = 1.0  # a hung Redis costs a call at most this; then the breaker opens


@dataclass
class RedisHealth:
    """What the last Redis calls of one sandbox did: the page shows 'degraded' from this."""

    last_error: str = ""
    last_error_at: Optional[float] = None
    last_success_at: Optional[float] = None
    error_count: int = 0

    def record_success(self) -> None:
        """Note a call that worked."""
        self.last_success_at = time.time()

    def record_failure(self, error: BaseException) -> None:
        """Note a call that failed, keeping a one-line description."""
        self.error_count += 1
        self.last_error = f"{type(error).__name__}: {error}"[:300]
        self.last_error_at = time.time()

    @property
    def degraded(self) -> bool:
        """True while the most recent call failed."""
        if self.last_error_at is None:
            return False
        return self.last_success_at is None or self.last_error_at > self.last_success_at


class RedisService:
    """The process's Redis: a real server at REDIS_URL, or an in-process fakeredis server.

    Falling back to fakeredis is decided once, at start-up; the reason is kept for the sidebar.
    Clients belong to the event loop that created them, so this lives in the runtime's loop.
    """

    def __init__(self, *, mode: str, reason: str, url: Optional[str], client: Any, fake_server: Any = None) -> None:
        self.mode = mode  # "redis" or "fakeredis"
        self.reason = reason
        self.url = url
        self.client = client
        self.fake_server = fake_server
        self.command_timeout_seconds = REDIS_COMMAND_TIMEOUT_SECONDS
        # One breaker per server, shared by every sandbox: a frozen server is frozen for all of them.
        self.breaker = qulab_redis.CircuitBreaker(self.client.ping)

    @classmethod
    async def connect(cls, settings: Settings) -> "RedisService":
        """Connect to REDIS_URL when it answers a PING, else start fakeredis and say why."""
        if settings.redis_url:
            client = redis_asyncio.from_url(
                settings.redis_url,
                decode_responses=True,
                socket_connect_timeout=settings.redis_connect_timeout_seconds,
                socket_timeout=5,
                health_check_interval=30,
            )
            try:
                await asyncio.wait_for(client.ping(), settings.redis_connect_timeout_seconds + 1)
            except (*REDIS_ERRORS, ValueError) as error:
                await client.aclose()
                reason = f"REDIS_URL ({mask_url(settings.redis_url)}) did not answer ({type(error).__name__}); using fakeredis"
                logger.warning(reason)
                return cls._fake(reason)
            # Where, not how it is: the breaker's state says whether it answers now.
            return cls(mode="redis", reason=f"REDIS_URL {mask_url(settings.redis_url)}", url=settings.redis_url, client=client)
        return cls._fake("REDIS_URL is not set; using fakeredis, an in-process Redis")

    @classmethod
    def _fake(cls, reason: str) -> "RedisService":
        server = fakeredis.FakeServer()
        client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
        return cls(mode="fakeredis", reason=reason, url=None, client=client, fake_server=server)

    def unreachable_client(self) -> Any:
        """A client whose connection attempts really fail: what a broker outage looks like."""
        if self.mode == "fakeredis":
            server = fakeredis.FakeServer()
            server.connected = False
            return fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
        # A Unix socket that does not exist: every connect fails at once with a real OSError. No
        # retries: redis-py's default retry backs off for seconds on this error, a refused TCP
        # connection (a stopped server) fails in about a millisecond.
        return redis_asyncio.Redis(
            unix_socket_path="/nonexistent/qulab-redis-outage.sock",
            decode_responses=True,
            retry=RedisRetry(NoBackoff(), 0),
        )

    async def close(self) -> None:
        """Stop the breaker's probe and close the client's connections."""
        await self.breaker.close()
        await self.client.aclose()


class RedisLink:
    """One sandbox's view of Redis: its key prefix, its health, the server's breaker and an outage switch.

    execute() and execute_many() are the guarded way to call Redis: a timeout per call, the
    breaker consulted before and told after, health recorded. The outage switch bypasses the
    breaker (its calls fail at once by themselves), so one learner's switch never opens the
    breaker for everyone else.
    """

    def __init__(self, service: RedisService, sandbox_id: str) -> None:
        self.service = service
        self.prefix = f"qulab:{sandbox_id}:"
        self.health = RedisHealth()
        self._unreachable: Any = None

    @property
    def client(self) -> Any:
        """The client this sandbox talks to: the real one, or an unreachable one during an outage."""
        return self._unreachable if self._unreachable is not None else self.service.client

    def key(self, *parts: str) -> str:
        """A key inside this sandbox's namespace."""
        return self.prefix + ":".join(parts)

    @property
    def breaker(self) -> qulab_redis.CircuitBreaker:
        """The server's breaker: `link.breaker.state` is 'closed', 'open' or 'half-open'; `.is_open` to skip."""
        return self.service.breaker

    async def execute(self, *command: Any) -> Any:
        """Send one command through the breaker, with the command timeout; raises one of REDIS_ERRORS."""
        if self._unreachable is None and not self.service.breaker.is_open:  # the usual case, kept lean: a hit's path
            try:
                async with asyncio.timeout(self.service.command_timeout_seconds):
                    reply = await self.service.client.execute_command(*command)
            except REDIS_ERRORS as error:
                self._failed(error, cut_off=False)
                raise
            self.health.record_success()
            return reply
        return await self._guarded(lambda client: client.execute_command(*command))

    async def execute_many(self, *commands: tuple[Any, ...], transaction: bool = False) -> list[Any]:
        """Send several commands in one round trip (MULTI/EXEC when transaction), through the breaker."""

        async def send(client: Any) -> list[Any]:
            pipeline = client.pipeline(transaction=transaction)
            for command in commands:
                pipeline.execute_command(*command)
            return await pipeline.execute()

        return await self._guarded(send)

    async def _guarded(self, call: Callable[[Any], Awaitable[T]], timeout_seconds: Optional[float] = None) -> T:
        cut_off = self._unreachable is not None
        if not cut_off and self.breaker.is_open:
            error = qulab_redis.RedisSkipped(f"skipped: the Redis breaker is {self.breaker.state}")
            self.health.record_failure(error)
            raise error
        try:
            async with asyncio.timeout(timeout_seconds or self.service.command_timeout_seconds):
                reply = await call(self.client)
        except REDIS_ERRORS as error:
            self._failed(error, cut_off=cut_off)
            raise
        self.health.record_success()
        return reply

    def _failed(self, error: BaseException, *, cut_off: bool) -> None:
        if isinstance(error, qulab_redis.breaker.SERVER_FAILURES) and not cut_off:
            self.breaker.record_failure(error)
        self.health.record_failure(error)

    @property
    def cut_off(self) -> bool:
        """True while the outage switch is on."""
        return self._unreachable is not None

    def cut(self) -> None:
        """Start an outage for this sandbox only: its calls go to an endpoint that refuses them."""
        if self._unreachable is None:
            self._unreachable = self.service.unreachable_client()

    async def restore(self) -> None:
        """End the outage; the next call reaches the real Redis again."""
        unreachable, self._unreachable = self._unreachable, None
        if unreachable is not None:
            await unreachable.aclose()

    async def check(self, *, timeout_seconds: float = 1.0) -> bool:
        """PING Redis now (through the breaker) and record the answer in health, so the status is right at once."""
        try:
            await self._guarded(lambda client: client.ping(), timeout_seconds)
        except REDIS_ERRORS:
            return False
        return True

    async def switch_outage(self, *, cut: bool, timeout_seconds: float = 1.0) -> bool:
        """Turn the outage switch on or off, then PING; returns whether Redis answers now."""
        if cut:
            self.cut()
        else:
            await self.restore()
        return await self.check(timeout_seconds=timeout_seconds)

    async def delete_namespace(self) -> int:
        """Delete every key of this sandbox (SCAN, never KEYS); returns how many were deleted.

        Through the breaker and within a bounded time: the registry deletes sandboxes under its
        lock, and a frozen Redis must not hold every newcomer there for seconds a sandbox.
        """

        async def scan_and_delete(client: Any) -> int:
            deleted, batch = 0, []
            async for key in client.scan_iter(match=self.prefix + "*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await client.delete(*batch)
                    batch.clear()
            return deleted + (await client.delete(*batch) if batch else 0)

        return await self._guarded(scan_and_delete, timeout_seconds=NAMESPACE_DELETE_TIMEOUT_SECONDS)


# =============================================================================================
# 9. Sandboxes
# =============================================================================================

NAMESPACE_DELETE_TIMEOUT_SECONDS = 5.0  # at most this long deleting one sandbox's Redis keys (SCAN + DEL)

# Always used with fullmatch: `$` alone also matches before a trailing newline ("abcdefgh\n").
SANDBOX_ID_PATTERN = re.compile(r"[a-z0-9]{8,32}")
# PostgreSQL sandboxes are schemas named qulab_<sandbox id>. Each has a row in this table saying
# when it was last used (the database's clock, so replicas agree); a live sandbox renews it at
# most once per renewal interval. A process that dies cannot drop its schemas, so every replica's
# reaper also drops schemas whose lease expired, whoever created them (reap_abandoned_schemas).
SANDBOX_SCHEMA_PATTERN = re.compile(r"qulab_[a-z0-9]{8,32}")
SANDBOX_LEASE_TABLE = "qulab_sandbox_leases"
_LEASE_TABLE_LOCK_KEY = 0x7175_6C61_62  # pg_advisory_xact_lock key: "qulab"
MAX_SCHEMAS_REAPED_PER_PASS = 50
POSTGRES_RESERVED_CONNECTIONS = 3  # superuser_reserved_connections' default: never ours to spend
# What one awake sandbox may cost in memory beyond the process's base. bench/sandboxes.py
# measured 0.58 MB (SQLite) after initialize and a read; this leaves room for a burst's caches.
AWAKE_SANDBOX_MEMORY_MB = {"sqlite": 1.0, "postgresql": 1.0}
# The states of a sandbox. Active: a browser session or a Python holder has it open; it is never
# released to make room. Idle: awake, nobody holds it; after the grace period it goes dormant.
# Dormant: engine, pool, driver threads and background tasks freed; its data (SQLite file,
# PostgreSQL schema, Redis keys) kept, and the next use wakes it. Deleted after the idle limit.
SANDBOX_ACTIVE, SANDBOX_IDLE, SANDBOX_DORMANT = "active", "idle", "dormant"
CommitListener = Callable[[CommittedChanges], Awaitable[None]]
SandboxListener = Callable[["Sandbox"], Awaitable[None]]


class ClassFullError(QuLabError):
    """Every place in the class is taken by a connected learner; nobody's sandbox is released for a newcomer."""

    def __init__(self, *, in_class: int, capacity: int, limited_by: str, retry_after_seconds: float) -> None:
        super().__init__(
            f"The class is full: {in_class} learners are working here (room for {capacity}, set by "
            f"{limited_by}). A place frees as soon as a learner closes their tab; try again in about "
            f"{max(1, round(retry_after_seconds / 60))} minute(s)."
        )
        self.in_class = in_class
        self.capacity = capacity
        self.limited_by = limited_by
        self.retry_after_seconds = retry_after_seconds


def quoted_schema(schema: str) -> str:
    """A sandbox schema name, checked against the issued form and quoted, for raw DDL."""
    if not SANDBOX_SCHEMA_PATTERN.fullmatch(schema):
        raise ValidationError("Malformed sandbox schema name.", field="sandbox_id")
    return f'"{schema}"'


def new_sandbox_id() -> str:
    """A fresh random sandbox id (also a valid PostgreSQL schema suffix and Redis key part)."""
    return secrets.token_hex(8)


@dataclass(eq=False)
class Sandbox:
    """One learner's private world: a database (file or schema), an engine view and a Redis namespace.

    Listeners let other parts react to its life: commit (what changed), reset (emptied),
    dormant (stop background work and flush: the engine is about to go), wake (awake again),
    release (data about to be deleted).
    """

    id: str
    backend: str  # "sqlite" or "postgresql"
    redis: RedisLink
    settings: Settings
    location: str  # the SQLite file, or the PostgreSQL schema
    open_engine: Callable[[], AsyncEngine]  # builds the engine (view) when the sandbox wakes
    owns_engine: bool  # SQLite sandboxes own their engine and pool; PostgreSQL ones share the store's
    state: str = SANDBOX_IDLE
    holders: set[str] = field(default_factory=set)  # browser sessions and Labs that have it open
    operations_in_flight: int = 0
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    unheld_since: float = field(default_factory=time.monotonic)
    commit_listeners: list[CommitListener] = field(default_factory=list)
    reset_listeners: list[SandboxListener] = field(default_factory=list)
    dormant_listeners: list[SandboxListener] = field(default_factory=list)
    wake_listeners: list[SandboxListener] = field(default_factory=list)
    release_listeners: list[SandboxListener] = field(default_factory=list)
    services: dict[str, Any] = field(default_factory=dict)
    notice: Optional[str] = None  # set when this id had a sandbox before that was released
    lease_renewed_at: float = field(default_factory=time.monotonic)  # PostgreSQL: last lease write
    connection_budget: Optional["ConnectionBudget"] = None  # the process's; experiments reserve from it
    going_dormant: Optional["asyncio.Task[None]"] = None  # the flush and close of a sleep in progress
    journal_generation: int = 0  # bumped by every journal write or delete in this process (13a's cache)
    progress_read: Optional[tuple[int, Any]] = None  # (journal_generation, LearnerProgress) last read
    _engine: Optional[AsyncEngine] = None
    _session_factory: Optional[async_sessionmaker[AsyncSession]] = None

    @property
    def engine(self) -> AsyncEngine:
        """This sandbox's engine; a dormant sandbox builds it again (and logs it: a wake hook was missed)."""
        if self._engine is None:
            if self.state == SANDBOX_DORMANT:
                logger.warning("sandbox %s used while dormant; reopening its engine", self.id)
            self._engine = self.open_engine()
            self._session_factory = None
        return self._engine

    @property
    def session_factory(self) -> async_sessionmaker[AsyncSession]:
        """Sessions bound to this sandbox's engine."""
        if self._session_factory is None or self._engine is None:
            self._session_factory = new_session_factory(self.engine)
        return self._session_factory

    @property
    def awake(self) -> bool:
        """True unless dormant."""
        return self.state != SANDBOX_DORMANT

    def touch(self) -> None:
        """Mark the sandbox as in use now (idle time counts from here)."""
        self.last_used = time.monotonic()

    def service(self, name: str, factory: Callable[["Sandbox"], T]) -> T:
        """A per-sandbox helper (cache, publisher, …), created on first use."""
        if name not in self.services:
            self.services[name] = factory(self)
        return self.services[name]

    async def notify_committed(self, changes: CommittedChanges) -> None:
        """Tell listeners what a committed transaction changed; a failing listener is logged, not raised."""
        for listener in list(self.commit_listeners):
            try:
                await listener(changes)
            except Exception:  # the commit stands whatever a listener does
                logger.exception("commit listener failed in sandbox %s", self.id)

    async def notify(self, listeners: list[SandboxListener], what: str) -> None:
        """Call lifecycle listeners in order; one that fails is logged and the rest still run."""
        for listener in list(listeners):
            try:
                await listener(self)
            except Exception:
                logger.exception("%s listener failed in sandbox %s", what, self.id)

    async def close_engine(self) -> None:
        """Dispose the engine this sandbox owns (connections and driver threads go); a view is just dropped."""
        engine, self._engine, self._session_factory = self._engine, None, None
        if engine is not None and self.owns_engine:
            await engine.dispose()


@dataclass(frozen=True)
class SandboxCapacity:
    """How many sandboxes may be awake at once, and which budget sets it."""

    limits: dict[str, int]  # budget name -> awake sandboxes it allows
    memory_mb_per_sandbox: float
    connections_per_sandbox: int

    @property
    def sandboxes(self) -> int:
        """The smallest of the limits."""
        return max(1, min(self.limits.values()))

    @property
    def limited_by(self) -> str:
        """The budget that sets the capacity."""
        return min(self.limits, key=lambda name: self.limits[name])


class SQLiteSandboxStore:
    """Sandboxes as SQLite files in WAL mode: one file, one small engine and pool per awake sandbox."""

    backend = "sqlite"

    def __init__(self, settings: Settings, target: DatabaseTarget) -> None:
        self.settings = settings
        self.target = target
        self.directory = _sandbox_directory(settings) if target.kind == "embedded" else None
        self.connections_per_sandbox = settings.sqlite_pool_size + settings.sqlite_max_overflow

    def describe(self) -> str:
        if self.target.kind == "embedded":
            return f"embedded SQLite, one WAL file per sandbox in {self.directory}"
        return mask_url(self.target.url)

    async def start(self, budget: ConnectionBudget) -> None:
        """Nothing to connect to (the budget is the configured thread budget); with DATABASE_URL=sqlite:///path,
        delete sandbox files beside that path nobody touched for longer than the idle limit (nothing left behind)."""
        if self.target.kind != "sqlite-file":
            return
        template = self.path_for("x" * 8)
        prefix, suffix = template.name.split("x" * 8, 1)
        cutoff = time.time() - self.settings.sandbox_idle_seconds
        for path in template.parent.glob(f"{prefix}*{suffix}"):
            sandbox_id = path.name[len(prefix) : len(path.name) - len(suffix)]
            companions = [Path(str(path) + extra) for extra in ("", "-wal", "-shm", "-journal")]
            # In WAL mode commits land in -wal; the main file changes only at a checkpoint, so the
            # newest of the files says when the sandbox was last written.
            last_written = max(companion.stat().st_mtime for companion in companions if companion.exists())
            if SANDBOX_ID_PATTERN.fullmatch(sandbox_id) and last_written < cutoff:
                for extra in ("", "-wal", "-shm", "-journal"):
                    Path(str(path) + extra).unlink(missing_ok=True)
                logger.info("deleted sandbox file %s, unused for longer than the idle limit", path)

    def path_for(self, sandbox_id: str) -> Path:
        if self.directory is not None:
            return self.directory / f"qulab-{os.getpid()}-{sandbox_id}.sqlite3"
        assert self.target.url is not None and self.target.url.database
        given = Path(self.target.url.database)
        return given.with_name(f"{given.stem}-{sandbox_id}{given.suffix or '.sqlite3'}")

    async def open(self, sandbox_id: str) -> tuple[str, Callable[[], AsyncEngine]]:
        url = URL.create("sqlite+aiosqlite", database=str(self.path_for(sandbox_id)))
        return url.database or "", lambda: create_engine_for(url, self.settings)

    async def renew_lease(self, sandbox: Sandbox) -> bool:
        return True

    async def before_sleep(self, sandbox: Sandbox) -> None:
        """Fold the WAL back into the database and truncate it, so a dormant sandbox holds no RAM for it."""
        if sandbox._engine is None:
            return
        async with sandbox._engine.connect() as connection:
            await connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    async def delete(self, sandbox: Sandbox, *, only_if_expired: bool) -> bool:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(sandbox.location + suffix).unlink(missing_ok=True)
        return True

    async def reap_abandoned_schemas(self, *, expired_after_seconds: float, live: list[str]) -> list[str]:
        return []

    async def close(self) -> None:
        """Nothing shared to close."""


class SchemaLeases:
    """The lease table: which sandbox schemas exist and when any replica last used each."""

    def __init__(self, holder: str) -> None:
        self.holder = holder

    async def create_table(self, connection: Any) -> None:
        # Replicas may start together; CREATE TABLE IF NOT EXISTS alone can still collide.
        await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LEASE_TABLE_LOCK_KEY})
        await connection.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {SANDBOX_LEASE_TABLE} ("
                "schema_name text PRIMARY KEY, last_used timestamptz NOT NULL, holder text NOT NULL)"
            )
        )

    async def take(self, connection: Any, schema: str) -> None:
        await connection.execute(
            text(
                f"INSERT INTO {SANDBOX_LEASE_TABLE} (schema_name, last_used, holder) VALUES (:schema, now(), :holder) "
                "ON CONFLICT (schema_name) DO UPDATE SET last_used = now(), holder = excluded.holder"
            ),
            {"schema": schema, "holder": self.holder},
        )

    async def renew(self, connection: Any, schema: str) -> bool:
        renewed = await connection.execute(
            text(f"UPDATE {SANDBOX_LEASE_TABLE} SET last_used = now(), holder = :holder WHERE schema_name = :schema"),
            {"schema": schema, "holder": self.holder},
        )
        return renewed.rowcount == 1

    async def end(self, connection: Any, schema: str, *, only_if_unused_for: Optional[float]) -> bool:
        """Delete the lease; with only_if_unused_for, only when no replica used the schema for that long."""
        condition = "" if only_if_unused_for is None else " AND last_used < now() - make_interval(secs => :seconds)"
        ended = await connection.execute(
            text(f"DELETE FROM {SANDBOX_LEASE_TABLE} WHERE schema_name = :schema{condition}"),
            {"schema": schema, "seconds": float(only_if_unused_for or 0)},
        )
        return ended.rowcount == 1

    async def lease_orphans(self, connection: Any) -> None:
        """Give schemas without a lease (made before leases existed) one, so they go one idle period later."""
        await connection.execute(
            text(
                f"INSERT INTO {SANDBOX_LEASE_TABLE} (schema_name, last_used, holder) "
                "SELECT nspname, now(), :holder FROM pg_catalog.pg_namespace WHERE nspname ~ :pattern "
                "ORDER BY nspname ON CONFLICT (schema_name) DO NOTHING"
            ),
            {"holder": f"{self.holder} (found without a lease)", "pattern": f"^{SANDBOX_SCHEMA_PATTERN.pattern}$"},
        )

    async def claim_expired(self, connection: Any, *, seconds: float, live: list[str]) -> list[str]:
        """Expired leases not live here; FOR UPDATE SKIP LOCKED gives each to one replica."""
        expired = await connection.execute(
            text(
                f"SELECT schema_name FROM {SANDBOX_LEASE_TABLE} "
                "WHERE last_used < now() - make_interval(secs => :seconds) AND NOT (schema_name = ANY(:live)) "
                "ORDER BY last_used LIMIT :limit FOR UPDATE SKIP LOCKED"
            ),
            {"seconds": float(seconds), "live": live, "limit": MAX_SCHEMAS_REAPED_PER_PASS},
        )
        return list(expired.scalars().all())


class PostgresSandboxStore:
    """Sandboxes as schemas of one PostgreSQL database, all through one shared engine and pool."""

    backend = "postgresql"

    def __init__(self, settings: Settings, target: DatabaseTarget, redis_service: RedisService) -> None:
        self.settings = settings
        self.target = target
        self.redis_service = redis_service
        self.leases = SchemaLeases(f"{os.uname().nodename}:{os.getpid()}")
        self.shared_engine: Optional[AsyncEngine] = None
        self.connections_per_sandbox = 0  # sandboxes share the pool
        self.max_connections: Optional[int] = None
        self._start_lock = asyncio.Lock()

    def describe(self) -> str:
        return mask_url(self.target.url)

    async def start(self, budget: ConnectionBudget) -> None:
        """Create the shared engine and the lease table; size the budget from max_connections ÷ replicas."""
        async with self._start_lock:
            if self.shared_engine is not None:
                return
            assert self.target.url is not None
            engine = create_engine_for(self.target.url, self.settings)
            try:
                async with engine.begin() as connection:
                    await self.leases.create_table(connection)
                    self.max_connections = int(await connection.scalar(text("SHOW max_connections")))
            except BaseException:
                await engine.dispose()
                raise
            share = (self.max_connections - POSTGRES_RESERVED_CONNECTIONS) // self.settings.replicas
            budget.total = max(1, min(self.settings.connection_budget, share))
            budget.take(engine_connection_limit(engine))
            self.shared_engine = engine

    async def engine(self) -> AsyncEngine:
        if self.shared_engine is None:
            raise RuntimeError("the PostgreSQL sandbox store was not started")
        return self.shared_engine

    async def open(self, sandbox_id: str) -> tuple[str, Callable[[], AsyncEngine]]:
        shared = await self.engine()
        schema = f"qulab_{sandbox_id}"
        async with shared.begin() as connection:  # schema and lease appear together
            await connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted_schema(schema)}"))
            await self.leases.take(connection, schema)
        return schema, lambda: shared.execution_options(schema_translate_map={None: schema})

    async def renew_lease(self, sandbox: Sandbox) -> bool:
        async with (await self.engine()).begin() as connection:
            return await self.leases.renew(connection, sandbox.location)

    async def before_sleep(self, sandbox: Sandbox) -> None:
        """Nothing: the schema's connections belong to the shared pool."""

    async def delete(self, sandbox: Sandbox, *, only_if_expired: bool) -> bool:
        """Drop the schema with its lease; only_if_expired keeps it when another replica used it lately."""
        only_if_unused_for = self.settings.sandbox_idle_seconds if only_if_expired else None
        async with (await self.engine()).begin() as connection:
            if not await self.leases.end(connection, sandbox.location, only_if_unused_for=only_if_unused_for):
                if only_if_expired:
                    return False
            await connection.execute(text(f"DROP SCHEMA IF EXISTS {quoted_schema(sandbox.location)} CASCADE"))
        return True

    async def reap_abandoned_schemas(self, *, expired_after_seconds: float, live: list[str]) -> list[str]:
        """Drop schemas (and their Redis keys) whose lease expired and that are not live here."""
        engine = await self.engine()
        async with engine.begin() as connection:
            await self.leases.lease_orphans(connection)
        async with engine.begin() as connection:
            expired = await self.leases.claim_expired(connection, seconds=expired_after_seconds, live=live)
            reaped = [schema for schema in expired if SANDBOX_SCHEMA_PATTERN.fullmatch(schema)]
            for schema in reaped:
                await connection.execute(text(f"DROP SCHEMA IF EXISTS {quoted_schema(schema)} CASCADE"))
            if expired:
                await connection.execute(
                    text(f"DELETE FROM {SANDBOX_LEASE_TABLE} WHERE schema_name = ANY(:expired)"), {"expired": expired}
                )
        for schema in reaped:  # nothing left behind: the sandbox's Redis keys go with its schema
            try:
                await RedisLink(self.redis_service, schema.removeprefix("qulab_")).delete_namespace()
            except REDIS_ERRORS:
                logger.warning("could not delete the Redis keys of reaped schema %s", schema)
        return reaped

    async def close(self) -> None:
        if self.shared_engine is not None:
            await self.shared_engine.dispose()
            self.shared_engine = None


def _still_going_dormant(sandbox: Sandbox) -> bool:
    return sandbox.going_dormant is not None and not sandbox.going_dormant.done()


class SandboxRegistry:
    """Every sandbox of this process and its lifecycle: active, idle, dormant, deleted.

    A sandbox is held while a browser session (or a Lab) has it open; a held sandbox is never
    put to sleep or deleted. When its last holder goes, it stays awake for a grace period (a
    reload comes back at once), then goes dormant: its engine, pool, driver threads and
    background tasks are freed, its data kept. Any use wakes it. Only after the idle limit is its
    data deleted (on PostgreSQL, only if no replica used the schema meanwhile). At capacity the
    registry puts unheld sandboxes to sleep to make room; when all are held, the newcomer gets
    ClassFullError and nobody's data is touched.
    """

    def __init__(self, settings: Settings, redis_service: RedisService) -> None:
        self.settings = settings
        self.redis_service = redis_service
        self.target = resolve_database_target(settings.database_url)
        self.store: SQLiteSandboxStore | PostgresSandboxStore = (
            PostgresSandboxStore(settings, self.target, redis_service)
            if self.target.kind == "postgresql"
            else SQLiteSandboxStore(settings, self.target)
        )
        self.budget = ConnectionBudget(settings.connection_budget)
        self._sandboxes: dict[str, Sandbox] = {}
        self._holder_sandbox: dict[str, str] = {}  # holder -> the sandbox id it holds
        self._released: dict[str, str] = {}  # sandbox id -> why it was deleted (bounded)
        self._lock = asyncio.Lock()
        self._started = False
        # Renew often enough that a lease never looks expired while its sandbox is in use.
        self.lease_renewal_seconds = min(60.0, settings.sandbox_idle_seconds / 4)

    @property
    def backend(self) -> str:
        """'postgresql' or 'sqlite'."""
        return self.store.backend

    @property
    def _shared_engine(self) -> Optional[AsyncEngine]:
        return getattr(self.store, "shared_engine", None)

    async def _postgres_engine(self) -> AsyncEngine:
        await self._start()
        assert isinstance(self.store, PostgresSandboxStore)
        return await self.store.engine()

    def describe_database(self) -> str:
        """A one-line, password-free description of where sandboxes live."""
        return self.store.describe()

    def __len__(self) -> int:
        return sum(1 for sandbox in self._sandboxes.values() if sandbox.awake)

    def counts(self) -> dict[str, int]:
        """How many sandboxes are in each state."""
        counted = {SANDBOX_ACTIVE: 0, SANDBOX_IDLE: 0, SANDBOX_DORMANT: 0}
        for sandbox in self._sandboxes.values():
            counted[sandbox.state] += 1
        return counted

    def capacity(self) -> SandboxCapacity:
        """Awake sandboxes this process can afford: the smallest of its memory, connection and count limits."""
        memory_each = AWAKE_SANDBOX_MEMORY_MB[self.backend]
        connections_each = self.store.connections_per_sandbox
        limits = {
            "the memory budget": int(self.settings.memory_budget_mb // memory_each),
            "QULAB_MAX_SANDBOXES": self.settings.max_sandboxes,
        }
        if connections_each:  # keep room for one pool experiment at its maximum
            spare = self.budget.total - MAX_POOL_EXPERIMENT_CONCURRENCY
            limits["the connection budget"] = max(1, spare // connections_each)
        return SandboxCapacity(limits, memory_each, connections_each)

    def get_existing(self, sandbox_id: str) -> Optional[Sandbox]:
        """The sandbox with this id if this process knows it (awake or dormant), or None."""
        return self._sandboxes.get(sandbox_id)

    async def _start(self) -> None:
        if not self._started:
            await self.store.start(self.budget)
            self._started = True

    async def acquire(self, sandbox_id: str, *, holder: Optional[str] = None) -> Sandbox:
        """The sandbox with this id, awake: created on first use, woken if dormant; `holder` takes a hold.

        Raises ClassFullError when it would have to wake and every awake sandbox is held.
        """
        if not isinstance(sandbox_id, str) or not SANDBOX_ID_PATTERN.fullmatch(sandbox_id):
            raise ValidationError("Malformed sandbox id.", field="sandbox_id")
        while True:
            sandbox = self._sandboxes.get(sandbox_id)
            if sandbox is not None and _still_going_dormant(sandbox):
                # Its flush runs outside the lock: wait for it to finish (never with the lock
                # held, so nobody else waits), then wake the sandbox the usual way.
                await asyncio.shield(sandbox.going_dormant)  # type: ignore[arg-type]
                continue
            if sandbox is None or not sandbox.awake:
                async with self._lock:
                    await self._start()
                    sandbox = self._sandboxes.get(sandbox_id)
                    if sandbox is not None and _still_going_dormant(sandbox):
                        continue  # it began to sleep after the check above
                    if sandbox is None:
                        await self._make_room()
                        sandbox = await self._create(sandbox_id)
                        reason = self._released.pop(sandbox_id, None)
                        if reason:
                            sandbox.notice = f"Your previous sandbox was released because {reason}; this one starts empty."
                        self._sandboxes[sandbox_id] = sandbox
                    elif not sandbox.awake:
                        await self._make_room()
                        await self._wake(sandbox)
            break
        if holder is not None:
            self._hold(sandbox, holder)
        sandbox.touch()
        if sandbox.backend == "postgresql" and time.monotonic() - sandbox.lease_renewed_at >= self.lease_renewal_seconds:
            sandbox.lease_renewed_at = time.monotonic()
            if not await self.store.renew_lease(sandbox):
                # Another replica found the lease expired and dropped the schema: start afresh.
                await self.release(sandbox_id, "its storage was reclaimed after it sat idle")
                return await self.acquire(sandbox_id, holder=holder)
        return sandbox

    @asynccontextmanager
    async def using(self, sandbox_id: str, *, holder: Optional[str] = None) -> AsyncIterator[Sandbox]:
        """The awake sandbox for the length of one operation: it cannot go dormant meanwhile."""
        sandbox = await self.acquire(sandbox_id, holder=holder)
        sandbox.operations_in_flight += 1
        try:
            yield sandbox
        finally:
            sandbox.operations_in_flight -= 1
            sandbox.touch()

    def _hold(self, sandbox: Sandbox, holder: str) -> None:
        previous = self._holder_sandbox.get(holder)
        if previous != sandbox.id:
            if previous is not None:
                self._drop_hold(holder)
            self._holder_sandbox[holder] = sandbox.id
        sandbox.holders.add(holder)
        sandbox.state = SANDBOX_ACTIVE

    def _drop_hold(self, holder: str) -> None:
        sandbox = self._sandboxes.get(self._holder_sandbox.pop(holder, ""))
        if sandbox is not None and holder in sandbox.holders:
            sandbox.holders.discard(holder)
            if not sandbox.holders:
                sandbox.state = SANDBOX_IDLE
                sandbox.unheld_since = time.monotonic()
                sandbox.touch()  # idle time counts from the moment the last holder left

    def release_holder(self, holder: str) -> None:
        """A browser session ended or a Lab was closed: its sandbox is no longer held by it (call on the loop)."""
        self._drop_hold(holder)

    async def _make_room(self) -> None:
        capacity = self.capacity().sandboxes
        awake = [sandbox for sandbox in self._sandboxes.values() if sandbox.awake]
        if len(awake) < capacity:
            return
        sleepers = sorted(
            (sandbox for sandbox in awake if not sandbox.holders and not sandbox.operations_in_flight),
            key=lambda sandbox: sandbox.last_used,
        )
        for sandbox in sleepers[: len(awake) - capacity + 1]:
            # Dormant now; its flush and close finish in the background (the newcomer does not wait
            # for a slow broker, and its learner, if back meanwhile, waits in acquire for it).
            self._begin_sleep(sandbox)
        if len(awake) - len(sleepers) >= capacity:
            capacity_now = self.capacity()
            raise ClassFullError(
                in_class=len(awake),
                capacity=capacity_now.sandboxes,
                limited_by=capacity_now.limited_by,
                retry_after_seconds=max(60.0, self.settings.sandbox_grace_seconds),
            )

    async def _create(self, sandbox_id: str) -> Sandbox:
        location, open_engine = await self.store.open(sandbox_id)
        sandbox = Sandbox(
            id=sandbox_id,
            backend=self.backend,
            redis=RedisLink(self.redis_service, sandbox_id),
            settings=self.settings,
            location=location,
            open_engine=open_engine,
            owns_engine=self.backend == "sqlite",
            connection_budget=self.budget,
        )
        self.budget.take(self.store.connections_per_sandbox)
        try:
            await create_schema(sandbox)
        except BaseException:
            await sandbox.close_engine()
            await self.budget.give_back(self.store.connections_per_sandbox)
            await self.store.delete(sandbox, only_if_expired=False)
            raise
        return sandbox

    async def _sleep(self, sandbox: Sandbox) -> None:
        """Active/idle -> dormant, and wait until it is: background work stops, then the engine goes; data stays."""
        going = self._begin_sleep(sandbox)
        if going is not None:
            await asyncio.shield(going)

    def _begin_sleep(self, sandbox: Sandbox) -> Optional["asyncio.Task[None]"]:
        """Mark the sandbox dormant now (call under the lock) and run its flush and close as a task.

        Dormant from this moment: a learner arriving meanwhile finds it going dormant, waits for
        that task (acquire does, outside the lock), then wakes it properly. The flush can take
        seconds when the broker is slow, so the sweep awaits these tasks after releasing the lock.
        """
        if not sandbox.awake:
            return sandbox.going_dormant if _still_going_dormant(sandbox) else None
        sandbox.state = SANDBOX_DORMANT
        sandbox.going_dormant = asyncio.get_running_loop().create_task(
            self._finish_sleep(sandbox), name=f"sandbox-dormant-{sandbox.id}"
        )
        return sandbox.going_dormant

    async def _finish_sleep(self, sandbox: Sandbox) -> None:
        """The slow part of a sleep (listeners flush, then the engine goes); never raises to a waiter."""
        try:
            await sandbox.notify(sandbox.dormant_listeners, "dormant")
            try:
                await self.store.before_sleep(sandbox)
            except Exception:
                logger.warning("could not checkpoint sandbox %s before it went dormant", sandbox.id, exc_info=True)
            await sandbox.close_engine()
        except Exception:
            logger.exception("sandbox %s did not close cleanly on going dormant", sandbox.id)
        finally:
            await self.budget.give_back(self.store.connections_per_sandbox)

    async def _wake(self, sandbox: Sandbox) -> None:
        """Dormant -> idle (the caller's hold makes it active); on PostgreSQL the lease is renewed first."""
        if sandbox.backend == "postgresql":
            sandbox.lease_renewed_at = 0.0  # acquire renews the lease (or finds the schema reaped)
        self.budget.take(self.store.connections_per_sandbox)
        sandbox.state = SANDBOX_IDLE
        sandbox.unheld_since = time.monotonic()
        await sandbox.notify(sandbox.wake_listeners, "wake")

    async def sweep(self) -> dict[str, list[str]]:
        """One pass of the lifecycle: idle past the grace period -> dormant; unused past the idle limit -> deleted."""
        now = time.monotonic()
        slept, deleted, kept_for_another_replica = [], [], []
        going_dormant: list[Optional[asyncio.Task[None]]] = []
        async with self._lock:
            for sandbox in list(self._sandboxes.values()):
                if sandbox.holders or sandbox.operations_in_flight:
                    if sandbox.backend == "postgresql" and now - sandbox.lease_renewed_at >= self.lease_renewal_seconds:
                        sandbox.lease_renewed_at = now  # a connected learner keeps the lease without clicking
                        await self.store.renew_lease(sandbox)
                    continue
                if now - sandbox.last_used > self.settings.sandbox_idle_seconds:
                    minutes = self.settings.sandbox_idle_seconds / 60
                    if await self._delete(sandbox, f"it was idle for more than {minutes:g} minutes", only_if_expired=True):
                        deleted.append(sandbox.id)
                    else:
                        kept_for_another_replica.append(sandbox.id)
                elif sandbox.awake and now - sandbox.unheld_since >= self.settings.sandbox_grace_seconds:
                    going_dormant.append(self._begin_sleep(sandbox))
                    slept.append(sandbox.id)
        # Their flushes (up to seconds each with a slow broker) run after the lock is released:
        # another learner's open never waits for them.
        await asyncio.gather(*(asyncio.shield(going) for going in going_dormant if going is not None))
        return {"dormant": slept, "deleted": deleted, "kept": kept_for_another_replica}

    async def release(self, sandbox_id: str, reason: str = "released") -> bool:
        """Delete a sandbox now, whoever holds it: stop its workers, free its engine, delete its data and keys.

        Its outbox flush and engine close (seconds with a slow broker) run outside the lock, as a
        sleep does: other learners' opens never wait for them.
        """
        while True:
            async with self._lock:
                sandbox = self._sandboxes.get(sandbox_id)
                if sandbox is None:
                    return False  # never here, or released by someone else meanwhile
                going = self._begin_sleep(sandbox)
                if going is None:  # dormant, its flush done: deleting it takes no wait
                    return await self._delete(sandbox, reason, only_if_expired=False)
            # A learner returning meanwhile may wake it again: then it goes back to sleep, here.
            await asyncio.shield(going)

    async def _delete(self, sandbox: Sandbox, reason: str, *, only_if_expired: bool) -> bool:
        await self._sleep(sandbox)
        self._sandboxes.pop(sandbox.id, None)
        for holder in list(sandbox.holders):
            self._holder_sandbox.pop(holder, None)
        if not await self.store.delete(sandbox, only_if_expired=only_if_expired):
            return False  # another replica used it lately: its data stays for that replica
        await sandbox.notify(sandbox.release_listeners, "release")
        self._released[sandbox.id] = reason
        while len(self._released) > 10_000:
            self._released.pop(next(iter(self._released)))
        try:
            await sandbox.redis.restore()
            await sandbox.redis.delete_namespace()
        except REDIS_ERRORS:
            logger.warning("could not delete Redis keys of released sandbox %s", sandbox.id)
        return True

    async def release_idle(self, *, idle_seconds: Optional[float] = None) -> list[str]:
        """Delete every unheld sandbox unused for longer than the idle limit; returns their ids."""
        limit = self.settings.sandbox_idle_seconds if idle_seconds is None else idle_seconds
        now = time.monotonic()
        released = []
        async with self._lock:
            for sandbox in list(self._sandboxes.values()):
                if not sandbox.holders and not sandbox.operations_in_flight and now - sandbox.last_used > limit:
                    reason = f"it was idle for more than {limit / 60:g} minutes"
                    if await self._delete(sandbox, reason, only_if_expired=idle_seconds is None):
                        released.append(sandbox.id)
        return released

    async def reap_abandoned_schemas(self, *, expired_after_seconds: Optional[float] = None) -> list[str]:
        """Drop sandbox schemas nobody used for longer than the idle limit (PostgreSQL); returns them.

        Covers schemas left by a process that died, on this replica or any other. A schema with
        no lease (made before leases existed) is given one now, so it goes one idle period later.
        Replicas reaping at once share the work: FOR UPDATE SKIP LOCKED gives each row to one.
        Each reaped schema's Redis keys (qulab:<id>:) are deleted too.
        """
        if self.backend != "postgresql":
            return []
        if expired_after_seconds is None:
            expired_after_seconds = self.settings.sandbox_idle_seconds + self.lease_renewal_seconds
        async with self._lock:
            await self._start()
            live = [sandbox.location for sandbox in self._sandboxes.values()]
            reaped = await self.store.reap_abandoned_schemas(expired_after_seconds=expired_after_seconds, live=live)
        if reaped:
            logger.info("dropped %d abandoned sandbox schemas: %s", len(reaped), ", ".join(reaped))
        return reaped

    async def close(self, *, delete_data: bool = True) -> None:
        """Stop every sandbox; delete their data too unless told to keep it (PostgreSQL leases then expire)."""
        async with self._lock:
            for sandbox in list(self._sandboxes.values()):
                if delete_data:
                    await self._delete(sandbox, "the server shut down", only_if_expired=False)
                else:
                    await self._sleep(sandbox)
            self._sandboxes.clear()
            self._holder_sandbox.clear()
            await self.store.close()
            self._started = False


async def create_schema(sandbox: Sandbox) -> None:
    """Create the sandbox's tables if they do not exist yet."""
    async with sandbox.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


# =============================================================================================
# 10. Data models and connectivity (codelab sections 1 and 2)
# =============================================================================================

SAMPLE_USERS: tuple[dict[str, Any], ...] = (
    {
        "email": "alex.smith@innovateai.example",
        "name": "Alex Smith",
        "occupation_code": "15-1252.00",
        "education_level": "Master's degree",
        "years_experience": 8.0,
    },
    {
        "email": "jane.doe@innovateai.example",
        "name": "Jane Doe",
        "occupation_code": "15-2051.00",
        "education_level": "Doctorate",
        "years_experience": 5.0,
    },
)


def user_as_row(user: User) -> dict[str, Any]:
    """The user's columns as plain values, for tables on a page."""
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "occupation_code": user.occupation_code,
        "education_level": user.education_level,
        "years_experience": user.years_experience,
        "created_at": user.created_at,
    }


@journaled("user_created")
async def create_user(
    sandbox: Sandbox,
    *,
    email: str,
    name: str,
    occupation_code: Optional[str] = None,
    education_level: Optional[str] = None,
    years_experience: Optional[float] = None,
) -> User:
    """Create one user in the sandbox (section 1's Create User form)."""
    async with get_session(sandbox) as session:
        return await UserRepository(session).create(
            email=email,
            name=name,
            occupation_code=occupation_code,
            education_level=education_level,
            years_experience=years_experience,
        )


async def list_users(sandbox: Sandbox, *, limit: int = 100) -> list[User]:
    """The sandbox's users, newest first."""
    async with get_session(sandbox) as session:
        return await UserRepository(session).list(limit=limit)


async def delete_user(sandbox: Sandbox, *, user_id: str) -> None:
    """Delete a user; their assessments and scores go with them (cascade)."""
    async with get_session(sandbox) as session:
        repository = UserRepository(session)
        await repository.delete(await repository.get(user_id))


async def count_rows(sandbox: Sandbox) -> dict[str, int]:
    """Rows per table in the sandbox."""
    async with get_session(sandbox) as session:
        return {
            model.__tablename__: int(await session.scalar(select(func.count()).select_from(model)) or 0)
            for model in MODEL_CLASSES
        }


@journaled("initialized")
async def init_db(sandbox: Sandbox, *, reset: bool = True) -> list[User]:
    """Create the schema; with reset, empty this sandbox and create the sample users.

    The wipe and the inserts share one transaction: another tab of the same learner sees the
    old data or the new, never half of each. Other sandboxes are different files or schemas.
    """
    await create_schema(sandbox)
    if not reset:
        return []
    async with get_session(sandbox) as session:
        for table in tables_emptied_by_initialize():
            await session.execute(delete(table))
        repository = UserRepository(session)
        users = [await repository.create(**sample) for sample in SAMPLE_USERS]
    await _after_reset(sandbox)
    return users


async def reset_sandbox(sandbox: Sandbox) -> dict[str, int]:
    """Empty this sandbox (every row, its Redis keys) and keep its id: the sidebar's Reset my sandbox."""
    await create_schema(sandbox)
    async with get_session(sandbox) as session:
        await _delete_every_row(session)
    await _after_reset(sandbox)
    return await count_rows(sandbox)


async def _delete_every_row(session: AsyncSession) -> None:
    for table in reversed(Base.metadata.sorted_tables):
        await session.execute(delete(table))


async def _after_reset(sandbox: Sandbox) -> None:
    for listener in list(sandbox.reset_listeners):
        await listener(sandbox)
    try:
        await sandbox.redis.delete_namespace()
        sandbox.redis.health.record_success()
    except REDIS_ERRORS as error:
        sandbox.redis.health.record_failure(error)


@dataclass(frozen=True)
class EngineReport:
    """What the Connectivity page shows about the sandbox's engine and pool."""

    backend: str
    url: str
    location: str
    pool: dict[str, Any]
    configured_pool_size: int
    configured_max_overflow: int
    pool_timeout_seconds: float
    pool_pre_ping: bool


async def describe_engine(sandbox: Sandbox) -> EngineReport:
    """The engine URL (password hidden), pool class and live pool counters of this sandbox."""
    engine = sandbox.engine
    pool = pool_status(engine)
    return EngineReport(
        backend=sandbox.backend,
        url=mask_url(engine.url),
        location=sandbox.location,
        pool=pool,
        configured_pool_size=int(pool.get("size", 0)),
        configured_max_overflow=max(0, engine_connection_limit(engine) - int(pool.get("size", 0))),
        pool_timeout_seconds=float(pool.get("timeout_seconds", sandbox.settings.pool_timeout_seconds)),
        pool_pre_ping=engine_pre_pings(engine),
    )


@dataclass(frozen=True)
class PoolTrial:
    """One run of the pooling experiment: R queries, C at a time, through one kind of pool."""

    label: str
    pool_class: str
    requests: int
    concurrency: int
    seconds: float
    connections_opened: int
    latencies_ms: tuple[float, ...]
    waited_seconds: float = 0.0  # waiting for the connection budget and other learners' experiments
    capped_by_budget: bool = False  # C and P were lowered to what the budget can ever grant

    @property
    def throughput(self) -> float:
        """Requests per second: Θ = requests ÷ total time."""
        return self.requests / self.seconds if self.seconds > 0 else float("inf")

    @property
    def median_latency_ms(self) -> float:
        """The median time one request took, waiting for a connection included."""
        return statistics.median(self.latencies_ms)


MAX_POOL_EXPERIMENT_REQUESTS = 2000
MAX_POOL_EXPERIMENT_CONCURRENCY = 50


def milliseconds_text(value: Optional[float]) -> str:
    """A time in ms as a table shows it: two decimals below 10 ms, one above ('7.41', '47.0'); 'n/a' if none."""
    if value is None:
        return "n/a"
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}"


def pool_trial_row(trial: PoolTrial) -> dict[str, str]:
    """One row of the pool experiment's table, as text (a table would pad floats to four decimals)."""
    return {
        "pool": trial.label,
        "requests": f"{trial.requests:,}",
        "in flight": f"{trial.concurrency:,}",
        "seconds": f"{trial.seconds:,.3f}",
        "throughput (req/s)": f"{trial.throughput:,.0f}",
        "median latency (ms)": milliseconds_text(trial.median_latency_ms),
        "connections opened": f"{trial.connections_opened:,}",
    }


@journaled("pool_experiment")
async def run_pool_experiment(
    sandbox: Sandbox, *, requests: int = 200, concurrency: int = 20, pool_size: int = 5
) -> list[PoolTrial]:
    """Time the same R queries, C in flight at once, through a pool of P connections and through NullPool.

    Each trial uses a fresh engine on this sandbox's database (so it never starves the pages'
    own pool); the pooled engine is warmed with P connections first, as a running app's is.
    Both engines draw from the process's connection budget: when other learners' experiments
    hold it, this one waits its turn instead of failing with "too many clients".
    """
    for label, value, upper in (
        ("Requests", requests, MAX_POOL_EXPERIMENT_REQUESTS),
        ("Concurrency", concurrency, MAX_POOL_EXPERIMENT_CONCURRENCY),
        ("Pool size", pool_size, MAX_POOL_EXPERIMENT_CONCURRENCY),
    ):
        validate_whole_number(value, label=label, low=1, high=upper)
    budget = sandbox.connection_budget or ConnectionBudget(MAX_POOL_EXPERIMENT_CONCURRENCY)
    granted = min(max(pool_size, concurrency), budget.most_one_reservation_gets)
    capped = granted < max(pool_size, concurrency)
    concurrency, pool_size = min(concurrency, granted), min(pool_size, granted)
    translate = sandbox.engine.get_execution_options().get("schema_translate_map")
    async with budget.reserve(granted, timeout_seconds=3 * sandbox.settings.pool_timeout_seconds) as waited:
        # Thousands of queries are seconds of CPU: on the shared loop, or even a thread of their
        # own, they would stall every other learner's click. They run in the experiment process.
        trials, queued = await run_experiment_elsewhere(
            _run_pool_trials, url=sandbox.engine.url, settings=sandbox.settings, translate=translate,
            requests=requests, concurrency=concurrency, pool_size=pool_size,
        )  # fmt: skip
    return [replace(trial, waited_seconds=waited + queued, capped_by_budget=capped) for trial in trials]


async def _run_pool_trials(
    url: URL, settings: Settings, *, translate: Optional[dict[Any, Any]], requests: int, concurrency: int, pool_size: int
) -> list[PoolTrial]:
    trials = []
    for label, overrides in (
        (f"QueuePool (pool_size={pool_size})", {"pool_size": pool_size, "max_overflow": 0}),
        ("NullPool (no pooling)", {"poolclass": NullPool}),
    ):
        engine = create_engine_for(url, settings, pool_pre_ping=False, pool_timeout=60, **overrides)
        try:
            trials.append(
                await _time_queries(
                    engine, label, translate=translate, requests=requests, concurrency=concurrency, warm=pool_size
                )
            )
        finally:
            await engine.dispose()
    return trials


async def _time_queries(
    base_engine: AsyncEngine,
    label: str,
    *,
    translate: Optional[dict[Any, Any]],
    requests: int,
    concurrency: int,
    warm: int,
) -> PoolTrial:
    opened = 0

    def count_connection(dbapi_connection: Any, connection_record: Any) -> None:
        nonlocal opened
        opened += 1

    event.listen(base_engine.sync_engine, "connect", count_connection)
    engine = base_engine.execution_options(schema_translate_map=translate) if translate else base_engine
    query = select(func.count()).select_from(User)

    async def one_query() -> float:
        started = time.perf_counter()
        async with engine.connect() as connection:
            await connection.execute(query)
        return (time.perf_counter() - started) * 1000

    if not isinstance(engine.pool, NullPool):
        await asyncio.gather(*(one_query() for _ in range(warm)))
    opened = 0
    semaphore = asyncio.Semaphore(concurrency)

    async def limited() -> float:
        async with semaphore:
            return await one_query()

    started = time.perf_counter()
    latencies = await asyncio.gather(*(limited() for _ in range(requests)))
    seconds = time.perf_counter() - started
    return PoolTrial(label, type(engine.pool).__name__, requests, concurrency, seconds, opened, tuple(latencies))


# =============================================================================================
# 11. N+1 and eager loading (codelab section 3)
# =============================================================================================

SAMPLE_SCORES_PER_CLICK = 3
MAX_SAMPLE_SCORES_PER_CALL = 50
SAMPLE_OCCUPATION_CODE = "15-1252.00"  # used when the user has no occupation code of their own
SAMPLE_PARAMETER_VERSION = "irt-2024.1"
NAIVE_STATEMENT_FORMULA = "1 + 1 + N"  # the user, the ids of their scores, then one per score
EAGER_STATEMENT_FORMULA = "1 + 1"  # the user, then all their scores in one IN query


def _whole_number(value: Any, *, label: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"{label} must be a whole number from {low:,} to {high:,}.", field=label.lower())
    return value


def _sample_score_values(rng: random.Random) -> dict[str, Any]:
    # Every score within 0-100 and ci_lower <= air_score <= ci_upper, as AIRScoreRepository requires.
    air_score = round(rng.uniform(40.0, 95.0), 1)
    half_width = round(rng.uniform(2.0, 6.0), 1)

    def near_air_score(spread: float) -> float:
        return round(min(100.0, max(0.0, air_score + rng.uniform(-spread, spread))), 1)

    return {
        "air_score": air_score,
        "vr_score": near_air_score(12.0),
        "hr_score": near_air_score(12.0),
        "synergy_score": near_air_score(8.0),
        "ci_lower": round(max(0.0, air_score - half_width), 1),
        "ci_upper": round(min(100.0, air_score + half_width), 1),
        "parameter_version": SAMPLE_PARAMETER_VERSION,
    }


def score_as_row(score: AIRScore) -> dict[str, Any]:
    """The score's columns as plain values, for tables on a page."""
    return {
        "id": score.id,
        "air_score": score.air_score,
        "vr_score": score.vr_score,
        "hr_score": score.hr_score,
        "synergy_score": score.synergy_score,
        "ci_lower": score.ci_lower,
        "ci_upper": score.ci_upper,
        "occupation_code": score.occupation_code,
        "parameter_version": score.parameter_version,
        "created_at": score.created_at,
    }


@journaled("sample_scores_added")
async def add_sample_scores(sandbox: Sandbox, *, user_id: str, count: int = SAMPLE_SCORES_PER_CLICK) -> list[AIRScore]:
    """Add `count` valid sample scores for an existing user in one transaction; an unknown user writes nothing."""
    _whole_number(count, label="Scores to add", low=1, high=MAX_SAMPLE_SCORES_PER_CALL)
    rng = random.Random()
    async with get_session(sandbox) as session:
        user = await UserRepository(session).get(user_id)
        scores = AIRScoreRepository(session)
        return [
            await scores.create(
                user_id=user.id,
                occupation_code=user.occupation_code or SAMPLE_OCCUPATION_CODE,
                calculation_metadata={"source": "codelab section 3 sample"},
                **_sample_score_values(rng),
            )
            for _ in range(count)
        ]


@dataclass
class Measurement:
    """The statements one block of code ran and the wall-clock time it took."""

    statements: StatementLog
    elapsed_ms: float = 0.0


@contextmanager
def measure() -> Iterator[Measurement]:
    """Record every statement the block runs (this task only) and time the whole block."""
    with capture_statements() as log:
        measurement = Measurement(log)
        started = time.perf_counter()
        try:
            yield measurement
        finally:
            measurement.elapsed_ms = (time.perf_counter() - started) * 1000


@dataclass(frozen=True)
class UserScoresFetch:
    """One user read with their scores: the rows, every statement that ran, and how long it took."""

    path: str  # "naive" or "eager"
    user: User
    scores: list[AIRScore]
    statements: StatementLog
    elapsed_ms: float

    @property
    def formula(self) -> str:
        """How many statements this path needs, with this fetch's N."""
        if self.path == "naive":
            return f"{NAIVE_STATEMENT_FORMULA} with N = {len(self.scores)}"
        return f"{EAGER_STATEMENT_FORMULA}, whatever N is (here N = {len(self.scores)})"

    def sql_listing(self) -> str:
        """Every statement in order, each with its time and parameters, as one SQL text."""
        return "\n\n".join(
            f"-- statement {number}: {statement.duration_ms:.2f} ms, parameters {statement.parameters}\n{statement.sql}"
            for number, statement in enumerate(self.statements.statements, start=1)
        )


@journaled("user_and_scores_fetched")
async def fetch_user_and_scores_naive(sandbox: Sandbox, *, user_id: str) -> UserScoresFetch:
    """The N+1 path: the user (1), the ids of their scores (1), then each score by its id (N).

    It runs in a fresh session on purpose: session.get() answers from the identity map without
    any SQL when the object is already loaded, which would hide the very round trips shown here.
    """
    with measure() as measurement:
        async with get_session(sandbox) as session:
            user = await UserRepository(session).get(user_id)
            score_repository = AIRScoreRepository(session)
            score_ids = await score_repository.list_ids_for_user(user.id)
            scores = [await score_repository.get(score_id) for score_id in score_ids]
    return UserScoresFetch("naive", user, scores, measurement.statements, measurement.elapsed_ms)


@journaled("user_and_scores_fetched")
async def fetch_user_and_scores_eager(sandbox: Sandbox, *, user_id: str) -> UserScoresFetch:
    """The eager path: UserRepository.get_user_with_scores_eager, 2 statements however many scores there are."""
    with measure() as measurement:
        async with get_session(sandbox) as session:
            user = await UserRepository(session).get_user_with_scores_eager(user_id)
            scores = sorted(user.scores, key=lambda score: (score.created_at, score.id))
    return UserScoresFetch("eager", user, scores, measurement.statements, measurement.elapsed_ms)


async def list_users_with_score_counts(sandbox: Sandbox, *, limit: int = 50) -> list[dict[str, Any]]:
    """The sandbox's own users (scale-up users left out) with how many scores each has, oldest first."""
    validate_whole_number(limit, label="Limit", low=0, high=MAX_ROWS_PER_PAGE)
    score_count = (
        select(func.count(AIRScore.id)).where(AIRScore.user_id == User.id).correlate(User).scalar_subquery()
    )
    statement = (
        select(User.id, User.name, User.email, score_count.label("scores"))
        .where(~_is_scale_up_user())
        .order_by(User.created_at, User.id)
        .limit(limit)
    )
    async with get_session(sandbox) as session:
        return [dict(row._mapping) for row in await session.execute(statement)]


# The scale-up experiment: N users with a few scores each, loaded with each strategy.
# Its users are named "Scale-up user #0001", ...: validate_name refuses '#', so no user created
# through a form can look like one, and the experiment never counts the learner's own users.
SCALE_UP_NAME_PREFIX = "Scale-up user #"
SCALE_UP_EMAIL_DOMAIN = "n-plus-one.qulab.example"
SCALE_UP_SCORES_PER_USER = 5
MAX_SCALE_UP_USERS = 1000
SCALE_UP_USERS_PER_CHUNK = 200
SCALE_UP_SIZES = (10, 50, 100, 250, 500, 1000)
COMPARISON_REPEATS = 3
LOADING_STRATEGIES: dict[str, Optional[Callable[..., Any]]] = {
    "lazy": None,  # no loader option: each `await user.awaitable_attrs.scores` runs its own SELECT
    "selectinload": selectinload,
    "joinedload": joinedload,
    "subqueryload": subqueryload,
}


def _is_scale_up_user() -> Any:
    return User.name.startswith(SCALE_UP_NAME_PREFIX)


async def count_scale_up_users(sandbox: Sandbox) -> int:
    """How many scale-up users the sandbox holds."""
    async with get_session(sandbox) as session:
        return await _count_scale_up_users(session)


async def _count_scale_up_users(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(User).where(_is_scale_up_user())) or 0)


async def grow_scale_up_users(
    sandbox: Sandbox,
    *,
    target_users: int,
    scores_per_user: int = SCALE_UP_SCORES_PER_USER,
    max_new_users: int = SCALE_UP_USERS_PER_CHUNK,
) -> int:
    """Add scale-up users, each with `scores_per_user` valid scores, until `target_users` exist; returns how many exist.

    Adds at most `max_new_users` per call, so a page can move a progress bar between calls.
    Two bulk INSERTs per call (users, then scores) keep a thousand users to well under a second.
    """
    _whole_number(target_users, label="Users", low=1, high=MAX_SCALE_UP_USERS)
    _whole_number(scores_per_user, label="Scores per user", low=0, high=20)
    _whole_number(max_new_users, label="Users per call", low=1, high=MAX_SCALE_UP_USERS)
    rng = random.Random()
    # One grower at a time per sandbox, so numbering stays consecutive when a page reruns mid-way.
    async with sandbox.service("scale_up_lock", lambda _: asyncio.Lock()):
        async with get_session(sandbox) as session:
            existing = await _count_scale_up_users(session)
            numbers = range(existing + 1, min(target_users, existing + max_new_users) + 1)
            if not numbers:
                return existing
            users = [
                {
                    "id": _new_id(),
                    "email": f"scale-up-{number:04d}-{uuid.uuid4().hex[:8]}@{SCALE_UP_EMAIL_DOMAIN}",
                    "name": f"{SCALE_UP_NAME_PREFIX}{number:04d}",
                    "occupation_code": SAMPLE_OCCUPATION_CODE,
                }
                for number in numbers
            ]
            scores = [
                {
                    "user_id": user["id"],
                    "occupation_code": SAMPLE_OCCUPATION_CODE,
                    "calculation_metadata": {"source": "codelab section 3 scale-up"},
                    **_sample_score_values(rng),
                }
                for user in users
                for _ in range(scores_per_user)
            ]
            await session.execute(insert(User), users)
            if scores:
                await session.execute(insert(AIRScore), scores)
        return existing + len(users)


async def remove_scale_up_users(sandbox: Sandbox) -> int:
    """Delete every scale-up user (their scores go with them, ON DELETE CASCADE); returns how many."""
    async with get_session(sandbox) as session:
        result = await session.execute(delete(User).where(_is_scale_up_user()))
        return int(result.rowcount or 0)


@dataclass(frozen=True)
class StrategyRun:
    """One loading strategy at one N: the statements it ran, its times, and a digest of what it loaded."""

    strategy: str
    users: int
    scores: int
    statements: int
    statement_sql: tuple[tuple[str, int], ...]  # each distinct SQL text, with how many times it ran
    times_ms: tuple[float, ...]
    results_digest: str  # equal digests: the same users with the same scores

    @property
    def median_ms(self) -> float:
        """The median of the timed runs."""
        return statistics.median(self.times_ms)

    def sql_listing(self, *, max_characters: int = 700) -> str:
        """Each distinct SQL text once, with how many times it was sent (long IN lists cut short)."""
        return "\n\n".join(
            f"-- sent {times:,}×\n{sql[:max_characters]}{' …' if len(sql) > max_characters else ''}"
            for sql, times in self.statement_sql
        )


async def load_scale_up_users(sandbox: Sandbox | ExperimentDatabase, *, strategy: str, users: int) -> StrategyRun:
    """Load the first `users` scale-up users and all their scores with one strategy, in a fresh session."""
    if strategy not in LOADING_STRATEGIES:
        raise ValidationError(f"Unknown loading strategy; choose one of: {', '.join(LOADING_STRATEGIES)}.")
    _whole_number(users, label="Users", low=1, high=MAX_SCALE_UP_USERS)
    statement = select(User).where(_is_scale_up_user()).order_by(User.name, User.id).limit(users)
    loader = LOADING_STRATEGIES[strategy]
    with measure() as measurement:
        async with sandbox.session_factory() as session:  # it only reads: nothing to commit
            if loader is None:
                parents = (await session.scalars(statement)).all()
                loaded = [(user, await user.awaitable_attrs.scores) for user in parents]  # one SELECT each
            else:
                # unique(): a joined collection returns each user once per score; it folds them back.
                parents = (await session.scalars(statement.options(loader(User.scores)))).unique().all()
                loaded = [(user, user.scores) for user in parents]
    if len(loaded) < users:
        raise ValidationError(
            f"Only {len(loaded):,} scale-up users exist; create {users:,} before loading them.", field="users"
        )
    canonical = [[user.id, sorted(score.id for score in scores)] for user, scores in loaded]
    statement_counts: dict[str, int] = {}
    for sql in measurement.statements.sql():
        statement_counts[sql] = statement_counts.get(sql, 0) + 1
    return StrategyRun(
        strategy=strategy,
        users=len(loaded),
        scores=sum(len(scores) for _, scores in loaded),
        statements=measurement.statements.count,
        statement_sql=tuple(statement_counts.items()),
        times_ms=(measurement.elapsed_ms,),
        results_digest=hashlib.sha256(json.dumps(canonical).encode()).hexdigest(),
    )


@dataclass(frozen=True)
class StrategyComparison:
    """Every strategy at every N, measured in one run."""

    runs: tuple[StrategyRun, ...]
    repeats: int
    waited_seconds: float = 0.0  # in line behind other learners' experiments before it started

    def at(self, users: int) -> dict[str, StrategyRun]:
        """The runs at one N, by strategy."""
        return {run.strategy: run for run in self.runs if run.users == users}

    @property
    def identical_results(self) -> bool:
        """True when, at each N, every strategy loaded exactly the same users and scores."""
        return all(len({run.results_digest for run in self.at(size).values()}) == 1 for size in self.sizes)

    @property
    def sizes(self) -> list[int]:
        """The N values compared, smallest first."""
        return sorted({run.users for run in self.runs})

    def rows(self) -> list[dict[str, Any]]:
        """One row per strategy and N: statements, scores, median time and its ratio to selectinload."""
        return [
            {
                "N (users)": run.users,
                "strategy": run.strategy,
                "statements": run.statements,
                "scores loaded": run.scores,
                "median ms": run.median_ms,
                "÷ selectinload": run.median_ms / self.at(run.users)["selectinload"].median_ms,
                "all runs (ms)": ", ".join(f"{time_ms:.1f}" for time_ms in run.times_ms),
            }
            for run in self.runs
        ]


@journaled("loading_strategies_compared")
async def compare_loading_strategies(
    sandbox: Sandbox, *, sizes: Sequence[int], repeats: int = COMPARISON_REPEATS
) -> StrategyComparison:
    """Time every strategy at every N (see _time_strategies), in the experiment process.

    Loading a thousand users four ways builds tens of thousands of ORM objects: seconds of CPU
    that would stall every other learner's click if they ran in the app's process. The experiment
    process runs them on its own engine on this sandbox's database, one learner at a time.
    """
    chosen = sorted({_whole_number(size, label="Users", low=1, high=MAX_SCALE_UP_USERS) for size in sizes})
    if not chosen:
        raise ValidationError("Choose at least one number of users to compare.", field="users")
    _whole_number(repeats, label="Repeats", low=1, high=20)
    budget = sandbox.connection_budget or ConnectionBudget(1)
    translate = sandbox.engine.get_execution_options().get("schema_translate_map")
    async with budget.reserve(1, timeout_seconds=3 * sandbox.settings.pool_timeout_seconds) as waited:
        comparison, queued = await run_experiment_elsewhere(
            _time_strategies_on, url=sandbox.engine.url, settings=sandbox.settings, translate=translate,
            sizes=chosen, repeats=repeats,
        )  # fmt: skip
    return replace(comparison, waited_seconds=waited + queued)


async def _time_strategies(database: ExperimentDatabase, *, sizes: list[int], repeats: int) -> StrategyComparison:
    """One untimed warm-up per strategy, then `repeats` rounds at each N, the median kept.

    Rounds go strategy by strategy in turn, so a moment of machine noise hits all of them alike.
    """
    for strategy in LOADING_STRATEGIES:  # compile and cache each statement before any timing
        await load_scale_up_users(database, strategy=strategy, users=sizes[0])
    runs = []
    for size in sizes:
        rounds = [
            [await load_scale_up_users(database, strategy=strategy, users=size) for strategy in LOADING_STRATEGIES]
            for _ in range(repeats)
        ]
        for attempts in zip(*rounds):
            runs.append(replace(attempts[-1], times_ms=tuple(attempt.times_ms[0] for attempt in attempts)))
    return StrategyComparison(tuple(runs), repeats)


async def scale_up_and_compare(
    sandbox: Sandbox, *, sizes: Sequence[int], repeats: int = COMPARISON_REPEATS
) -> StrategyComparison:
    """Section 3's Compare button: create the scale-up users still missing, then compare the strategies."""
    target = max((size for size in sizes if isinstance(size, int)), default=0)
    if 0 < target <= MAX_SCALE_UP_USERS:
        while await grow_scale_up_users(sandbox, target_users=target) < target:
            pass  # each call adds one chunk, in its own short transaction
    return await compare_loading_strategies(sandbox, sizes=sizes, repeats=repeats)


# =============================================================================================
# 12. Cache (codelab section 4)
# =============================================================================================
# The lesson is ReadThroughCache.read: GET; on a miss, read the database and SET … EX. Every
# commit (get_session) calls invalidate_cached_changes. What keeps it right under faults and
# across replicas is in qulab_redis/ (coherence, single flight, tracing, breaker).

CACHE_TTL_SECONDS = 300
CACHE_TTL_JITTER = 0.10  # each key lives TTL ± 10 %, so keys written together do not expire together
CACHE_HIT, CACHE_MISS, CACHE_FALLBACK = "HIT", "MISS", "FALLBACK"  # FALLBACK: Redis failed, database answered
CACHE_DEMO_EMAIL = "cache.demo@innovateai.example"
MAX_CACHE_EXPERIMENT_READS = 1000
MAX_CACHE_EXPERIMENT_RATIOS = 11


def cache_ttl_bounds() -> tuple[int, int]:
    """The shortest and longest TTL (seconds) a cached value can get."""
    spread = round(CACHE_TTL_SECONDS * CACHE_TTL_JITTER)
    return CACHE_TTL_SECONDS - spread, CACHE_TTL_SECONDS + spread


RedisCommand = qulab_redis.RedisCommand  # one command as sent, its reply and its round-trip time
CacheInvalidation = qulab_redis.CacheInvalidation  # keys dropped after a write, and whether Redis took them


@dataclass
class CacheMetrics:
    """Counters and measured times of cache reads; H and T_avg are derived from them."""

    hits: int = 0
    misses: int = 0
    errors: int = 0  # reads Redis could not answer; the database answered them
    lookups: int = 0  # GETs that Redis answered (hits and misses)
    lookup_ms_total: float = 0.0
    database_reads: int = 0  # reads that really went to the database (single-flight waiters excluded)
    database_ms_total: float = 0.0
    request_ms_total: float = 0.0

    @property
    def requests(self) -> int:
        """Every read answered: hits + misses + errors."""
        return self.hits + self.misses + self.errors

    @property
    def hit_ratio(self) -> Optional[float]:
        """H = hits ÷ requests."""
        return self.hits / self.requests if self.requests else None

    @property
    def mean_cache_ms(self) -> Optional[float]:
        """T_cache: the mean time of a Redis lookup (GET and JSON decoding)."""
        return self.lookup_ms_total / self.lookups if self.lookups else None

    @property
    def mean_database_ms(self) -> Optional[float]:
        """T_db: the mean time of a database read (new session, query, conversion)."""
        return self.database_ms_total / self.database_reads if self.database_reads else None

    @property
    def predicted_average_ms(self) -> Optional[float]:
        """T_avg by the formula H·T_cache + (1−H)·(T_cache + T_db), from the measured means."""
        hit_ratio, cache_ms, database_ms = self.hit_ratio, self.mean_cache_ms, self.mean_database_ms
        if hit_ratio is None or cache_ms is None or (database_ms is None and hit_ratio < 1):
            return None
        return hit_ratio * cache_ms + (1 - hit_ratio) * (cache_ms + (database_ms or 0.0))

    @property
    def measured_average_ms(self) -> Optional[float]:
        """T_avg as measured: total time of every read ÷ requests (includes the SETs the formula leaves out)."""
        return self.request_ms_total / self.requests if self.requests else None

    def record(self, read: "CacheRead") -> None:
        """Count one answered read and add its measured times."""
        if read.outcome == CACHE_HIT:
            self.hits += 1
        elif read.outcome == CACHE_MISS:
            self.misses += 1
        else:
            self.errors += 1
        if read.lookup_ms is not None:
            self.lookups += 1
            self.lookup_ms_total += read.lookup_ms
        if read.database_ms is not None:
            self.database_reads += 1
            self.database_ms_total += read.database_ms
        self.request_ms_total += read.total_ms


@dataclass(slots=True)  # made on every read: slots, not frozen, keeps that cheap (frozen costs 4x)
class CacheRead:
    """One read through the cache: what it returned, whether Redis had it, and what it cost."""

    kind: str  # "user" or "latest_airscore"
    user_id: str
    key: str
    outcome: str  # CACHE_HIT, CACHE_MISS or CACHE_FALLBACK
    value: Optional[dict[str, Any]]  # the same JSON-shaped dict whether it came from Redis or the database
    total_ms: float
    lookup_ms: Optional[float]  # GET + decoding; None when Redis failed
    database_ms: Optional[float]  # None on a hit, and when another read's database answer was shared
    database_statements: int
    shared_database_read: bool  # waited for the same key's database read already in flight (single flight)
    redis_commands: tuple[RedisCommand, ...]
    note: str = ""


@dataclass(slots=True)
class DatabaseAnswer:
    """What a miss got from the database, and what that cost (None and 0 when another read's answer was shared)."""

    value: Any
    milliseconds: Optional[float]
    statements: int


class ReadThroughCache:
    """The read-through pattern: GET the key; on a miss, read the database, answer, and SET it with a TTL.

    The steps are the lesson; how each survives faults lives in qulab_redis: `coherence` checks
    every GET and SET against the sandbox's epoch and fence (no stale value after any write, in
    any process), `flights` makes concurrent misses share one database read, and every command
    goes through the sandbox's RedisLink (a timeout, and a breaker that skips a hung Redis).
    """

    def __init__(self, link: RedisLink, coherence: qulab_redis.CacheCoherence) -> None:
        self.link = link
        self.coherence = coherence
        self.flights = qulab_redis.SingleFlight()

    async def read(self, key: str, load: Callable[[], Awaitable[Any]], *, kind: str, user_id: str) -> CacheRead:
        """The value under key: from Redis on a hit, else from load() (the database), then stored."""
        trace, started = qulab_redis.CommandTrace(self.link), time.perf_counter()
        ticket = self.flights.ticket()
        try:
            cached = await self.coherence.get(key, trace)  # 1. GET: does Redis have it?
            lookup_ms: Optional[float] = (time.perf_counter() - started) * 1000
        except REDIS_ERRORS as error:  # Redis failed or is skipped: the database answers, nothing is stored
            answer = await self._from_database(key, ticket, load)
            self.flights.landed(key)
            outcome, lookup_ms = CACHE_FALLBACK, None
            note = f"Redis failed ({type(error).__name__}); the database answered and nothing was stored."
        else:
            if cached.found:  # 2a. hit: answer from memory
                answer, outcome, note = DatabaseAnswer(cached.value, None, 0), CACHE_HIT, ""
            else:  # 2b. miss: read the database ...
                answer, outcome = await self._from_database(key, ticket, load, since=cached), CACHE_MISS
                try:  # 3. ... and keep a copy for the next reader: SET key value EX ttl
                    ttl = random.randint(*cache_ttl_bounds())
                    note = await self.coherence.set(key, answer.value, ttl=ttl, since=cached, trace=trace)
                finally:
                    self.flights.landed(key)
        shared = outcome != CACHE_HIT and answer.milliseconds is None
        if shared:
            note = "Another read of this key went to the database; this one shared its answer."
        return CacheRead(
            kind=kind,
            user_id=user_id,
            key=key,
            outcome=outcome,
            value=answer.value,
            total_ms=(time.perf_counter() - started) * 1000,
            lookup_ms=lookup_ms,
            database_ms=answer.milliseconds,
            database_statements=answer.statements,
            shared_database_read=shared,
            redis_commands=tuple(trace.commands),
            note=note,
        )

    async def _from_database(
        self, key: str, ticket: int, load: Callable[[], Awaitable[Any]], *, since: Optional[Any] = None
    ) -> DatabaseAnswer:
        async def timed_load() -> DatabaseAnswer:
            with capture_statements() as log:
                load_started = time.perf_counter()
                value = await load()
            return DatabaseAnswer(value, (time.perf_counter() - load_started) * 1000, log.count)

        generation = since.generation if since is not None else self.coherence.generation
        answer, shared = await self.flights.load(key, generation=generation, ticket=ticket, load=timed_load)
        return DatabaseAnswer(answer.value, None, 0) if shared else answer


def _user_as_json(user: User) -> dict[str, Any]:
    return {**user_as_row(user), "created_at": user.created_at.isoformat(), "updated_at": user.updated_at.isoformat()}


def _airscore_as_json(score: AIRScore) -> dict[str, Any]:
    return {
        **score_as_row(score),
        "user_id": score.user_id,
        "calculation_metadata": score.calculation_metadata,
        "created_at": score.created_at.isoformat(),
    }


def user_cache_key(sandbox: Sandbox, user_id: str) -> str:
    """The key of a user's cached profile."""
    return sandbox.redis.key("cache", "user", user_id)


def latest_airscore_cache_key(sandbox: Sandbox, user_id: str) -> str:
    """The key of a user's cached latest AIRScore (a JSON null when they have none)."""
    return sandbox.redis.key("cache", "user", user_id, "latest-airscore")


class CachedUserRepository:
    """User profiles and latest AIRScores, read through the cache (what the page's buttons call)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.cache = ReadThroughCache(sandbox.redis, cache_coherence(sandbox))
        self.metrics = CacheMetrics()
        sandbox.reset_listeners.append(self._forget_everything)

    def user_key(self, user_id: str) -> str:
        """The key of a user's cached profile."""
        return user_cache_key(self.sandbox, user_id)

    def latest_airscore_key(self, user_id: str) -> str:
        """The key of a user's cached latest AIRScore."""
        return latest_airscore_cache_key(self.sandbox, user_id)

    async def get_user(self, *, user_id: str, metrics: Optional[CacheMetrics] = None) -> CacheRead:
        """The user's profile, from Redis when cached; an unknown id raises UserNotFoundError."""
        user_id = parse_entity_id(user_id)
        read = await self.cache.read(self.user_key(user_id), lambda: self._load_user(user_id), kind="user", user_id=user_id)
        (metrics or self.metrics).record(read)
        return read

    async def get_latest_airscore(self, *, user_id: str, metrics: Optional[CacheMetrics] = None) -> CacheRead:
        """The user's most recent AIRScore (value None when they have none), from Redis when cached."""
        user_id = parse_entity_id(user_id)
        key = self.latest_airscore_key(user_id)
        read = await self.cache.read(key, lambda: self._load_latest_airscore(user_id), kind="latest_airscore", user_id=user_id)
        (metrics or self.metrics).record(read)
        return read

    async def _load_user(self, user_id: str) -> dict[str, Any]:
        async with self.sandbox.session_factory() as session:
            return _user_as_json(await UserRepository(session).get(user_id))

    async def _load_latest_airscore(self, user_id: str) -> Optional[dict[str, Any]]:
        async with self.sandbox.session_factory() as session:
            score = await AIRScoreRepository(session).latest_for_user(user_id)
            if score is None:
                await UserRepository(session).require(user_id)  # no score, or no such user?
                return None
            return _airscore_as_json(score)

    async def invalidate_user(self, *, user_id: str, reason: str = "requested") -> CacheInvalidation:
        """Delete the user's cached profile and latest AIRScore."""
        user_id = parse_entity_id(user_id)
        return await self.invalidate_keys([self.user_key(user_id), self.latest_airscore_key(user_id)], reason=reason)

    async def invalidate_keys(self, keys: list[str], *, reason: str, remember: bool = True) -> CacheInvalidation:
        """Delete these keys now (or, Redis failing, settle before the next read); misses in flight won't store them."""
        return await self.cache.coherence.invalidate(keys, reason=reason, remember=remember)

    @property
    def pending_invalidations(self) -> int:
        """Writes whose invalidation Redis has not taken yet (a new epoch settles them before the next read)."""
        return self.cache.coherence.pending_writes

    @property
    def recent_invalidations(self) -> Sequence[CacheInvalidation]:
        """The last invalidations of this sandbox, newest first."""
        return self.cache.coherence.recent_invalidations

    async def _forget_everything(self, sandbox: Sandbox) -> None:
        # The reset's bulk deletes already moved the epoch; start the counters and the history afresh.
        self.metrics = CacheMetrics()
        self.cache.flights.clear()
        self.cache.coherence.forget_history()


def cache_coherence(sandbox: Sandbox) -> qulab_redis.CacheCoherence:
    """The sandbox's epoch, fence and pending invalidations (shared by its cache and its commits)."""

    def create(owner: Sandbox) -> qulab_redis.CacheCoherence:
        coherence = qulab_redis.CacheCoherence(owner.redis)
        owner.release_listeners.append(lambda released: coherence.close())
        owner.dormant_listeners.append(lambda sleeping: coherence.settle_once_and_stop())  # idle costs nothing
        owner.wake_listeners.append(lambda woken: coherence.resume_settling())
        return coherence

    return sandbox.service("cache-coherence", create)


CACHED_TABLES = frozenset({"*", "users", "air_scores"})


def cache_keys_changed_by(sandbox: Sandbox, changes: CommittedChanges) -> list[str]:
    """The cache keys a committed transaction's ORM changes made stale (bulk writes are handled by epoch)."""
    keys: dict[str, None] = {}  # ordered and without repeats
    for user in (*changes.updated, *changes.deleted):
        if isinstance(user, User):
            keys[user_cache_key(sandbox, user.id)] = None
    for user in changes.deleted:
        if isinstance(user, User):
            keys[latest_airscore_cache_key(sandbox, user.id)] = None
    for score in changes.of_type(AIRScore):
        keys[latest_airscore_cache_key(sandbox, score.user_id)] = None
    return list(keys)


async def invalidate_cached_changes(sandbox: Sandbox, changes: CommittedChanges) -> Optional[CacheInvalidation]:
    """Drop what a commit made stale: its changed keys, or (after a bulk write) the whole epoch.

    get_session calls this after every commit, whether or not this process has used the cache:
    another replica may have cached what this one just changed. It never raises: the commit
    stands, and a failed invalidation is settled before the cache is read again.
    """
    keys = cache_keys_changed_by(sandbox, changes)
    bulk = sorted(changes.bulk_tables & CACHED_TABLES)
    if not keys and not bulk:
        return None
    what = sorted({type(obj).__name__ for obj in (*changes.updated, *changes.deleted, *changes.inserted)})
    reason = f"a write committed ({', '.join(what)})" if not bulk else f"a bulk write committed ({', '.join(bulk)})"
    try:
        return await cache_coherence(sandbox).invalidate(keys, reason=reason, everything=bool(bulk))
    except Exception:
        logger.exception("cache invalidation failed in sandbox %s", sandbox.id)
        return None


def cache_for(sandbox: Sandbox) -> CachedUserRepository:
    """The sandbox's cached repository, created on first use."""
    return sandbox.service("cache", CachedUserRepository)


@journaled("cache_read")
async def fetch_user_cached(sandbox: Sandbox, *, user_id: str) -> CacheRead:
    """Read a user's profile through the cache (the Fetch User (Cached) button)."""
    return await cache_for(sandbox).get_user(user_id=user_id)


@journaled("cache_read")
async def fetch_latest_airscore_cached(sandbox: Sandbox, *, user_id: str) -> CacheRead:
    """Read a user's latest AIRScore through the cache (the Fetch Latest AIRScore (Cached) button)."""
    return await cache_for(sandbox).get_latest_airscore(user_id=user_id)


@journaled("cache_invalidated")
async def invalidate_user_cache(sandbox: Sandbox, *, user_id: str) -> CacheInvalidation:
    """Delete a user's cached entries (the Invalidate Cache for this User button)."""
    return await cache_for(sandbox).invalidate_user(user_id=user_id, reason="requested on the page")


@dataclass(frozen=True)
class CacheStatus:
    """What the cache page shows besides reads: metrics, Redis mode, breaker and health, recent invalidations."""

    metrics: CacheMetrics
    redis_mode: str
    redis_reason: str
    breaker_state: str  # "closed", "open" or "half-open"
    breaker: str  # the breaker's state in one line
    cut_off: bool
    degraded: bool
    last_error: str
    pending_invalidations: int
    recent_invalidations: tuple[CacheInvalidation, ...]


async def cache_status(sandbox: Sandbox) -> CacheStatus:
    """A snapshot of the sandbox's cache metrics and Redis health."""
    cache = cache_for(sandbox)
    link = sandbox.redis
    return CacheStatus(
        metrics=replace(cache.metrics),
        redis_mode=link.service.mode,
        redis_reason=link.service.reason,
        breaker_state=link.breaker.state,
        breaker=link.breaker.describe(),
        cut_off=link.cut_off,
        degraded=link.health.degraded,
        last_error=link.health.last_error,
        pending_invalidations=cache.pending_invalidations,
        recent_invalidations=tuple(cache.recent_invalidations),
    )


async def set_redis_outage(sandbox: Sandbox, *, cut: bool) -> bool:
    """Cut this sandbox off from Redis, or reconnect it; returns whether Redis answers now (and took what it missed)."""
    answers = await sandbox.redis.switch_outage(cut=cut, timeout_seconds=sandbox.redis.service.command_timeout_seconds)
    return answers and await cache_coherence(sandbox).settle_pending()


def cache_metric_rows(metrics: CacheMetrics) -> list[dict[str, str]]:
    """The page's two rows of metrics: counts and H, then the four times."""

    def milliseconds(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.3f} ms"

    hit_ratio = "n/a" if metrics.hit_ratio is None else f"{metrics.hit_ratio:.1%}"
    return [
        {"Hits": str(metrics.hits), "Misses": str(metrics.misses), "Errors": str(metrics.errors), "Hit ratio H": hit_ratio},
        {
            "T_cache (mean)": milliseconds(metrics.mean_cache_ms),
            "T_db (mean)": milliseconds(metrics.mean_database_ms),
            "T_avg predicted": milliseconds(metrics.predicted_average_ms),
            "T_avg measured": milliseconds(metrics.measured_average_ms),
        },
    ]


def invalidation_row(invalidation: CacheInvalidation) -> dict[str, str]:
    """One row of the page's table of recent invalidations."""
    return {
        "why": invalidation.reason,
        "commands": "; ".join(f"{c.command} -> {c.reply}" for c in invalidation.redis_commands),
        "applied": "yes" if invalidation.applied else "no: Redis failed; settled before the next read",
    }


# What the cache page shows under "How this survives faults": each unit on its own, each short.
CACHE_HARDENING: tuple[Any, ...] = (
    invalidate_cached_changes,
    qulab_redis.CacheCoherence.get,
    qulab_redis.CacheCoherence.set,
    qulab_redis.CacheCoherence.invalidate,
    qulab_redis.SingleFlight.load,
    RedisLink._guarded,
    qulab_redis.CircuitBreaker.record_failure,
    qulab_redis.CircuitBreaker._probe_until_closed,
)


@dataclass(frozen=True)
class CacheDemo:
    """The user the cache page reads, their latest AIRScore id, and what was created to have them."""

    user_id: str
    user_name: str
    latest_airscore_id: str
    created: tuple[str, ...]


async def prepare_cache_demo(sandbox: Sandbox) -> CacheDemo:
    """Pick Alex Smith, else Jane Doe, else a Cache Demo User (created), and make sure they have a score."""
    try:
        async with get_session(sandbox) as session:
            users = UserRepository(session)
            user, created = None, []
            for email in (*(sample["email"] for sample in SAMPLE_USERS), CACHE_DEMO_EMAIL):
                user = await users.get_by_email(email)
                if user is not None:
                    break
            if user is None:
                user = await users.create(
                    email=CACHE_DEMO_EMAIL, name="Cache Demo User", occupation_code=SAMPLE_OCCUPATION_CODE
                )
                created.append("user")
            score = await AIRScoreRepository(session).latest_for_user(user.id)
            if score is None:
                score = await _add_sample_airscore(session, user)
                created.append("AIRScore")
    except DuplicateEmailError:  # another tab of this sandbox created the demo user first
        return await prepare_cache_demo(sandbox)
    return CacheDemo(user.id, user.name, score.id, tuple(created))


async def _add_sample_airscore(session: AsyncSession, user: User) -> AIRScore:
    return await AIRScoreRepository(session).create(
        user_id=user.id,
        occupation_code=user.occupation_code or SAMPLE_OCCUPATION_CODE,
        calculation_metadata={"source": "codelab section 4 cache demo"},
        **_sample_score_values(random.Random()),
    )


async def add_demo_airscore(sandbox: Sandbox, *, user_id: str) -> AIRScore:
    """Add a new AIRScore for the user (it becomes their latest; the commit invalidates the cached one)."""
    async with get_session(sandbox) as session:
        return await _add_sample_airscore(session, await UserRepository(session).get(user_id))


async def rename_user(sandbox: Sandbox, *, user_id: str, name: str) -> User:
    """Change a user's name (the commit invalidates their cached profile)."""
    new_name = validate_name(name)
    async with get_session(sandbox) as session:
        user = await UserRepository(session).get(user_id)
        user.name = new_name
    return user


@dataclass(frozen=True)
class CacheTrial:
    """R reads of one user's profile with a planned share of misses, and what they measured."""

    target_hit_ratio: float
    outcomes: tuple[str, ...]
    latencies_ms: tuple[float, ...]
    metrics: CacheMetrics


def cache_trial_row(trial: CacheTrial) -> dict[str, str]:
    """One row of the experiment's table, as text: counts, measured H and the four times (ms, 3 decimals).

    Text, because a table pads floats to four decimals; the chart reads cache_trial_point instead.
    """

    def milliseconds(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:,.3f}"

    metrics = trial.metrics
    return {
        "target H": f"{trial.target_hit_ratio:.0%}",
        "hits": f"{metrics.hits:,}",
        "misses": f"{metrics.misses:,}",
        "errors": f"{metrics.errors:,}",
        "measured H": "n/a" if metrics.hit_ratio is None else f"{metrics.hit_ratio:.1%}",
        "T_cache (ms)": milliseconds(metrics.mean_cache_ms),
        "T_db (ms)": milliseconds(metrics.mean_database_ms),
        "T_avg predicted (ms)": milliseconds(metrics.predicted_average_ms),
        "T_avg measured (ms)": milliseconds(metrics.measured_average_ms),
    }


def cache_trial_point(trial: CacheTrial) -> dict[str, Optional[float]]:
    """One trial as numbers for the experiment's chart: measured H and T_avg, predicted and measured."""
    metrics = trial.metrics
    return {
        "measured H": metrics.hit_ratio,
        "T_avg predicted (ms)": metrics.predicted_average_ms,
        "T_avg measured (ms)": metrics.measured_average_ms,
    }


async def run_cache_experiment(
    sandbox: Sandbox, *, user_id: str, reads: int = 100, hit_ratios: tuple[float, ...] = (0.0, 0.5, 0.9, 1.0)
) -> list[CacheTrial]:
    """For each target H, read the user's profile R times, evicting the key before the reads meant to miss.

    The key is warmed first and evictions are not timed, so each trial's measured H is its
    target (unless Redis fails, or another tab reads or writes this user meanwhile). Each trial
    has its own metrics; the page's counters stay as they are.
    """
    validate_whole_number(reads, label="Reads", low=1, high=MAX_CACHE_EXPERIMENT_READS)
    if not hit_ratios or len(hit_ratios) > MAX_CACHE_EXPERIMENT_RATIOS or not all(
        not isinstance(ratio, bool) and isinstance(ratio, (int, float)) and 0 <= ratio <= 1 for ratio in hit_ratios
    ):
        raise ValidationError(
            f"Choose from 1 to {MAX_CACHE_EXPERIMENT_RATIOS} hit ratios, each between 0 and 1.", field="hit_ratios"
        )
    cache = cache_for(sandbox)
    user_id = parse_entity_id(user_id)
    key = cache.user_key(user_id)
    pacer = HeavyWorkPacer()  # thousands of reads: rest between slices so other learners' clicks get through
    trials = []
    for ratio in hit_ratios:
        await cache.get_user(user_id=user_id, metrics=CacheMetrics())  # warm the key; not counted
        planned_misses = round(reads * (1 - ratio))
        metrics = CacheMetrics()
        outcomes, latencies = [], []
        for index in range(reads):
            async with pacer.unit():  # each read is timed on its own: the rests fall between reads
                if (index + 1) * planned_misses // reads > index * planned_misses // reads:
                    await cache.invalidate_keys([key], reason="experiment", remember=False)
                result = await cache.get_user(user_id=user_id, metrics=metrics)
            outcomes.append(result.outcome)
            latencies.append(result.total_ms)
        trials.append(CacheTrial(float(ratio), tuple(outcomes), tuple(latencies), metrics))
    return trials


# =============================================================================================
# 13. Outbox (codelab section 5)
# =============================================================================================
#
# The score and its AIRScoreCalculated event commit in one transaction. A publisher (an outbox
# relay) runs as a task on the runtime's loop: it leases due events in one UPDATE, XADDs them to
# the sandbox's Redis stream in one pipeline and marks them published in one UPDATE. A downstream
# consumer reads the stream through a consumer group and records each event id in its inbox
# table, so a message delivered twice is recognised and counted, never applied twice.
# What keeps it whole over a class lives beside it in qulab_outbox/ (the page lists it under "How
# this survives faults"): a circuit that pauses the relay during a broker outage, retention that
# trims only acknowledged entries, the broker's persistence settings, LISTEN/NOTIFY; and here,
# PublishedEventAudit (republishes what a broker lost) and prune_delivered_events (bounded history).

AIRSCORE_CALCULATED = "AIRScoreCalculated"
AIR_PARAMETER_VERSION = "qulab-air-1.0"
AIR_ALPHA = 0.6  # weight of individual readiness (VR) against occupational readiness (HR)
AIR_BETA = 0.15  # weight of the synergy term
AIR_EXPERIENCE_SCALE_YEARS = 8.0  # experience readiness reaches 63% of 100 after this many years
AIR_EVIDENCE_SPREAD = 10.0  # σ of a score backed by no evidence; each piece of evidence narrows it
# Readiness points per education level and per SOC major group (the occupation code's first two
# digits). Teaching values, versioned by AIR_PARAMETER_VERSION so a stored score says which it used.
EDUCATION_READINESS: dict[str, float] = {
    "High school": 40.0,
    "Associate degree": 55.0,
    "Bachelor's degree": 70.0,
    "Master's degree": 82.0,
    "Doctorate": 90.0,
    "Other": 50.0,
}
OCCUPATION_GROUP_READINESS: dict[str, float] = {
    "11": 70.0,  # management
    "13": 72.0,  # business and financial operations
    "15": 88.0,  # computer and mathematical
    "17": 78.0,  # architecture and engineering
    "19": 75.0,  # life, physical and social science
    "23": 60.0,  # legal
    "25": 58.0,  # educational instruction
    "27": 62.0,  # arts, design, entertainment and media
    "29": 60.0,  # healthcare practitioners
    "41": 52.0,  # sales
    "43": 50.0,  # office and administrative support
}
DEFAULT_OCCUPATION_READINESS = 45.0


@dataclass(frozen=True)
class AIRScoreCalculation:
    """The parts of one AI-Readiness score and the evidence it was calculated from."""

    air_score: float
    vr_score: float
    hr_score: float
    synergy_score: float
    ci_lower: float
    ci_upper: float
    parameter_version: str
    evidence: dict[str, Any]


def calculate_airscore(
    *,
    occupation_code: str,
    education_level: Optional[str] = None,
    years_experience: Optional[float] = None,
    abilities: tuple[float, ...] = (),
) -> AIRScoreCalculation:
    """QuLab's AI-Readiness formula: deterministic, from a user's profile and assessments.

    VR (individual readiness) is the mean of the evidence there is: the education level's points,
    experience as 100·(1 − e^(−years/8)), and each assessment's ability θ as 100/(1 + e^(−θ)).
    HR (occupational readiness) is the points of the occupation's SOC major group.
    Synergy = VR·HR/100 and AIR = (α·VR + (1 − α)·HR + β·Synergy) / (1 + β), all from 0 to 100.
    The 95% interval is AIR ± 1.96·σ with σ = 10/√(1 + pieces of evidence), clipped to 0–100.
    """
    code = validate_occupation_code(occupation_code, required=True) or ""
    evidence: list[float] = []
    if education_level:
        evidence.append(EDUCATION_READINESS[validate_education_level(education_level) or "Other"])
    if years_experience is not None:
        years = validate_years_experience(years_experience) or 0.0
        evidence.append(100 * (1 - math.exp(-years / AIR_EXPERIENCE_SCALE_YEARS)))
    usable_abilities = [min(6.0, max(-6.0, theta)) for theta in abilities if math.isfinite(theta)]
    evidence.extend(100 / (1 + math.exp(-theta)) for theta in usable_abilities)
    vr = statistics.fmean(evidence) if evidence else 50.0
    hr = OCCUPATION_GROUP_READINESS.get(code[:2], DEFAULT_OCCUPATION_READINESS)
    synergy = vr * hr / 100
    air = (AIR_ALPHA * vr + (1 - AIR_ALPHA) * hr + AIR_BETA * synergy) / (1 + AIR_BETA)
    half_width = 1.96 * AIR_EVIDENCE_SPREAD / math.sqrt(1 + len(evidence))
    return AIRScoreCalculation(
        air_score=round(air, 2),
        vr_score=round(vr, 2),
        hr_score=round(hr, 2),
        synergy_score=round(synergy, 2),
        ci_lower=round(max(0.0, air - half_width), 2),
        ci_upper=round(min(100.0, air + half_width), 2),
        parameter_version=AIR_PARAMETER_VERSION,
        evidence={
            "education_level": education_level,
            "years_experience": years_experience,
            "assessment_abilities": usable_abilities,
            "pieces_of_evidence": len(evidence),
            "alpha": AIR_ALPHA,
            "beta": AIR_BETA,
        },
    )


async def add_calculated_airscore(session: AsyncSession, *, user_id: str, occupation_code: str) -> AIRScore:
    """Calculate a user's score from their profile and assessments and add it to the caller's transaction."""
    user = await UserRepository(session).require(user_id)
    assessments = await AssessmentRepository(session).list_for_user(user.id)
    calculation = calculate_airscore(
        occupation_code=occupation_code,
        education_level=user.education_level,
        years_experience=user.years_experience,
        abilities=tuple(assessment.current_ability for assessment in assessments),
    )
    return await AIRScoreRepository(session).create(
        user_id=user.id,
        occupation_code=occupation_code,
        air_score=calculation.air_score,
        vr_score=calculation.vr_score,
        hr_score=calculation.hr_score,
        synergy_score=calculation.synergy_score,
        ci_lower=calculation.ci_lower,
        ci_upper=calculation.ci_upper,
        parameter_version=calculation.parameter_version,
        calculation_metadata=calculation.evidence,
    )


def airscore_calculated_event(score: AIRScore) -> DomainEvent:
    """The AIRScoreCalculated event for a score: everything a downstream service needs, no lookups."""
    event_id = _new_id()
    return DomainEvent(
        id=event_id,
        event_type=AIRSCORE_CALCULATED,
        aggregate_type="AIRScore",
        aggregate_id=score.id,
        payload={
            "event_id": event_id,
            "score_id": score.id,
            "user_id": score.user_id,
            "occupation_code": score.occupation_code,
            "air_score": score.air_score,
            "vr_score": score.vr_score,
            "hr_score": score.hr_score,
            "synergy_score": score.synergy_score,
            "ci_lower": score.ci_lower,
            "ci_upper": score.ci_upper,
            "parameter_version": score.parameter_version,
        },
        status="pending",
    )


@dataclass(frozen=True)
class StoredAIRScore:
    """What calculate_and_store_airscore committed: the score and its pending event."""

    score: AIRScore
    event: DomainEvent


@journaled("airscore_stored")
async def calculate_and_store_airscore(sandbox: Sandbox, *, user_id: str, occupation_code: str) -> StoredAIRScore:
    """Calculate and store a user's AIRScore and its AIRScoreCalculated event in ONE transaction.

    Both rows commit together or neither does: no score is ever saved without its event, and no
    event announces a score that was rolled back. Publishing happens later, in the background.
    """
    async with get_session(sandbox) as session:
        score = await add_calculated_airscore(session, user_id=user_id, occupation_code=occupation_code)
        event = airscore_calculated_event(score)
        session.add(event)  # flushed by the commit, inside the same transaction as the score
    return StoredAIRScore(score=score, event=event)


MAX_BURST_WRITES = 2000
BURST_CONCURRENCY = 8
BURST_FALLBACK_OCCUPATION = "15-1252.00"  # for users without an occupation code of their own


@dataclass(frozen=True)
class BurstResult:
    """What a burst of score writes committed (each write its own transaction) and how long it spent writing."""

    writes: int  # committed: each one a score and its event
    concurrency: int
    seconds: float
    failed: int = 0  # writes that rolled back whole (nothing of them was stored)
    first_error: str = ""  # why the first of them failed


@journaled("airscore_burst")
async def store_airscore_burst(
    sandbox: Sandbox, *, count: int, concurrency: int = BURST_CONCURRENCY
) -> BurstResult:
    """Store `count` scores with their events, round-robin over the sandbox's users, `concurrency` at a time."""
    validate_whole_number(count, label="Burst writes", low=1, high=MAX_BURST_WRITES, field="count")
    validate_whole_number(concurrency, label="Concurrency", low=1, high=50)
    users = await list_learner_users(sandbox) or await list_users(sandbox, limit=100)
    if not users:
        raise ValidationError("Your sandbox has no users yet: initialize it on page 2 first.", field="user_id")
    semaphore = asyncio.Semaphore(concurrency)
    pacer = HeavyWorkPacer()  # rests between slices of writes, so other learners' clicks get through

    async def write(number: int) -> None:
        user = users[number % len(users)]
        async with semaphore, pacer.unit():
            await calculate_and_store_airscore(
                sandbox, user_id=user.id, occupation_code=user.occupation_code or BURST_FALLBACK_OCCUPATION
            )

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(write(number) for number in range(count)), return_exceptions=True)
    seconds = time.perf_counter() - started - pacer.rested_seconds  # time spent writing: no write runs in a rest
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    for error in errors:
        if not isinstance(error, Exception):
            raise error  # cancelled: stop here
    # Each write is its own transaction: the ones that failed stored nothing, the others are whole.
    first_error = f"{type(errors[0]).__name__}: {errors[0]}"[:300] if errors else ""
    if errors and not isinstance(errors[0], QuLabError):
        logger.error("burst writes failed in sandbox %s", sandbox.id, exc_info=errors[0])
    return BurstResult(
        writes=count - len(errors), concurrency=concurrency, seconds=seconds, failed=len(errors), first_error=first_error
    )


async def list_learner_users(sandbox: Sandbox, *, limit: int = 100) -> list[User]:
    """The learner's own users, oldest first (the thousand scale-up users of section 3 left out)."""
    async with get_session(sandbox) as session:
        statement = select(User).where(~_is_scale_up_user()).order_by(User.created_at).limit(limit)
        return list((await session.scalars(statement)).all())


@dataclass(frozen=True)
class EventDelivery:
    """Where one event is now: its status, when it was published, when the consumer recorded it."""

    event_id: str
    status: str
    created_at: datetime
    published_at: Optional[datetime]
    delivered_at: Optional[datetime]
    last_error: Optional[str]


async def event_delivery(sandbox: Sandbox, *, event_id: str) -> Optional[EventDelivery]:
    """The event's current state (None once it is gone: pruned after delivery, or reset)."""
    event_id = parse_entity_id(event_id, what="event")
    async with get_session(sandbox) as session:
        row = (
            await session.execute(
                select(DomainEvent, ConsumedEvent.consumed_at)
                .outerjoin(ConsumedEvent, ConsumedEvent.event_id == DomainEvent.id)
                .where(DomainEvent.id == event_id)
            )
        ).first()
    if row is None:
        return None
    event, delivered_at = row
    return EventDelivery(event.id, event.status, event.created_at, event.published_at, delivered_at, event.last_error)


class ConsumedEvent(Base):
    """The downstream consumer's inbox: one row per event id it has handled, its deduplication key."""

    __tablename__ = "consumed_events"
    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    event_type: Mapped[str] = mapped_column(String(100))
    stream_message_id: Mapped[str] = mapped_column(String(40))
    consumer_name: Mapped[str] = mapped_column(String(64))
    consumed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, index=True)  # retention


@dataclass(frozen=True)
class OutboxSettings:
    """Limits and timings of the publisher and the consumer (tests shrink the timings)."""

    batch_size: int = 100
    idle_wait_seconds: float = 1.0  # an idle worker's first wait; a commit wakes it at once
    idle_wait_max_seconds: float = 60.0  # ...and each empty look doubles it up to this
    # Nothing pending, and every commit wakes the publisher (in-process on SQLite, LISTEN on
    # PostgreSQL): it only waits for that wake-up, looking on its own this rarely as a safety net.
    quiet_look_seconds: float = 600.0
    lease_seconds: float = 30.0  # a claim keeps other publishers off an event this long
    outage_backoff_base_seconds: float = 0.5  # broker down: first wait before probing it again
    outage_backoff_max_seconds: float = 30.0
    stream_trim_above: int = 10_000  # once longer, the stream drops entries every group acknowledged
    max_message_bytes: int = 64 * 1024
    consumer_batch_size: int = 100
    consumer_reclaim_idle_seconds: float = 30.0  # XAUTOCLAIM messages left unacknowledged this long
    broker_timeout_seconds: float = 2.0  # a broker call slower than this counts as an outage
    audit_interval_seconds: float = 30.0  # how often published-but-unconsumed events are checked
    audit_batch_size: int = 500
    # Older events, published AND consumed, are pruned: the panel reads at most these (it shows 10,
    # and its latencies come from the newest LATENCY_SAMPLE_SIZE), so its cost stays flat with history.
    keep_published_events: int = 200
    inbox_retention_seconds: float = 86_400.0  # the consumer remembers an event id this long, to deduplicate
    stop_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class ClaimedEvent:
    """An event a publisher holds the lease on, with what goes into its stream message."""

    id: str
    event_type: str
    aggregate_type: str
    aggregate_id: str
    payload_json: str  # as stored: the relay passes it through, it never decodes and re-encodes it
    created_at: datetime

    def stream_message(self) -> dict[str, str]:
        """The stream entry's fields: the event id first, so any consumer can deduplicate."""
        return {
            "event_id": self.id,
            "event_type": self.event_type,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "occurred_at": self.created_at.isoformat(),
            "payload": self.payload_json,
        }


@dataclass
class StreamDelivery:
    """What the broker did with one batch: stream ids of the entries it took, and what it refused."""

    stream_ids: dict[str, str] = field(default_factory=dict)  # event id -> stream entry id
    rejected: dict[str, str] = field(default_factory=dict)  # event id -> why this event can never go
    unsent: list[str] = field(default_factory=list)  # not sent because the broker is down
    broker_error: str = ""


@dataclass
class BatchReport:
    """What one publisher batch did."""

    claimed: int = 0
    published: int = 0
    failed: int = 0  # refused by the broker for what they are (too large, say): 'failed' at once
    released: int = 0  # not sent because the broker is down: pending again, attempts untouched
    lease_lost: int = 0  # published, but another publisher had taken the lease over meanwhile
    broker_error: str = ""
    seconds: float = 0.0
    # Last batch of a backlog asked to look ahead: seconds until a pending event can be claimed
    # (0: now; math.inf: nothing is pending). None: not looked.
    next_claimable_seconds: Optional[float] = None


# Outbox calls to the broker at once, per process. redis-py's pool refuses a connection beyond its
# 100th (MaxConnectionsError, a ConnectionError): 200 idle consumers looking at the same moment
# would take that for an outage, and the cache's reads need connections too.
OUTBOX_BROKER_CALLS_AT_ONCE = 32
_outbox_broker_slots: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = (
    weakref.WeakKeyDictionary()
)


async def outbox_broker_call(call: Callable[[], Awaitable[T]], timeout_seconds: float) -> T:
    """Run one outbox broker call within its timeout, once a slot is free (waiting for it is not timed)."""
    loop = asyncio.get_running_loop()
    slots = _outbox_broker_slots.get(loop)
    if slots is None:
        slots = _outbox_broker_slots[loop] = asyncio.Semaphore(OUTBOX_BROKER_CALLS_AT_ONCE)
    async with slots:
        return await asyncio.wait_for(call(), timeout_seconds)


# The relay's statements are set-based Core statements on the table: per batch, the ORM session
# machinery would only cost CPU, and it is the relay's bottleneck.
_EVENTS = DomainEvent.__table__


def _stream_ids_table(backend: str) -> Any:
    """The JSON object bound as :stream_ids (event id -> stream id) as rows (key, value), parsed ONCE.

    A per-row lookup (json_extract_path_text(:stream_ids, id)) re-parsed the whole batch's JSON for
    every row it updated: on PostgreSQL that was half the relay's time.
    """
    stream_ids = bindparam("stream_ids", type_=String)
    if backend == "postgresql":
        rows = func.json_each_text(cast(stream_ids, JSON))
    else:
        rows = func.json_each(stream_ids)
    return rows.table_valued("key", "value").alias("delivered")


def _event_id_in_list(backend: str) -> Any:
    """events.id among the ids bound as :event_ids: id = ANY(:array) on PostgreSQL, IN (…) on SQLite."""
    if backend == "postgresql":
        return _EVENTS.c.id == any_(bindparam("event_ids", type_=PostgresArray(String)))
    return _EVENTS.c.id.in_(bindparam("event_ids", expanding=True))


class OutboxPublisher:
    """The outbox relay: leases due events oldest first, XADDs them in one pipeline, marks them published.

    Several publishers may run against one database: the claim is one UPDATE … RETURNING whose
    subquery takes FOR UPDATE SKIP LOCKED on PostgreSQL (SQLite runs the statement under its
    single write lock), and an event is only marked by the publisher whose name holds its lease.
    """

    def __init__(
        self, sandbox: Sandbox, settings: Optional[OutboxSettings] = None, *, name: Optional[str] = None
    ) -> None:
        self.sandbox = sandbox
        self.settings = settings or OutboxSettings()
        self.name = name or f"publisher-{uuid.uuid4().hex[:12]}"
        self._autocommit_view: tuple[Any, Any] = (None, None)  # (sandbox engine, its autocommit view)

    @property
    def _autocommit(self) -> Any:
        # Each statement commits on its own (UPDATE … RETURNING is atomic): no BEGIN/COMMIT trips.
        # Built from the sandbox's current engine: a sandbox that went dormant and woke has a new one.
        engine, view = self._autocommit_view
        if engine is not self.sandbox.engine:
            engine = self.sandbox.engine
            view = engine.execution_options(isolation_level="AUTOCOMMIT")
            self._autocommit_view = (engine, view)
        return view

    @property
    def stream_key(self) -> str:
        """The Redis stream this sandbox's events go to."""
        return self.sandbox.redis.key("events")

    async def publish_due_batch(self, connection: Any = None) -> BatchReport:
        """Lease a batch, send it in one pipeline, then record what the broker did: one connection."""
        if connection is None:
            async with self._autocommit.connect() as connection:
                return await self.publish_due_batch(connection)
        started = time.perf_counter()
        events = await self.claim_due_events(connection)
        report = BatchReport(claimed=len(events))
        if events:
            delivery = await self.send_to_stream(events)
            if delivery.stream_ids:
                report.published = await self._mark_published(connection, delivery.stream_ids)
                report.lease_lost = len(delivery.stream_ids) - report.published
            if delivery.rejected:
                report.failed = await self._mark_failed(connection, delivery.rejected)
            if delivery.unsent:  # an outage is the broker's fault, not the events'
                report.released = await self._release(connection, delivery.unsent, delivery.broker_error)
            report.broker_error = delivery.broker_error
        report.seconds = time.perf_counter() - started
        return report

    async def publish_backlog(self, *, look_ahead: bool = False) -> AsyncIterator[BatchReport]:
        """Batch after batch on ONE connection while they come back full: a backlog drains in one checkout.

        look_ahead: the last batch also says when the next pending event can be claimed (one more
        statement on the same connection), so an idle publisher knows how long it may sleep.
        """
        async with self._autocommit.connect() as connection:
            while True:
                report = await self.publish_due_batch(connection)
                done = report.claimed < self.settings.batch_size or bool(report.broker_error)
                if done and look_ahead and not report.broker_error:
                    report.next_claimable_seconds = await self.seconds_until_claimable(connection)
                yield report
                if done:
                    return

    async def seconds_until_claimable(self, connection: Any) -> float:
        """0 if a pending event can be claimed now, math.inf if none is pending, else when a lease ends.

        Another relay's lease (it may have died holding it) is the only thing that keeps a pending
        event from being claimed; the soonest lease end is when this publisher should look again.
        """
        events = _EVENTS.c
        soonest = (
            await connection.execute(
                select(events.claimed_until)
                .where(events.status == "pending")
                .order_by(events.claimed_until.asc().nulls_first())
                .limit(1)
            )
        ).first()
        if soonest is None:
            return math.inf
        if soonest[0] is None:
            return 0.0
        return max(0.0, (soonest[0] - utc_now()).total_seconds())

    async def claim_due_events(self, connection: Any) -> list[ClaimedEvent]:
        """Lease up to batch_size pending events, oldest first, in ONE UPDATE … RETURNING."""
        now = utc_now()
        events = _EVENTS.c
        claimable = (events.status == "pending", or_(events.claimed_until.is_(None), events.claimed_until < now))
        oldest_due = (
            select(events.id)
            .where(*claimable)
            .order_by(events.created_at, events.id)
            .limit(self.settings.batch_size)
            .with_for_update(skip_locked=True)  # PostgreSQL; compiled to nothing on SQLite
            # MATERIALIZED: evaluated once. As a plain IN subquery PostgreSQL may re-run it for
            # each row of a nested-loop join, and each run leases another batch_size rows.
            .cte("oldest_due")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        if self.sandbox.backend == "postgresql":
            # id = ANY(ARRAY(SELECT …)) and nothing else: the ids are collected once, then looked
            # up by primary key whatever the planner believes about the table (a join planned on
            # stale statistics, right after a burst, compared every pending row with every leased
            # id: 200 ms a batch). The CTE's FOR UPDATE already locked each row as claimable, so
            # no other transaction can change it before this UPDATE.
            leased = (events.id == any_(func.array(select(oldest_due.c.id).scalar_subquery())),)
        else:
            leased = (events.id == oldest_due.c.id, *claimable)  # UPDATE … FROM, under SQLite's one writer
        claim = (
            update(_EVENTS)
            .where(*leased)
            .values(claimed_by=self.name, claimed_until=now + timedelta(seconds=self.settings.lease_seconds))
            .returning(
                events.id,
                events.event_type,
                events.aggregate_type,
                events.aggregate_id,
                cast(events.payload, Text),
                events.created_at,
            )
        )
        rows = (await connection.execute(claim)).all()
        return sorted((ClaimedEvent(*row) for row in rows), key=lambda claimed: (claimed.created_at, claimed.id))

    async def send_to_stream(self, events: list[ClaimedEvent]) -> StreamDelivery:
        """XADD every event in one pipeline; sort the replies into taken, refused, and not sent."""
        delivery = StreamDelivery()
        messages: dict[str, dict[str, str]] = {}
        for claimed in events:
            message = claimed.stream_message()
            size = sum(len(name) + len(value.encode()) for name, value in message.items())
            if size > self.settings.max_message_bytes:
                delivery.rejected[claimed.id] = (
                    f"message is {size} bytes; the broker's limit is {self.settings.max_message_bytes}"
                )
            else:
                messages[claimed.id] = message
        if not messages:
            return delivery
        redis_link = self.sandbox.redis
        try:
            pipeline = redis_link.client.pipeline(transaction=False)
            for message in messages.values():
                pipeline.xadd(self.stream_key, message)  # no MAXLEN: retention never drops unread entries
            replies = await outbox_broker_call(
                lambda: pipeline.execute(raise_on_error=False), self.settings.broker_timeout_seconds
            )
        except REDIS_ERRORS as error:
            redis_link.health.record_failure(error)
            delivery.broker_error = f"broker unavailable: {type(error).__name__}: {error}"[:300]
            delivery.unsent = list(messages)
            return delivery
        redis_link.health.record_success()
        for event_id, reply in zip(messages, replies):
            if not isinstance(reply, Exception):
                delivery.stream_ids[event_id] = reply
            elif is_broker_wide_refusal(reply):
                delivery.unsent.append(event_id)
                delivery.broker_error = f"broker unavailable: it refused every message: {reply}"[:300]
            else:
                delivery.rejected[event_id] = f"the broker refused this event: {reply}"[:300]
        return delivery

    async def _mark_published(self, connection: Any, stream_ids: dict[str, str]) -> int:
        events = _EVENTS.c
        delivered = _stream_ids_table(self.sandbox.backend)
        mark = (  # UPDATE … FROM the delivered (event id, stream id) pairs: one statement for the batch
            update(_EVENTS)
            .where(
                # The ids again, as a list the planner looks up by primary key: the join alone
                # scanned the whole table, and it grows with every event.
                _event_id_in_list(self.sandbox.backend),
                events.id == delivered.c.key,
                events.claimed_by == self.name,
            )
            .values(
                status="published",
                published_at=bindparam("published_at"),
                stream_id=delivered.c.value,  # the audit looks entries up by it
                claimed_by=None,
                claimed_until=None,
            )
        )
        parameters = {"event_ids": list(stream_ids), "published_at": utc_now(), "stream_ids": json.dumps(stream_ids)}
        return int((await connection.execute(mark, parameters)).rowcount)

    async def _mark_failed(self, connection: Any, reasons: dict[str, str]) -> int:
        events = _EVENTS.c
        record = (
            update(_EVENTS)
            .where(events.id == bindparam("event_id"), events.claimed_by == self.name)
            .values(
                status="failed",
                attempts=events.attempts + 1,
                last_error=bindparam("reason"),
                claimed_by=None,
                claimed_until=None,
            )
        )
        rows = [{"event_id": event_id, "reason": reason[:500]} for event_id, reason in reasons.items()]
        await connection.execute(record, rows)
        return len(rows)

    async def _release(self, connection: Any, event_ids: list[str], error: str) -> int:
        events = _EVENTS.c
        release = (
            update(_EVENTS)
            .where(events.id.in_(event_ids), events.claimed_by == self.name)
            .values(last_error=error[:500], claimed_by=None, claimed_until=None)  # attempts untouched
        )
        return int((await connection.execute(release)).rowcount)


EVENT_CONSUMER_GROUP = "score-notifications"


@dataclass
class ConsumeReport:
    """What one consumer batch did."""

    received: int = 0
    recorded: int = 0  # first delivery of an event id: handled and stored in the inbox
    duplicates: int = 0  # an event id the inbox already had: acknowledged, not handled again
    reclaimed: int = 0  # taken over with XAUTOCLAIM from a consumer that stopped acknowledging
    group_created: bool = False  # the stream or its group was gone (a reset, or a broker restart)


class StreamConsumer:
    """The downstream service: reads the stream in a consumer group, deduplicates by event id, acknowledges."""

    def __init__(self, sandbox: Sandbox, settings: Optional[OutboxSettings] = None) -> None:
        self.sandbox = sandbox
        self.settings = settings or OutboxSettings()
        self.name = f"consumer-{uuid.uuid4().hex[:12]}"
        self.duplicates_ignored = 0
        self._reclaim_cursor = "0-0"

    @property
    def stream_key(self) -> str:
        """The stream this consumer reads (the publisher's)."""
        return self.sandbox.redis.key("events")

    async def consume_batch(self) -> ConsumeReport:
        """Read up to one batch (abandoned messages first), record new event ids in the inbox, XACK all."""
        client = self.sandbox.redis.client
        group_created = False
        try:
            reclaimed, fresh = await self._bounded(lambda: self._read(client))
        except redis.exceptions.ResponseError:
            # NOGROUP: the stream or its group is gone (init_db wipes the namespace): recreate it.
            if not await self._bounded(lambda: self._create_group(client)):
                raise
            group_created = True
            reclaimed, fresh = await self._bounded(lambda: self._read(client))
        messages = reclaimed + fresh
        report = ConsumeReport(received=len(messages), reclaimed=len(reclaimed), group_created=group_created)
        if not messages:
            return report
        rows: dict[str, dict[str, Any]] = {}
        for message_id, fields in messages:
            event_id = (fields or {}).get("event_id")
            if event_id and event_id not in rows:
                rows[event_id] = {
                    "event_id": event_id,
                    "event_type": fields.get("event_type", "")[:100],
                    "stream_message_id": message_id,
                    "consumer_name": self.name,
                    "consumed_at": utc_now(),
                }
        if rows:
            async with get_session(self.sandbox) as session:
                result = await session.execute(_insert_ignoring_duplicates(self.sandbox.backend), list(rows.values()))
                report.recorded = len(result.scalars().all())
        # Acknowledge only after the inbox committed: a crash in between means redelivery, which
        # the inbox then recognises, rather than a lost event.
        acknowledged = [message_id for message_id, _ in messages]
        await self._bounded(lambda: client.xack(self.stream_key, EVENT_CONSUMER_GROUP, *acknowledged))
        report.duplicates = len(messages) - report.recorded
        self.duplicates_ignored += report.duplicates
        return report

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        return await outbox_broker_call(call, self.settings.broker_timeout_seconds)

    async def _read(self, client: Any) -> tuple[list[Any], list[Any]]:
        """Abandoned messages (XAUTOCLAIM) and new ones (XREADGROUP) in one round trip."""
        count = self.settings.consumer_batch_size
        pipeline = client.pipeline(transaction=False)
        pipeline.xautoclaim(
            self.stream_key,
            EVENT_CONSUMER_GROUP,
            self.name,
            min_idle_time=int(self.settings.consumer_reclaim_idle_seconds * 1000),
            start_id=self._reclaim_cursor,
            count=count,
        )
        pipeline.xreadgroup(EVENT_CONSUMER_GROUP, self.name, {self.stream_key: ">"}, count=count)
        (cursor, reclaimed, *_), response = await pipeline.execute()  # raises the first error (NOGROUP…)
        self._reclaim_cursor = cursor
        reclaimed = [(message_id, fields) for message_id, fields in reclaimed if fields]
        fresh = response[0][1] if response else []
        return reclaimed, list(fresh)

    async def _create_group(self, client: Any) -> bool:
        try:
            await client.xgroup_create(self.stream_key, EVENT_CONSUMER_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as error:
            if "BUSYGROUP" in str(error):
                return False  # it existed: the error that brought us here was something else
            raise
        self._reclaim_cursor = "0-0"
        return True


def _insert_ignoring_duplicates(backend: str) -> Any:
    dialect_insert = postgresql_insert if backend == "postgresql" else sqlite_insert
    return (
        dialect_insert(ConsumedEvent)
        .on_conflict_do_nothing(index_elements=[ConsumedEvent.event_id])
        .returning(ConsumedEvent.event_id)
    )


@dataclass(frozen=True)
class AuditReport:
    """What one audit of published events found."""

    at: datetime
    checked: int  # published events nobody had consumed yet, looked up in the stream
    missing: int  # of those, gone from the stream: the broker lost them
    republished: int  # pending again, so the relay sends them once more
    broker_error: str = ""


class PublishedEventAudit:
    """Finds events marked published that the broker no longer has and nobody consumed; republishes them.

    A broker restarted without persistence forgets entries it had accepted: the outbox says
    'published', the consumer never sees them. The audit looks each unconsumed published event up
    by its stream id (one pipelined XRANGE), checks the inbox again for those missing (the consumer
    may have acknowledged and the stream trimmed them meanwhile), and makes the rest pending again.
    A republished event that did arrive after all is recognised by the consumer's inbox.
    """

    def __init__(self, sandbox: Sandbox, settings: OutboxSettings) -> None:
        self.sandbox = sandbox
        self.settings = settings
        self.last: Optional[AuditReport] = None
        self.republished_total = 0
        # Events published before this moment are known consumed: each audit reads only what is newer.
        self._checked_from = datetime.min.replace(tzinfo=timezone.utc)

    async def run(self) -> AuditReport:
        """Audit the oldest unconsumed published events (at most audit_batch_size)."""
        started = utc_now()
        events = _EVENTS.c
        consumed = select(ConsumedEvent.event_id).where(ConsumedEvent.event_id == events.id).exists()
        unconsumed = (
            select(events.id, events.stream_id, events.published_at)
            .where(events.status == "published", events.published_at >= self._checked_from, ~consumed)
            .order_by(events.published_at)
            .limit(self.settings.audit_batch_size)
        )
        async with self.sandbox.engine.connect() as connection:
            candidates = [row for row in (await connection.execute(unconsumed)).all() if row.stream_id]
        missing: list[str] = []
        if candidates:
            try:
                pipeline = self.sandbox.redis.client.pipeline(transaction=False)
                for row in candidates:
                    pipeline.xrange(self.sandbox.redis.key("events"), row.stream_id, row.stream_id, count=1)
                found = await outbox_broker_call(pipeline.execute, self.settings.broker_timeout_seconds)
            except REDIS_ERRORS as error:
                error_text = f"broker unavailable: {type(error).__name__}: {error}"[:300]
                return AuditReport(at=started, checked=0, missing=0, republished=0, broker_error=error_text)
            missing = [row.id for row, entries in zip(candidates, found) if not entries]
        republished = await self._republish(missing) if missing else 0
        still_waiting = [row.published_at for row in candidates if row.id not in set(missing)]
        if still_waiting:
            self._checked_from = min(still_waiting)
        elif len(candidates) < self.settings.audit_batch_size:
            # A mark commits a moment after its published_at was stamped: look back a lease's length.
            self._checked_from = started - timedelta(seconds=self.settings.lease_seconds)
        self.last = AuditReport(at=started, checked=len(candidates), missing=len(missing), republished=republished)
        self.republished_total += republished
        return self.last

    async def _republish(self, event_ids: list[str]) -> int:
        events = _EVENTS.c
        consumed_meanwhile = select(ConsumedEvent.event_id).where(ConsumedEvent.event_id.in_(event_ids))
        republish = (
            update(_EVENTS)
            .where(events.id.in_(event_ids), events.status == "published", events.id.not_in(consumed_meanwhile))
            .values(
                status="pending",
                published_at=None,
                stream_id=None,
                last_error="republished: the broker lost it before anyone consumed it",
            )
        )
        async with self.sandbox.engine.begin() as connection:
            return int((await connection.execute(republish)).rowcount)


PRUNE_BATCH = 5_000


async def prune_delivered_events(sandbox: Sandbox, *, keep: int, inbox_retention_seconds: float) -> int:
    """Delete events that are published AND consumed, beyond the newest `keep`; returns how many.

    The outbox only needs an event until it is delivered; keeping every one makes each status
    query slower with history. Pending, failed and unconsumed events are never touched. The
    consumer's inbox keeps its ids longer (inbox_retention_seconds), so a late duplicate of a
    pruned event is still recognised.
    """
    events = _EVENTS.c
    newest_kept = (
        select(events.published_at)
        .where(events.status == "published")
        .order_by(events.published_at.desc())
        .offset(keep)
        .limit(1)
        .scalar_subquery()
    )
    consumed = select(ConsumedEvent.event_id).where(ConsumedEvent.event_id == events.id).exists()
    # Strictly older: a batch shares one published_at, so the batch holding the boundary stays whole.
    prunable = select(events.id).where(events.status == "published", events.published_at < newest_kept, consumed)
    async with sandbox.engine.begin() as connection:
        doomed = (await connection.execute(prunable.limit(PRUNE_BATCH))).scalars().all()
        if doomed:
            await connection.execute(delete(_EVENTS).where(events.id.in_(doomed)))
        forgotten = utc_now() - timedelta(seconds=inbox_retention_seconds)
        await connection.execute(delete(ConsumedEvent).where(ConsumedEvent.consumed_at < forgotten))
    if sandbox.backend == "postgresql" and len(doomed) >= VACUUM_AFTER_PRUNING:
        try:
            await _vacuum_events(sandbox)
        except SQLAlchemyError as error:  # the prune committed; autovacuum will get there later
            logger.warning("could not vacuum the events of sandbox %s: %s", sandbox.id, error)
    return len(doomed)


# PostgreSQL keeps a deleted row's version until VACUUM: right after a large prune every status
# query still walked 20,000 dead index entries (the panel read 2–3.5× slower than at 100 events)
# until autovacuum came round. Pruning this many rows vacuums the table at once.
VACUUM_AFTER_PRUNING = 1_000


async def _vacuum_events(sandbox: Sandbox) -> None:
    """VACUUM (ANALYZE) the events and the inbox of this sandbox's schema, outside a transaction as it must be.

    The inbox is only analyzed with it: it grew by every event, and a planner that still thinks it
    empty counts delivered events by scanning all of it.
    """
    schema = quoted_schema(sandbox.location)
    tables = f"{schema}.{_EVENTS.name}, {schema}.{ConsumedEvent.__table__.name}"
    async with sandbox.engine.execution_options(isolation_level="AUTOCOMMIT").connect() as connection:
        await connection.exec_driver_sql(f"VACUUM (ANALYZE) {tables}")


LEASE_END_MARGIN_SECONDS = 0.05  # look just after another relay's lease has ended, not just before


class OutboxService:
    """One sandbox's outbox machinery: the publisher and consumer tasks, their wake-ups, an activity log.

    The tasks run on the runtime's loop, across reruns and page changes, until stop() (or the
    sandbox's release). A commit that inserts a DomainEvent wakes the publisher; with nothing to
    do it waits longer and longer (up to idle_wait_max_seconds), so an idle sandbox costs almost
    nothing. Each published batch wakes the consumer. While the broker is down (BrokerCircuit)
    the relay pauses and probes with backoff; no event spends an attempt on an outage.
    """

    def __init__(self, sandbox: Sandbox, settings: Optional[OutboxSettings] = None) -> None:
        self.sandbox = sandbox
        self.settings = settings or OutboxSettings()
        self.publisher = OutboxPublisher(sandbox, self.settings)
        self.consumer = StreamConsumer(sandbox, self.settings)
        self.audit = PublishedEventAudit(sandbox, self.settings)
        self.circuit = BrokerCircuit(
            base_seconds=self.settings.outage_backoff_base_seconds, max_seconds=self.settings.outage_backoff_max_seconds
        )
        self.activity: deque[str] = deque(maxlen=40)
        self.resume_on_return = False  # set when the sandbox went dormant with the publisher on
        self.pruned_total = 0  # events published, consumed and then pruned by this service
        self.changes = 0  # moves whenever what the status panel shows may have changed (outbox_changes)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._publisher_wake = asyncio.Event()
        self._consumer_wake = asyncio.Event()
        self._probe_now = asyncio.Event()
        self._broker_back = asyncio.Event()
        self._broker_back.set()
        self._audit_due_at: Optional[float] = None  # time.monotonic(); None: nothing to audit
        self._errors_noted: dict[str, str] = {}
        self._notifications: Optional[CommitNotifications] = None  # PostgreSQL: commits of other processes
        sandbox.commit_listeners.append(self._on_commit)
        sandbox.reset_listeners.append(self._on_reset)
        sandbox.release_listeners.append(self._on_release)
        sandbox.dormant_listeners.append(publish_pending_and_stop)  # a dormant sandbox runs no background tasks
        sandbox.wake_listeners.append(resume_event_publisher)

    @property
    def running(self) -> bool:
        """True while the background tasks run."""
        return any(not task.done() for task in self._tasks)

    async def start(self) -> bool:
        """Start the publisher and the consumer on this loop; False if they were already running."""
        if self.running:
            return False
        self._stopping.clear()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run_publisher(), name=f"outbox-publisher-{self.sandbox.id}"),
            loop.create_task(self._run_consumer(), name=f"outbox-consumer-{self.sandbox.id}"),
        ]
        self._note(f"publisher {self.publisher.name} started")
        if self.sandbox.backend == "postgresql":
            await self._listen_for_other_processes()
        return True

    async def _listen_for_other_processes(self) -> None:
        try:
            await install_notify_trigger(self.sandbox.engine, self.sandbox.location)
            notifications = commit_notifications(self.sandbox.engine.url, self.sandbox.connection_budget)
            await notifications.subscribe(self.sandbox.location, self._publisher_wake.set)
        except Exception as error:  # the idle wait still finds the events, only later
            logger.warning("outbox in sandbox %s cannot LISTEN for commits: %s", self.sandbox.id, error)
            return
        self._notifications = notifications

    async def stop(self) -> bool:
        """Let both tasks finish their current batch, then stop; False if they were not running."""
        if not self.running:
            return False
        self._stopping.set()
        self.wake()
        tasks = list(self._tasks)
        _, still_running = await asyncio.wait(tasks, timeout=self.settings.stop_timeout_seconds)
        for task in still_running:
            task.cancel()  # a batch stuck longer than the timeout; its lease will expire
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        if self._notifications is not None:
            notifications, self._notifications = self._notifications, None
            await notifications.unsubscribe(self.sandbox.location, self._publisher_wake.set)
        self._note(f"publisher {self.publisher.name} stopped")
        return True

    async def publish_pending_and_stop(self) -> int:
        """Before the sandbox goes dormant: stop, then publish what is pending; returns how many went out.

        Remembers whether the publisher was on, so resume() can switch it back on when the learner
        returns. With the broker down nothing can go out: the events stay pending in the database.
        """
        self.resume_on_return = self.running
        if not self.resume_on_return:
            return 0
        await self.stop()
        published = 0
        deadline = time.monotonic() + self.settings.stop_timeout_seconds
        while not self.circuit.is_open and time.monotonic() < deadline:
            report = await self.publisher.publish_due_batch()
            published += report.published
            if report.broker_error or report.claimed < self.settings.batch_size:
                break
        self._note(f"sandbox dormant: published {published} pending events, then stopped")
        return published

    async def resume(self) -> bool:
        """The learner is back: start again if the publisher was on when the sandbox went dormant."""
        if not self.resume_on_return:
            return False
        self.resume_on_return = False
        return await self.start()

    def wake(self) -> None:
        """Make both workers look for work now instead of after their idle wait."""
        self._publisher_wake.set()
        self._consumer_wake.set()
        self._probe_now.set()

    def _note(self, message: str) -> None:
        self.activity.appendleft(f"{datetime.now(timezone.utc):%H:%M:%S.%f}"[:-3] + f"  {message}")
        self.changes += 1

    async def _run_publisher(self) -> None:
        idle_wait = self.settings.idle_wait_seconds
        database_failures = 0
        while not self._stopping.is_set():
            self._publisher_wake.clear()
            if self.circuit.is_open and not await self._probe_broker():
                continue
            try:
                report, claimed = await self._publish_backlog()
                audit = await self._audit_if_due()
            except Exception as error:  # the database failed: keep running, try again later
                database_failures += 1
                self._note_error("publisher", error)
                await self._wait(self._publisher_wake, self.circuit_backoff(database_failures))
                continue
            database_failures = 0
            self._errors_noted.pop("publisher", None)
            if report.broker_error or (audit is not None and audit.broker_error):
                self._broker_failed(report.broker_error or audit.broker_error)
                continue
            if report.claimed == self.settings.batch_size or (audit is not None and audit.republished):
                continue  # stopped after a full batch, or the audit made events pending again
            idle_wait = self.settings.idle_wait_seconds if claimed else idle_wait
            await self._wait(self._publisher_wake, self._until_audit(self._idle_wait(report, idle_wait)))
            if not self._publisher_wake.is_set():
                idle_wait = min(self.settings.idle_wait_max_seconds, idle_wait * 2)

    @property
    def every_commit_wakes_the_publisher(self) -> bool:
        """SQLite: only this process writes the sandbox, and its commits wake it; PostgreSQL: once LISTEN is on."""
        return self.sandbox.backend == "sqlite" or self._notifications is not None

    def _idle_wait(self, report: BatchReport, backoff: float) -> float:
        """How long the publisher may sleep after a backlog: until a wake-up when one is sure to come.

        Nothing pending and every commit wakes it: it only looks on its own every quiet_look_seconds.
        An event leased by another relay: until that lease ends. Otherwise the growing backoff.
        """
        ahead = report.next_claimable_seconds
        if ahead is None or not self.every_commit_wakes_the_publisher:
            return backoff if ahead is None or math.isinf(ahead) else min(backoff, ahead + LEASE_END_MARGIN_SECONDS)
        if math.isinf(ahead):
            return self.settings.quiet_look_seconds
        return min(self.settings.quiet_look_seconds, ahead + LEASE_END_MARGIN_SECONDS)

    async def _publish_backlog(self) -> tuple[BatchReport, int]:
        """Publish until a batch comes back short; returns the last batch's report and all events claimed."""
        claimed, report = 0, BatchReport()
        async with aclosing(self.publisher.publish_backlog(look_ahead=True)) as batches:
            async for report in batches:
                claimed += report.claimed
                self._note_batch(report)
                await journal_background_publication(self.sandbox, publisher=self.publisher.name, report=report)
                if report.published:
                    self._consumer_wake.set()  # consuming overlaps the rest of the backlog
                    if self._audit_due_at is None:
                        self._audit_due_at = time.monotonic() + self.settings.audit_interval_seconds
                if self._stopping.is_set():
                    break
        return report, claimed

    async def _run_consumer(self) -> None:
        database_failures = 0
        while not self._stopping.is_set():
            self._consumer_wake.clear()
            if self.circuit.is_open:
                await self._wait(self._broker_back, self.settings.idle_wait_max_seconds)
                continue
            try:
                report = await self.consumer.consume_batch()
                if report.received:
                    await outbox_broker_call(
                        lambda: trim_acknowledged_entries(
                            self.sandbox.redis.client, self.consumer.stream_key, keep_at_least=self.settings.stream_trim_above
                        ),
                        self.settings.broker_timeout_seconds,
                    )
            except REDIS_ERRORS as error:
                self._broker_failed(f"broker unavailable: {type(error).__name__}: {error}"[:300])
                continue
            except Exception as error:  # the database failed: keep running, try again later
                database_failures += 1
                self._note_error("consumer", error)
                await self._wait(self._consumer_wake, self.circuit_backoff(database_failures))
                continue
            database_failures = 0
            self._errors_noted.pop("consumer", None)
            if report.group_created:
                self._audit_due_at = time.monotonic()  # the stream was new: a restart may have lost entries
                self._publisher_wake.set()
            if report.received:
                self._note(
                    f"consumer received {report.received}: {report.recorded} new, "
                    f"{report.duplicates} duplicates ignored"
                    + (f", {report.reclaimed} reclaimed" if report.reclaimed else "")
                )
            if report.received < self.settings.consumer_batch_size:
                await self._wait_for_stream()

    async def _wait_for_stream(self) -> None:
        """Idle consumer: wait for the publisher's wake-up, or for the process's one look at every idle stream.

        That look (qulab_outbox.StreamWatch: one pipelined XINFO GROUPS each idle_wait_max_seconds
        for all of the process's idle consumers) wakes this one only when its stream holds entries
        the group has not read or acknowledged (another process's relay, a dead consumer), or the
        broker lost the stream or the group.
        """
        watch = stream_watch(
            self.sandbox.redis.service.client,
            EVENT_CONSUMER_GROUP,
            interval_seconds=self.settings.idle_wait_max_seconds,
            timeout_seconds=self.settings.broker_timeout_seconds,
        )
        wake = self._consumer_wake.set
        watch.watch(self.consumer.stream_key, wake)
        try:
            await self._wait(self._consumer_wake, self.settings.quiet_look_seconds)
        finally:
            watch.unwatch(self.consumer.stream_key, wake)

    def circuit_backoff(self, failures: int) -> float:
        """Exponential backoff with jitter for database failures (the broker's are the circuit's)."""
        delay = min(self.settings.outage_backoff_max_seconds, self.settings.outage_backoff_base_seconds * 2 ** min(failures - 1, 30))
        return delay / 2 + random.uniform(0, delay / 2)

    def _broker_failed(self, error: str) -> None:
        if self.circuit.open(error):  # reported once per outage, not once per pass
            self._broker_back.clear()
            self._publisher_wake.set()  # the publisher probes; the consumer waits for it
            logger.warning("outbox broker unreachable in sandbox %s (%s): relay paused", self.sandbox.id, error)
            self._note(f"{error}: relay paused, events keep their attempts; probing with backoff")

    async def _probe_broker(self) -> bool:
        self._probe_now.clear()
        await self._wait(self._probe_now, self.circuit.seconds_until_probe())
        if self._stopping.is_set():
            return False
        if not await self.sandbox.redis.check(timeout_seconds=self.settings.broker_timeout_seconds):
            self.circuit.probe_failed()
            return False
        lasted = self.circuit.close() or 0.0
        self._broker_back.set()
        self._consumer_wake.set()
        self._audit_due_at = time.monotonic()  # had it restarted, it may have lost what it held
        logger.warning("outbox broker answers again in sandbox %s after %.1f s", self.sandbox.id, lasted)
        self._note(f"broker answers again after {lasted:.1f} s: publishing resumes")
        return True

    async def _audit_if_due(self) -> Optional[AuditReport]:
        if self._audit_due_at is None or time.monotonic() < self._audit_due_at:
            return None
        report = await self.audit.run()
        if report.broker_error:
            return report
        pruned = await prune_delivered_events(
            self.sandbox,
            keep=self.settings.keep_published_events,
            inbox_retention_seconds=self.settings.inbox_retention_seconds,
        )
        if pruned:
            self.pruned_total += pruned
            self._note(f"pruned {pruned} events published and consumed, beyond the newest {self.settings.keep_published_events}")
        self._audit_due_at = time.monotonic() + self.settings.audit_interval_seconds if report.checked else None
        if report.missing:
            self._note(
                f"audit: {report.missing} published events were gone from the stream and never consumed; "
                f"{report.republished} republished"
            )
            logger.warning("outbox audit in sandbox %s republished %d lost events", self.sandbox.id, report.republished)
        return report

    def _until_audit(self, wait: float) -> float:
        if self._audit_due_at is None:
            return wait
        return max(0.0, min(wait, self._audit_due_at - time.monotonic()))

    async def _wait(self, wake: asyncio.Event, seconds: float) -> None:
        """Sleep up to `seconds`, ending early when `wake` is set or the service stops."""
        waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=max(0.001, seconds), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _note_batch(self, report: BatchReport) -> None:
        if not report.claimed:
            return
        parts = [f"claimed {report.claimed}", f"published {report.published}"]
        if report.failed:
            parts.append(f"{report.failed} refused by the broker: failed")
        if report.released:
            parts.append(f"{report.released} back to pending (broker down)")
        if report.lease_lost:
            parts.append(f"{report.lease_lost} had lost their lease")
        self._note(", ".join(parts) + f" in {report.seconds * 1000:.1f} ms")

    def _note_error(self, worker: str, error: BaseException) -> None:
        description = f"{worker} error: {type(error).__name__}: {error}"[:300]
        if self._errors_noted.get(worker) != description:  # one line per new error, not one per retry
            self._errors_noted[worker] = description
            logger.warning("outbox %s in sandbox %s", description, self.sandbox.id)
            self._note(description)

    async def _on_commit(self, changes: CommittedChanges) -> None:
        if any(isinstance(obj, DomainEvent) for obj in changes.inserted):
            self.changes += 1
            self._publisher_wake.set()

    async def _on_reset(self, sandbox: Sandbox) -> None:
        self.consumer.duplicates_ignored = 0
        self.audit = PublishedEventAudit(sandbox, self.settings)
        self.activity.clear()
        self._note("sandbox reset: events, inbox and stream emptied")

    async def _on_release(self, sandbox: Sandbox) -> None:
        await self.stop()


OUTBOX_SERVICE_NAME = "outbox"


def outbox_service(sandbox: Sandbox, settings: Optional[OutboxSettings] = None) -> OutboxService:
    """The sandbox's outbox machinery, created on first use (settings apply only to that first call)."""
    return sandbox.service(OUTBOX_SERVICE_NAME, lambda owner: OutboxService(owner, settings))


@journaled("publisher_started")
async def start_event_publisher(sandbox: Sandbox) -> bool:
    """Start the sandbox's publisher and consumer in the background; False if already running."""
    return await outbox_service(sandbox).start()


@journaled("publisher_stopped")
async def stop_event_publisher(sandbox: Sandbox) -> bool:
    """Stop them after their current batch; False if they were not running."""
    return await outbox_service(sandbox).stop()


async def publish_pending_and_stop(sandbox: Sandbox) -> int:
    """For the sandbox going dormant: publish what is pending, stop, remember to resume; returns how many went out.

    Does nothing (0) for a sandbox whose outbox never started. The runtime calls it before it
    lets a sandbox sleep; resume_event_publisher when the learner comes back.
    """
    service = sandbox.services.get(OUTBOX_SERVICE_NAME)
    return await service.publish_pending_and_stop() if service is not None else 0


async def resume_event_publisher(sandbox: Sandbox) -> bool:
    """For the learner's return: start the publisher again if it was on when the sandbox went dormant."""
    service = sandbox.services.get(OUTBOX_SERVICE_NAME)
    return await service.resume() if service is not None else False


_broker_durability: "weakref.WeakKeyDictionary[RedisService, BrokerDurability]" = weakref.WeakKeyDictionary()


async def read_durability_of(service: RedisService) -> BrokerDurability:
    """How this Redis keeps its streams across a restart: asked once (the Runtime asks at start-up), then known.

    A broker that does not answer says "unknown", and is asked again next time.
    """
    known = _broker_durability.get(service)
    if known is None:
        try:
            known = await asyncio.wait_for(
                read_broker_durability(service.client, in_process=service.mode == "fakeredis"), 2.0
            )
        except REDIS_ERRORS:
            return BrokerDurability("unknown", "the broker did not answer, so how it persists is not known yet.")
        _broker_durability[service] = known
    return known


async def broker_durability(sandbox: Sandbox) -> BrokerDurability:
    """How the sandbox's broker keeps its stream across a restart (read at start-up; no round trip after)."""
    return await read_durability_of(sandbox.redis.service)


@dataclass(frozen=True)
class PublisherState:
    """Whether the sandbox's publisher runs and whether its broker connection is cut (no database call)."""

    running: bool
    publisher_name: str
    broker_cut_off: bool
    settings: OutboxSettings


async def event_publisher_state(sandbox: Sandbox) -> PublisherState:
    """The publisher's switches, for the page's controls."""
    service = outbox_service(sandbox)
    return PublisherState(
        running=service.running,
        publisher_name=service.publisher.name,
        broker_cut_off=sandbox.redis.cut_off,
        settings=service.settings,
    )


async def outbox_changes(sandbox: Sandbox) -> int:
    """A number that moves whenever the outbox may have changed: an event committed in this process,
    a batch published or consumed, an outage, a reset (anything the activity log notes).

    Reading it costs no query, so an idle status panel can look every few seconds and redraw only
    when it moved: a score stored in another tab, or committed by another replica (its NOTIFY
    wakes this publisher, whose batch moves the number).
    """
    return outbox_service(sandbox).changes


async def set_broker_outage(sandbox: Sandbox, *, cut: bool) -> bool:
    """Cut this sandbox off from the broker (connections really fail) or reconnect; True when it answers.

    The switch PINGs at once, so the status stops saying 'degraded' as soon as Redis answers,
    and a relay paused by the outage probes now instead of after its backoff.
    """
    service = outbox_service(sandbox)
    answers = await sandbox.redis.switch_outage(cut=cut, timeout_seconds=service.settings.broker_timeout_seconds)
    if answers:
        service.wake()
    return answers


async def retry_failed_events(sandbox: Sandbox) -> int:
    """Give every failed event a fresh set of attempts (pending, due now); returns how many."""
    retry = (
        update(DomainEvent)
        .where(DomainEvent.status == "failed")
        .values(status="pending", attempts=0, next_attempt_at=utc_now(), claimed_by=None, claimed_until=None)
    )
    async with get_session(sandbox) as session:
        result = await session.execute(retry, execution_options={"synchronize_session": False})
    outbox_service(sandbox).wake()
    return int(result.rowcount)


@dataclass(frozen=True)
class OutboxStatus:
    """The event status panel: counts, rates and latencies measured now, and the latest events."""

    publisher_running: bool
    broker_cut_off: bool
    broker_outage_seconds: Optional[float]  # how long the relay has been paused (None: not paused)
    changes: int  # outbox_changes as it was before anything below was read
    pending: int
    published: int
    failed: int
    delivered: int
    duplicates_ignored: int
    stream_length: Optional[int]  # None while the broker cannot be reached
    consumer_lag: Optional[int]  # entries the consumer group has not read yet
    consumer_unacknowledged: Optional[int]  # read but not acknowledged yet
    events_per_second: float  # published during the last RATE_WINDOW_SECONDS, per second
    oldest_pending_age_seconds: Optional[float]
    median_latency_ms: Optional[float]  # commit-to-publish, over the latest published events
    p95_latency_ms: Optional[float]
    last_audit: Optional[AuditReport]
    republished_by_audits: int
    pruned: int  # published and consumed events pruned so far (beyond the newest keep_published_events)
    durability: BrokerDurability
    pending_events: list[dict[str, Any]]
    published_events: list[dict[str, Any]]
    failed_events: list[dict[str, Any]]
    activity: list[str]


RATE_WINDOW_SECONDS = 5.0
LATENCY_SAMPLE_SIZE = 200  # the median and p95 latencies are over the newest this many


def _event_row(event: DomainEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "event_type": event.event_type,
        "aggregate_id": event.aggregate_id,
        "status": event.status,
        "attempts": event.attempts,
        "created_at": event.created_at,
        "next_attempt_at": event.next_attempt_at,
        "last_error": event.last_error,
        "published_at": event.published_at,
    }


async def _event_overview(session: AsyncSession, now: datetime) -> tuple[dict[str, int], int, Optional[datetime]]:
    """Events by status, delivered ones, the rate window's count and the oldest pending event: ONE statement.

    Each figure is a scalar subquery over an index; together they take one round trip (the panel
    redraws on every refresh of every open tab, and each round trip costs the runtime's loop).
    """
    events = DomainEvent

    def count(*where: Any) -> Any:
        return select(func.count()).select_from(events).where(*where).scalar_subquery()

    delivered = (  # of the events the outbox still holds
        select(func.count())
        .select_from(events)
        .join(ConsumedEvent, ConsumedEvent.event_id == events.id)
        .where(events.status == "published")
        .scalar_subquery()
    )
    oldest_pending = (
        select(events.created_at).where(events.status == "pending").order_by(events.created_at).limit(1).scalar_subquery()
    )
    since = now - timedelta(seconds=RATE_WINDOW_SECONDS)
    pending, published, failed, delivered_count, recently_published, oldest = (
        await session.execute(
            select(
                count(events.status == "pending"),
                count(events.status == "published"),
                count(events.status == "failed"),
                delivered,
                count(events.status == "published", events.published_at >= since),
                oldest_pending,
            )
        )
    ).one()
    counts = {"pending": pending, "published": published, "failed": failed, "delivered": delivered_count}
    return counts, int(recently_published or 0), oldest


async def _latency_sample(session: AsyncSession) -> list[float]:
    """Commit-to-publish latencies (ms) of the newest LATENCY_SAMPLE_SIZE published events, sorted."""
    latency_sample = await session.execute(
        select(DomainEvent.created_at, DomainEvent.published_at)
        .where(DomainEvent.status == "published")
        .order_by(DomainEvent.published_at.desc())
        .limit(LATENCY_SAMPLE_SIZE)
    )
    # Latency runs from created_at, stamped inside the writing transaction just before its commit,
    # so it slightly overstates commit-to-publish, never understates it.
    return sorted((published - created).total_seconds() * 1000 for created, published in latency_sample)


async def _latest_events(session: AsyncSession, *, limit: int) -> dict[str, list[dict[str, Any]]]:
    """The oldest pending and failed events and the latest published ones (with their delivery time)."""
    latest: dict[str, list[dict[str, Any]]] = {}
    for status in ("pending", "failed"):
        statement = select(DomainEvent).where(DomainEvent.status == status).order_by(DomainEvent.created_at).limit(limit)
        latest[status] = [_event_row(event) for event in (await session.scalars(statement)).all()]
    published = await session.execute(
        select(DomainEvent, ConsumedEvent.consumed_at)
        .outerjoin(ConsumedEvent, ConsumedEvent.event_id == DomainEvent.id)
        .where(DomainEvent.status == "published")
        .order_by(DomainEvent.published_at.desc(), DomainEvent.created_at.desc())
        .limit(limit)
    )
    latest["published"] = [{**_event_row(event), "delivered_at": delivered_at} for event, delivered_at in published]
    return latest


async def _stream_backlog(sandbox: Sandbox, timeout_seconds: float) -> Optional[StreamBacklog]:
    try:
        return await asyncio.wait_for(
            read_stream_backlog(sandbox.redis.client, sandbox.redis.key("events"), EVENT_CONSUMER_GROUP), timeout_seconds
        )
    except REDIS_ERRORS:
        return None  # the broker cannot be reached


def _percentile(sorted_values: list[float], fraction: float) -> Optional[float]:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


async def outbox_status(sandbox: Sandbox, *, limit: int = 20) -> OutboxStatus:
    """Count events by status, measure rate, backlog age and latency, and list the latest of each kind."""
    service = outbox_service(sandbox)
    now, changes = utc_now(), service.changes  # first: a change while reading shows as a change after
    async with get_session(sandbox) as session:
        counts, recently_published, oldest_pending = await _event_overview(session, now)
        latencies = await _latency_sample(session)
        latest = await _latest_events(session, limit=limit)
    backlog = await _stream_backlog(sandbox, service.settings.broker_timeout_seconds)
    return OutboxStatus(
        publisher_running=service.running,
        broker_cut_off=sandbox.redis.cut_off,
        broker_outage_seconds=service.circuit.seconds_open() if service.circuit.is_open else None,
        changes=changes,
        pending=int(counts.get("pending", 0)),
        published=int(counts.get("published", 0)),
        failed=int(counts.get("failed", 0)),
        delivered=int(counts.get("delivered") or 0),
        duplicates_ignored=service.consumer.duplicates_ignored,
        stream_length=None if backlog is None else backlog.length,
        consumer_lag=None if backlog is None else backlog.lag,
        consumer_unacknowledged=None if backlog is None else backlog.pending,
        events_per_second=recently_published / RATE_WINDOW_SECONDS,
        oldest_pending_age_seconds=(now - oldest_pending).total_seconds() if oldest_pending else None,
        median_latency_ms=statistics.median(latencies) if latencies else None,
        p95_latency_ms=_percentile(latencies, 0.95),
        last_audit=service.audit.last,
        republished_by_audits=service.audit.republished_total,
        pruned=service.pruned_total,
        durability=await broker_durability(sandbox),
        pending_events=latest["pending"],
        published_events=latest["published"],
        failed_events=latest["failed"],
        activity=list(service.activity),
    )


# =============================================================================================
# 13a. Progress
# =============================================================================================
#
# The learner's path: one Step per thing the user guide asks them to do and see, in the guide's
# order, plus optional steps QuLab goes beyond the guide with. A step is done when what it teaches
# has happened in this sandbox, which its check reads from the journal the demos wrote (6a):
# clicking a button proves nothing; "N+1 fetch: 5 statements for N = 3" does. Progress lives in
# the sandbox's database, so it survives reloads and replicas and goes when the sandbox goes.


@dataclass(frozen=True)
class JournalLine:
    """One journal entry as the checks read it."""

    id: int
    recorded_at: datetime
    kind: str
    detail: str
    facts: dict[str, Any]


Check = Callable[[Sequence[JournalLine]], Optional[str]]  # the evidence when done, None when not yet


@dataclass(frozen=True)
class Step:
    """One thing to do and see; its check says whether this sandbox shows it happened."""

    key: str
    section: int
    title: str
    how: str = field(kw_only=True)  # what to do, with the guide's button labels
    check: Check = field(kw_only=True)
    optional: bool = field(default=False, kw_only=True)


def _first(journal: Sequence[JournalLine], kind: str, where: Callable[[dict[str, Any]], bool] = lambda _: True) -> Optional[JournalLine]:
    return next((line for line in journal if line.kind == kind and where(line.facts)), None)


def _recorded(kind: str, where: Callable[[dict[str, Any]], bool] = lambda _: True) -> Check:
    """Done when the journal holds an entry of this kind (that satisfies `where`)."""

    def check(journal: Sequence[JournalLine]) -> Optional[str]:
        line = _first(journal, kind, where)
        return line.detail if line else None

    return check


def _fetched(path: str, enough_statements: Callable[[int, int], bool]) -> Check:
    """Done when a fetch along this path loaded at least one score with the statement count it teaches."""
    return _recorded(
        "user_and_scores_fetched",
        lambda facts: facts["path"] == path and facts["scores"] >= 1 and enough_statements(facts["statements"], facts["scores"]),
    )


def _fetches_compared(journal: Sequence[JournalLine]) -> Optional[str]:
    """The same user with the same N fetched both ways, and the statement counts differ."""
    fetches = [line.facts for line in journal if line.kind == "user_and_scores_fetched" and line.facts["scores"] >= 1]
    for naive in (facts for facts in fetches if facts["path"] == "naive"):
        for eager in (facts for facts in fetches if facts["path"] == "eager"):
            same_data = (naive["user_id"], naive["scores"]) == (eager["user_id"], eager["scores"])
            if same_data and naive["statements"] != eager["statements"]:
                return (
                    f"Same user, N = {naive['scores']}: N+1 ran {naive['statements']} statements, "
                    f"eager loading {eager['statements']}."
                )
    return None


def _cache_reads(journal: Sequence[JournalLine], read: Optional[str] = None) -> list[JournalLine]:
    return [line for line in journal if line.kind == "cache_read" and read in (None, line.facts["read"])]


def _miss_then_hit(read: str) -> Check:
    """A MISS that stored the value, then a HIT that served it: same key, in that order."""

    def check(journal: Sequence[JournalLine]) -> Optional[str]:
        missed: dict[str, JournalLine] = {}
        for line in _cache_reads(journal, read):
            if line.facts["outcome"] == CACHE_MISS:
                missed.setdefault(line.facts["key"], line)
            elif line.facts["outcome"] == CACHE_HIT and line.facts["key"] in missed:
                miss = missed[line.facts["key"]]
                return f"MISS at {miss.recorded_at:%H:%M:%S}, then HIT at {line.recorded_at:%H:%M:%S} on {line.facts['key']}."
        return None

    return check


def _metrics_moved(journal: Sequence[JournalLine]) -> Optional[str]:
    """The cache's counters hold hits and misses both, so H is measured, not 0 or 1 by default."""
    for line in _cache_reads(journal):
        facts = line.facts
        if facts["hits"] >= 1 and facts["misses"] >= 1:
            return f"H = {facts['hits']} hits ÷ {facts['requests']} requests = {facts['hits'] / facts['requests']:.2f}."
    return None


def _invalidated_then_missed(journal: Sequence[JournalLine]) -> Optional[str]:
    """A key was read (so cached), invalidated on request, then read again as a MISS."""
    read_before: set[str] = set()
    invalidated: dict[str, JournalLine] = {}
    for line in journal:
        if line.kind == "cache_invalidated" and line.facts["applied"]:
            for key in line.facts["keys"]:
                if key in read_before:
                    invalidated[key] = line
        elif line.kind == "cache_read" and line.facts["outcome"] in (CACHE_HIT, CACHE_MISS):
            key = line.facts["key"]
            if line.facts["outcome"] == CACHE_MISS and key in invalidated:
                return f"Invalidated at {invalidated[key].recorded_at:%H:%M:%S}, then MISS at {line.recorded_at:%H:%M:%S}."
            read_before.add(key)
            invalidated.pop(key, None)
    return None


def _survived_redis_outage(journal: Sequence[JournalLine]) -> Optional[str]:
    """A read the database answered while Redis failed, then a normal read once it answered again."""
    fallback: Optional[JournalLine] = None
    for line in _cache_reads(journal):
        if line.facts["outcome"] == CACHE_FALLBACK:
            fallback = fallback or line
        elif fallback is not None:
            return f"FALLBACK at {fallback.recorded_at:%H:%M:%S} (database answered), then {line.facts['outcome']} at {line.recorded_at:%H:%M:%S}."
    return None


def _stopped_after_start(journal: Sequence[JournalLine]) -> Optional[str]:
    started = _first(journal, "publisher_started")
    stopped = started and next((line for line in journal if line.kind == "publisher_stopped" and line.id > started.id), None)
    return stopped.detail if stopped else None


def _published_in_background(journal: Sequence[JournalLine]) -> Optional[str]:
    line = next((line for line in journal if line.kind in ("events_published", "published_after_outage")), None)
    return line.detail if line else None


STEPS: tuple[Step, ...] = (
    # 1. Data models
    Step("create_user", 1, "Create a user",
         how='Enter an email and a name, then click "Create User".',
         check=_recorded("user_created")),
    # 2. Connectivity and pooling
    Step("initialize", 2, "Initialize and see the two sample users",
         how='Click "Initialize In-Memory SQLite Database & Create Sample Users".',
         check=_recorded("initialized", lambda facts: len(facts["sample_user_ids"]) == len(SAMPLE_USERS))),
    Step("pool_experiment", 2, "Measure pooling", optional=True,
         how='Click "Run Pooling Experiment": a pool against a new connection per query.',
         check=_recorded("pool_experiment")),
    # 3. Repository pattern and N+1: an N+1 fetch only counts with scores to fetch (N >= 1)
    Step("add_scores", 3, "Add three sample scores",
         how='Enter a user id, then click "Add 3 Sample Scores for User".',
         check=_recorded("sample_scores_added", lambda facts: facts["count"] >= 3)),
    Step("fetch_n_plus_one", 3, "Fetch with N+1",
         how='Click "Fetch User & Scores (Simulated N+1)" for a user with scores.',
         check=_fetched("naive", lambda statements, scores: statements >= scores + 1)),
    Step("fetch_eager", 3, "Fetch with eager loading",
         how='Click "Fetch User & Scores (Eager Loading)" for the same user.',
         check=_fetched("eager", lambda statements, scores: statements <= 2)),
    Step("compare_fetches", 3, "See the statement counts differ",
         how="Fetch the same user both ways and compare the counts.",
         check=_fetches_compared),
    Step("scale_up", 3, "Compare the strategies at scale", optional=True,
         how='Click "Compare Loading Strategies".',
         check=_recorded("loading_strategies_compared", lambda facts: facts["identical_results"])),
    # 4. Caching: only reads Redis answered count (a FALLBACK during an outage is neither hit nor miss)
    Step("user_miss_then_hit", 4, "User: a miss, then a hit",
         how='Click "Fetch User (Cached)" twice.',
         check=_miss_then_hit("user")),
    Step("score_miss_then_hit", 4, "Latest score: a miss, then a hit",
         how='Click "Fetch Latest AIRScore (Cached)" twice.',
         check=_miss_then_hit("latest_airscore")),
    Step("metrics_move", 4, "See the metrics count hits and misses",
         how="Read the cache metrics after a few reads.",
         check=_metrics_moved),
    Step("invalidate_then_miss", 4, "Invalidate, then miss again",
         how='Click "Invalidate Cache for this User", then fetch again.',
         check=_invalidated_then_missed),
    Step("redis_outage", 4, "Survive a Redis outage", optional=True,
         how="Cut Redis off, fetch (the database answers), reconnect, fetch again.",
         check=_survived_redis_outage),
    # 5. Eventing: "published" is journaled by the background publisher itself, never by a click
    Step("store_airscore", 5, "Store a score with its pending event",
         how='Click "Calculate & Store AIRScore (Creates Pending Event)".',
         check=_recorded("airscore_stored", lambda facts: facts["event_status"] == "pending")),
    Step("start_publisher", 5, "Start the publisher",
         how='Click "Start Event Publisher (Background)".',
         check=_recorded("publisher_started")),
    Step("event_published", 5, "See an event published in the background",
         how='With the publisher running, store a score: it turns published with no click ("Refresh Event Status Now").',
         check=_published_in_background),
    Step("stop_publisher", 5, "Stop the publisher",
         how='Click "Stop Event Publisher".',
         check=_stopped_after_start),
    Step("broker_outage", 5, "Survive a broker outage", optional=True,
         how="Cut the broker off, store a score, reconnect: it is still published.",
         check=_recorded("published_after_outage")),
)  # fmt: skip

# Once a section's required steps are done: one line on what the learner saw ({step key} = its evidence).
SECTION_RECAPS: dict[int, str] = {
    1: "{create_user} Its email is unique whatever its letter case.",
    2: "{initialize}",
    3: "{compare_fetches}",
    4: "Read-through: a miss stores, the next read hits, an invalidation makes it miss again. {metrics_move}",
    5: "Score and event committed in one transaction; then, with no click: {event_published}",
}


@dataclass(frozen=True)
class StepStatus:
    """A step and, when it is done, the evidence this sandbox shows for it."""

    step: Step
    evidence: Optional[str]

    @property
    def done(self) -> bool:
        """True when the sandbox shows the step happened."""
        return self.evidence is not None


@dataclass(frozen=True)
class LearnerProgress:
    """Every step with its status, and the journal they were read from (newest last)."""

    steps: tuple[StepStatus, ...]
    journal: tuple[JournalLine, ...]

    def in_section(self, section: int) -> tuple[StepStatus, ...]:
        """One section's steps, required ones first, in the guide's order."""
        return tuple(status for status in self.steps if status.step.section == section)

    @property
    def required(self) -> tuple[StepStatus, ...]:
        """The steps the guide asks for."""
        return tuple(status for status in self.steps if not status.step.optional)

    @property
    def optional(self) -> tuple[StepStatus, ...]:
        """The steps beyond the guide."""
        return tuple(status for status in self.steps if status.step.optional)

    def next_step(self, section: Optional[int] = None) -> Optional[StepStatus]:
        """The first required step not done yet (in one section, or anywhere)."""
        return next(
            (status for status in self.required if not status.done and section in (None, status.step.section)), None
        )

    def recap(self, section: int) -> Optional[str]:
        """One line on what the learner saw in a section, once its required steps are all done."""
        statuses = self.in_section(section)
        if not all(status.done for status in statuses if not status.step.optional):
            return None
        return SECTION_RECAPS[section].format(**{status.step.key: status.evidence for status in statuses})


MAX_JOURNAL_LINES_READ = 5000


async def learner_progress(sandbox: Sandbox) -> LearnerProgress:
    """Read the sandbox's journal once and run every step's check on it.

    Every rerun draws the sidebar's progress, so a SQLite sandbox keeps its last reading until
    this process writes or deletes journal lines (only this process opens its file). On
    PostgreSQL another replica may write the journal too, so it is read every time.
    """
    generation = sandbox.journal_generation
    if sandbox.backend == "sqlite" and sandbox.progress_read is not None and sandbox.progress_read[0] == generation:
        return sandbox.progress_read[1]
    progress = await _read_learner_progress(sandbox)
    sandbox.progress_read = (generation, progress)
    return progress


async def _read_learner_progress(sandbox: Sandbox) -> LearnerProgress:
    hidden = _active_statement_logs.set(())
    try:
        newest_first = select(JournalEntry.__table__).order_by(JournalEntry.id.desc()).limit(MAX_JOURNAL_LINES_READ)
        async with sandbox.engine.connect() as connection:
            rows = (await connection.execute(newest_first)).all()
    finally:
        _active_statement_logs.reset(hidden)
    journal = tuple(
        JournalLine(row.id, row.recorded_at, row.kind, row.detail, row.facts or {}) for row in reversed(rows)
    )
    return LearnerProgress(tuple(StepStatus(step, _run_check(step, journal)) for step in STEPS), journal)


def _run_check(step: Step, journal: Sequence[JournalLine]) -> Optional[str]:
    try:
        return step.check(journal)
    except (KeyError, TypeError, ValueError):  # an entry written by an older QuLab: it proves nothing
        logger.warning("check %s could not read the journal", step.key, exc_info=True)
        return None


# -- evidence: what each journaled operation measured, in the journal's words -------------------


def _user_created(sandbox: Sandbox, user: User, arguments: dict[str, Any]) -> Evidence:
    return Evidence("user_created", f"User {user.id} created: a new row in users.", {"user_id": user.id})


def _initialized(sandbox: Sandbox, users: list[User], arguments: dict[str, Any]) -> Optional[Evidence]:
    if not users:  # reset=False only created missing tables
        return None
    names = " and ".join(user.name for user in users)
    return Evidence(
        "initialized",
        f"Initialized: schema ready, data cleared, {len(users)} sample users ({names}).",
        {"sample_user_ids": [user.id for user in users]},
    )


def _pool_experiment(sandbox: Sandbox, trials: list[PoolTrial], arguments: dict[str, Any]) -> Evidence:
    pooled, unpooled = trials[0], trials[-1]
    return Evidence(
        "pool_experiment",
        f"Pool experiment, {pooled.requests} queries {pooled.concurrency} at a time: the pool opened "
        f"{pooled.connections_opened} connections ({pooled.throughput:,.0f}/s), NullPool "
        f"{unpooled.connections_opened} ({unpooled.throughput:,.0f}/s).",
        {"pooled_connections": pooled.connections_opened, "unpooled_connections": unpooled.connections_opened},
    )


def _sample_scores_added(sandbox: Sandbox, scores: list[AIRScore], arguments: dict[str, Any]) -> Evidence:
    user_id = scores[0].user_id if scores else ""
    return Evidence(
        "sample_scores_added",
        f"{len(scores)} sample scores added for user {user_id}.",
        {"user_id": user_id, "count": len(scores)},
    )


def _user_and_scores_fetched(sandbox: Sandbox, fetch: UserScoresFetch, arguments: dict[str, Any]) -> Evidence:
    label = "N+1 fetch" if fetch.path == "naive" else "Eager fetch"
    return Evidence(
        "user_and_scores_fetched",
        f"{label}: {fetch.statements.count} statements for N = {len(fetch.scores)} (user {fetch.user.id}).",
        {"path": fetch.path, "user_id": fetch.user.id, "scores": len(fetch.scores), "statements": fetch.statements.count},
    )


def _loading_strategies_compared(
    sandbox: Sandbox, comparison: StrategyComparison, arguments: dict[str, Any]
) -> Evidence:
    largest = comparison.sizes[-1]
    runs = comparison.at(largest)
    counts = ", ".join(f"{strategy} {run.statements}" for strategy, run in runs.items())
    return Evidence(
        "loading_strategies_compared",
        f"Strategies compared up to N = {largest:,} users; statements at that N: {counts}.",
        {"sizes": comparison.sizes, "identical_results": comparison.identical_results},
    )


def _cache_read(sandbox: Sandbox, read: CacheRead, arguments: dict[str, Any]) -> Evidence:
    metrics = cache_for(sandbox).metrics
    what = "user" if read.kind == "user" else "latest AIRScore"
    return Evidence(
        "cache_read",
        f"Cache read ({what}): {read.outcome} on key {read.key}; {metrics.hits} hits of {metrics.requests} reads.",
        {
            "read": read.kind,
            "outcome": read.outcome,
            "key": read.key,
            "user_id": read.user_id,
            "hits": metrics.hits,
            "misses": metrics.misses,
            "requests": metrics.requests,
        },
    )


def _cache_invalidated(sandbox: Sandbox, invalidation: CacheInvalidation, arguments: dict[str, Any]) -> Evidence:
    outcome = "deleted" if invalidation.applied else "pending (Redis did not answer)"
    return Evidence(
        "cache_invalidated",
        f"Cache invalidated on request: {len(invalidation.keys)} keys {outcome}.",
        {"keys": list(invalidation.keys), "applied": invalidation.applied},
    )


def _airscore_stored(sandbox: Sandbox, stored: StoredAIRScore, arguments: dict[str, Any]) -> Evidence:
    return Evidence(
        "airscore_stored",
        f"AIRScore {stored.score.id} and its {stored.event.event_type} event {stored.event.id} "
        f"committed in one transaction, the event {stored.event.status}.",
        {"score_id": stored.score.id, "event_id": stored.event.id, "event_status": stored.event.status},
    )


def _airscore_burst(sandbox: Sandbox, burst: BurstResult, arguments: dict[str, Any]) -> Evidence:
    return Evidence(
        "airscore_burst",
        f"Burst: {burst.writes:,} scores with their events, {burst.concurrency} at a time, in {burst.seconds:.2f} s.",
        {"writes": burst.writes},
    )


@dataclass
class _PublicationWatch:
    """Per sandbox: whether this run of the publisher journaled a publication, and the broker outages then."""

    recorded_this_run: bool = False
    outages_recorded: int = 0  # the broker circuit's outage count when a publication was last journaled

    async def forget_run(self, sandbox: Sandbox) -> None:
        """The sandbox was reset (its journal emptied): the next publication is journaled again."""
        self.recorded_this_run = False


def _publication_watch(sandbox: Sandbox) -> _PublicationWatch:
    def create(owner: Sandbox) -> _PublicationWatch:
        watch = _PublicationWatch()
        owner.reset_listeners.append(watch.forget_run)
        return watch

    return sandbox.service("publication_watch", create)


def _publisher_switched(kind: str, verb: str) -> Callable[[Sandbox, bool, dict[str, Any]], Optional[Evidence]]:
    def describe(sandbox: Sandbox, switched: bool, arguments: dict[str, Any]) -> Optional[Evidence]:
        if not switched:  # it already was running (or stopped): nothing happened
            return None
        service = outbox_service(sandbox)
        watch = _publication_watch(sandbox)
        # An outage still going on counts: the events it holds back are published in this run.
        watch.recorded_this_run = False
        watch.outages_recorded = service.circuit.outages - (1 if service.circuit.is_open else 0)
        name = service.publisher.name
        return Evidence(kind, f"Publisher {name} {verb} at {utc_now():%H:%M:%S}.", {"publisher": name})

    return describe


_EVIDENCE: dict[str, Callable[[Sandbox, Any, dict[str, Any]], Optional[Evidence]]] = {
    "user_created": _user_created,
    "initialized": _initialized,
    "pool_experiment": _pool_experiment,
    "sample_scores_added": _sample_scores_added,
    "user_and_scores_fetched": _user_and_scores_fetched,
    "loading_strategies_compared": _loading_strategies_compared,
    "cache_read": _cache_read,
    "cache_invalidated": _cache_invalidated,
    "airscore_stored": _airscore_stored,
    "airscore_burst": _airscore_burst,
    "publisher_started": _publisher_switched("publisher_started", "started in the background"),
    "publisher_stopped": _publisher_switched("publisher_stopped", "stopped"),
}


def describe_evidence(kind: str, sandbox: Sandbox, result: Any, arguments: dict[str, Any]) -> Optional[Evidence]:
    """What a journaled operation measured, from what it returned (None: nothing worth a line)."""
    try:
        return _EVIDENCE[kind](sandbox, result, arguments)
    except Exception:  # a describer's bug must not fail the operation that already succeeded
        logger.exception("could not describe %s in sandbox %s", kind, sandbox.id)
        return None


async def journal_background_publication(sandbox: Sandbox, *, publisher: str, report: BatchReport) -> None:
    """From the publisher's own loop: journal the first events it publishes in a run, and after an outage."""
    watch = _publication_watch(sandbox)
    outages = outbox_service(sandbox).circuit.outages
    after_outage = outages > watch.outages_recorded
    if not report.published or (watch.recorded_this_run and not after_outage):
        return  # one line per run (and per outage survived), not one per batch
    watch.recorded_this_run, watch.outages_recorded = True, outages
    newest = (
        select(DomainEvent.id, DomainEvent.published_at)
        .where(DomainEvent.status == "published")
        .order_by(DomainEvent.published_at.desc())
        .limit(1)
    )
    hidden = _active_statement_logs.set(())
    try:
        async with sandbox.engine.connect() as connection:
            event_id, published_at = (await connection.execute(newest)).one()
    except Exception:
        logger.warning("could not read the published event in sandbox %s", sandbox.id, exc_info=True)
        return
    finally:
        _active_statement_logs.reset(hidden)
    survived = ", once the broker answered again after an outage" if after_outage else ""
    await record_evidence(
        sandbox,
        Evidence(
            "published_after_outage" if after_outage else "events_published",
            f"Event {event_id} published at {published_at:%H:%M:%S} by the background publisher {publisher}"
            f"{survived} ({report.published} in that batch).",
            {"event_id": event_id, "publisher": publisher, "batch": report.published},
        ),
    )


# -- Download my sandbox ------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxExport:
    """The learner's sandbox as one file to take home."""

    file_name: str
    mime: str
    content: bytes


def export_file_name(*, backend: str, sandbox_id: str) -> tuple[str, str]:
    """The download's file name and MIME type: the SQLite file itself, or a zip of CSV files."""
    if backend == "sqlite":
        return f"qulab-sandbox-{sandbox_id}.sqlite3", "application/vnd.sqlite3"
    return f"qulab-sandbox-{sandbox_id}.zip", "application/zip"


async def export_sandbox(sandbox: Sandbox) -> SandboxExport:
    """A consistent copy of every table: SQLite's online backup of the file, or one CSV per table in a zip."""
    file_name, mime = export_file_name(backend=sandbox.backend, sandbox_id=sandbox.id)
    if sandbox.backend == "sqlite":
        content = await asyncio.to_thread(sandbox_export.sqlite_snapshot, sandbox.location)
    else:
        content = await sandbox_export.csv_zip(sandbox.engine, Base.metadata.sorted_tables)
    return SandboxExport(file_name, mime, content)


# =============================================================================================
# 14. Runtime
# =============================================================================================


@dataclass(frozen=True)
class RuntimeStatus:
    """What the sidebar shows: backends, pool settings, Redis mode, this session's sandbox and the class."""

    database: str
    backend: str
    database_note: str
    pool_size: int
    max_overflow: int
    pool_timeout_seconds: float
    pool_pre_ping: bool
    redis_mode: str
    redis_reason: str
    redis_degraded: bool
    redis_cut_off: bool
    redis_last_error: str
    redis_breaker: str  # the Redis breaker's state in one line (closed / open / half-open)
    sandbox_id: str
    sandbox_location: str
    sandbox_notice: Optional[str]
    live_sandboxes: int  # awake (active + idle)
    sandbox_states: dict[str, int]
    capacity: int
    capacity_limited_by: str
    connections_in_use: int
    connection_budget: int
    sandbox_idle_minutes: float
    sandbox_grace_seconds: float
    broker_durability: BrokerDurability  # read in the same round trip: one per rerun


def _as_qulab_error(error: Exception, what: str, settings: Settings) -> QuLabError:
    """Turn any failure into an error a page may show: QuLabErrors as they are, the rest logged and named."""
    if isinstance(error, QuLabError):
        return error
    if isinstance(error, (OperationalError, PoolTimeoutError, OSError)):
        logger.exception("database unavailable in %s", what)
        where = mask_url(settings.database_url) if settings.database_url else "the embedded SQLite files"
        return BackendUnavailableError(
            f"The database ({where}) did not answer ({type(error).__name__}); nothing was changed. "
            "Check that it is running and that DATABASE_URL is right, then try again."
        )
    logger.exception("unexpected error in %s", what)
    return UnexpectedError(
        f"Something went wrong ({type(error).__name__}); nothing was changed. The details are in the server log."
    )


class Runtime:
    """One background thread running one event loop, owner of every engine, client and worker.

    Streamlit runs each rerun on a script thread; async engines and Redis clients belong to the
    loop that created them. So nothing async is created per rerun: pages hand coroutines to
    this loop (run) and wait for the result. A background task runs the sandboxes' lifecycle.
    """

    def __init__(self, settings: Optional[Settings] = None) -> None:
        self.settings = settings or Settings.from_environment()
        resolve_database_target(self.settings.database_url)  # fail fast on a bad DATABASE_URL
        # A click hands work between threads (server, script, this loop, drivers) many times; each
        # hand-over waits up to this long while another thread runs Python. Process-wide.
        sys.setswitchinterval(self.settings.gil_switch_interval_ms / 1000)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="qulab-runtime", daemon=True)
        self._closed = False
        self.redis: RedisService
        self.broker_durability: BrokerDurability
        self.sandboxes: SandboxRegistry
        self._lifecycle: Optional[asyncio.Task[None]] = None
        self._thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self._stop_loop()
            raise

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _start(self) -> None:
        self.redis = await RedisService.connect(self.settings)
        # Read now, not on first use: the sidebar and the outbox page say from the first page
        # whether a broker restart could lose events (section 13).
        self.broker_durability = await read_durability_of(self.redis)
        self.sandboxes = SandboxRegistry(self.settings, self.redis)
        self._lifecycle = asyncio.get_running_loop().create_task(self._run_sandbox_lifecycle())

    @property
    def lifecycle_interval_seconds(self) -> float:
        """How often idle sandboxes are checked: a fraction of the grace period and the idle limit."""
        settings = self.settings
        return max(0.2, min(30.0, settings.sandbox_grace_seconds / 4 or 0.2, settings.sandbox_idle_seconds / 4))

    async def _run_sandbox_lifecycle(self) -> None:
        while True:
            await asyncio.sleep(self.lifecycle_interval_seconds)
            try:
                await self.sandboxes.sweep()
                await self.sandboxes.reap_abandoned_schemas()
            except Exception:
                logger.exception("the sandbox lifecycle pass failed")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The runtime's event loop (for tests and workers; pages use run())."""
        return self._loop

    @property
    def closed(self) -> bool:
        """True once close() ran (or start-up failed)."""
        return self._closed

    def run(self, coroutine: Awaitable[T], *, timeout: Optional[float] = 120.0) -> T:
        """Run a coroutine on the runtime's loop from any other thread and return its result."""
        if threading.current_thread() is self._thread or self._closed:
            close = getattr(coroutine, "close", None)
            if close is not None:
                close()  # never started: close it so Python does not warn it was never awaited
            if self._closed:
                raise RuntimeError("the runtime is closed")
            raise RuntimeError("Runtime.run() was called from the runtime's own loop; await instead.")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)  # type: ignore[arg-type]
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise OperationTimeoutError(
                f"The operation did not finish within {timeout:g} seconds and was cancelled."
            ) from None

    def lab(self, sandbox_id: str) -> "Lab":
        """Open a sandbox from Python: it is held (never put to sleep or deleted) until lab.close() or close().

        Raises ClassFullError if the class is full, like a browser would.
        """
        lab = Lab(self, sandbox_id, holder=f"lab:{uuid.uuid4().hex}")
        try:
            self.run(self.sandboxes.acquire(sandbox_id, holder=lab.holder))
        except Exception as error:
            raise _as_qulab_error(error, "Runtime.lab", self.settings) from error
        return lab

    async def sandbox(self, sandbox_id: str, *, holder: Optional[str] = None) -> Sandbox:
        """The awake sandbox with this id, created on first use (call on the runtime's loop)."""
        return await self.sandboxes.acquire(sandbox_id, holder=holder)

    def release_holder(self, holder: str) -> None:
        """Drop a hold from any thread (a browser session's end); a closed runtime has nothing to drop."""
        if not self._closed:
            try:
                self._loop.call_soon_threadsafe(self.sandboxes.release_holder, holder)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def close(self) -> None:
        """Stop every sandbox, close Redis and stop the loop thread.

        Embedded SQLite files belong to this process and are deleted. PostgreSQL schemas are kept
        (another replica may serve their learners) and reaped once their leases expire; files
        beside DATABASE_URL=sqlite:///path are kept for the next start, which deletes them once idle.
        """
        if self._closed:
            return

        async def shut_down() -> None:
            if self._lifecycle is not None:
                self._lifecycle.cancel()
            await self.sandboxes.close(delete_data=self.sandboxes.target.kind == "embedded")
            await self.redis.close()

        try:
            self.run(shut_down(), timeout=30)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class Lab:
    """What a page or a script holds: one sandbox plus the runtime that runs its coroutines.

    `lab.run(create_user, email=…, name=…)` calls `create_user(sandbox, email=…, name=…)` on the
    runtime's loop and returns its result. QuLabError subclasses pass through unchanged; any
    other failure is logged with its traceback and re-raised as a QuLabError with a short
    message, so a page never shows a traceback. Every call renews the holder's hold.
    """

    def __init__(self, runtime: Runtime, sandbox_id: str, *, holder: Optional[str] = None) -> None:
        self.runtime = runtime
        self.sandbox_id = sandbox_id
        self.holder = holder

    def run(self, operation: Callable[..., Awaitable[T]], /, *, timeout: Optional[float] = 120.0, **kwargs: Any) -> T:
        """Run `operation(sandbox, **kwargs)` in this lab's sandbox and return what it returns."""

        async def call() -> T:
            async with self.runtime.sandboxes.using(self.sandbox_id, holder=self.holder) as sandbox:
                return await operation(sandbox, **kwargs)

        try:
            return self.runtime.run(call(), timeout=timeout)
        except Exception as error:
            converted = _as_qulab_error(error, getattr(operation, "__name__", str(operation)), self.runtime.settings)
            if converted is error:
                raise
            raise converted from error

    def close(self) -> None:
        """Let go of the sandbox: it may go dormant after the grace period, and is deleted after the idle limit."""
        if self.holder is not None:
            self.runtime.release_holder(self.holder)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def status(self) -> RuntimeStatus:
        """The sidebar's status panel for this sandbox, with the broker's durability: one round trip per rerun."""
        runtime = self.runtime

        async def collect(sandbox: Sandbox) -> RuntimeStatus:
            return _collect_status(runtime, sandbox, await broker_durability(sandbox))

        return self.run(collect, timeout=30)


def _collect_status(runtime: Runtime, sandbox: Sandbox, durability: BrokerDurability) -> RuntimeStatus:
    registry, settings = runtime.sandboxes, runtime.settings
    capacity = registry.capacity()
    counts = registry.counts()
    notice, sandbox.notice = sandbox.notice, None  # shown once
    pool_size, max_overflow = (
        (settings.sqlite_pool_size, settings.sqlite_max_overflow)
        if registry.backend == "sqlite"
        else (settings.pool_size, settings.max_overflow)
    )
    return RuntimeStatus(
        database=registry.describe_database(),
        backend=registry.backend,
        database_note=registry.target.note,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout_seconds=settings.pool_timeout_seconds,
        pool_pre_ping=engine_pre_pings(sandbox.engine),
        redis_mode=runtime.redis.mode,
        redis_reason=runtime.redis.reason,
        redis_degraded=sandbox.redis.health.degraded,
        redis_cut_off=sandbox.redis.cut_off,
        redis_last_error=sandbox.redis.health.last_error,
        redis_breaker=sandbox.redis.breaker.describe(),
        sandbox_id=sandbox.id,
        sandbox_location=sandbox.location,
        sandbox_notice=notice,
        live_sandboxes=len(registry),
        sandbox_states=counts,
        capacity=capacity.sandboxes,
        capacity_limited_by=capacity.limited_by,
        connections_in_use=registry.budget.in_use,
        connection_budget=registry.budget.total,
        sandbox_idle_minutes=settings.sandbox_idle_seconds / 60,
        sandbox_grace_seconds=settings.sandbox_grace_seconds,
        broker_durability=durability,
    )


# ---------------------------------------------------------------------------------------------
# The experiment process: long experiments run beside the app, one at a time
# ---------------------------------------------------------------------------------------------
# Every learner's clicks share this process's one GIL. The loading-strategy comparison and the
# pooling experiment are seconds of CPU-bound Python; here they would stall everyone's clicks,
# even from a loop of their own. They run in one spawned process (qulab_worker), each on an
# engine of its own on the learner's database; the statements they count are the same ones.

_experiment_worker = qulab_worker.ExperimentWorker()
atexit.register(_experiment_worker.close)


def experiment_worker() -> qulab_worker.ExperimentWorker:
    """The process that runs the long experiments (started on first use; `queued` says how many wait)."""
    return _experiment_worker


@dataclass(frozen=True)
class ExperimentDatabase:
    """A sandbox's database as the experiment process sees it: its own engine, sessions on it."""

    engine: AsyncEngine
    session_factory: async_sessionmaker[QuLabSession]


class HeavyWorkPacer:
    """Lets a long experiment that must stay in this process give way to other learners' clicks.

    The cache experiment and the burst use this process's own Redis client, engine and outbox,
    so they cannot move to the experiment process. Instead each unit of their work (a read, a
    write) runs through `async with pacer.unit()`: after `slice_seconds` of work, the units in
    flight finish, then the experiment rests `rest_ratio` times as long, leaving the loop and the
    GIL to everyone else. Rests are counted in `rested_seconds`, so a result can leave them out of
    what it measured (the burst's throughput is writes per second of writing).
    """

    # Rest twice as long as the slice worked: the experiment takes at most a third of the loop.
    # Resting as long as it worked (1.0) kept walking learners' p95 within 2× of quiet while
    # their clicks cost ~40 ms; once they cost less, the cache experiment measured 2.46×.
    def __init__(self, *, slice_seconds: float = 0.02, rest_ratio: float = 2.0) -> None:
        self.slice_seconds = slice_seconds
        self.rest_ratio = rest_ratio
        self.rested_seconds = 0.0
        self.rests = 0
        self.resting = False
        self._slice_started = time.monotonic()
        self._gate = asyncio.Lock()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[None]:
        """One unit of work; it starts only when the experiment is not resting."""
        async with self._gate:
            if time.monotonic() - self._slice_started >= self.slice_seconds:
                await self._idle.wait()  # the units already running finish first: a rest is a real pause
                rest = (time.monotonic() - self._slice_started) * self.rest_ratio
                started, self.resting = time.monotonic(), True
                await asyncio.sleep(rest)
                self.rested_seconds += time.monotonic() - started
                self.rests, self.resting = self.rests + 1, False
                self._slice_started = time.monotonic()
            self._in_flight += 1
            self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()


async def run_experiment_elsewhere(experiment: Callable[..., Awaitable[T]], /, **kwargs: Any) -> tuple[T, float]:
    """`await experiment(**kwargs)` in the experiment process; returns (its result, seconds it waited in line).

    The arguments and the result cross a process boundary (pickled, between this process and
    its own child): plain values, URLs, Settings, dataclasses.
    """
    try:
        return await _experiment_worker.run(_run_in_experiment_process, experiment=experiment, kwargs=kwargs)
    except qulab_worker.WorkerLostError as error:
        logger.error("the experiment process died: %s", error)
        raise UnexpectedError("The experiment process stopped before it finished; nothing was changed. Try again.") from None


def _run_in_experiment_process(*, experiment: Callable[..., Awaitable[T]], kwargs: dict[str, Any]) -> T:
    settings = kwargs.get("settings")
    if isinstance(settings, Settings):
        for url in (settings.database_url, settings.redis_url):  # this process has its own secret list
            if url:
                remember_secrets_of_url(url)
    try:
        return asyncio.run(experiment(**kwargs))
    except QuLabError:
        raise
    except Exception as error:  # driver errors may not survive pickling: send QuLab's own
        raise _as_qulab_error(error, getattr(experiment, "__name__", "experiment"), settings or Settings()) from None


async def _time_strategies_on(
    *, url: URL, settings: Settings, translate: Optional[dict[Any, Any]], sizes: list[int], repeats: int
) -> StrategyComparison:
    """In the experiment process: one connection of its own to the sandbox's database, then the comparison."""
    engine = create_engine_for(url, settings, pool_size=1, max_overflow=0, pool_pre_ping=False)
    try:
        view = engine.execution_options(schema_translate_map=translate) if translate else engine
        database = ExperimentDatabase(view, new_session_factory(view))
        return await _time_strategies(database, sizes=sizes, repeats=repeats)
    finally:
        await engine.dispose()


_runtime: Optional[Runtime] = None
_runtime_lock = threading.Lock()
SANDBOX_STATE_KEY = "qulab_sandbox_id"
SANDBOX_HOLDER_KEY = "qulab_sandbox_holder"
SANDBOX_URL_PARAMETER = "sandbox"


def get_runtime() -> Runtime:
    """The process-wide runtime, started on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime._closed:
            _runtime = Runtime()
            freeze_startup_heap()
        return _runtime


_heap_frozen = False


def freeze_startup_heap() -> None:
    """Once per process: collect, then move every object alive now out of the garbage collector's reach.

    The first page load has imported Streamlit, SQLAlchemy, pandas and QuLab: about 170,000
    objects that live as long as the process, and Python's full collections walked all of them
    each time, holding the GIL while every learner waits. With 60 simulated learners
    (bench/classroom.py, load average 5-12), full collections took 7.5 s of the server's time,
    440 ms each; with this, 2.5 s, 160 ms each. Objects made later (sandboxes, sessions) are
    collected as usual.
    """
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


def shutdown_runtime() -> None:
    """Close the process-wide runtime (tests, and interpreter exit)."""
    global _runtime
    with _runtime_lock:
        runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.close()


atexit.register(shutdown_runtime)


_source_code_lock = threading.Lock()
_source_code_cache: dict[Any, str] = {}


def source_code(code_object: Any) -> str:
    """The source of a class or function, for a page to show; read once, one thread at a time.

    For a class, inspect.getsource parses the whole module with ast.parse, and on Python 3.11 two
    threads parsing at once (two learners' reruns) can fail with "SystemError: AST constructor
    recursion depth mismatch" (CPython gh-106905); the browser suite hit it.
    """
    with _source_code_lock:
        if code_object not in _source_code_cache:
            _source_code_cache[code_object] = inspect.getsource(code_object)
        return _source_code_cache[code_object]


class BrowserSessionHold:
    """A browser session's hold on its sandbox, released when Streamlit says the session ended.

    app.py keeps one per session in `st.cache_resource(scope="session", on_release=...)`.
    Streamlit clears a session's session-scoped resources, calling on_release, the moment its
    websocket disconnects (AppSession.clear_session_caches, from disconnect_session and from
    shutdown), and builds the resource again on the session's next run if it reconnects. We
    chose it over a heartbeat fragment (browser-timed, so it only stops when the tab is gone,
    and costs a rerun per tick per learner) and over polling Streamlit's session manager
    (internal API): it is the hook the maintainers point to (streamlit #8545, #13482). A
    reconnect or reload within the grace period finds the sandbox still awake.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.holder = f"browser:{uuid.uuid4().hex}"

    def release(self) -> None:
        """Called by Streamlit (on its own thread) when the session's websocket goes."""
        self.runtime.release_holder(self.holder)


def lab_for_browser_session(
    state: MutableMapping[str, Any],
    url_parameters: Optional[MutableMapping[str, Any]] = None,
    *,
    hold: Optional[BrowserSessionHold] = None,
) -> Lab:
    """The Lab of one browser session: its sandbox id lives in the session state and in the URL.

    A browser reload starts a new Streamlit session with empty state; the id in the URL
    (?sandbox=…) brings the learner back to their sandbox. A fresh visit gets a new random id,
    so two learners never share a sandbox unless one hands the other the URL. The session's
    hold (from app.py) keeps the sandbox active while the browser is connected.
    """
    sandbox_id = state.get(SANDBOX_STATE_KEY)
    if not isinstance(sandbox_id, str) or not SANDBOX_ID_PATTERN.fullmatch(sandbox_id):
        from_url = url_parameters.get(SANDBOX_URL_PARAMETER) if url_parameters is not None else None
        valid = isinstance(from_url, str) and SANDBOX_ID_PATTERN.fullmatch(from_url)
        sandbox_id = from_url if valid else new_sandbox_id()
        state[SANDBOX_STATE_KEY] = sandbox_id
    if url_parameters is not None and url_parameters.get(SANDBOX_URL_PARAMETER) != sandbox_id:
        url_parameters[SANDBOX_URL_PARAMETER] = sandbox_id
    if hold is not None:
        state[SANDBOX_HOLDER_KEY] = hold.holder
    holder = state.get(SANDBOX_HOLDER_KEY)
    return Lab(get_runtime(), sandbox_id, holder=holder if isinstance(holder, str) else None)


def switch_to_new_sandbox(state: MutableMapping[str, Any], url_parameters: MutableMapping[str, Any]) -> str:
    """Give this browser session a fresh sandbox id (the old sandbox stays reachable by its link)."""
    sandbox_id = new_sandbox_id()
    state[SANDBOX_STATE_KEY] = sandbox_id
    url_parameters[SANDBOX_URL_PARAMETER] = sandbox_id
    return sandbox_id
