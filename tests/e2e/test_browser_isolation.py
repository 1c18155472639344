"""Two learners at once, in two browsers, never see or touch each other's data."""

from __future__ import annotations

import pytest

from .browsertools import (
    alerts,
    cache_counts,
    click,
    code_blocks,
    fill,
    fresh_visitor,
    go_to_section,
    main_text,
    metrics,
    open_section,
    press,
    sandbox_id,
    shown_ids,
    sidebar_text,
    tables,
    wait_for_rerun,
    wait_for_text,
    wait_until,
)

pytestmark = pytest.mark.e2e

INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
REDIS_DOWN = "Redis is not answering right now"  # the sidebar's warning


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


def test_two_browsers_at_once_have_their_own_cache_and_outbox(browser, app_server):
    with fresh_visitor(browser) as first, fresh_visitor(browser) as second:
        learners = (first, second)
        for page in learners:
            open_section(page, app_server, "4. Caching with Redis")
        first_sandbox, second_sandbox = sandbox_id(first), sandbox_id(second)
        # Opening the page writes nothing: with no users, each learner asks for a Cache Demo User.
        assert (
            app_server.stored_users(first_sandbox) == app_server.stored_users(second_sandbox) == []
        )
        for run in [press(page, "Create the Cache Demo User") for page in learners]:
            wait_for_rerun(run)
        first_user, second_user = (
            demo_user_id(app_server, sandbox) for sandbox in (first_sandbox, second_sandbox)
        )
        assert (
            first_user != second_user
            and first_user in code_blocks(first)
            and second_user in code_blocks(second)
        )

        # Reads at the same moment: each cache counts only its own learner's reads.
        for run in [press(page, "Fetch User (Cached)") for page in learners]:
            wait_for_rerun(run)
            assert metrics(run.page)["Outcome"] == "MISS", metrics(run.page)
        click(first, "Fetch User (Cached)")
        assert metrics(first)["Outcome"] == "HIT"
        assert cache_counts(first) == ("1", "1", "0") and cache_counts(second) == ("0", "1", "0")

        # The second learner's Redis outage cuts off the second sandbox only.
        click(second, "Cut Redis for My Sandbox")
        assert REDIS_DOWN in sidebar_text(second)
        click(first, "Fetch User (Cached)")
        assert metrics(first)["Outcome"] == "HIT" and REDIS_DOWN not in sidebar_text(first)

        # An event in the first outbox, published by the first learner's publisher, never shows in
        # the second.
        for page in learners:
            go_to_section(page, "5. Eventing (Outbox Pattern)")
        click(first, "Calculate & Store AIRScore (Creates Pending Event)")
        click(first, "Start Event Publisher (Background)")
        [(event_id,)] = app_server.stored_rows(
            first_sandbox, "domain_events", ("id",), order_by="id"
        )
        wait_until(
            first,
            "the first learner's event delivered",
            lambda: app_server.stored_inbox(first_sandbox),
        )
        assert app_server.stored_inbox(first_sandbox) == [event_id]
        click(second, "Refresh Event Status Now")
        shown = metrics(second)
        assert (shown["Pending"], shown["Published"], shown["Delivered"]) == ("0", "0", "0"), shown
        assert not tables(second) and event_id not in main_text(second)
        assert app_server.stored_rows(second_sandbox, "domain_events", ("id",), order_by="id") == []
        assert app_server.stored_inbox(second_sandbox) == []
        click(first, "Stop Event Publisher")
        wait_for_text(first, "Stopped after finishing the current batch.")


def demo_user_id(server, sandbox: str) -> str:
    """The id of the Cache Demo User section 4's button created in a sandbox that had no users."""
    [(user_id, name)] = server.stored_rows(sandbox, "users", ("id", "name"), order_by="id")
    assert name == "Cache Demo User"
    return str(user_id)
