"""The sidebar's section links keep the learner's sandbox: a section opened in a new tab is the
same sandbox.

Runs on its own (`pytest tests/e2e/test_browser_navigation.py`): each test is a new learner.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from classroom.browser import SANDBOX_URL_PARAMETER

from .browsertools import (
    app_pages,
    click,
    current_section,
    fill,
    go_to_section,
    main_text,
    metrics,
    open_in_new_tab,
    open_page,
    sandbox_id,
    section_links,
    shown_ids,
    wait_until,
)

pytestmark = pytest.mark.e2e


def where_links_go(page) -> dict[str, tuple[str, dict[str, list[str]]]]:
    """{title: (path, query parameters)} of the sidebar's links, as a new tab would open them."""
    return {
        title: (urlsplit(href).path, parse_qs(urlsplit(href).query))
        for title, href in section_links(page).items()
    }


def test_every_section_link_carries_the_sandbox_on_every_page(visitor, app_server):
    open_page(visitor, app_server)
    sandbox = sandbox_id(visitor)
    for title, _url_path in app_pages():
        if title != "Introduction":
            go_to_section(visitor, title)  # checks the link it clicked is now the current one
        assert parse_qs(urlsplit(visitor.url).query) == {SANDBOX_URL_PARAMETER: [sandbox]}
        links = where_links_go(visitor)
        assert list(links) == [shown for shown, _ in app_pages()]
        for shown, (_path, query) in links.items():
            assert query == {SANDBOX_URL_PARAMETER: [sandbox]}, (title, shown, query)
        # Each link opens its own section, never the page it is clicked from.
        expected = {shown: f"/{path}" for shown, path in app_pages()}
        expected["Introduction"] = "/" if title == "Introduction" else "/introduction"
        assert {shown: path for shown, (path, _) in links.items()} == expected, title

    click(visitor, "New sandbox", dialog=True)  # asks first
    click(
        visitor, "Yes, start a new sandbox"
    )  # the links follow the sandbox the session switches to
    new_sandbox = sandbox_id(visitor)
    assert new_sandbox != sandbox
    assert {
        tuple(query[SANDBOX_URL_PARAMETER]) for _, query in where_links_go(visitor).values()
    } == {(new_sandbox,)}


def test_a_section_opened_in_a_new_tab_shows_the_same_sandboxs_data(visitor, app_server):
    open_page(visitor, app_server)
    go_to_section(visitor, "1. Data Models")
    fill(visitor, "Email", "new.tab@example.com")
    fill(visitor, "Name", "New Tab Learner")
    click(visitor, "Create User")
    [created] = shown_ids(visitor)
    sandbox = sandbox_id(visitor)

    tab = open_in_new_tab(visitor, "5. Eventing (Outbox Pattern)")

    assert sandbox_id(tab) == sandbox
    assert current_section(tab) == "5. Eventing (Outbox Pattern)"
    assert created in shown_ids(tab)  # section 5's "User ID": the user the first tab created
    assert "no users yet" not in main_text(tab)

    # Back to the introduction from a section, in yet another tab: the introduction, same sandbox.
    introduction = open_in_new_tab(tab, "Introduction")
    assert current_section(introduction) == "Introduction"
    assert sandbox_id(introduction) == sandbox
    assert current_section(visitor) == "1. Data Models"  # the first tab stayed where it was


def test_a_score_stored_in_another_tab_shows_in_this_tabs_idle_status_panel_without_a_click(
    visitor, app_server
):
    open_page(visitor, app_server)
    go_to_section(visitor, "2. DB Connectivity & Pooling")
    click(visitor, "Initialize In-Memory SQLite Database & Create Sample Users")
    go_to_section(visitor, "5. Eventing (Outbox Pattern)")
    assert metrics(visitor)["Pending"] == "0"

    other_tab = open_in_new_tab(visitor, "5. Eventing (Outbox Pattern)")
    click(other_tab, "Calculate & Store AIRScore (Creates Pending Event)")
    assert metrics(other_tab)["Pending"] == "1"

    # The first tab is idle: its panel looks every few seconds whether the outbox moved, and
    # redraws.
    wait_until(
        visitor,
        "the other tab's event in this tab's panel",
        lambda: metrics(visitor)["Pending"] == "1",
    )
