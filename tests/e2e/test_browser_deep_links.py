"""A link to any section, opened in a fresh browser, lands on that section with the sidebar status."""

from __future__ import annotations

import pytest

from .browsertools import (
    app_pages,
    start_app_server,
    current_section,
    fresh_visitor,
    headings,
    open_page,
    sandbox_id,
    sidebar_text,
)

pytestmark = pytest.mark.e2e


def test_every_deep_link_lands_on_its_section_with_the_sidebar_status(visitor, app_server):
    seen_sandboxes = set()
    for title, url_path in app_pages():
        open_page(visitor, app_server, url_path)
        assert current_section(visitor) == title, url_path
        assert headings(visitor), f"/{url_path} shows no title"
        status = sidebar_text(visitor)
        assert "Database:" in status and "Redis:" in status, status
        seen_sandboxes.add(sandbox_id(visitor))
    # Each load is a new Streamlit session, and each session gets a sandbox of its own.
    assert len(seen_sandboxes) == len(app_pages())


@pytest.mark.xfail(
    strict=True,
    reason="Streamlit serves the first session after start-up the old way (a pages/ folder exists, "
    "st.navigation has not run yet): a deep link there shows a 'Page not found' dialog over the right "
    "page, and the page stays inert until the learner closes it. Fix: rename pages/ (e.g. sections/).",
)
def test_a_deep_link_as_the_first_visit_after_start_up_shows_no_dialog(browser):
    with start_app_server() as fresh_server, fresh_visitor(browser) as page:
        open_page(page, fresh_server, "pooling")
        assert current_section(page) == "2. DB Connectivity & Pooling"
