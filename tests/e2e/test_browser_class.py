"""A class at capacity, in real browsers: the newcomer is told the class is full; nobody loses
work."""

from __future__ import annotations

import pytest

from .browsertools import (
    alerts,
    fill,
    fresh_visitor,
    main_text,
    open_section,
    press,
    sandbox_id,
    shown_ids,
    start_app_server,
    wait_for_rerun,
    wait_until,
)

pytestmark = pytest.mark.e2e


def test_with_room_for_two_a_third_browser_sees_the_class_is_full_and_the_first_two_keep_their_data(
    browser, monkeypatch
):
    monkeypatch.setenv("QULAB_MAX_SANDBOXES", "2")
    with (
        start_app_server() as server,
        fresh_visitor(browser) as first,
        fresh_visitor(browser) as second,
    ):
        made = {}
        for page, email in ((first, "first@example.com"), (second, "second@example.com")):
            open_section(page, server, "1. Data Models")
            fill(page, "Email", email)
            fill(page, "Name", "Learner")
            wait_for_rerun(press(page, "Create User"))
            assert alerts(page, "success"), alerts(page)
            made[sandbox_id(page)] = (shown_ids(page)[0], email)

        with fresh_visitor(browser) as third:
            third.goto(server.url)
            wait_until(
                third,
                "the class-full page",
                lambda: "The class is full" in main_text(third),
                timeout_seconds=60,
            )
            assert "2 learners are working" in main_text(third)

        for (
            sandbox,
            row,
        ) in made.items():  # both connected learners still have exactly what they made
            assert server.stored_users(sandbox) == [row]
        assert not alerts(first, "error") and not alerts(second, "error")
