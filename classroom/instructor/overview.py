"""The class at a glance, from one SELECT of the roster (and the servers' rows beside it).

`class_overview` reads every row once, whatever the class size, and works out the rest in
Python: learners by state, the servers and their capacity, the funnel (for each step of the
guide, how many learners completed it), the median time each step took (from the previous
required step, or from joining for the first), and who is stuck (active, the same next step
for longer than the threshold). `progress_csv` turns it into a file; `learner_view` is what the
instructor sees about one learner, for that learner's own page. Only display names, steps,
times and states leave this module: never a sandbox id (a learner's link) or any of their rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import Integer, Select, String, Table, cast, literal, null, select

import source
from classroom.instructor.roster import default_display_name, roster_of, utc_now
from classroom.progress.steps import STEPS
from classroom.sandboxes.sandbox import SANDBOX_ACTIVE, SANDBOX_DORMANT, SANDBOX_IDLE, Sandbox
from classroom.statements import statements_hidden

if TYPE_CHECKING:
    from classroom.instructor.service import InstructorService

STATES = (SANDBOX_ACTIVE, SANDBOX_IDLE, SANDBOX_DORMANT)
_TITLES = {step.key: step.title for step in STEPS}  # in the guide's order
_PREVIOUS_REQUIRED = {
    step.key: next((s.key for s in reversed(STEPS[:index]) if not s.optional), None)
    for index, step in enumerate(STEPS)
}
_CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class LearnerLine:
    """One learner as the instructor sees them."""

    display_name: str
    state: str  # as shown: an "active" row whose server stopped answering shows "idle"
    server_stopped_answering: bool
    next_step: Optional[str]  # its title; None once every required step is done
    on_it_since: Optional[datetime]
    completed: tuple[tuple[str, datetime], ...]  # (step title, first seen done), guide order


@dataclass(frozen=True)
class StepLine:
    """One step of the guide: how many learners completed it and the median time it took."""

    key: str
    title: str
    section: int
    optional: bool
    completed: int
    median_seconds: Optional[float]  # None until a learner has a measured time for it


@dataclass(frozen=True)
class StuckLearner:
    """A learner on the same step for longer than the threshold."""

    display_name: str
    step: str
    seconds: float


@dataclass(frozen=True)
class ServerLine:
    """One app process: its capacity, what sets it, and when it was last heard from."""

    capacity: int
    limited_by: str
    heard_seconds_ago: float
    answering: bool  # heard from within the staleness limit


@dataclass(frozen=True)
class ClassOverview:
    """The class at a glance, as one read of the roster saw it."""

    states: dict[str, int]
    learners: tuple[LearnerLine, ...]
    servers: tuple[ServerLine, ...]
    funnel: tuple[StepLine, ...]
    stuck: tuple[StuckLearner, ...]
    stuck_after_minutes: float
    every_server: bool  # PostgreSQL: every replica's learners; else this process's only
    version: str  # changes when anything shown changes, durations aside
    read_at: datetime

    @property
    def capacity(self) -> int:
        """Learners the answering servers have room for at once."""
        return sum(server.capacity for server in self.servers if server.answering)


@dataclass(frozen=True)
class LearnerView:
    """What the instructor sees about one learner: shown to that learner as it is."""

    line: LearnerLine
    named: bool  # the learner chose the display name


async def class_overview(
    instructor: InstructorService,
    *,
    stuck_after_minutes: Optional[float] = None,
    now: Optional[datetime] = None,
) -> ClassOverview:
    """The class now: one SELECT of every roster row and server row, the rest in Python."""
    await instructor.roster.flush()  # this process's changes first: the page shows them
    minutes = stuck_after_minutes or instructor.settings.stuck_minutes
    now = now or utc_now()
    stale_after = instructor.roster.stale_after
    learners: list[LearnerLine] = []
    servers: list[ServerLine] = []
    counts = dict.fromkeys(_TITLES, 0)
    taken: dict[str, list[float]] = {key: [] for key in _TITLES}
    shown: list[Any] = []  # what the version digests
    for row in await _read_class(instructor):
        if row.kind == "server":
            ago = max(0.0, (now - row.state_at).total_seconds())
            answering = ago <= stale_after.total_seconds()
            servers.append(ServerLine(row.capacity, row.display_name, ago, answering))
            shown.append((row.capacity, row.display_name, answering))
            continue
        completed = _completed(row.completed)
        line = _learner_line(row, now, stale_after, completed)
        learners.append(line)
        shown.append((line.display_name, line.state, row.next_step, str(row.step_since)))
        shown.append(row.completed)
        _count_into(counts, taken, row.joined_at, completed)
    stuck = tuple(
        sorted(
            (
                StuckLearner(line.display_name, line.next_step, seconds)
                for line in learners
                if line.state == SANDBOX_ACTIVE
                and line.next_step is not None
                and line.on_it_since is not None
                and (seconds := (now - line.on_it_since).total_seconds()) > minutes * 60
            ),
            key=lambda learner: -learner.seconds,
        )
    )
    shown.append([learner.display_name for learner in stuck])
    learners.sort(key=lambda line: line.display_name.lower())
    return ClassOverview(
        states={state: sum(line.state == state for line in learners) for state in STATES},
        learners=tuple(learners),
        servers=tuple(sorted(servers, key=lambda server: server.heard_seconds_ago)),
        funnel=tuple(
            StepLine(
                step.key,
                step.title,
                step.section,
                step.optional,
                counts[step.key],
                statistics.median(taken[step.key]) if taken[step.key] else None,
            )
            for step in STEPS
        ),
        stuck=stuck,
        stuck_after_minutes=minutes,
        every_server=instructor.store.shared,
        version=hashlib.sha256(json.dumps(sorted(map(str, shown))).encode()).hexdigest()[:16],
        read_at=now,
    )


async def _read_class(instructor: InstructorService) -> list[Any]:
    """Every roster row and every server row: one statement (a UNION ALL)."""
    roster, servers = instructor.store.tables.roster, instructor.store.tables.servers
    server_rows = select(
        literal("server", String),
        servers.c.server_id,
        servers.c.limited_by,
        servers.c.started_at,
        literal("", String),
        servers.c.heartbeat_at,
        servers.c.heartbeat_at,
        null(),
        null(),
        literal("", String),
        servers.c.capacity,
    )
    engine = await instructor.store.ready()
    with statements_hidden():
        async with engine.connect() as connection:
            read = await connection.execute(_learner_rows(roster).union_all(server_rows))
            return list(read.all())


def _learner_rows(roster: Table) -> Select[Any]:
    """The roster's rows, with the column names the overview's UNION gives them."""
    return select(
        literal("learner", String).label("kind"),
        roster.c.sandbox_id.label("key"),
        roster.c.display_name,
        roster.c.joined_at,
        roster.c.state,
        roster.c.state_at,
        roster.c.heartbeat_at,
        roster.c.next_step,
        roster.c.step_since,
        roster.c.completed,
        cast(null(), Integer).label("capacity"),
    )


def _completed(stored: Optional[str]) -> dict[str, datetime]:
    """Step key -> when first seen done, in the guide's order (a row's JSON read once)."""
    seen = json.loads(stored or "{}")
    return {key: datetime.fromisoformat(seen[key]) for key in _TITLES if key in seen}


def _learner_line(
    row: Any, now: datetime, stale_after: timedelta, completed: dict[str, datetime]
) -> LearnerLine:
    stopped = row.state == SANDBOX_ACTIVE and now - row.heartbeat_at > stale_after
    return LearnerLine(
        display_name=row.display_name or default_display_name(row.key),
        state=SANDBOX_IDLE if stopped else row.state,
        server_stopped_answering=stopped,
        next_step=_TITLES.get(row.next_step) if row.next_step else None,
        on_it_since=row.step_since if row.next_step else None,
        completed=tuple((_TITLES[key], seen) for key, seen in completed.items()),
    )


def _count_into(
    counts: dict[str, int],
    taken: dict[str, list[float]],
    joined_at: datetime,
    completed: dict[str, datetime],
) -> None:
    """One learner into the funnel: each step they completed, and the time it took them (from
    the previous required step, or from joining for the first)."""
    for key, seen in completed.items():
        counts[key] += 1
        previous = _PREVIOUS_REQUIRED[key]
        start = joined_at if previous is None else completed.get(previous)
        if start is not None and seen >= start:  # done out of the guide's order: not timed
            taken[key].append((seen - start).total_seconds())


def progress_csv(overview: ClassOverview) -> str:
    """The class's progress as CSV: display name, step, completed at (UTC, ISO 8601); one line
    per completed step."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["display name", "step", "completed at"])
    for line in overview.learners:
        name = line.display_name
        if name.startswith(_CSV_FORMULA_STARTS):  # a spreadsheet must not run it as a formula
            name = "'" + name
        for title, seen in line.completed:
            writer.writerow([name, title, seen.astimezone(UTC).isoformat()])
    return out.getvalue()


async def learner_view(sandbox: Sandbox) -> LearnerView:
    """Exactly what the instructor's page shows about this sandbox's learner (its stored row,
    read and shaped as the overview reads and shapes it), for the learner's own page."""
    roster = roster_of(sandbox)
    await roster.flush()
    table = roster.store.tables.roster
    engine = await roster.store.ready()
    with statements_hidden():
        async with engine.connect() as connection:
            found = await connection.execute(
                _learner_rows(table).where(table.c.sandbox_id == sandbox.id)
            )
            row = found.one_or_none()
    if row is None:
        raise source.QuLabError("Your place on the class roster is not written yet; try again.")
    line = _learner_line(row, utc_now(), roster.stale_after, _completed(row.completed))
    return LearnerView(line, named=row.display_name is not None)
