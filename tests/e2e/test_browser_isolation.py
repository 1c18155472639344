"""Two learners at once, in two browsers, never see or touch each other's data."""

from __future__ import annotations

import pytest

from .browsertools import (
    alerts,
    click,
    fill,
    fresh_visitor,
    go_to_section,
    open_section,
    press,
    sandbox_id,
    shown_ids,
    wait_for_rerun,
)

pytestmark = pytest.mark.e2e

INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"


def test_two_browsers_at_once_each_have_their_own_users(browser, app_server):
    with fresh_visitor(browser) as first, fresh_visitor(browser) as second:
        learners = (first, second)
        for page in learners:
            open_section(page, app_server, "1. Data Models")
        first_sandbox, second_sandbox = sandbox_id(first), sandbox_id(second)
        assert first_sandbox != second_sandbox

        # The same email in both browsers, submitted together: each sandbox has its own users table.
        for page, name in ((first, "First Learner"), (second, "Second Learner")):
            fill(page, "Email", "same.person@example.com")
            fill(page, "Name", name)
        pending = [press(page, "Create User") for page in learners]
        for run in pending:
            wait_for_rerun(run)
            assert alerts(run.page, "success") and not alerts(run.page, "error"), alerts(run.page)
        [first_id], [second_id] = shown_ids(first), shown_ids(second)
        assert first_id != second_id
        assert app_server.stored_users(first_sandbox) == [(first_id, "same.person@example.com")]
        assert app_server.stored_users(second_sandbox) == [(second_id, "same.person@example.com")]

        # Initializing the second sandbox wipes only the second sandbox.
        go_to_section(second, "2. DB Connectivity & Pooling")
        click(second, INITIALIZE)
        assert alerts(second, "success"), alerts(second)
        assert sorted(email for _, email in app_server.stored_users(second_sandbox)) == [
            "alex.smith@innovateai.example",
            "jane.doe@innovateai.example",
        ]
        assert app_server.stored_users(first_sandbox) == [(first_id, "same.person@example.com")]
