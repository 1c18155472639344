"""Section 3's demos as the page runs them: each loading path measured, and the comparison at scale.

The loading code is the lesson's (source.fetch_user_and_scores_naive / _eager,
source.load_users_and_scores). What the platform adds is the measuring: every statement the
block sent, counted by the statement log, and its time; and, for the comparison, N users created
in bulk and every strategy timed in the experiment process (tens of thousands of ORM objects are
seconds of CPU that would stall everyone else's clicks).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import statistics
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import URL

import source
from classroom.budget import ConnectionBudget
from classroom.config import Settings
from classroom.engines import open_engine
from classroom.experiments import run_experiment_elsewhere
from classroom.sandboxes.sandbox import Sandbox
from classroom.statements import StatementLog, measure

NAIVE_STATEMENT_FORMULA = "1 + 1 + N"  # the user, the ids of their scores, then one per score
EAGER_STATEMENT_FORMULA = "1 + 1"  # the user, then all their scores in one IN query
# The scale-up experiment: N users with a few scores each, loaded with each strategy. They are
# named "Scale-up user #0001", ...: validate_name refuses '#', so no user created through a form
# can look like one, and the experiment never counts the learner's own users.
SCALE_UP_NAME_PREFIX = "Scale-up user #"
SCALE_UP_EMAIL_DOMAIN = "n-plus-one.qulab.example"
SCALE_UP_SCORES_PER_USER = 5
MAX_SCALE_UP_USERS = 1000
SCALE_UP_USERS_PER_CHUNK = 200
SCALE_UP_SIZES = (10, 50, 100, 250, 500, 1000)
COMPARISON_REPEATS = 3
MAX_USERS_LISTED = 50


@dataclass(frozen=True)
class UserScoresFetch:
    """One user read with their scores: the rows, every statement sent, and how long it took."""

    path: str  # "naive" or "eager"
    user: source.User
    scores: list[source.AIRScore]
    statements: StatementLog
    elapsed_ms: float

    @property
    def formula(self) -> str:
        """How many statements this path needs, with this fetch's N."""
        n = len(self.scores)
        if self.path == "naive":
            return f"{NAIVE_STATEMENT_FORMULA} with N = {n}"
        return f"{EAGER_STATEMENT_FORMULA}, whatever N is (here N = {n})"

    def sql_listing(self) -> str:
        """Every statement in order, each with its time and parameters, as one SQL text."""
        return "\n\n".join(
            f"-- statement {number}: {statement.duration_ms:.2f} ms, "
            f"parameters {statement.parameters}\n{statement.sql}"
            for number, statement in enumerate(self.statements.statements, start=1)
        )


async def fetch_naive(sandbox: Sandbox, *, user_id: str) -> UserScoresFetch:
    """The lesson's N+1 path, with every statement it sent and its time."""
    with measure() as measurement:
        user, scores = await source.fetch_user_and_scores_naive(sandbox, user_id=user_id)
    return UserScoresFetch("naive", user, scores, measurement.statements, measurement.elapsed_ms)


async def fetch_eager(sandbox: Sandbox, *, user_id: str) -> UserScoresFetch:
    """The lesson's eager path, with every statement it sent and its time."""
    with measure() as measurement:
        user, scores = await source.fetch_user_and_scores_eager(sandbox, user_id=user_id)
    return UserScoresFetch("eager", user, scores, measurement.statements, measurement.elapsed_ms)


def is_scale_up_user() -> Any:
    """The condition that picks the experiment's users."""
    return source.User.name.startswith(SCALE_UP_NAME_PREFIX)


@dataclass(frozen=True)
class UserWithScoreCount:
    """One of the learner's own users, with how many scores they have."""

    id: str
    name: str
    email: str
    scores: int


@dataclass(frozen=True)
class UserList:
    """The learner's own users (scale-up users left out), oldest first, and whether more exist."""

    users: tuple[UserWithScoreCount, ...]
    complete: bool  # every user is listed: one that is not listed is gone

    def ids(self) -> set[str]:
        """The ids listed."""
        return {user.id for user in self.users}


async def list_users_with_score_counts(sandbox: Sandbox) -> UserList:
    """The sandbox's own users with their score counts (at most MAX_USERS_LISTED)."""
    User, AIRScore = source.User, source.AIRScore
    score_count = (
        select(func.count(AIRScore.id))
        .where(AIRScore.user_id == User.id)
        .correlate(User)
        .scalar_subquery()
    )
    statement = (
        select(User.id, User.name, User.email, score_count.label("scores"))
        .where(~is_scale_up_user())
        .order_by(User.created_at, User.id)
        .limit(MAX_USERS_LISTED + 1)
    )
    async with source.get_session(sandbox) as session:
        rows = [UserWithScoreCount(*row) for row in await session.execute(statement)]
    return UserList(tuple(rows[:MAX_USERS_LISTED]), complete=len(rows) <= MAX_USERS_LISTED)


async def count_scale_up_users(sandbox: Sandbox) -> int:
    """How many scale-up users the sandbox holds."""
    async with source.get_session(sandbox) as session:
        count = select(func.count()).select_from(source.User).where(is_scale_up_user())
        return int(await session.scalar(count) or 0)


async def grow_scale_up_users(
    sandbox: Sandbox,
    *,
    target_users: int,
    scores_per_user: int = SCALE_UP_SCORES_PER_USER,
    max_new_users: int = SCALE_UP_USERS_PER_CHUNK,
) -> int:
    """Add scale-up users, each with valid scores, until `target_users` exist; returns how many do.

    At most `max_new_users` per call, each call its own short transaction of two bulk INSERTs.
    """
    source.validate_whole_number(target_users, label="Users", low=1, high=MAX_SCALE_UP_USERS)
    source.validate_whole_number(scores_per_user, label="Scores per user", low=0, high=20)
    source.validate_whole_number(
        max_new_users, label="Users per call", low=1, high=MAX_SCALE_UP_USERS
    )
    rng = random.Random()
    # One grower at a time per sandbox, so numbering stays consecutive.
    async with sandbox.service("scale_up_lock", lambda _: asyncio.Lock()):
        existing = await count_scale_up_users(sandbox)
        numbers = range(existing + 1, min(target_users, existing + max_new_users) + 1)
        if not numbers:
            return existing
        code = source.SAMPLE_OCCUPATION_CODE
        users = [
            {
                "id": source.new_id(),
                "email": f"scale-up-{n:04d}-{uuid.uuid4().hex[:8]}@{SCALE_UP_EMAIL_DOMAIN}",
                "name": f"{SCALE_UP_NAME_PREFIX}{n:04d}",
                "occupation_code": code,
            }
            for n in numbers
        ]
        scores = [
            {
                "user_id": user["id"],
                "occupation_code": code,
                "calculation_metadata": {"source": "codelab section 3 scale-up"},
                **source.sample_score_values(rng),
            }
            for user in users
            for _ in range(scores_per_user)
        ]
        async with source.get_session(sandbox) as session:
            await session.execute(insert(source.User), users)
            if scores:
                await session.execute(insert(source.AIRScore), scores)
        return existing + len(users)


async def remove_scale_up_users(sandbox: Sandbox) -> int:
    """Delete every scale-up user (their scores go with them, ON DELETE CASCADE); how many."""
    async with source.get_session(sandbox) as session:
        result = await session.execute(delete(source.User).where(is_scale_up_user()))
        return int(result.rowcount or 0)


@dataclass(frozen=True)
class StrategyRun:
    """One strategy at one N: statements sent, times, and a digest of what it loaded."""

    strategy: str
    users: int
    scores: int
    statements: int
    statement_sql: tuple[tuple[str, int], ...]  # each distinct SQL text, and how often it ran
    times_ms: tuple[float, ...]
    results_digest: str  # equal digests: the same users with the same scores

    @property
    def median_ms(self) -> float:
        """The median of the timed runs."""
        return statistics.median(self.times_ms)

    def sql_listing(self, *, max_characters: int = 700) -> str:
        """Each distinct SQL text once, with how often it was sent (long IN lists cut short)."""
        return "\n\n".join(
            f"-- sent {times:,}×\n{sql[:max_characters]}{' …' if len(sql) > max_characters else ''}"
            for sql, times in self.statement_sql
        )


async def load_scale_up_users(sandbox: Any, *, strategy: str, users: int) -> StrategyRun:
    """The first `users` scale-up users and their scores, loaded with one strategy, measured."""
    source.validate_whole_number(users, label="Users", low=1, high=MAX_SCALE_UP_USERS)
    User = source.User
    statement = select(User).where(is_scale_up_user()).order_by(User.name, User.id).limit(users)
    with measure() as measurement:
        loaded = await source.load_users_and_scores(
            sandbox.session_factory, statement, strategy=strategy
        )
    if len(loaded) < users:
        raise source.ValidationError(
            f"Only {len(loaded):,} scale-up users exist; create {users:,} before loading them.",
            field="users",
        )
    canonical = [[user.id, sorted(score.id for score in scores)] for user, scores in loaded]
    counts: dict[str, int] = {}
    for sql in measurement.statements.sql():
        counts[sql] = counts.get(sql, 0) + 1
    return StrategyRun(
        strategy=strategy,
        users=len(loaded),
        scores=sum(len(scores) for _, scores in loaded),
        statements=measurement.statements.count,
        statement_sql=tuple(counts.items()),
        times_ms=(measurement.elapsed_ms,),
        results_digest=hashlib.sha256(json.dumps(canonical).encode()).hexdigest(),
    )


@dataclass(frozen=True)
class StrategyComparison:
    """Every strategy at every N, measured in one run."""

    runs: tuple[StrategyRun, ...]
    repeats: int
    waited_seconds: float = 0.0  # in line behind other learners' experiments

    def at(self, users: int) -> dict[str, StrategyRun]:
        """The runs at one N, by strategy."""
        return {run.strategy: run for run in self.runs if run.users == users}

    @property
    def identical_results(self) -> bool:
        """True when, at each N, every strategy loaded the same users and scores."""
        return all(
            len({run.results_digest for run in self.at(n).values()}) == 1 for n in self.sizes
        )

    @property
    def sizes(self) -> list[int]:
        """The N values compared, smallest first."""
        return sorted({run.users for run in self.runs})

    @property
    def largest(self) -> int:
        """The largest N compared."""
        return self.sizes[-1]

    def rows(self) -> list[dict[str, Any]]:
        """One row per strategy and N: statements, scores, median time, ratio to selectinload."""
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


@dataclass(frozen=True)
class ExperimentDatabase:
    """A sandbox's database as the experiment process sees it: an engine, sessions on it."""

    engine: Any
    session_factory: Any


async def compare_loading_strategies(
    sandbox: Sandbox, *, sizes: Sequence[int], repeats: int = COMPARISON_REPEATS
) -> StrategyComparison:
    """Time every strategy at every N in the experiment process, one learner at a time."""
    chosen = sorted(
        {
            source.validate_whole_number(n, label="Users", low=1, high=MAX_SCALE_UP_USERS)
            for n in sizes
        }
    )
    if not chosen:
        raise source.ValidationError(
            "Choose at least one number of users to compare.", field="users"
        )
    source.validate_whole_number(repeats, label="Repeats", low=1, high=20)
    budget = sandbox.connection_budget or ConnectionBudget(1)
    translate = sandbox.engine.get_execution_options().get("schema_translate_map")
    timeout = 3 * sandbox.settings.pool_timeout_seconds
    async with budget.reserve(1, timeout_seconds=timeout) as waited:
        comparison, queued = await run_experiment_elsewhere(
            time_strategies_on,
            url=sandbox.engine.url,
            settings=sandbox.settings,
            translate=translate,
            sizes=chosen,
            repeats=repeats,
        )
    return replace(comparison, waited_seconds=waited + queued)


async def time_strategies(database: Any, *, sizes: list[int], repeats: int) -> StrategyComparison:
    """One untimed warm-up per strategy, then `repeats` rounds at each N, the median kept.

    Rounds go strategy by strategy in turn, so a moment of machine noise hits all of them alike.
    """
    strategies = list(source.LOADING_STRATEGIES)
    for strategy in strategies:  # compile and cache each statement before any timing
        await load_scale_up_users(database, strategy=strategy, users=sizes[0])
    runs = []
    for size in sizes:
        rounds = [
            [await load_scale_up_users(database, strategy=s, users=size) for s in strategies]
            for _ in range(repeats)
        ]
        for attempts in zip(*rounds, strict=True):
            times = tuple(attempt.times_ms[0] for attempt in attempts)
            runs.append(replace(attempts[-1], times_ms=times))
    return StrategyComparison(tuple(runs), repeats)


async def time_strategies_on(
    *,
    url: URL,
    settings: Settings,
    translate: Optional[dict[Any, Any]],
    sizes: list[int],
    repeats: int,
) -> StrategyComparison:
    """In the experiment process: one connection of its own to the sandbox's database."""
    engine = open_engine(url, settings, pool_size=1, max_overflow=0, pre_ping=False)
    try:
        view = engine.execution_options(schema_translate_map=translate) if translate else engine
        database = ExperimentDatabase(view, source.new_session_factory(view))
        return await time_strategies(database, sizes=sizes, repeats=repeats)
    finally:
        await engine.dispose()


async def scale_up_and_compare(
    sandbox: Sandbox, *, sizes: Sequence[int], repeats: int = COMPARISON_REPEATS
) -> StrategyComparison:
    """Section 3's Compare button: create the scale-up users still missing, then compare."""
    target = max((n for n in sizes if isinstance(n, int) and not isinstance(n, bool)), default=0)
    if 0 < target <= MAX_SCALE_UP_USERS:
        while await grow_scale_up_users(sandbox, target_users=target) < target:
            pass  # each call adds one chunk, in its own short transaction
    return await compare_loading_strategies(sandbox, sizes=sizes, repeats=repeats)
