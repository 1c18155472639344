"""The learner's path: one step per thing the guide asks them to do and see, each checked against
the sandbox's journal.

A step is done when what it teaches has happened in this sandbox: clicking a button proves
nothing; "N+1 fetch: 5 statements for N = 3" does. Progress lives in the sandbox's database, so
it survives reloads and replicas and goes when the sandbox goes. What a step is called on a page
and how to do it (the guide's button labels) are the pages' (pages/progress).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import select

import source
from classroom.progress.journal import JournalEntry
from classroom.statements import statements_hidden

if TYPE_CHECKING:
    from classroom.sandboxes.sandbox import Sandbox

logger = logging.getLogger("qulab")
CACHE_HIT, CACHE_MISS, CACHE_FALLBACK = source.HIT, source.MISS, source.FALLBACK


@dataclass(frozen=True)
class JournalLine:
    """One journal entry as the checks read it."""

    id: int
    recorded_at: datetime
    kind: str
    detail: str
    facts: dict[str, Any]


Check = Callable[
    [Sequence[JournalLine]], Optional[str]
]  # the evidence when done, None when not yet


@dataclass(frozen=True)
class Step:
    """One thing to do and see; its check says whether this sandbox shows it happened."""

    key: str
    section: int
    title: str
    check: Check = field(kw_only=True)
    optional: bool = field(default=False, kw_only=True)


def _first(
    journal: Sequence[JournalLine],
    kind: str,
    where: Callable[[dict[str, Any]], bool] = lambda _: True,
) -> Optional[JournalLine]:
    return next((line for line in journal if line.kind == kind and where(line.facts)), None)


def _recorded(kind: str, where: Callable[[dict[str, Any]], bool] = lambda _: True) -> Check:
    """Done when the journal holds an entry of this kind (that satisfies `where`)."""

    def check(journal: Sequence[JournalLine]) -> Optional[str]:
        line = _first(journal, kind, where)
        return line.detail if line else None

    return check


def _fetched(path: str, enough_statements: Callable[[int, int], bool]) -> Check:
    """Done when a fetch along this path loaded a score with the statement count it teaches."""
    return _recorded(
        "user_and_scores_fetched",
        lambda facts: (
            facts["path"] == path
            and facts["scores"] >= 1
            and enough_statements(facts["statements"], facts["scores"])
        ),
    )


def _fetches_compared(journal: Sequence[JournalLine]) -> Optional[str]:
    """The same user with the same N fetched both ways, and the statement counts differ."""
    fetches = [
        line.facts
        for line in journal
        if line.kind == "user_and_scores_fetched" and line.facts["scores"] >= 1
    ]
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
    return [
        line for line in journal if line.kind == "cache_read" and read in (None, line.facts["read"])
    ]


def _miss_then_hit(read: str) -> Check:
    """A MISS that stored the value, then a HIT that served it: same key, in that order."""

    def check(journal: Sequence[JournalLine]) -> Optional[str]:
        missed: dict[str, JournalLine] = {}
        for line in _cache_reads(journal, read):
            if line.facts["outcome"] == CACHE_MISS:
                missed.setdefault(line.facts["key"], line)
            elif line.facts["outcome"] == CACHE_HIT and line.facts["key"] in missed:
                miss = missed[line.facts["key"]]
                return (
                    f"MISS at {miss.recorded_at:%H:%M:%S}, "
                    f"then HIT at {line.recorded_at:%H:%M:%S} on {line.facts['key']}."
                )
        return None

    return check


def _metrics_moved(journal: Sequence[JournalLine]) -> Optional[str]:
    """The cache's counters hold hits and misses both, so H is measured, not 0 or 1 by default."""
    for line in _cache_reads(journal):
        facts = line.facts
        if facts["hits"] >= 1 and facts["misses"] >= 1:
            return (
                f"H = {facts['hits']} hits ÷ {facts['requests']} requests "
                f"= {facts['hits'] / facts['requests']:.2f}."
            )
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
                return (
                    f"Invalidated at {invalidated[key].recorded_at:%H:%M:%S}, "
                    f"then MISS at {line.recorded_at:%H:%M:%S}."
                )
            read_before.add(key)
            invalidated.pop(key, None)
    return None


def _survived_redis_outage(journal: Sequence[JournalLine]) -> Optional[str]:
    """A read the database answered while Redis failed, then a normal read once Redis answered."""
    fallback: Optional[JournalLine] = None
    for line in _cache_reads(journal):
        if line.facts["outcome"] == CACHE_FALLBACK:
            fallback = fallback or line
        elif fallback is not None:
            return (
                f"FALLBACK at {fallback.recorded_at:%H:%M:%S} (database answered), "
                f"then {line.facts['outcome']} at {line.recorded_at:%H:%M:%S}."
            )
    return None


def _stopped_after_start(journal: Sequence[JournalLine]) -> Optional[str]:
    started = _first(journal, "publisher_started")
    stopped = started and next(
        (line for line in journal if line.kind == "publisher_stopped" and line.id > started.id),
        None,
    )
    return stopped.detail if stopped else None


def _published_in_background(journal: Sequence[JournalLine]) -> Optional[str]:
    line = next(
        (line for line in journal if line.kind in ("events_published", "published_after_outage")),
        None,
    )
    return line.detail if line else None


STEPS: tuple[Step, ...] = (
    # 1. Data models
    Step("create_user", 1, "Create a user", check=_recorded("user_created")),
    # 2. Connectivity and pooling
    Step(
        "initialize",
        2,
        "Initialize and see the two sample users",
        check=_recorded(
            "initialized", lambda facts: len(facts["sample_user_ids"]) == len(source.SAMPLE_USERS)
        ),
    ),
    Step(
        "pool_experiment", 2, "Measure pooling", optional=True, check=_recorded("pool_experiment")
    ),
    # 3. Repository pattern and N+1: an N+1 fetch only counts with scores to fetch (N >= 1)
    Step(
        "add_scores",
        3,
        "Add three sample scores",
        check=_recorded("sample_scores_added", lambda facts: facts["count"] >= 3),
    ),
    Step(
        "fetch_n_plus_one",
        3,
        "Fetch with N+1",
        check=_fetched("naive", lambda statements, scores: statements >= scores + 1),
    ),
    Step(
        "fetch_eager",
        3,
        "Fetch with eager loading",
        check=_fetched("eager", lambda statements, scores: statements <= 2),
    ),
    Step("compare_fetches", 3, "See the statement counts differ", check=_fetches_compared),
    Step(
        "scale_up",
        3,
        "Compare the strategies at scale",
        optional=True,
        check=_recorded("loading_strategies_compared", lambda facts: facts["identical_results"]),
    ),
    # 4. Caching: only reads Redis answered count (a FALLBACK is neither hit nor miss)
    Step("user_miss_then_hit", 4, "User: a miss, then a hit", check=_miss_then_hit("user")),
    Step(
        "score_miss_then_hit",
        4,
        "Latest score: a miss, then a hit",
        check=_miss_then_hit("latest_airscore"),
    ),
    Step("metrics_move", 4, "See the metrics count hits and misses", check=_metrics_moved),
    Step("invalidate_then_miss", 4, "Invalidate, then miss again", check=_invalidated_then_missed),
    Step("redis_outage", 4, "Survive a Redis outage", optional=True, check=_survived_redis_outage),
    # 5. Eventing: "published" is journaled by the background publisher itself, never by a click
    Step(
        "store_airscore",
        5,
        "Store a score with its pending event",
        check=_recorded("airscore_stored", lambda facts: facts["event_status"] == "pending"),
    ),
    Step("start_publisher", 5, "Start the publisher", check=_recorded("publisher_started")),
    Step(
        "event_published",
        5,
        "See an event published in the background",
        check=_published_in_background,
    ),
    Step("stop_publisher", 5, "Stop the publisher", check=_stopped_after_start),
    Step(
        "broker_outage",
        5,
        "Survive a broker outage",
        optional=True,
        check=_recorded("published_after_outage"),
    ),
)


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
            (
                status
                for status in self.required
                if not status.done and section in (None, status.step.section)
            ),
            None,
        )

    def section_complete(self, section: int) -> bool:
        """True once every required step of the section is done."""
        return all(status.done for status in self.in_section(section) if not status.step.optional)

    def evidence_of(self, key: str) -> Optional[str]:
        """The evidence of one step (None while it is not done)."""
        return next((status.evidence for status in self.steps if status.step.key == key), None)


MAX_JOURNAL_LINES_READ = 5000


async def learner_progress(sandbox: Sandbox) -> LearnerProgress:
    """Read the sandbox's journal once and run every step's check on it.

    Every rerun draws the sidebar's progress, so a SQLite sandbox keeps its last reading until
    this process writes or deletes journal lines (only this process opens its file). On
    PostgreSQL another replica may write the journal too, so it is read every time.
    """
    generation = sandbox.journal_generation
    if (
        sandbox.backend == "sqlite"
        and sandbox.progress_read is not None
        and sandbox.progress_read[0] == generation
    ):
        return sandbox.progress_read[1]
    progress = await _read_learner_progress(sandbox)
    sandbox.progress_read = (generation, progress)
    return progress


async def _read_learner_progress(sandbox: Sandbox) -> LearnerProgress:
    newest_first = (
        select(JournalEntry.__table__)
        .order_by(JournalEntry.id.desc())
        .limit(MAX_JOURNAL_LINES_READ)
    )
    with statements_hidden():
        async with sandbox.engine.connect() as connection:
            rows = (await connection.execute(newest_first)).all()
    journal = tuple(
        JournalLine(row.id, row.recorded_at, row.kind, row.detail, row.facts or {})
        for row in reversed(rows)
    )
    return LearnerProgress(
        tuple(StepStatus(step, _run_check(step, journal)) for step in STEPS), journal
    )


def _run_check(step: Step, journal: Sequence[JournalLine]) -> Optional[str]:
    try:
        return step.check(journal)
    except (
        KeyError,
        TypeError,
        ValueError,
    ):  # an entry written by an older QuLab: it proves nothing
        logger.warning("check %s could not read the journal", step.key, exc_info=True)
        return None
