"""Fixtures for the browser suite: one app server and one Chromium for all of tests/e2e."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import servers

from . import browsertools


@pytest.fixture(scope="package")
def browser() -> Iterator[browsertools.Browser]:
    """Debian's Chromium; the suite skips (or fails under QULAB_REQUIRE_SERVERS=1) without it."""
    reason = browsertools.browser_missing_reason()
    if reason:
        servers.unavailable(reason)
    with browsertools.chromium() as chromium:
        yield chromium


@pytest.fixture(scope="package")
def app_server(browser) -> Iterator[browsertools.AppServer]:
    """`streamlit run app.py` on a free port, ready: its first session has rendered the app."""
    with browsertools.start_app_server() as server:
        # Load the introduction once: the tests then start from a warm app (source imported,
        # runtime started); a cold first visit has a test of its own in test_browser_deep_links.
        with browsertools.fresh_visitor(browser) as page:
            browsertools.open_page(page, server)
        yield server


@pytest.fixture
def visitor(browser) -> Iterator[browsertools.Page]:
    """A new learner's browser page (a context of its own), closed after the test."""
    with browsertools.fresh_visitor(browser) as page:
        yield page
