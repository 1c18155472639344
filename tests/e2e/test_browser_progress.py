"""Progress and "Download my sandbox" in Chromium: the count survives a reload, the file opens in
sqlite3.

Runs on its own (`pytest tests/e2e/test_browser_progress.py`): each test is a new learner.
"""

from __future__ import annotations

import io
import re
import sqlite3
import zipfile
from pathlib import Path

import pytest

from classroom.progress.steps import STEPS

from .browsertools import (
    click,
    fill,
    go_to_section,
    open_page,
    sandbox_id,
    sidebar_text,
    wait_until,
)

pytestmark = pytest.mark.e2e

INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
REQUIRED = sum(not step.optional for step in STEPS)


def steps_done(page) -> int:
    """The N of the sidebar's 'N of M steps'."""
    found = re.search(r"(\d+) of (\d+) steps", sidebar_text(page))
    assert found, sidebar_text(page)
    assert int(found.group(2)) == REQUIRED
    return int(found.group(1))


def create_user(page, email: str) -> None:
    go_to_section(page, "1. Data Models")
    fill(page, "Email", email)
    fill(page, "Name", "Progress Learner")
    click(page, "Create User")


def test_a_reload_keeps_the_progress_count(visitor, app_server):
    open_page(visitor, app_server)
    assert steps_done(visitor) == 0
    create_user(visitor, "reload.learner@example.com")
    assert steps_done(visitor) == 1  # counted in the very run that created the user
    shown = visitor.locator("[data-testid='stMain']").inner_text()
    assert "1 of 1 steps done" in shown and "Section 1 complete" in shown
    sandbox = sandbox_id(visitor)

    open_page(
        visitor, app_server, visitor.url.removeprefix(f"{app_server.url}/")
    )  # a reload: same URL
    assert sandbox_id(visitor) == sandbox
    assert steps_done(visitor) == 1


def test_download_my_sandbox_gives_a_file_with_the_learners_users(
    visitor, app_server, tmp_path: Path
):
    open_page(visitor, app_server)
    go_to_section(visitor, "2. DB Connectivity & Pooling")
    click(visitor, INITIALIZE)
    create_user(visitor, "download.learner@example.com")
    expected = {email for _, email in app_server.stored_users(sandbox_id(visitor))}
    assert "download.learner@example.com" in expected

    with visitor.expect_download() as pending:
        visitor.locator("[data-testid='stSidebar']").get_by_role(
            "button", name="Download my sandbox"
        ).click()
    download = pending.value
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert sandbox_id(visitor) in saved.name

    if saved.suffix == ".sqlite3":  # the embedded backend: the SQLite file itself
        with sqlite3.connect(saved) as connection:
            emails = {email for (email,) in connection.execute("SELECT email FROM users")}
            journal = [
                kind for (kind,) in connection.execute("SELECT kind FROM lab_journal ORDER BY id")
            ]
        assert journal == ["initialized", "user_created"]
    else:  # PostgreSQL: one CSV per table
        with zipfile.ZipFile(io.BytesIO(saved.read_bytes())) as archive:
            rows = archive.read("users.csv").decode().splitlines()[1:]
        emails = {row.split(",")[1] for row in rows}
    assert emails == expected
    wait_until(
        visitor, "the page stays healthy after the download", lambda: steps_done(visitor) == 2
    )
