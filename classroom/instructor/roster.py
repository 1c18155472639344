"""The class roster: one row per sandbox, written only when something about it changed.

A row holds what the instructor may see of a learner: a display name, when they joined, their
sandbox's state (active, idle, dormant) and since when, the next step of the guide and since
when it has been next, and the steps completed, each with the time it was first seen done.
Never a row of the learner's own data.

What writes a row, and nothing else does:
- a progress reading whose done steps (or next step) differ from those this process last
  noted for the sandbox (classroom.progress.steps tells every reading; an unchanged one costs a
  set comparison and no statement);
- a change of state (a browser session holds the sandbox: active; nobody does: idle; dormant),
  and the sandbox's deletion (its row goes), from the sandbox's listeners;
- a heartbeat: every HEARTBEAT_SECONDS, one UPDATE marks the sandboxes this process holds as
  alive, and only while it holds any. A row still "active" whose heartbeat is older than
  STALE_AFTER_HEARTBEATS beats is shown as idle: its server stopped answering.

Writes go through one writer task per process, in order, and each writes the row as this
process knows it now, so a burst of changes costs one statement per sandbox, not one each.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import case, delete, select, update

import source
from classroom.errors import BackendUnavailableError
from classroom.instructor.store import DISPLAY_NAME_MAX, ClassStore
from classroom.progress.steps import PROGRESS_LISTENERS, STEPS, LearnerProgress
from classroom.sandboxes.sandbox import SANDBOX_ACTIVE, Sandbox
from classroom.statements import statements_hidden

if TYPE_CHECKING:
    from classroom.sandboxes.registry import SandboxRegistry

logger = logging.getLogger("qulab")
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_HEARTBEATS = 3
ROSTER_SERVICE = "class_roster"  # sandbox.services key: the roster the sandbox is on
_STEP_ORDER = {step.key: index for index, step in enumerate(STEPS)}


def default_display_name(sandbox_id: str) -> str:
    """ "Learner " and 6 hex digits of the id's SHA-256: never a part of the id (the id is the
    learner's link, a secret)."""
    return "Learner " + hashlib.sha256(sandbox_id.encode()).hexdigest()[:6]


def checked_display_name(typed: Any) -> str:
    """A display name as typed, stripped; refused (ValidationError) unless 1 to 40 characters
    of plain text with no control characters."""
    if not isinstance(typed, str):
        raise source.ValidationError("A display name is text.", field="display_name")
    name = typed.strip()
    if not name:
        raise source.ValidationError(
            f"Type a display name of 1 to {DISPLAY_NAME_MAX} characters.", field="display_name"
        )
    if len(name) > DISPLAY_NAME_MAX:
        raise source.ValidationError(
            f"A display name has at most {DISPLAY_NAME_MAX} characters; this one has {len(name)}.",
            field="display_name",
        )
    if any(unicodedata.category(character).startswith("C") for character in name):
        raise source.ValidationError(
            "A display name cannot hold control characters (tabs, line breaks and the like).",
            field="display_name",
        )
    return name


def utc_now() -> datetime:
    """Now, in UTC (every replica of one machine room agrees closely enough for minutes)."""
    return datetime.now(UTC)


@dataclass
class RosterEntry:
    """What this process last noted about one sandbox (and so last wrote to its row)."""

    sandbox_id: str
    state: str
    state_at: datetime
    joined_at: datetime
    display_name: Optional[str] = None
    done: Optional[frozenset[str]] = None  # None: no progress reading noted yet
    next_step: Optional[str] = None
    step_since: Optional[datetime] = None
    completed: dict[str, str] = field(default_factory=dict)  # step key -> ISO time first seen
    loaded: bool = False  # the stored row (another replica's) was read and merged
    name_changed: bool = False
    removed: bool = False

    def merge_stored(self, row: Any) -> None:
        """Keep what the stored row knew first: when the learner joined, their name, and when
        each step still done was first seen done (on another replica, say)."""
        self.joined_at = row.joined_at
        if not self.name_changed:
            self.display_name = row.display_name
        stored = json.loads(row.completed or "{}")
        if self.done is None:
            self.completed = stored
            self.next_step, self.step_since = row.next_step, row.step_since
        else:
            self.completed = {key: stored.get(key, seen) for key, seen in self.completed.items()}
            if row.next_step == self.next_step and row.step_since is not None:
                self.step_since = row.step_since


class ClassRoster:
    """This process's part of the class roster: notes changes, writes them, beats."""

    def __init__(
        self,
        store: ClassStore,
        registry: SandboxRegistry,
        *,
        server_id: str,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.store = store
        self.registry = registry
        self.server_id = server_id
        self.heartbeat_seconds = heartbeat_seconds
        self._entries: dict[str, RosterEntry] = {}
        self._pending: dict[str, bool] = {}  # sandbox id -> True: write its row, False: delete
        self._writer: Optional[asyncio.Task[None]] = None
        self._beating: Optional[asyncio.Task[None]] = None
        self._stopped = False
        self.heartbeats_written = 0

    @property
    def stale_after(self) -> timedelta:
        """An active row not heard from for this long is shown idle."""
        return timedelta(seconds=self.heartbeat_seconds * STALE_AFTER_HEARTBEATS)

    # --- listening to the sandboxes ---------------------------------------------------------

    def attach(self) -> None:
        """Hear of every sandbox the registry makes from now on, and of every one reaped."""
        self.registry.created_listeners.append(self.join)
        self.registry.reaped_listeners.append(self.forget)
        for sandbox in self.registry.all():
            self.join(sandbox)

    def join(self, sandbox: Sandbox) -> None:
        """A sandbox of this process: listen to its state and progress; its row is written."""
        now = utc_now()
        entry = RosterEntry(sandbox.id, sandbox.state, now, now, loaded=not self.store.shared)
        self._entries[sandbox.id] = entry
        sandbox.services[ROSTER_SERVICE] = self
        sandbox.services.setdefault(PROGRESS_LISTENERS, []).append(
            lambda progress: self.note_progress(entry, progress)
        )
        sandbox.state_listeners.append(lambda changed: self.note_state(entry, changed.state))
        sandbox.release_listeners.append(self._left)
        self._mark(entry)

    def note_state(self, entry: RosterEntry, state: str) -> None:
        """Active, idle or dormant: noted and written."""
        if state != entry.state:
            entry.state, entry.state_at = state, utc_now()
            self._mark(entry)

    def note_progress(self, entry: RosterEntry, progress: LearnerProgress) -> None:
        """A progress reading: written only when its done steps or next step changed."""
        done = frozenset(status.step.key for status in progress.steps if status.done)
        upcoming = progress.next_step()
        next_key = upcoming.step.key if upcoming is not None else None
        if entry.done == done and entry.next_step == next_key:
            return
        now = utc_now()
        ordered = sorted(done, key=_STEP_ORDER.__getitem__)
        entry.completed = {key: entry.completed.get(key, now.isoformat()) for key in ordered}
        if next_key != entry.next_step or entry.step_since is None:
            entry.step_since = now
        entry.done, entry.next_step = done, next_key
        self._mark(entry)

    def rename(self, sandbox_id: str, display_name: str) -> None:
        """The learner chose a display name (checked_display_name first)."""
        entry = self._entries.get(sandbox_id)
        if entry is None:
            raise source.QuLabError("This sandbox is not on the class roster.")
        entry.display_name, entry.name_changed = display_name, True
        self._mark(entry)

    async def _left(self, sandbox: Sandbox) -> None:
        """The sandbox was deleted: its row goes."""
        entry = self._entries.pop(sandbox.id, None)
        if entry is not None:
            entry.removed = True
            self._pending[sandbox.id] = False
            self._start_writer()

    async def forget(self, sandbox_ids: list[str]) -> None:
        """Sandboxes reaped after their process died: their rows go."""
        for sandbox_id in sandbox_ids:
            if sandbox_id not in self._entries:
                self._pending[sandbox_id] = False
        self._start_writer()

    # --- writing ----------------------------------------------------------------------------

    def _mark(self, entry: RosterEntry) -> None:
        if not entry.removed:
            self._pending[entry.sandbox_id] = True
            self._start_writer()

    def _start_writer(self) -> None:
        if self._stopped:  # the store is closing: what is left stays as last written
            return
        if self._pending and (self._writer is None or self._writer.done()):
            # A context of its own: the writes never show in a learner's statement log.
            self._writer = asyncio.get_running_loop().create_task(
                self._write_pending(), name="class-roster-writer", context=contextvars.Context()
            )

    async def flush(self) -> None:
        """Wait until every change noted so far is written."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _write_pending(self) -> None:
        while self._pending:
            sandbox_id, keep = self._pending.popitem()
            entry = self._entries.get(sandbox_id)
            try:
                if keep and entry is not None:
                    await self._write_row(entry)
                elif not keep:
                    await self._delete_rows([sandbox_id])
            except BackendUnavailableError:  # kept: written when the store opens again
                self._pending.setdefault(sandbox_id, keep)
                return
            except Exception:
                logger.warning("could not write the class roster row of a sandbox", exc_info=True)

    async def write_everything(self) -> None:
        """The store (re)opened: every sandbox of this process is written as noted now."""
        for entry in self._entries.values():
            self._pending.setdefault(entry.sandbox_id, True)
        self._start_writer()

    async def _write_row(self, entry: RosterEntry) -> None:
        roster = self.store.tables.roster
        engine = await self.store.ready()
        with statements_hidden():
            async with engine.begin() as connection:
                if not entry.loaded:  # another replica may have had this sandbox before
                    stored = await connection.execute(
                        select(roster).where(roster.c.sandbox_id == entry.sandbox_id)
                    )
                    row = stored.one_or_none()
                    if row is not None:
                        entry.merge_stored(row)
                    entry.loaded = True
                renaming, entry.name_changed = entry.name_changed, False  # a rename meanwhile
                columns = ["state", "state_at", "heartbeat_at", "next_step", "step_since"]
                columns += ["completed", *(["display_name"] if renaming else [])]
                values = {
                    "sandbox_id": entry.sandbox_id,
                    "display_name": entry.display_name,
                    "joined_at": entry.joined_at,
                    "state": entry.state,
                    "state_at": entry.state_at,
                    "heartbeat_at": utc_now(),
                    "next_step": entry.next_step,
                    "step_since": entry.step_since,
                    "completed": json.dumps(entry.completed),
                }
                try:
                    await connection.execute(
                        self.store.upsert(roster, values, update=tuple(columns))
                    )
                except BaseException:
                    entry.name_changed = entry.name_changed or renaming
                    raise

    async def _delete_rows(self, sandbox_ids: list[str]) -> None:
        roster = self.store.tables.roster
        engine = await self.store.ready()
        with statements_hidden():
            async with engine.begin() as connection:
                await connection.execute(delete(roster).where(roster.c.sandbox_id.in_(sandbox_ids)))

    # --- the heartbeat ----------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Beat every heartbeat_seconds while this process holds a sandbox (idle: nothing)."""
        self._beating = asyncio.get_running_loop().create_task(
            self._beat(), name="class-roster-heartbeat", context=contextvars.Context()
        )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            held = [sandbox.id for sandbox in self.registry.all() if sandbox.holders]
            if held:
                try:
                    await self.beat(held)
                except BackendUnavailableError:
                    pass  # the store logged it; the next beat tries again
                except Exception:
                    logger.warning("could not write the class roster's heartbeat", exc_info=True)

    async def beat(self, held: list[str]) -> None:
        """The held sandboxes are alive (and active), and so is this server."""
        roster = self.store.tables.roster
        now = utc_now()
        engine = await self.store.ready()
        with statements_hidden():
            async with engine.begin() as connection:
                await connection.execute(
                    update(roster)
                    .where(roster.c.sandbox_id.in_(held))
                    .values(
                        heartbeat_at=now,
                        state=SANDBOX_ACTIVE,
                        state_at=case(
                            (roster.c.state != SANDBOX_ACTIVE, now), else_=roster.c.state_at
                        ),
                    )
                )
                await connection.execute(self.server_row(now, started_at=None))
        self.heartbeats_written += 1

    def server_row(self, now: datetime, *, started_at: Optional[datetime]) -> Any:
        """Upsert this server's row: its capacity, what sets it, and that it answered now."""
        capacity = self.registry.capacity()
        values = {
            "server_id": self.server_id,
            "started_at": started_at or now,
            "capacity": capacity.sandboxes,
            "limited_by": capacity.limited_by[:200],
            "heartbeat_at": now,
        }
        return self.store.upsert(
            self.store.tables.servers, values, update=("capacity", "limited_by", "heartbeat_at")
        )

    async def stop(self) -> None:
        """Stop beating; write what is pending; note nothing more."""
        if self._beating is not None:
            self._beating.cancel()
            self._beating = None
        await self.flush()
        self._stopped = True


def roster_of(sandbox: Sandbox) -> ClassRoster:
    """The roster this sandbox is on (every sandbox of a runtime is)."""
    roster = sandbox.services.get(ROSTER_SERVICE)
    if roster is None:
        raise source.QuLabError("The class roster is not running on this server.")
    return roster


async def set_display_name(sandbox: Sandbox, *, name: str) -> str:
    """The learner's display name, checked (nothing changes when refused) and written."""
    roster = roster_of(sandbox)
    display_name = checked_display_name(name)
    roster.rename(sandbox.id, display_name)
    await roster.flush()
    return display_name
