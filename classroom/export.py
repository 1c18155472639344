"""Plumbing behind "Download my sandbox": a consistent copy of a sandbox's tables, as one file.

No page teaches this; export_sandbox is what the sidebar's button calls:
- SQLite: SQLite's online backup API copies every page inside one read transaction, WAL included,
  so the copy is a consistent snapshot even while the publisher writes; the copy is switched to
  rollback-journal mode so it is one self-contained file that `sqlite3` opens anywhere.
- PostgreSQL: every table read in one REPEATABLE READ transaction (one snapshot), written as one
  CSV file per table into a zip, for a spreadsheet or `\\copy`.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncEngine

import source
from classroom.outbox.counts import SQLITE_REMOVAL
from classroom.progress.journal import JournalBase


def sqlite_snapshot(database_path: str) -> bytes:
    """The bytes of a consistent, self-contained copy of a live SQLite database.

    It blocks: run it in a thread.
    """
    with tempfile.TemporaryDirectory(prefix="qulab-export-") as directory:
        copy_path = Path(directory) / "sandbox.sqlite3"
        source = sqlite3.connect(database_path, timeout=30)
        try:
            copy = sqlite3.connect(copy_path)
            try:
                source.backup(copy)  # pages=-1: every page in one step, one read transaction
                for statement in SQLITE_REMOVAL:  # the outbox's counts stay with QuLab
                    copy.execute(statement)
                copy.commit()
                copy.execute("PRAGMA journal_mode=DELETE")
            finally:
                copy.close()
        finally:
            source.close()
        return copy_path.read_bytes()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return value


async def csv_zip(engine: AsyncEngine, tables: Iterable[Table]) -> bytes:
    """A zip holding <table>.csv (header row, then every row) per table, read from one snapshot."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        async with engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="REPEATABLE READ")
            for table in tables:
                result = await connection.execute(
                    select(table).order_by(*table.primary_key.columns)
                )
                text = io.StringIO()
                writer = csv.writer(text)
                writer.writerow(result.keys())
                writer.writerows([_csv_value(value) for value in row] for row in result)
                archive.writestr(f"{table.name}.csv", text.getvalue())
    return buffer.getvalue()


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


async def export_sandbox(sandbox: Any) -> SandboxExport:
    """A consistent copy of every table.

    SQLite's online backup of the file, or one CSV per table in a zip.
    """
    file_name, mime = export_file_name(backend=sandbox.backend, sandbox_id=sandbox.id)
    if sandbox.backend == "sqlite":
        content = await asyncio.to_thread(sqlite_snapshot, sandbox.location)
    else:
        content = await csv_zip(
            sandbox.engine,
            [*source.Base.metadata.sorted_tables, *JournalBase.metadata.sorted_tables],
        )
    return SandboxExport(file_name, mime, content)
