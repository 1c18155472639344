"""QuLab's lesson: the data layer of an AI assessment platform, in the codelab's order.

Every page shows listings read from this file, and every button runs them. Top to bottom:

1. Errors                - what a learner may be told; the numeric checks the models make
2. Models                - User, Assessment, AIRScore, DomainEvent, and the consumer's inbox
3. Engine and sessions   - an async engine with an explicit pool; get_session, the unit of work
4. Repositories          - one class per model: the only code here that writes queries
5. Users and pooling     - sections 1 and 2: create users, initialize, time a pool against none
6. N+1 and eager loading - section 3: the same rows read lazily and eagerly
7. Read-through cache    - section 4: GET; on a miss read the database and SET with a TTL
8. Outbox                - section 5: a score and its event in one transaction, a relay that
                           publishes in the background, a consumer that deduplicates

It imports nothing of QuLab's platform: it is written against one small protocol, `Sandbox`
(an engine with its sessions, and a Redis namespace). QuLab's `classroom` package gives every
learner one and hardens the patterns from outside (docs/architecture.md); `LocalSandbox` runs
this file alone, on a SQLite file and fakeredis.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import random
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, NamedTuple, Optional, Protocol, TypeVar

import fakeredis
import redis.asyncio
import redis.exceptions
from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Select,
    String,
    Text,
    any_,
    bindparam,
    cast,
    delete,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY as PostgresArray
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
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
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
    validates,
)
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator

T = TypeVar("T")


# =================================================================================================
# 1. Errors
# =================================================================================================
# What a form brings (an email, a name, an id typed by hand) is checked by QuLab before any code
# here runs (classroom.validation); the models refuse impossible numbers themselves.


class QuLabError(Exception):
    """An error whose message is written for the learner: a page shows it as it is."""


class ValidationError(QuLabError, ValueError):
    """Input was refused before anything was written; `field` names the input at fault."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class DuplicateEmailError(QuLabError):
    """Another user already has this email (compared ignoring letter case)."""


class NotFoundError(QuLabError, LookupError):
    """No row has this id."""


class UserNotFoundError(NotFoundError):
    """No user has this id."""


MAX_ROWS_PER_PAGE = 10_000
ABILITY_BOUNDS = (-10.0, 10.0)  # an IRT ability estimate, in logits; real ones stay well inside
EDUCATION_LEVELS = (
    "High school",
    "Associate degree",
    "Bachelor's degree",
    "Master's degree",
    "Doctorate",
    "Other",
)


def validate_number(value: Any, *, label: str, low: float, high: float, field: str = "") -> float:
    """A finite number from low to high; booleans (True is 1 to Python), NaN and ±inf refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{label} must be a number.", field=field or label.lower())
    if not math.isfinite(value) or not low <= value <= high:
        raise ValidationError(
            f"{label} must be between {low:g} and {high:g}.", field=field or label.lower()
        )
    return float(value)


def validate_whole_number(value: Any, *, label: str, low: int, high: int, field: str = "") -> int:
    """An int from low to high; booleans and floats refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(
            f"{label} must be a whole number from {low:,} to {high:,}.",
            field=field or label.lower(),
        )
    return value


# =================================================================================================
# 2. Models
# =================================================================================================

_last_timestamp = datetime.min.replace(tzinfo=UTC)
_timestamp_lock = threading.Lock()


def utc_now() -> datetime:
    """The current UTC time, strictly increasing within this process, so created_at orders rows."""
    global _last_timestamp
    with _timestamp_lock:
        now = max(datetime.now(UTC), _last_timestamp + timedelta(microseconds=1))
        _last_timestamp = now
        return now


def new_id() -> str:
    """A new primary key: a random UUID as text."""
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone: UTC is put back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass a timezone-aware datetime")
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(AsyncAttrs, DeclarativeBase):
    """Declarative base; AsyncAttrs lets a lazy relationship be awaited (user.awaitable_attrs)."""

    type_annotation_map = {datetime: UTCDateTime()}


class TimestampMixin:
    """created_at / updated_at in UTC, set by the application so every backend agrees."""

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now)


class User(Base, TimestampMixin):
    """A learner on the assessment platform."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(255), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(255))
    occupation_code: Mapped[Optional[str]] = mapped_column(String(20))
    education_level: Mapped[Optional[str]] = mapped_column(String(50))
    years_experience: Mapped[Optional[float]] = mapped_column(Float)
    assessments: Mapped[list[Assessment]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )
    scores: Mapped[list[AIRScore]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )

    @validates("years_experience")
    def _check_years(self, key: str, value: Any) -> Optional[float]:
        if value is None:
            return None
        return validate_number(value, label="Years of experience", low=0, high=80, field=key)


# Emails are unique whatever their letter case: Alex@X.com and alex@x.com are one person.
Index("ux_users_email_lower", func.lower(User.email), unique=True)


class Assessment(Base, TimestampMixin):
    """One assessment session of a user."""

    __tablename__ = "assessments"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="in_progress")
    component: Mapped[str] = mapped_column(String(50))
    current_ability: Mapped[float] = mapped_column(Float, default=0.0)
    items_administered: Mapped[int] = mapped_column(default=0)
    user: Mapped[User] = relationship(back_populates="assessments")

    @validates("current_ability", "items_administered")
    def _check_numbers(self, key: str, value: Any) -> float:
        if key == "items_administered":  # a count: True, 2.5, NaN and ±inf are refused
            return validate_whole_number(value, label="Items administered", low=0, high=10_000)
        low, high = ABILITY_BOUNDS
        return validate_number(value, label="Current ability", low=low, high=high)


SCORE_FIELDS = ("air_score", "vr_score", "hr_score", "synergy_score", "ci_lower", "ci_upper")


class AIRScore(Base, TimestampMixin):
    """An AI-Readiness score calculated for a user, with its parts and confidence interval."""

    __tablename__ = "air_scores"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
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
    user: Mapped[User] = relationship(back_populates="scores")

    @validates(*SCORE_FIELDS)
    def _check_score(self, key: str, value: Any) -> float:
        return validate_number(value, label=key, low=0, high=100)


class DomainEvent(Base, TimestampMixin):
    """A fact other services must hear about, written in the same transaction as the change."""

    __tablename__ = "domain_events"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    event_type: Mapped[str] = mapped_column(String(100), nullable=False, index=True)
    aggregate_type: Mapped[str] = mapped_column(String(100), nullable=False)
    aggregate_id: Mapped[str] = mapped_column(String(36), nullable=False, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending|published|failed
    published_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    # What delivery needs (section 5): attempts that failed, the last broker error, and the lease
    # a publisher holds while it sends the event; then the entry id the broker gave it.
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[Optional[str]] = mapped_column(String(500))
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    claimed_by: Mapped[Optional[str]] = mapped_column(String(64))
    claimed_until: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    stream_id: Mapped[Optional[str]] = mapped_column(String(40))
    __table_args__ = (
        Index("ix_events_status_created", "status", "created_at"),
        Index("ix_events_status_published", "status", "published_at"),
    )


class ConsumedEvent(Base):
    """The downstream consumer's inbox: one row per event id it has handled (its dedup key)."""

    __tablename__ = "consumed_events"
    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    event_type: Mapped[str] = mapped_column(String(100))
    stream_message_id: Mapped[str] = mapped_column(String(40))
    consumer_name: Mapped[str] = mapped_column(String(64))
    consumed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, index=True)


MODEL_CLASSES: tuple[type[Base], ...] = (User, Assessment, AIRScore, DomainEvent, ConsumedEvent)


# =================================================================================================
# 3. Engine and sessions
# =================================================================================================


class RedisKeys(Protocol):
    """A Redis client, and the prefix that keeps one sandbox's keys apart from all others."""

    @property
    def client(self) -> Any: ...

    def key(self, *parts: str) -> str: ...


class Sandbox(Protocol):
    """Where the lesson's code runs: an engine with its sessions, and a namespace in Redis.

    QuLab gives every learner one (classroom.sandboxes); LocalSandbox below is the smallest.
    """

    @property
    def engine(self) -> AsyncEngine: ...

    @property
    def session_factory(self) -> async_sessionmaker[AsyncSession]: ...

    @property
    def redis(self) -> RedisKeys: ...


def create_engine(
    url: str | URL,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_timeout: float = 30.0,
    pre_ping: bool = True,
    **options: Any,
) -> AsyncEngine:
    """An async engine with an explicit connection pool.

    pool_size connections stay open and are lent to one session at a time; a burst may open
    max_overflow more (closed again when returned); a session waits at most pool_timeout seconds
    for one. pre_ping tests a connection before lending it, so one the server dropped (a
    restart, a network cut) is replaced instead of failing the request.
    """
    if options.get("poolclass") is NullPool:  # no pool: a new connection for every checkout
        return create_async_engine(url, **options)
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_pre_ping=pre_ping,
        **options,
    )


def new_session_factory(
    engine: AsyncEngine, *, session_class: type[AsyncSession] = AsyncSession, **options: Any
) -> async_sessionmaker[AsyncSession]:
    """Sessions on this engine; objects stay readable after the commit (expire_on_commit=False)."""
    return async_sessionmaker(engine, class_=session_class, expire_on_commit=False, **options)


@asynccontextmanager
async def get_session(sandbox: Sandbox) -> AsyncIterator[AsyncSession]:
    """A unit of work: commits if the block succeeds, rolls back if it raises, always closes."""
    async with sandbox.session_factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


async def create_tables(sandbox: Sandbox) -> None:
    """Create every table that does not exist yet (CREATE TABLE IF NOT EXISTS, in effect)."""
    async with sandbox.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


def pool_status(engine: AsyncEngine) -> dict[str, Any]:
    """The engine's pool right now: its class and, for a queue pool, its counters."""
    pool = engine.pool
    status: dict[str, Any] = {"pool_class": type(pool).__name__}
    for counter in ("size", "checkedin", "checkedout", "overflow", "timeout"):
        method = getattr(pool, counter, None)
        if callable(method):
            status[counter] = method()
    return status


@dataclass
class RedisNamespace:
    """The plain RedisKeys: a client and a key prefix."""

    client: Any
    prefix: str = "qulab:"

    def key(self, *parts: str) -> str:
        """A key inside this namespace."""
        return self.prefix + ":".join(parts)


@dataclass
class LocalSandbox:
    """The smallest Sandbox: one engine, its sessions, one Redis namespace."""

    engine: AsyncEngine
    redis: RedisNamespace
    session_factory: async_sessionmaker[AsyncSession] = field(init=False)

    def __post_init__(self) -> None:
        self.session_factory = new_session_factory(self.engine)


# =================================================================================================
# 4. Repositories
# =================================================================================================

ModelT = TypeVar("ModelT", bound=Base)


class Repository(Generic[ModelT]):
    """Data access for one model through one session: it flushes, the unit of work commits."""

    model: type[ModelT]
    id_label = "record"

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def find(self, entity_id: str) -> Optional[ModelT]:
        """The row with this id, or None."""
        return await self.session.get(self.model, entity_id)

    async def get(self, entity_id: str) -> ModelT:
        """The row with this id; NotFoundError when there is none."""
        entity = await self.find(entity_id)
        if entity is None:
            raise self._not_found(entity_id)
        return entity

    async def list(self, *, limit: int = 100) -> list[ModelT]:
        """The newest rows first, at most `limit` of them."""
        validate_whole_number(limit, label="Limit", low=0, high=MAX_ROWS_PER_PAGE)
        model: Any = self.model
        statement = select(model).order_by(model.created_at.desc(), model.id).limit(limit)
        return list((await self.session.scalars(statement)).all())

    async def add(self, entity: ModelT) -> ModelT:
        """Stage a new row and flush it, so the database's constraints are checked now."""
        self.session.add(entity)
        await self.session.flush()
        return entity

    async def delete(self, entity: ModelT) -> None:
        """Delete a row (and, through cascades, what it owns)."""
        await self.session.delete(entity)
        await self.session.flush()

    def _not_found(self, entity_id: str) -> NotFoundError:
        return NotFoundError(f"No {self.id_label} has the id {entity_id}.")


class UserRepository(Repository[User]):
    """Users, unique by email whatever its letter case."""

    model = User
    id_label = "user"

    def _not_found(self, entity_id: str) -> NotFoundError:
        return UserNotFoundError(f"No user has the id {entity_id} in your sandbox.")

    async def create(
        self,
        *,
        email: str,
        name: str,
        occupation_code: Optional[str] = None,
        education_level: Optional[str] = None,
        years_experience: Optional[float] = None,
    ) -> User:
        """Insert a user; a taken email, in any letter case, raises DuplicateEmailError."""
        user = User(
            email=email,
            name=name,
            occupation_code=occupation_code,
            education_level=education_level,
            years_experience=years_experience,
        )
        try:
            await self.add(user)
        except IntegrityError as error:
            if "email" not in str(error.orig).lower():
                raise
            raise DuplicateEmailError(
                f"A user with the email `{user.email}` already exists "
                "(emails are compared ignoring letter case)."
            ) from None
        return user

    async def get_by_email(self, email: str) -> Optional[User]:
        """The user with this email in any letter case, or None."""
        statement = select(User).where(func.lower(User.email) == email.lower())
        return await self.session.scalar(statement)

    async def get_user_with_scores_eager(self, user_id: str) -> User:
        """The user with every score loaded up front: 2 statements, whatever N is."""
        statement = select(User).where(User.id == user_id).options(selectinload(User.scores))
        user = await self.session.scalar(statement)
        if user is None:
            raise self._not_found(user_id)
        return user


class UserOwnedRepository(Repository[ModelT]):
    """Rows that belong to a user (a user_id column), listed per user, oldest first."""

    async def list_for_user(self, user_id: str) -> list[ModelT]:
        """The user's rows, oldest first."""
        model: Any = self.model
        statement = (
            select(model).where(model.user_id == user_id).order_by(model.created_at, model.id)
        )
        return list((await self.session.scalars(statement)).all())


class AssessmentRepository(UserOwnedRepository[Assessment]):
    """Assessments, always for an existing user."""

    model = Assessment
    id_label = "assessment"

    async def create(
        self, *, user_id: str, component: str, current_ability: float = 0.0
    ) -> Assessment:
        """Start an assessment for an existing user."""
        user = await UserRepository(self.session).get(user_id)
        return await self.add(
            Assessment(user_id=user.id, component=component, current_ability=current_ability)
        )


class AIRScoreRepository(UserOwnedRepository[AIRScore]):
    """AI-Readiness scores, always for an existing user, every part from 0 to 100."""

    model = AIRScore
    id_label = "score"

    async def create(
        self,
        *,
        user_id: str,
        occupation_code: str,
        parameter_version: str,
        calculation_metadata: Optional[dict[str, Any]] = None,
        **scores: float,
    ) -> AIRScore:
        """Insert a score (the six SCORE_FIELDS) for an existing user; checked by the model."""
        user = await UserRepository(self.session).get(user_id)
        if sorted(scores) != sorted(SCORE_FIELDS):
            raise ValidationError(f"A score needs exactly these parts: {', '.join(SCORE_FIELDS)}.")
        score = AIRScore(
            user_id=user.id,
            occupation_code=occupation_code,
            parameter_version=parameter_version,
            calculation_metadata=dict(calculation_metadata or {}),
            **scores,
        )
        if not score.ci_lower <= score.air_score <= score.ci_upper:
            raise ValidationError(
                "The confidence interval must contain the AIR score.", field="ci_lower"
            )
        return await self.add(score)

    async def list_ids_for_user(self, user_id: str) -> list[str]:
        """The ids of a user's scores, oldest first (ids only: no score enters the session)."""
        statement = (
            select(AIRScore.id)
            .where(AIRScore.user_id == user_id)
            .order_by(AIRScore.created_at, AIRScore.id)
        )
        return list((await self.session.scalars(statement)).all())

    async def latest_for_user(self, user_id: str) -> Optional[AIRScore]:
        """A user's most recent score, or None."""
        statement = (
            select(AIRScore)
            .where(AIRScore.user_id == user_id)
            .order_by(AIRScore.created_at.desc(), AIRScore.id.desc())
            .limit(1)
        )
        return await self.session.scalar(statement)


# =================================================================================================
# 5. Users and pooling (sections 1 and 2)
# =================================================================================================

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


async def create_user(sandbox: Sandbox, **fields: Any) -> User:
    """Section 1's Create User form: email, name and the optional profile fields."""
    async with get_session(sandbox) as session:
        return await UserRepository(session).create(**fields)


async def list_users(sandbox: Sandbox, *, limit: int = 100) -> list[User]:
    """The sandbox's users, newest first."""
    async with get_session(sandbox) as session:
        return await UserRepository(session).list(limit=limit)


async def delete_user(sandbox: Sandbox, *, user_id: str) -> None:
    """Delete a user; their assessments and scores go with them (the cascade)."""
    async with get_session(sandbox) as session:
        users = UserRepository(session)
        await users.delete(await users.get(user_id))


async def count_rows(sandbox: Sandbox) -> dict[str, int]:
    """Rows per table of the lesson's models."""
    async with get_session(sandbox) as session:
        return {
            model.__tablename__: int(await session.scalar(select(func.count()).select_from(model)))
            for model in MODEL_CLASSES
        }


async def init_db(sandbox: Sandbox, *, reset: bool = True) -> list[User]:
    """Create the tables; with reset, empty them and create the sample users.

    The deletes and the inserts share one transaction: another tab of the same sandbox sees the
    old rows or the new ones, never half of each.
    """
    await create_tables(sandbox)
    if not reset:
        return []
    async with get_session(sandbox) as session:
        for model in reversed(MODEL_CLASSES):  # children before their parents
            await session.execute(delete(model))
        users = UserRepository(session)
        return [await users.create(**sample) for sample in SAMPLE_USERS]


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

    @property
    def throughput(self) -> float:
        """Θ = requests ÷ total time, per second."""
        return self.requests / self.seconds if self.seconds > 0 else float("inf")

    @property
    def median_latency_ms(self) -> float:
        """The median time of one request, waiting for a connection included."""
        return statistics.median(self.latencies_ms)


async def time_queries(
    engine: AsyncEngine, *, label: str, requests: int, concurrency: int, warm: int
) -> PoolTrial:
    """Run `requests` small queries, `concurrency` at a time, counting the connections opened."""
    opened = 0

    def count_connection(dbapi_connection: Any, connection_record: Any) -> None:
        nonlocal opened
        opened += 1

    event.listen(engine.sync_engine, "connect", count_connection)
    query = select(func.count()).select_from(User)
    in_flight = asyncio.Semaphore(concurrency)

    async def one_query() -> float:
        async with in_flight:
            started = time.perf_counter()
            async with engine.connect() as connection:
                await connection.execute(query)
            return (time.perf_counter() - started) * 1000

    if not isinstance(engine.pool, NullPool):  # a running app's pool is warm: open P first
        await asyncio.gather(*(one_query() for _ in range(warm)))
    opened = 0
    started = time.perf_counter()
    latencies = await asyncio.gather(*(one_query() for _ in range(requests)))
    seconds = time.perf_counter() - started
    pool = type(engine.pool).__name__
    return PoolTrial(label, pool, requests, concurrency, seconds, opened, tuple(latencies))


async def compare_pooling(
    open_engine: Callable[..., AsyncEngine], *, requests: int, concurrency: int, pool_size: int
) -> list[PoolTrial]:
    """The same queries through a warm pool of P connections, then through NullPool (no pool)."""
    trials = []
    for label, pooling in (
        (f"QueuePool (pool_size={pool_size})", {"pool_size": pool_size, "max_overflow": 0}),
        ("NullPool (no pooling)", {"poolclass": NullPool}),
    ):
        engine = open_engine(**pooling)
        try:
            trial = await time_queries(
                engine, label=label, requests=requests, concurrency=concurrency, warm=pool_size
            )
        finally:
            await engine.dispose()
        trials.append(trial)
    return trials


# =================================================================================================
# 6. N+1 and eager loading (section 3)
# =================================================================================================

SAMPLE_OCCUPATION_CODE = "15-1252.00"  # for users with no occupation code of their own


def sample_score_values(rng: random.Random) -> dict[str, Any]:
    """Plausible score parts: each from 0 to 100, the interval around the AIR score."""
    air = round(rng.uniform(40.0, 95.0), 1)
    half_width = round(rng.uniform(2.0, 6.0), 1)

    def near(spread: float) -> float:
        return round(min(100.0, max(0.0, air + rng.uniform(-spread, spread))), 1)

    return {
        "air_score": air,
        "vr_score": near(12.0),
        "hr_score": near(12.0),
        "synergy_score": near(8.0),
        "ci_lower": round(max(0.0, air - half_width), 1),
        "ci_upper": round(min(100.0, air + half_width), 1),
        "parameter_version": "irt-2024.1",
    }


async def add_sample_scores(sandbox: Sandbox, *, user_id: str, count: int = 3) -> list[AIRScore]:
    """Add `count` sample scores for an existing user, in one transaction."""
    validate_whole_number(count, label="Scores to add", low=1, high=50)
    rng = random.Random()
    async with get_session(sandbox) as session:
        user = await UserRepository(session).get(user_id)
        scores = AIRScoreRepository(session)
        return [
            await scores.create(
                user_id=user.id,
                occupation_code=user.occupation_code or SAMPLE_OCCUPATION_CODE,
                calculation_metadata={"source": "codelab section 3 sample"},
                **sample_score_values(rng),
            )
            for _ in range(count)
        ]


async def fetch_user_and_scores_naive(
    sandbox: Sandbox, *, user_id: str
) -> tuple[User, list[AIRScore]]:
    """The N+1 path: the user (1), the ids of their scores (1), then each score by its id (N).

    A fresh session on purpose: session.get() answers from the identity map without any SQL
    when the object is already loaded, which would hide the very round trips shown here.
    """
    async with get_session(sandbox) as session:
        user = await UserRepository(session).get(user_id)
        repository = AIRScoreRepository(session)
        score_ids = await repository.list_ids_for_user(user.id)
        scores = [await repository.get(score_id) for score_id in score_ids]  # one SELECT each
    return user, scores


async def fetch_user_and_scores_eager(
    sandbox: Sandbox, *, user_id: str
) -> tuple[User, list[AIRScore]]:
    """The eager path: selectinload fetches every score in one more statement, whatever N is."""
    async with get_session(sandbox) as session:
        user = await UserRepository(session).get_user_with_scores_eager(user_id)
    return user, sorted(user.scores, key=lambda score: (score.created_at, score.id))


LOADING_STRATEGIES: dict[str, Optional[Callable[..., Any]]] = {
    "lazy": None,  # no loader option: each `await user.awaitable_attrs.scores` is its own SELECT
    "selectinload": selectinload,
    "joinedload": joinedload,
    "subqueryload": subqueryload,
}


async def load_users_and_scores(
    session_factory: async_sessionmaker[AsyncSession], users: Select[Any], *, strategy: str
) -> list[tuple[User, list[AIRScore]]]:
    """Run a SELECT of users and load each one's scores with one of SQLAlchemy's strategies."""
    if strategy not in LOADING_STRATEGIES:
        raise ValidationError(f"Choose a loading strategy: {', '.join(LOADING_STRATEGIES)}.")
    loader = LOADING_STRATEGIES[strategy]
    async with session_factory() as session:  # it only reads: nothing to commit
        if loader is None:
            parents = (await session.scalars(users)).all()
            return [(user, await user.awaitable_attrs.scores) for user in parents]  # 1 + N
        # unique(): a joined collection returns each user once per score; this folds them back.
        parents = (await session.scalars(users.options(loader(User.scores)))).unique().all()
        return [(user, user.scores) for user in parents]


# =================================================================================================
# 7. Read-through cache (section 4)
# =================================================================================================

CACHE_TTL_SECONDS = 300
CACHE_TTL_JITTER = 0.10  # each key lives TTL ± 10 %, so keys written together expire apart
HIT, MISS, FALLBACK = "HIT", "MISS", "FALLBACK"  # FALLBACK: Redis failed, the database answered
REDIS_ERRORS: tuple[type[BaseException], ...] = (  # every way a Redis call can fail
    redis.exceptions.RedisError,
    OSError,
    asyncio.TimeoutError,
)


def redis_client(url: Optional[str]) -> Any:
    """A client of the Redis server at url; with none, fakeredis (the same commands, in-process)."""
    if url:
        return redis.asyncio.from_url(url, decode_responses=True)
    return fakeredis.FakeAsyncRedis(decode_responses=True)


@dataclass(slots=True)
class Cached:
    """What a GET found: a value, or nothing (found=False)."""

    found: bool
    value: Any = None


@dataclass(slots=True)
class CacheRead:
    """One read through the cache: the value, where it came from, and what each part took."""

    key: str
    outcome: str  # HIT, MISS or FALLBACK
    value: Any
    total_ms: float
    lookup_ms: Optional[float]  # the GET; None when Redis failed
    database_ms: Optional[float] = None  # None on a hit


def _milliseconds_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


class ReadThroughCache:
    """The read-through pattern, on JSON values in Redis.

    QuLab runs a subclass (classroom.cache.CoherentCache) whose get, load and set check an epoch
    and a fence, share concurrent misses and skip a Redis that hangs; read() stays this one.
    """

    def __init__(self, client: Any, *, ttl_seconds: int = CACHE_TTL_SECONDS) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds

    async def read(self, key: str, load: Callable[[], Awaitable[Any]]) -> CacheRead:
        """The value under key: from Redis on a hit; on a miss from load(), then kept in Redis."""
        started = time.perf_counter()
        cached = await self.get(key)  # 1. GET key
        lookup_ms = _milliseconds_since(started)
        if cached.found:  # 2a. a hit: answered from memory
            return CacheRead(key, HIT, cached.value, _milliseconds_since(started), lookup_ms)
        loading = time.perf_counter()
        value = await self.load(key, load, cached)  # 2b. a miss: the database answers ...
        database_ms = _milliseconds_since(loading)
        await self.set(key, value, cached)  # 3. ... and Redis keeps a copy: SET key value EX ttl
        total_ms = _milliseconds_since(started)
        return CacheRead(key, MISS, value, total_ms, lookup_ms, database_ms)

    async def get(self, key: str) -> Cached:
        """GET key, decoded from JSON."""
        raw = await self.client.get(key)
        return Cached(False) if raw is None else Cached(True, json.loads(raw))

    async def load(self, key: str, load: Callable[[], Awaitable[Any]], cached: Cached) -> Any:
        """Read the value from the database (`cached` is what the GET saw)."""
        return await load()

    async def set(self, key: str, value: Any, cached: Cached) -> None:
        """SET key value EX ttl, the TTL jittered."""
        await self.client.set(key, json.dumps(value), ex=self.jittered_ttl())

    async def invalidate(self, keys: list[str], *, reason: str = "requested") -> Any:
        """DEL the keys: the next read of each misses and sees what the database holds now."""
        return await self.client.delete(*keys)

    def jittered_ttl(self) -> int:
        """The TTL ± CACHE_TTL_JITTER, so values cached together do not expire together."""
        spread = round(self.ttl_seconds * CACHE_TTL_JITTER)
        return random.randint(self.ttl_seconds - spread, self.ttl_seconds + spread)


@dataclass
class CacheMetrics:
    """Counts and measured times of cache reads; H and T_avg follow from them."""

    hits: int = 0
    misses: int = 0
    errors: int = 0  # reads Redis could not answer (FALLBACK): the database answered them
    lookup_ms_total: float = 0.0  # over hits and misses: the GETs Redis answered
    database_reads: int = 0
    database_ms_total: float = 0.0
    request_ms_total: float = 0.0

    @property
    def requests(self) -> int:
        """Every read answered: hits + misses + errors."""
        return self.hits + self.misses + self.errors

    @property
    def lookups(self) -> int:
        """GETs Redis answered: the hits and the misses."""
        return self.hits + self.misses

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
        """T_db: the mean time of a database read."""
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
        """T_avg as measured: every read's time ÷ requests (the SETs included)."""
        return self.request_ms_total / self.requests if self.requests else None

    def record(self, read: CacheRead) -> None:
        """Count one read and add its measured times."""
        if read.outcome == HIT:
            self.hits += 1
        elif read.outcome == MISS:
            self.misses += 1
        else:
            self.errors += 1
        if read.lookup_ms is not None:
            self.lookup_ms_total += read.lookup_ms
        if read.database_ms is not None:
            self.database_reads += 1
            self.database_ms_total += read.database_ms
        self.request_ms_total += read.total_ms


def row_as_json(row: Base) -> dict[str, Any]:
    """A row's columns as JSON values (datetimes as ISO 8601 text): what the cache keeps."""
    values = {column.key: getattr(row, column.key) for column in row.__table__.columns}
    return {key: v.isoformat() if isinstance(v, datetime) else v for key, v in values.items()}


class CachedUserRepository:
    """User profiles and latest AIRScores, read through the cache (section 4's buttons)."""

    def __init__(self, sandbox: Sandbox, cache: Optional[ReadThroughCache] = None) -> None:
        self.sandbox = sandbox
        self.cache = cache or ReadThroughCache(sandbox.redis.client)
        self.metrics = CacheMetrics()

    def user_key(self, user_id: str) -> str:
        """The key of a user's cached profile."""
        return self.sandbox.redis.key("cache", "user", user_id)

    def latest_airscore_key(self, user_id: str) -> str:
        """The key of a user's cached latest AIRScore (JSON null when they have none)."""
        return self.sandbox.redis.key("cache", "user", user_id, "latest-airscore")

    async def get_user(self, *, user_id: str) -> CacheRead:
        """The user's profile, from Redis when cached; an unknown id raises UserNotFoundError."""
        read = await self.cache.read(self.user_key(user_id), lambda: self._load_user(user_id))
        self.metrics.record(read)
        return read

    async def get_latest_airscore(self, *, user_id: str) -> CacheRead:
        """The user's newest AIRScore (value None when they have none), from Redis when cached."""
        key = self.latest_airscore_key(user_id)
        read = await self.cache.read(key, lambda: self._load_latest_airscore(user_id))
        self.metrics.record(read)
        return read

    async def invalidate_user(self, *, user_id: str) -> Any:
        """Delete the user's cached profile and latest AIRScore."""
        keys = [self.user_key(user_id), self.latest_airscore_key(user_id)]
        return await self.cache.invalidate(keys, reason="requested on the page")

    async def _load_user(self, user_id: str) -> dict[str, Any]:
        async with self.sandbox.session_factory() as session:
            return row_as_json(await UserRepository(session).get(user_id))

    async def _load_latest_airscore(self, user_id: str) -> Optional[dict[str, Any]]:
        async with self.sandbox.session_factory() as session:
            score = await AIRScoreRepository(session).latest_for_user(user_id)
            if score is None:
                await UserRepository(session).get(user_id)  # no score, or no such user?
                return None
            return row_as_json(score)


# =================================================================================================
# 8. Outbox (section 5)
# =================================================================================================

AIRSCORE_CALCULATED = "AIRScoreCalculated"
AIR_PARAMETER_VERSION = "qulab-air-1.0"
AIR_ALPHA = 0.6  # weight of individual readiness (VR) against occupational readiness (HR)
AIR_BETA = 0.15  # weight of the synergy term
AIR_EXPERIENCE_SCALE_YEARS = 8.0  # experience readiness reaches 63 % of 100 after this long
AIR_EVIDENCE_SPREAD = 10.0  # σ of a score backed by no evidence; each piece narrows it
# Readiness points per education level and per SOC major group (the code's first two digits):
# teaching values, versioned by AIR_PARAMETER_VERSION so a stored score says which it used.
EDUCATION_READINESS = dict(zip(EDUCATION_LEVELS, (40.0, 55.0, 70.0, 82.0, 90.0, 50.0), strict=True))
# By SOC major group: management, business, computing and mathematics, engineering, science,
# legal, education, arts and media, healthcare, sales, office support.
OCCUPATION_GROUP_READINESS = dict(
    zip(
        ("11", "13", "15", "17", "19", "23", "25", "27", "29", "41", "43"),
        (70.0, 72.0, 88.0, 78.0, 75.0, 60.0, 58.0, 62.0, 60.0, 52.0, 50.0),
        strict=True,
    )
)
DEFAULT_OCCUPATION_READINESS = 45.0


def calculate_airscore(
    *,
    occupation_code: str,
    education_level: Optional[str] = None,
    years_experience: Optional[float] = None,
    abilities: tuple[float, ...] = (),
) -> dict[str, Any]:
    """QuLab's AI-Readiness formula: deterministic, from a user's profile and assessments.

    VR (individual readiness) is the mean of the evidence there is: the education level's points,
    experience as 100·(1 − e^(−years/8)), and each assessment's ability θ as 100/(1 + e^(−θ)).
    HR (occupational readiness) is the points of the occupation's SOC major group.
    Synergy = VR·HR/100 and AIR = (α·VR + (1 − α)·HR + β·Synergy) / (1 + β), all from 0 to 100.
    The 95% interval is AIR ± 1.96·σ with σ = 10/√(1 + pieces of evidence), clipped to 0–100.
    """
    evidence: list[float] = []
    if education_level:
        evidence.append(EDUCATION_READINESS.get(education_level, EDUCATION_READINESS["Other"]))
    if years_experience is not None:
        evidence.append(100 * (1 - math.exp(-years_experience / AIR_EXPERIENCE_SCALE_YEARS)))
    thetas = [min(6.0, max(-6.0, theta)) for theta in abilities if math.isfinite(theta)]
    evidence.extend(100 / (1 + math.exp(-theta)) for theta in thetas)
    vr = statistics.fmean(evidence) if evidence else 50.0
    hr = OCCUPATION_GROUP_READINESS.get(occupation_code[:2], DEFAULT_OCCUPATION_READINESS)
    synergy = vr * hr / 100
    air = (AIR_ALPHA * vr + (1 - AIR_ALPHA) * hr + AIR_BETA * synergy) / (1 + AIR_BETA)
    half_width = 1.96 * AIR_EVIDENCE_SPREAD / math.sqrt(1 + len(evidence))
    parts = (air, vr, hr, synergy, max(0.0, air - half_width), min(100.0, air + half_width))
    return {
        **{name: round(part, 2) for name, part in zip(SCORE_FIELDS, parts, strict=True)},
        "parameter_version": AIR_PARAMETER_VERSION,
        "calculation_metadata": {
            "education_level": education_level,
            "years_experience": years_experience,
            "assessment_abilities": thetas,
            "pieces_of_evidence": len(evidence),
            "alpha": AIR_ALPHA,
            "beta": AIR_BETA,
        },
    }


def airscore_calculated_event(score: AIRScore) -> DomainEvent:
    """The AIRScoreCalculated event for a score: all a downstream service needs, no lookups."""
    event_id = new_id()
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
            **{name: getattr(score, name) for name in SCORE_FIELDS},
            "parameter_version": score.parameter_version,
        },
        status="pending",
    )


@dataclass(frozen=True)
class StoredAIRScore:
    """What calculate_and_store_airscore committed: the score and its pending event."""

    score: AIRScore
    event: DomainEvent


async def calculate_and_store_airscore(
    sandbox: Sandbox, *, user_id: str, occupation_code: str
) -> StoredAIRScore:
    """Calculate and store a user's AIRScore and its AIRScoreCalculated event in ONE transaction.

    Both rows commit together or neither does: no score is ever saved without its event, and no
    event announces a score that was rolled back. Publishing happens later, in the background.
    """
    async with get_session(sandbox) as session:
        user = await UserRepository(session).get(user_id)
        assessments = await AssessmentRepository(session).list_for_user(user.id)
        calculation = calculate_airscore(
            occupation_code=occupation_code,
            education_level=user.education_level,
            years_experience=user.years_experience,
            abilities=tuple(assessment.current_ability for assessment in assessments),
        )
        scores = AIRScoreRepository(session)
        score = await scores.create(user_id=user.id, occupation_code=occupation_code, **calculation)
        event = airscore_calculated_event(score)
        session.add(event)  # flushed by the commit, in the same transaction as the score
    return StoredAIRScore(score, event)


class ClaimedEvent(NamedTuple):  # a tuple: a batch builds a hundred, each in one step
    """An event a publisher holds the lease on, with what goes into its stream entry."""

    id: str
    event_type: str
    aggregate_type: str
    aggregate_id: str
    payload_json: str  # as stored: the relay passes it through, never decodes it
    created_at: datetime

    def stream_message(self) -> dict[str, str]:
        """The entry's fields: the event id first, so any consumer can deduplicate."""
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
    """What the broker did with one batch: the entries it took, and the events it refused."""

    stream_ids: dict[str, str] = field(default_factory=dict)  # event id -> stream entry id
    refused: dict[str, Exception] = field(default_factory=dict)  # event id -> the broker's error


@dataclass
class BatchReport:
    """What one round of the publisher did."""

    claimed: int = 0
    published: int = 0
    refused: int = 0  # the broker refused them: still leased, claimed again when the lease ends
    lease_lost: int = 0  # published, but another publisher had taken the lease meanwhile
    seconds: float = 0.0


_EVENTS = DomainEvent.__table__  # the relay's statements are Core: no ORM work per row


# The relay's statements are built once per dialect, every value a parameter: building one (and
# its cache key, which SQLAlchemy keeps on it) costs more Python than running it.
@functools.cache
def claim_statement(dialect: str) -> Any:
    """UPDATE … RETURNING that leases the :batch_size oldest claimable events to :publisher."""
    events = _EVENTS.c
    now = bindparam("now")
    claimable = (
        events.status == "pending",
        or_(events.claimed_until.is_(None), events.claimed_until < now),
    )
    oldest_due = (
        select(events.id)
        .where(*claimable)
        .order_by(events.created_at, events.id)
        .limit(bindparam("batch_size"))
        .with_for_update(skip_locked=True)  # PostgreSQL; compiled to nothing on SQLite
        .cte("oldest_due")  # MATERIALIZED: evaluated once, never once per joined row
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    if dialect == "postgresql":
        # id = ANY(ARRAY(SELECT …)): looked up by primary key whatever the planner believes
        # about the table; the CTE's FOR UPDATE already locked each row as claimable.
        leased: tuple[Any, ...] = (
            events.id == any_(func.array(select(oldest_due.c.id).scalar_subquery())),
        )
    else:
        leased = (events.id == oldest_due.c.id, *claimable)  # under SQLite's one writer
    return (
        update(_EVENTS)
        .where(*leased)
        .values(claimed_by=bindparam("publisher"), claimed_until=bindparam("lease_until"))
        .returning(
            events.id,
            events.event_type,
            events.aggregate_type,
            events.aggregate_id,
            cast(events.payload, Text),
            events.created_at,
        )
    )


@functools.cache
def mark_published_statement(dialect: str) -> Any:
    """UPDATE … FROM that marks :event_ids published by :publisher, each with its stream id."""
    events = _EVENTS.c
    postgresql = dialect == "postgresql"
    pairs = bindparam("stream_ids", type_=String)  # JSON, read as rows once for the batch
    rows = func.json_each_text(cast(pairs, JSON)) if postgresql else func.json_each(pairs)
    delivered = rows.table_valued("key", "value").alias("delivered")
    listed = (  # the ids again, as a list the planner looks up by primary key
        events.id == any_(bindparam("event_ids", type_=PostgresArray(String)))
        if postgresql
        else events.id.in_(bindparam("event_ids", expanding=True))
    )
    return (
        update(_EVENTS)
        .where(listed, events.id == delivered.c.key, events.claimed_by == bindparam("publisher"))
        .values(
            status="published",
            published_at=bindparam("published_at"),
            stream_id=delivered.c.value,
            claimed_by=None,
            claimed_until=None,
        )
    )


class OutboxPublisher:
    """The outbox relay: leases due events oldest first, XADDs them in one pipeline, marks them.

    Several publishers may run on one database: the claim is one UPDATE … RETURNING whose
    subquery takes FOR UPDATE SKIP LOCKED on PostgreSQL (SQLite runs it under its one write
    lock), and only the publisher whose name holds an event's lease may mark it. QuLab runs
    classroom.outbox.relay.GuardedPublisher, which also marks refused events failed at once and
    gives a batch back the moment the broker fails, instead of waiting for the leases to end.
    """

    def __init__(
        self,
        sandbox: Sandbox,
        *,
        name: Optional[str] = None,
        batch_size: int = 100,
        lease_seconds: float = 30.0,
        broker_timeout_seconds: float = 2.0,
        idle_seconds: float = 1.0,
    ) -> None:
        self.sandbox = sandbox
        self.name = name or f"publisher-{uuid.uuid4().hex[:12]}"
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.broker_timeout_seconds = broker_timeout_seconds
        self.idle_wait_seconds = idle_seconds
        self.stream_key = sandbox.redis.key("events")

    async def publish_due_batch(self) -> BatchReport:
        """One round: lease due events, send them in one pipeline, mark those the broker took.

        An event it did not take keeps its lease until the lease ends; then a publisher claims it
        again. A broker that is down raises here, and every lease of the batch ends the same way.
        """
        started = time.perf_counter()
        async with self.sandbox.engine.connect() as connection:
            # Each statement commits by itself: the claim and the mark are one statement each.
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            events = await self.claim_due_events(connection)
            report = BatchReport(claimed=len(events))
            if events:
                delivery = await self.send_to_stream(events)
                report.published = await self.mark_published(connection, delivery.stream_ids)
                report.lease_lost = len(delivery.stream_ids) - report.published
                report.refused = len(delivery.refused)
        report.seconds = time.perf_counter() - started
        return report

    async def claim_due_events(self, connection: Any) -> list[ClaimedEvent]:
        """Lease up to batch_size pending events, oldest first, in ONE UPDATE … RETURNING."""
        now = utc_now()
        lease = {
            "now": now,
            "batch_size": self.batch_size,
            "publisher": self.name,
            "lease_until": now + timedelta(seconds=self.lease_seconds),
        }
        rows = (await connection.execute(claim_statement(connection.dialect.name), lease)).all()
        return sorted((ClaimedEvent(*row) for row in rows), key=lambda e: (e.created_at, e.id))

    async def send_to_stream(self, events: list[ClaimedEvent]) -> StreamDelivery:
        """XADD every event in one pipeline; sort the replies into entries taken and refusals."""
        pipeline = self.sandbox.redis.client.pipeline(transaction=False)
        for claimed in events:  # no MAXLEN: retention never drops entries nobody has read
            pipeline.xadd(self.stream_key, claimed.stream_message())
        replies = await self.call_broker(pipeline.execute(raise_on_error=False))
        delivery = StreamDelivery()
        for claimed, reply in zip(events, replies, strict=True):
            if isinstance(reply, Exception):
                delivery.refused[claimed.id] = reply
            else:
                delivery.stream_ids[claimed.id] = reply
        return delivery

    async def call_broker(self, call: Awaitable[T]) -> T:
        """Await one broker call, for at most broker_timeout_seconds."""
        return await asyncio.wait_for(call, self.broker_timeout_seconds)

    async def mark_published(self, connection: Any, stream_ids: dict[str, str]) -> int:
        """Mark the events the broker took, with their entry ids: one UPDATE … FROM for all."""
        if not stream_ids:
            return 0
        delivered = {
            "event_ids": list(stream_ids),
            "stream_ids": json.dumps(stream_ids),
            "published_at": utc_now(),
            "publisher": self.name,
        }
        mark = mark_published_statement(connection.dialect.name)
        return int((await connection.execute(mark, delivered)).rowcount)

    def idle_seconds(self, report: BatchReport) -> float:
        """How long the loop sleeps once caught up, unless a commit wakes it sooner."""
        return self.idle_wait_seconds


async def sleep_until_woken(wake: asyncio.Event, stopping: asyncio.Event, seconds: float) -> None:
    """Sleep up to `seconds`, ending early when `wake` or `stopping` is set."""
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waiters, timeout=max(0.001, seconds), return_when="FIRST_COMPLETED")
    finally:
        for waiter in waiters:
            waiter.cancel()


async def run_publisher(
    publisher: OutboxPublisher, *, wake: asyncio.Event, stopping: asyncio.Event
) -> None:
    """The relay, in the background: publish what is due; caught up, sleep until a commit wakes it.

    A full batch means more are waiting, so it goes again at once. `wake` is set by whoever
    commits an event (QuLab's session does it after every such commit); `stopping` ends the loop
    after the batch in hand.
    """
    while not stopping.is_set():
        wake.clear()
        try:
            report = await publisher.publish_due_batch()
        except REDIS_ERRORS:  # the broker is down: the batch's leases end, its events go later
            report = BatchReport()
        if report.claimed < publisher.batch_size:
            await sleep_until_woken(wake, stopping, publisher.idle_seconds(report))


EVENT_CONSUMER_GROUP = "score-notifications"


@dataclass
class ConsumeReport:
    """What one consumer batch did."""

    received: int = 0
    recorded: int = 0  # first delivery of an event id: handled, and kept in the inbox
    duplicates: int = 0  # an id the inbox already had: acknowledged, not handled again
    reclaimed: int = 0  # taken over (XAUTOCLAIM) from a consumer that stopped acknowledging
    group_created: bool = False  # the stream or its group was gone (a reset, a broker restart)


class StreamConsumer:
    """The downstream service: reads the stream in a consumer group, deduplicates, acknowledges."""

    def __init__(
        self,
        sandbox: Sandbox,
        *,
        batch_size: int = 100,
        reclaim_idle_seconds: float = 30.0,
        broker_timeout_seconds: float = 2.0,
        idle_seconds: float = 1.0,
    ) -> None:
        self.sandbox = sandbox
        self.name = f"consumer-{uuid.uuid4().hex[:12]}"
        self.batch_size = batch_size
        self.reclaim_idle_seconds = reclaim_idle_seconds
        self.broker_timeout_seconds = broker_timeout_seconds
        self.idle_wait_seconds = idle_seconds
        self.stream_key = sandbox.redis.key("events")
        self.duplicates_ignored = 0
        self._reclaim_cursor = "0-0"

    async def consume_batch(self) -> ConsumeReport:
        """Read a batch (abandoned entries first), record new event ids in the inbox, XACK all."""
        report = ConsumeReport()
        try:
            reclaimed, fresh = await self.call_broker(self._read())
        except redis.exceptions.ResponseError:  # NOGROUP: the stream or its group is gone
            report.group_created = await self.call_broker(self._create_group())
            if not report.group_created:
                raise
            reclaimed, fresh = await self.call_broker(self._read())
        messages = reclaimed + fresh
        report.received, report.reclaimed = len(messages), len(reclaimed)
        if not messages:
            return report
        inbox = {
            fields["event_id"]: {
                "event_id": fields["event_id"],
                "event_type": fields.get("event_type", "")[:100],
                "stream_message_id": message_id,
                "consumer_name": self.name,
                "consumed_at": utc_now(),
            }
            for message_id, fields in messages
            if (fields or {}).get("event_id")
        }
        if inbox:
            postgresql = self.sandbox.engine.dialect.name == "postgresql"
            new_ids = (postgresql_insert if postgresql else sqlite_insert)(ConsumedEvent)
            new_ids = new_ids.on_conflict_do_nothing(index_elements=[ConsumedEvent.event_id])
            async with get_session(self.sandbox) as session:
                result = await session.execute(
                    new_ids.returning(ConsumedEvent.event_id), list(inbox.values())
                )
                report.recorded = len(result.scalars().all())
        # Acknowledged only once the inbox committed: a crash in between means a redelivery,
        # which the inbox recognises, rather than a lost event.
        acknowledged = [message_id for message_id, _ in messages]
        client = self.sandbox.redis.client
        await self.call_broker(client.xack(self.stream_key, EVENT_CONSUMER_GROUP, *acknowledged))
        report.duplicates = len(messages) - report.recorded
        self.duplicates_ignored += report.duplicates
        return report

    async def call_broker(self, call: Awaitable[T]) -> T:
        """Await one broker call, for at most broker_timeout_seconds."""
        return await asyncio.wait_for(call, self.broker_timeout_seconds)

    async def _read(self) -> tuple[list[Any], list[Any]]:
        """Abandoned entries (XAUTOCLAIM) and new ones (XREADGROUP), in one round trip."""
        pipeline = self.sandbox.redis.client.pipeline(transaction=False)
        pipeline.xautoclaim(
            self.stream_key,
            EVENT_CONSUMER_GROUP,
            self.name,
            min_idle_time=int(self.reclaim_idle_seconds * 1000),
            start_id=self._reclaim_cursor,
            count=self.batch_size,
        )
        pipeline.xreadgroup(
            EVENT_CONSUMER_GROUP, self.name, {self.stream_key: ">"}, count=self.batch_size
        )
        (cursor, reclaimed, *_), response = await pipeline.execute()  # raises NOGROUP first
        self._reclaim_cursor = cursor
        fresh = response[0][1] if response else []
        return [(key, fields) for key, fields in reclaimed if fields], list(fresh)

    async def _create_group(self) -> bool:
        try:
            await self.sandbox.redis.client.xgroup_create(
                self.stream_key, EVENT_CONSUMER_GROUP, id="0", mkstream=True
            )
        except redis.exceptions.ResponseError as error:
            if "BUSYGROUP" in str(error):
                return False  # it existed: what brought us here was something else
            raise
        self._reclaim_cursor = "0-0"
        return True

    def idle_seconds(self, report: ConsumeReport) -> float:
        """How long the loop sleeps when the stream has nothing new, unless woken sooner."""
        return self.idle_wait_seconds


async def run_consumer(
    consumer: StreamConsumer, *, wake: asyncio.Event, stopping: asyncio.Event
) -> None:
    """The consumer, in the background: handle what the stream holds; idle, wait to be woken."""
    while not stopping.is_set():
        wake.clear()
        report = await consumer.consume_batch()
        if report.received < consumer.batch_size:
            await sleep_until_woken(wake, stopping, consumer.idle_seconds(report))
