"""What each learner of a benchmark class must find in its sandbox afterwards, and what is not.

The rows a learner saw made (the sample users after its Initialize finished, the user it created,
one AIRScore and its event per store click it saw succeed) are looked up in its own sandbox: its
SQLite file on the embedded default, its schema on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Optional

from learners import LearnerReport

from classroom.config import DatabaseTarget, resolve_database_target


def rows_lost(
    report: LearnerReport, *, database_url: Optional[str], sandbox_directory: Path
) -> int:
    """Rows this learner made that its sandbox no longer has (0 when everything is there)."""
    if not report.sandbox_id or report.turned_away:
        return 0
    queries = {
        "users": "SELECT email FROM {schema}users",
        "airscores": "SELECT count(*) FROM {schema}air_scores",
        "events": (
            "SELECT count(*) FROM {schema}domain_events WHERE event_type = 'AIRScoreCalculated'"
        ),
    }
    target = resolve_database_target(database_url)
    try:
        if target.kind == "postgresql":
            found = _query_postgres_each(target, report.sandbox_id, queries)
        else:
            directory = (
                sandbox_directory if target.kind == "embedded" else Path(target.url.database).parent
            )
            files = [
                path
                for path in directory.glob(f"*{report.sandbox_id}*")
                if path.suffix in {".sqlite3", ".db"}
            ]
            if not files:
                return len(_expected_users(report)) + 2 * report.stores
            with sqlite3.connect(f"file:{files[0]}?mode=ro", uri=True) as connection:
                found = {
                    name: connection.execute(sql.format(schema="")).fetchall()
                    for name, sql in queries.items()
                }
    except Exception as error:  # a missing table is data lost too
        report.errors.append(f"checking rows: {type(error).__name__}: {error}")
        return len(_expected_users(report)) + 2 * report.stores
    emails = {row[0].lower() for row in found["users"]}
    lost = len({email.lower() for email in _expected_users(report)} - emails)
    lost += max(0, report.stores - found["airscores"][0][0]) + max(
        0, report.stores - found["events"][0][0]
    )
    return lost


def _expected_users(report: LearnerReport) -> list[str]:
    """The users the learner saw made: the sample users (Initialize) and the one it created."""
    sample = ["alex.smith@innovateai.example", "jane.doe@innovateai.example"]
    return sample * report.initialized + (
        [report.email]
        if report.email and not any("Create User" in e for e in report.errors)
        else []
    )


def _query_postgres_each(
    target: DatabaseTarget, sandbox_id: str, queries: dict[str, str]
) -> dict[str, list]:
    import asyncpg

    dsn = target.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def fetch() -> dict[str, list]:
        connection = await asyncpg.connect(dsn)
        try:
            schema = f'"qulab_{sandbox_id}".'
            return {
                name: [tuple(r) for r in await connection.fetch(sql.format(schema=schema))]
                for name, sql in queries.items()
            }
        finally:
            await connection.close()

    return asyncio.run(fetch())
