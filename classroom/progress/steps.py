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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import func, select

import source
from classroom.progress.journal import JournalEntry, JournalLine
from classroom.statements import statements_hidden

if TYPE_CHECKING:
    from classroom.sandboxes.sandbox import Sandbox

logger = logging.getLogger("qulab")
CACHE_HIT, CACHE_MISS, CACHE_FALLBACK = source.HIT, source.MISS, source.FALLBACK
# sandbox.services key: callables told every progress reading (the class roster notes changes)
PROGRESS_LISTENERS = "progress_listeners"


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
            hits = f"{facts['hits']} hit{'' if facts['hits'] == 1 else 's'}"
            return (
                f"H = {hits} ÷ {facts['requests']} requests "
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


# The rows a step's evidence shows: (journal kind, the fact naming the row, its table). A step
# stays done when they are deleted (by an initialize, say), but its learner is told, since what
# the step showed is gone. The newest entry of the kind is the one checked.
ROWS_SHOWN = {
    "create_user": ("user_created", "user_id", "users"),
    "initialize": ("initialized", "sample_user_ids", "users"),
    "add_scores": ("sample_scores_added", "user_id", "users"),
    "fetch_n_plus_one": ("user_and_scores_fetched", "user_id", "users"),
    "fetch_eager": ("user_and_scores_fetched", "user_id", "users"),
    "compare_fetches": ("user_and_scores_fetched", "user_id", "users"),
    "user_miss_then_hit": ("cache_read", "user_id", "users"),
    "score_miss_then_hit": ("cache_read", "user_id", "users"),
    "metrics_move": ("cache_read", "user_id", "users"),
    "invalidate_then_miss": ("cache_read", "user_id", "users"),
    "store_airscore": ("airscore_stored", "score_id", "air_scores"),
    "event_published": ("events_published", "score_id", "air_scores"),
}


@dataclass(frozen=True)
class StepStatus:
    """A step and, when it is done, the evidence this sandbox shows for it."""

    step: Step
    evidence: Optional[str]
    rows_gone: bool = False  # done, but the rows its evidence showed were deleted since

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


MAX_JOURNAL_LINES_READ = 5000


@dataclass(frozen=True)
class ProgressReading:
    """A sandbox's last progress reading, and what it was read from."""

    journal_generation: int  # this process's journal writes and deletions when it was read
    deletion_generation: int
    progress: LearnerProgress
    existing: frozenset[str]  # shown row ids seen to exist since the last deletion
    gone: frozenset[str]  # shown row ids seen gone (ids are UUIDs: they never come back)
    lines: int = 0  # PostgreSQL: the journal's line count and newest id when it was read
    newest_id: int = 0


async def learner_progress(sandbox: Sandbox) -> LearnerProgress:
    """Read the sandbox's journal, run every step's check on it, and see which done steps showed
    rows that are gone.

    Every click draws some progress, so the last reading is kept and only what changed is read.
    A SQLite sandbox is opened by this process only: the journal lines it wrote since are kept
    as they were written (not read back), and the shown rows are asked about again only after a
    commit that deleted rows or for a row not asked about yet. On PostgreSQL another replica may
    write too, so one statement first asks how many lines the journal has, its newest id, and
    how many of the rows seen are still there: the lines after the newest are read when that
    accounts for the count, everything otherwise.
    """
    kept: Optional[ProgressReading] = sandbox.progress_read
    written, sandbox.journal_written = sandbox.journal_written, []
    if sandbox.backend == "sqlite":
        reading = await _read_own(sandbox, kept, written)
    else:
        reading = await _read_shared(sandbox, kept)
    sandbox.progress_read = reading
    _tell_progress_listeners(sandbox, reading.progress)
    return reading.progress


def _tell_progress_listeners(sandbox: Sandbox, progress: LearnerProgress) -> None:
    """Each reading goes to the listeners (synchronous and cheap: they write only on change)."""
    for listener in sandbox.services.get(PROGRESS_LISTENERS, ()):
        try:
            listener(progress)
        except Exception:  # the reading stands whatever a listener does
            logger.exception("progress listener failed in sandbox %s", sandbox.id)


async def _read_own(
    sandbox: Sandbox, kept: Optional[ProgressReading], written: list[JournalLine]
) -> ProgressReading:
    """SQLite: only this process writes the file, so its own counters say what changed."""
    generations = (sandbox.journal_generation, sandbox.deletion_generation)
    if kept is not None and (kept.journal_generation, kept.deletion_generation) == generations:
        return kept
    if kept is None:
        progress = _checked(await _read_journal(sandbox))
    elif kept.journal_generation == generations[0]:
        progress = kept.progress
    else:
        newest_id = kept.progress.journal[-1].id if kept.progress.journal else 0
        if len(written) != generations[0] - kept.journal_generation:  # one not seen written
            written = list(await _read_journal(sandbox, after_id=newest_id))
        journal = (*kept.progress.journal, *(line for line in written if line.id > newest_id))
        progress = _checked(journal[-MAX_JOURNAL_LINES_READ:], kept.progress)
    unchanged_rows = kept is not None and kept.deletion_generation == generations[1]
    progress, existing, gone = await _mark_rows_gone(
        sandbox,
        progress,
        kept.existing if kept is not None and unchanged_rows else frozenset(),
        kept.gone if kept is not None else frozenset(),
    )
    return ProgressReading(*generations, progress, existing, gone)


async def _read_shared(sandbox: Sandbox, kept: Optional[ProgressReading]) -> ProgressReading:
    """PostgreSQL: one probe of the journal and the rows seen; then only what it says changed."""
    seen = kept.existing if kept is not None else frozenset()
    lines, newest_id, still_there = await _probe(sandbox, seen)
    if kept is not None and (lines, newest_id) == (kept.lines, kept.newest_id):
        progress = kept.progress
    else:
        progress = None
        if kept is not None and newest_id > kept.newest_id:
            added = await _read_journal(sandbox, after_id=kept.newest_id)
            if kept.lines + len(added) == lines:  # nothing committed out of order, nothing gone
                journal = (*kept.progress.journal, *added)
                progress = _checked(journal[-MAX_JOURNAL_LINES_READ:], kept.progress)
        if progress is None:
            progress = _checked(await _read_journal(sandbox))
    progress, existing, gone = await _mark_rows_gone(
        sandbox,
        progress,
        seen if still_there == len(seen) else frozenset(),
        kept.gone if kept is not None else frozenset(),
    )
    return ProgressReading(
        sandbox.journal_generation,
        sandbox.deletion_generation,
        progress,
        existing,
        gone,
        lines,
        newest_id,
    )


async def _probe(sandbox: Sandbox, seen: frozenset[str]) -> tuple[int, int, int]:
    """(journal lines, newest journal id, how many of the `seen` rows still exist): one query."""
    journal = JournalEntry.__table__
    columns = [
        select(func.count()).select_from(journal).scalar_subquery(),
        select(func.coalesce(func.max(journal.c.id), 0)).scalar_subquery(),
    ]
    for model in (source.User, source.AIRScore):
        if seen:
            columns.append(
                select(func.count()).select_from(model).where(model.id.in_(seen)).scalar_subquery()
            )
    with statements_hidden():
        async with sandbox.engine.connect() as connection:
            row = (await connection.execute(select(*columns))).one()
    return row[0], row[1], sum(row[2:])


def _shown_rows(progress: LearnerProgress) -> dict[str, tuple[str, str]]:
    """Step key -> (table, row id) of the row each done step's newest evidence showed."""
    shown: dict[str, tuple[str, str]] = {}
    for status in progress.steps:
        if status.done and status.step.key in ROWS_SHOWN:
            kind, fact, table = ROWS_SHOWN[status.step.key]
            line = next((ln for ln in reversed(progress.journal) if ln.kind == kind), None)
            row_id = line.facts.get(fact) if line is not None else None
            row_id = row_id[0] if isinstance(row_id, list) and row_id else row_id
            if isinstance(row_id, str):
                shown[status.step.key] = (table, row_id)
    return shown


async def _mark_rows_gone(
    sandbox: Sandbox, progress: LearnerProgress, existing: frozenset[str], gone: frozenset[str]
) -> tuple[LearnerProgress, frozenset[str], frozenset[str]]:
    """Each done step whose shown row no longer exists, marked; the rows known to exist and
    known gone are not asked again (one query per table with rows to ask about)."""
    shown = _shown_rows(progress)
    models = {"users": source.User, "air_scores": source.AIRScore}
    unknown = {
        table: {row_id for named, row_id in shown.values() if named == table} - existing - gone
        for table in models
    }
    if any(unknown.values()):
        found: set[str] = set()
        with statements_hidden():
            async with sandbox.engine.connect() as connection:
                for table, ids in unknown.items():
                    if ids:
                        model = models[table]
                        rows = await connection.execute(select(model.id).where(model.id.in_(ids)))
                        found.update(rows.scalars())
        asked = set().union(*unknown.values())
        existing, gone = existing | (asked & found), gone | (asked - found)
    steps = tuple(
        replace(status, rows_gone=status.step.key in shown and shown[status.step.key][1] in gone)
        for status in progress.steps
    )
    return replace(progress, steps=steps), existing, gone


async def _read_journal(sandbox: Sandbox, *, after_id: int = 0) -> tuple[JournalLine, ...]:
    """The journal's newest lines (those after `after_id`), oldest first."""
    newest_first = (
        select(JournalEntry.__table__)
        .where(JournalEntry.id > after_id)
        .order_by(JournalEntry.id.desc())
        .limit(MAX_JOURNAL_LINES_READ)
    )
    with statements_hidden():
        async with sandbox.engine.connect() as connection:
            rows = (await connection.execute(newest_first)).all()
    return tuple(
        JournalLine(row.id, row.recorded_at, row.kind, row.detail, row.facts or {})
        for row in reversed(rows)
    )


def _checked(
    journal: tuple[JournalLine, ...], earlier: Optional[LearnerProgress] = None
) -> LearnerProgress:
    """Every step's check on the journal; with `earlier`, a reading of the same journal before
    lines were added, a step it found done keeps its evidence without being checked again.

    Each check looks for the first lines that show its step, so lines added after them cannot
    change what it finds: a click costs the steps not done yet, not every step over the whole
    journal.
    """
    found = {status.step.key: status.evidence for status in earlier.steps} if earlier else {}
    return LearnerProgress(
        tuple(StepStatus(step, found.get(step.key) or _run_check(step, journal)) for step in STEPS),
        journal,
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
