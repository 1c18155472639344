"""A new learner walks the codelab in Chromium, section by section, as the user guide says.

One learner (one browser page, one sandbox) goes through the tests below in file order, so a
later section can use what an earlier one created (`learner.notes`). Each section ends with a
screenshot in tests/e2e/screenshots/. To add a section, append a test that goes to it with
go_to_section, clicks the guide's buttons with click, and asserts what alerts, tables, metrics
and the sandbox's rows show.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from .browsertools import (
    AppServer,
    alerts,
    app_pages,
    click,
    code_blocks,
    current_section,
    fill,
    fresh_visitor,
    go_to_section,
    headings,
    metrics,
    open_page,
    sandbox_id,
    screenshot,
    section_titles,
    shown_ids,
    sidebar_text,
    table_rows,
)

pytestmark = pytest.mark.e2e

INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"


@dataclass
class Learner:
    """One learner's browser page, their sandbox and what they noted on the way."""

    page: Any
    server: AppServer
    sandbox_id: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def stored_users(self) -> list[tuple[str, str]]:
        """(id, email) of the users really stored in this learner's sandbox."""
        return self.server.stored_users(self.sandbox_id)


@pytest.fixture(scope="module")
def learner(browser, app_server) -> Iterator[Learner]:
    with fresh_visitor(browser) as page:
        yield Learner(page, app_server)


def create_user(learner: Learner, *, email: str, name: str) -> None:
    fill(learner.page, "Email", email)
    fill(learner.page, "Name", name)
    click(learner.page, "Create User")


def test_introduction_lists_every_section_and_the_sidebar_status(learner):
    page = open_page(learner.page, learner.server)
    learner.sandbox_id = sandbox_id(page)

    assert current_section(page) == "Introduction"
    assert section_titles(page) == [title for title, _ in app_pages()]
    assert any("QuLab" in heading for heading in headings(page))
    status = sidebar_text(page)
    assert "Database:" in status and "Redis:" in status and learner.sandbox_id in status
    assert learner.stored_users() == []
    screenshot(page, "0-introduction")


def test_section_1_creates_a_user_and_refuses_duplicates_and_bad_input(learner):
    page = learner.page
    go_to_section(page, "1. Data Models")
    assert any(code.startswith("class User(Base, TimestampMixin):") for code in code_blocks(page))

    create_user(learner, email="sam.learner@example.com", name="Sam Learner")
    assert alerts(page, "success") and not alerts(page, "error")
    [new_id] = shown_ids(page)
    assert learner.stored_users() == [(new_id, "sam.learner@example.com")]

    create_user(learner, email="SAM.Learner@Example.COM", name="Sam Again")
    assert any("already exists" in text for text in alerts(page, "error")), alerts(page)
    assert not alerts(page, "success")

    create_user(learner, email="not-an-email", name="Sam")
    assert any("not a valid email" in text for text in alerts(page, "error")), alerts(page)

    create_user(learner, email="markup@example.com", name="<b>Sam</b>")
    assert any("markup" in text for text in alerts(page, "error")), alerts(page)
    assert page.locator("[data-testid='stMain'] b", has_text="Sam").count() == 0

    assert learner.stored_users() == [(new_id, "sam.learner@example.com")]
    screenshot(page, "1-data-models")


def test_section_2_initializes_the_sample_users_and_measures_pooling(learner):
    page = learner.page
    go_to_section(page, "2. DB Connectivity & Pooling")

    click(page, INITIALIZE)
    assert any("2 sample users" in text for text in alerts(page, "success")), alerts(page)
    shown = {row["name"]: row["id"] for row in table_rows(page)}
    assert sorted(shown) == ["Alex Smith", "Jane Doe"]
    stored = {email: user_id for user_id, email in learner.stored_users()}
    assert sorted(stored.values()) == sorted(shown.values())  # the section-1 user is gone
    learner.notes["alex_id"] = shown["Alex Smith"]
    learner.notes["jane_id"] = shown["Jane Doe"]

    click(page, "Run Pooling Experiment")
    shown_metrics = metrics(page)
    for label in ("Pooled throughput", "NullPool throughput", "Pooled ÷ NullPool"):
        assert label in shown_metrics, shown_metrics
    pooled, unpooled = table_rows(page)
    assert pooled["pool"].startswith("QueuePool") and unpooled["pool"].startswith("NullPool")
    assert pooled["connections opened"] == "0"  # the warmed pool lent its connections out
    assert unpooled["connections opened"] == unpooled["requests"]  # one new connection per query
    screenshot(page, "2-pooling")


# Sections 3-5 follow here, one test each, e.g.:
#   def test_section_3_...(learner):
#       page = learner.page
#       go_to_section(page, "3. Repository Pattern & N+1")
#       fill(page, "<the input's label>", learner.notes["alex_id"])
#       click(page, "Add 3 Sample Scores for User")
#       ...assert on alerts / table_rows / metrics / code_blocks...
#       screenshot(page, "3-n-plus-one")
