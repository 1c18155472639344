"""A link to any section, opened in a fresh browser, lands on that section with the sidebar
status."""

from __future__ import annotations

import pytest

from .browsertools import (
    app_pages,
    current_section,
    fresh_visitor,
    headings,
    open_page,
    open_section,
    sandbox_id,
    server_details,
    start_app_server,
)

pytestmark = pytest.mark.e2e


def test_every_deep_link_lands_on_its_section_with_the_sidebar_status(browser, app_server):
    seen_sandboxes = set()
    for title, url_path in app_pages():
        # A fresh browser each time: one that used a sandbox here before is offered it back.
        with fresh_visitor(browser) as visitor:
            open_page(visitor, app_server, url_path)
            assert current_section(visitor) == title, url_path
            assert headings(visitor), f"/{url_path} shows no title"
            status = server_details(visitor)  # drawn only while its expander is open
            assert "Database:" in status and "Redis:" in status, status
            seen_sandboxes.add(sandbox_id(visitor))
    # Each load is a new Streamlit session, and each session gets a sandbox of its own.
    assert len(seen_sandboxes) == len(app_pages())


def test_a_deep_link_as_the_first_visit_after_start_up_lands_framed_without_a_dialog(browser):
    # Until app.py has run once, Streamlit serves a pages/ folder the old way (pages/__init__.py).
    with start_app_server() as fresh_server, fresh_visitor(browser) as page:
        open_section(
            page, fresh_server, "2. DB Connectivity & Pooling"
        )  # checks: no dialog, no exception
        assert "Database:" in server_details(page)
