"""Server CPU of one refresh of the instructor's page: a class of 200 against a class of 2.

The instructor's page redraws the class in a fragment every 5 s while it is open. A refresh must
cost about the same whatever the class size (one SELECT of the roster, never one per learner):
with 200 roster rows, at most 2× what it costs with 2 (issue 21). Measured on a real server
over its websocket, as the browser asks for it (a rerun of the class's fragment, NOTES): the
server's CPU (utime + stime of the whole process, /proc) over REFRESHES refreshes, divided by
their number, rows added between the two halves of each round, rounds alternated, in one run.
Before each refresh one row changes (as in a class at work), so the page stays live.

The classroom's own part (class_overview, without Streamlit) is reported beside it, with no
target: it grows with the rows it reads, and Streamlit's drawing of the page, which does not,
is most of a refresh.

    python3 bench/instructor_refresh.py              # the backend DATABASE_URL names
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchtools import print_table, process_cpu_seconds, result
from learners import start_replica, stop_replica
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from streamlit_socket import RunOutcome, StreamlitTab

from classroom.config import Settings, resolve_database_target
from classroom.instructor.overview import class_overview
from classroom.instructor.roster import utc_now
from classroom.instructor.store import ClassStore, ClassTables
from classroom.progress.steps import STEPS
from classroom.runtime import Runtime
from classroom.sandboxes.sandbox import new_sandbox_id

KEY = "bench instructor key"
SMALL, LARGE = 2, 200
REFRESHES = 40
ROUNDS = 3
TARGET = 2.0
SYNTHETIC = "bench"  # display names of the rows this benchmark writes


class InstructorTab(StreamlitTab):
    """A tab on the instructor's page that knows the id of the fragment the class is drawn in."""

    fragment_ids: set[str]

    def _read(self, forward: Any, outcome: RunOutcome) -> bool:
        if forward.WhichOneof("type") == "delta" and forward.delta.fragment_id:
            self.fragment_ids.add(forward.delta.fragment_id)
        return super()._read(forward, outcome)

    async def enter(self) -> str:
        """Open /instructor, type the key, press Enter; the class fragment's id."""
        self.fragment_ids = set()
        await self.open()
        page = await self.go_to("instructor")
        typed = (page.text_inputs["Instructor key"], "string_value", KEY)
        shown = await self.press(page, "Enter", (typed,))
        assert not shown.errors, shown.errors
        self.fragment_ids.clear()
        await self.rerun()  # the signed-in page: only its class is drawn in a fragment
        assert len(self.fragment_ids) == 1, self.fragment_ids
        return next(iter(self.fragment_ids))


def _row(number: int, now: Any) -> dict[str, Any]:
    done = [step.key for step in STEPS[: number % 8]]
    return {
        "sandbox_id": new_sandbox_id(),
        "display_name": f"{SYNTHETIC} {number}",
        "joined_at": now,
        "state": "active",
        "state_at": now,
        "heartbeat_at": now,
        "next_step": STEPS[number % 8].key,
        "step_since": now,
        "completed": json.dumps({key: now.isoformat() for key in done}),
    }


async def _set_rows(engine: AsyncEngine, tables: ClassTables, count: int) -> None:
    """Exactly `count` synthetic learners on the roster (rows as the roster writes them)."""
    async with engine.begin() as connection:
        await connection.execute(
            delete(tables.roster).where(tables.roster.c.display_name.like(f"{SYNTHETIC} %"))
        )
        now = utc_now()
        if count:
            await connection.execute(tables.roster.insert(), [_row(n, now) for n in range(count)])


async def _touch(engine: AsyncEngine, tables: ClassTables, turn: int) -> None:
    """One learner moves: the class changed, so the page keeps refreshing itself."""
    async with engine.begin() as connection:
        await connection.execute(
            update(tables.roster)
            .where(tables.roster.c.display_name == f"{SYNTHETIC} 0")
            .values(next_step=STEPS[turn % 2].key)
        )


async def _refresh_cost(
    tab: InstructorTab, fragment_id: str, pid: int, engine: AsyncEngine, tables: ClassTables
) -> float:
    """Server CPU seconds per fragment refresh, over REFRESHES refreshes."""
    spent = 0.0
    for turn in range(REFRESHES):
        await _touch(engine, tables, turn)
        before = process_cpu_seconds(pid)
        outcome = await tab.rerun(fragment_id=fragment_id)
        spent += process_cpu_seconds(pid) - before
        assert outcome.fragment_run and not outcome.errors, outcome.errors
    return spent / REFRESHES


def _class_engine(database_url: str | None, sandbox_directory: Path) -> AsyncEngine:
    target = resolve_database_target(database_url)
    if target.kind == "postgresql":
        assert target.url is not None
        return create_async_engine(target.url)
    [path] = sandbox_directory.glob("qulab-*-class-*.sqlite3")  # the server's own class file
    return create_async_engine(f"sqlite+aiosqlite:///{path}")


async def _measure(replica: Any, database_url: str | None, directory: Path, class_name: str):
    tab = InstructorTab(replica.port)
    fragment_id = await tab.enter()
    tables = ClassTables(class_name)
    engine = _class_engine(database_url, directory)
    costs: dict[int, list[float]] = {SMALL: [], LARGE: []}
    try:
        await _set_rows(engine, tables, SMALL)
        await _refresh_cost(tab, fragment_id, replica.process.pid, engine, tables)  # warm
        for number in range(ROUNDS):
            order = (SMALL, LARGE) if number % 2 == 0 else (LARGE, SMALL)
            for size in order:
                await _set_rows(engine, tables, size)
                costs[size].append(
                    await _refresh_cost(tab, fragment_id, replica.process.pid, engine, tables)
                )
        if resolve_database_target(database_url).kind == "postgresql":
            async with engine.begin() as connection:
                await connection.run_sync(tables.metadata.drop_all)
    finally:
        await tab.close()
        await engine.dispose()
    return statistics.median(costs[SMALL]), statistics.median(costs[LARGE])


def _classroom_part(class_name: str) -> tuple[float, float]:
    """CPU of class_overview alone (this process, no Streamlit), 2 rows and 200."""
    settings = Settings.from_environment()
    runtime = Runtime(Settings(**{**settings.__dict__, "class_name": class_name}))
    try:
        store: ClassStore = runtime.instructor.store
        assert store.engine is not None
        costs = {}
        for size in (SMALL, LARGE):
            runtime.run(_set_rows(store.engine, store.tables, size))
            runtime.run(class_overview(runtime.instructor))  # warm
            started = time.process_time()
            for _ in range(REFRESHES):
                runtime.run(class_overview(runtime.instructor))
            costs[size] = (time.process_time() - started) / REFRESHES
        if store.shared:

            async def drop() -> None:
                async with store.engine.begin() as connection:
                    await connection.run_sync(store.tables.metadata.drop_all)

            runtime.run(drop())
        return costs[SMALL], costs[LARGE]
    finally:
        runtime.close()


def main() -> list[dict[str, Any]]:
    """For bench/run_all.py: the refresh's server CPU with 200 roster rows ÷ with 2."""
    workspace = Path(tempfile.mkdtemp(prefix="qulab-instructor-"))
    directory = workspace / "sandboxes"
    class_name = f"bench{secrets.token_hex(4)}"
    environment = dict(
        os.environ,
        QULAB_SANDBOX_DIR=str(directory),
        QULAB_INSTRUCTOR_KEY=KEY,
        QULAB_CLASS=class_name,
    )
    database_url = environment.get("DATABASE_URL", "").strip() or None
    try:
        replica = start_replica(environment, workspace, [])
        try:
            small, large = asyncio.run(_measure(replica, database_url, directory, class_name))
        finally:
            stop_replica(replica)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    own_small, own_large = _classroom_part(f"{class_name}_own")
    rows = [
        result(
            "instructor_refresh",
            f"server CPU of a refresh, {LARGE} roster rows ÷ {SMALL} "
            f"({large * 1000:.1f} ms ÷ {small * 1000:.1f} ms)",
            large / small,
            target=f"≤ {TARGET:g}×",
            met=large / small <= TARGET,
        ),
        result(
            "instructor_refresh",
            f"class_overview alone (no Streamlit), {LARGE} rows ÷ {SMALL} "
            f"({own_large * 1000:.1f} ms ÷ {own_small * 1000:.1f} ms)",
            own_large / own_small,
        ),
    ]
    print_table(rows)
    return rows


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    main()
