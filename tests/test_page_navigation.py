"""The sidebar's section links, driven through AppTest: each keeps the learner's sandbox in its
href.

A middle-click or "open in new tab" on a section link follows its href, a new browser session: the
?sandbox=<id> in it is what brings that tab to the same sandbox. (The browser suite opens one in a
new tab: tests/e2e/test_browser_navigation.py.) AppTest shows the sidebar on a session's first run
only, so each case here is a new session opened on the page under test.
"""

from __future__ import annotations

from typing import Optional
from urllib.parse import parse_qs

import pytest
from pagetools import APP
from streamlit.testing.v1 import AppTest

from classroom.browser import SANDBOX_STATE_KEY, SANDBOX_URL_PARAMETER
from classroom.sandboxes.sandbox import new_sandbox_id

# (label, url path) in the guide's order, as the sidebar showed them before it drew its own links
SECTIONS = [
    ("Introduction", ""),
    ("1. Data Models", "data_models"),
    ("2. DB Connectivity & Pooling", "connectivity_pooling"),
    ("3. Repository Pattern & N+1", "repository_n_plus_one"),
    ("4. Caching with Redis", "caching"),
    ("5. Eventing (Outbox Pattern)", "eventing_outbox"),
]
SECTION_FILES = [
    "pages/data_models.py",
    "pages/connectivity_pooling.py",
    "pages/repository_n_plus_one.py",
    "pages/caching.py",
    "pages/eventing_outbox.py",
]


def first_run(page: Optional[str] = None, *, sandbox: Optional[str] = None) -> AppTest:
    """A new browser session opened on `page` (None: the root URL), with ?sandbox= if given."""
    app = AppTest.from_file(str(APP), default_timeout=60)
    if sandbox is not None:
        app.query_params[SANDBOX_URL_PARAMETER] = sandbox
    if page is not None:
        app.switch_page(page)  # before the first run: the page whose url_path is the file's name
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def section_links(app: AppTest) -> list[tuple[str, str, dict[str, list[str]]]]:
    """(label, page path, query parameters) of every page link in the sidebar, in order."""
    return [
        (link.proto.label, link.proto.page, parse_qs(link.proto.query_string))
        for link in app.sidebar.get("page_link")
    ]


@pytest.mark.parametrize("page", [None, *SECTION_FILES])
def test_every_section_link_carries_this_sessions_sandbox(fresh_global_runtime, page):
    app = first_run(page)
    sandbox = app.session_state[SANDBOX_STATE_KEY]
    assert app.query_params[SANDBOX_URL_PARAMETER] == sandbox  # the address bar keeps it too

    links = section_links(app)

    assert [label for label, _, _ in links] == [label for label, _ in SECTIONS]
    assert all(query == {SANDBOX_URL_PARAMETER: [sandbox]} for _, _, query in links), links
    # The default page's own path is empty, and an href of "?sandbox=…" stays on the page it is
    # clicked from: off the root, the introduction's link goes to its second address.
    introduction = "" if page is None else "introduction"
    assert [path for _, path, _ in links] == [introduction] + [path for _, path in SECTIONS[1:]]


def test_a_link_with_a_sandbox_gives_section_links_with_that_sandbox(fresh_global_runtime):
    learners = new_sandbox_id()

    app = first_run("pages/caching.py", sandbox=learners)

    assert app.session_state[SANDBOX_STATE_KEY] == learners
    assert {tuple(query[SANDBOX_URL_PARAMETER]) for _, _, query in section_links(app)} == {
        (learners,)
    }


def test_the_introductions_second_address_shows_the_introduction(fresh_global_runtime):
    at_the_root = first_run()
    # /introduction, where the other pages' link goes.
    elsewhere = first_run("pages/introduction.py")

    assert [title.value for title in elsewhere.title] == [
        title.value for title in at_the_root.title
    ]
    assert [path for _, path, _ in section_links(elsewhere)][0] == "introduction"
