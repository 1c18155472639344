"""The learner's page in Chromium (issues 20 and 22): what a learner sees is true, calm and safe.

Each test is a new learner with a sandbox of their own, on whatever backend the environment
names (DATABASE_URL, REDIS_URL), except the Redis outage, which needs a Redis of its own to stop.
What a page claims is checked against the rows in the learner's sandbox (AppServer.stored_rows).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import servers

from classroom.browser import LAST_SANDBOX_COOKIE, SANDBOX_URL_PARAMETER
from classroom.demos.eventing import MAX_BURST_WRITES

from .browsertools import (
    AppServer,
    alerts,
    click,
    current_section,
    fill,
    finished_runs,
    fresh_visitor,
    go_to_section,
    headings,
    main_text,
    metrics,
    open_in_new_tab,
    open_page,
    open_section,
    sandbox_id,
    shown_ids,
    sidebar_text,
    start_app_server,
    tables_with_column,
    wait_until,
)

pytestmark = pytest.mark.e2e

INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
FETCH_USER = "Fetch User (Cached)"
STORE_SCORE = "Calculate & Store AIRScore (Creates Pending Event)"
STORE_BURST = "Store Burst of AIRScores"
SIDEBAR_REDIS_DOWN = "Redis is not answering right now: reads come from the database."
PAGE_REDIS_DOWN = "Redis is not answering right now: reads go to the database"
# The lesson's tables, each with a column every row has.
TABLES = {
    "users": "id",
    "assessments": "id",
    "air_scores": "id",
    "domain_events": "id",
    "consumed_events": "event_id",
}
NO_ROWS = dict.fromkeys(TABLES, 0)


def row_counts(server: AppServer, sandbox: str) -> dict[str, int]:
    """How many rows each of the lesson's tables holds in one sandbox."""
    return {
        table: len(server.stored_rows(sandbox, table, (key,), order_by=key))
        for table, key in TABLES.items()
    }


def steps_done(page) -> int:
    """The N of the sidebar's "Your progress: N of M steps"."""
    found = re.search(r"Your progress: (\d+) of \d+ steps", sidebar_text(page))
    assert found, sidebar_text(page)
    return int(found[1])


def initialize(page) -> dict[str, str]:
    """Section 2's initialize; {name: id} of the sample users it shows."""
    go_to_section(page, "2. DB Connectivity & Pooling")
    click(page, INITIALIZE)
    [sample_users] = tables_with_column(page, "email")
    shown = {row["name"]: row["id"] for row in sample_users}
    assert sorted(shown) == ["Alex Smith", "Jane Doe"], shown
    return shown


@pytest.fixture
def page(browser, app_server) -> Iterator:
    """A new learner on the introduction page, with an empty sandbox of their own."""
    with fresh_visitor(browser) as visitor:
        open_page(visitor, app_server)
        yield visitor


# --- issue 22: what the page says is true ---------------------------------------------------


@pytest.mark.parametrize("size", ["0", "99999999"])
def test_a_burst_out_of_range_writes_nothing_and_says_why(page, app_server, size):
    sandbox = sandbox_id(page)
    initialize(page)
    go_to_section(page, "5. Eventing (Outbox Pattern)")
    before = row_counts(app_server, sandbox)
    assert before["air_scores"] == before["domain_events"] == 0, before

    fill(page, "Scores in the burst", size)
    click(page, STORE_BURST)

    assert row_counts(app_server, sandbox) == before
    expected = (
        f"Nothing was written. Burst writes must be a whole number from 1 to {MAX_BURST_WRITES:,}."
    )
    assert any(expected in text for text in alerts(page, "error")), alerts(page)
    assert "Score+event transactions" not in metrics(page)


def test_after_an_initialize_sections_3_4_and_5_show_nothing_of_the_deleted_rows(page, app_server):
    sandbox = sandbox_id(page)
    initialize(page)
    go_to_section(page, "4. Caching with Redis")
    click(page, FETCH_USER)
    assert metrics(page)["Outcome"] == "MISS", metrics(page)
    go_to_section(page, "5. Eventing (Outbox Pattern)")
    click(page, STORE_SCORE)
    [(score_id,)] = app_server.stored_rows(sandbox, "air_scores", ("id",), order_by="id")
    assert score_id in main_text(page)
    go_to_section(page, "3. Repository Pattern & N+1")
    click(page, "Remove 100")
    click(page, "Remove 1000")
    click(page, "Compare Loading Strategies")
    assert tables_with_column(page, "strategy"), alerts(page)

    new_ids = initialize(page)  # deletes every row those results described
    assert row_counts(app_server, sandbox)["air_scores"] == 0

    go_to_section(page, "4. Caching with Redis")
    assert new_ids["Alex Smith"] in shown_ids(page) or new_ids["Alex Smith"] in main_text(page)
    assert "Last read:" not in main_text(page) and "Outcome" not in metrics(page), metrics(page)

    go_to_section(page, "5. Eventing (Outbox Pattern)")
    assert score_id not in main_text(page)
    assert not any("one transaction stored" in text for text in alerts(page, "success"))
    assert any(
        "Your last stored score and its event are gone" in text for text in alerts(page, "info")
    ), alerts(page)

    go_to_section(page, "3. Repository Pattern & N+1")
    assert not tables_with_column(page, "strategy")
    assert any("Your last comparison's users are gone" in text for text in alerts(page, "info")), (
        alerts(page)
    )
    assert not alerts(page, "error"), alerts(page)


def test_opening_section_4_on_a_fresh_sandbox_writes_no_row(page, app_server):
    sandbox = sandbox_id(page)

    def journal() -> list[tuple]:  # what the sandbox recorded as done: nothing, by opening
        return app_server.stored_rows(sandbox, "lab_journal", ("id",), order_by="id")

    assert row_counts(app_server, sandbox) == NO_ROWS and journal() == []
    go_to_section(page, "4. Caching with Redis")
    assert any("none of the users this demo reads" in text for text in alerts(page, "info"))
    assert row_counts(app_server, sandbox) == NO_ROWS and journal() == []
    open_page(page, app_server, page.url.removeprefix(f"{app_server.url}/"))  # and a reload
    assert current_section(page) == "4. Caching with Redis"
    assert row_counts(app_server, sandbox) == NO_ROWS and journal() == []


@pytest.mark.parametrize("outage", ["stopped", "frozen"])
def test_with_redis_down_the_sidebar_and_section_4_say_so_together(browser, outage):
    redis = servers.RedisProcess(persistent=False).start()
    try:
        with (
            start_app_server({"REDIS_URL": redis.url}) as server,
            fresh_visitor(browser) as page,
        ):
            open_section(page, server, "4. Caching with Redis")
            click(page, "Create the Cache Demo User")
            click(page, FETCH_USER)  # the cache in use
            assert_redis_state_agrees(page, down=False)

            assert redis.process is not None
            if outage == "stopped":
                redis.stop()
            else:  # hung: connections open, nothing answers
                redis.process.send_signal(signal.SIGSTOP)
            reload_until_agreed(page, server, down=True)

            if outage == "stopped":
                redis.start()
            else:
                redis.process.send_signal(signal.SIGCONT)
            # The breaker closes after its cooling period; until then both still say it is down.
            reload_until_agreed(page, server, down=False, seconds=60)
    finally:
        if redis.process is not None:
            redis.process.send_signal(signal.SIGCONT)
        redis.close()


def redis_state_shown(page) -> tuple[bool, bool, str]:
    """(sidebar warns, section 4 warns, section 4's breaker caption) in one read."""
    main = main_text(page)
    breaker = re.search(r"Breaker: ([^\n]*)", main)
    assert breaker, main
    return SIDEBAR_REDIS_DOWN in sidebar_text(page), PAGE_REDIS_DOWN in main, breaker[1]


def assert_redis_state_agrees(page, *, down: bool) -> None:
    sidebar_warns, page_warns, breaker = redis_state_shown(page)
    assert sidebar_warns == page_warns == down, (sidebar_warns, page_warns, breaker)
    assert breaker.startswith("closed") == (not down), breaker


def reload_until_agreed(page, server: AppServer, *, down: bool, seconds: float = 20) -> None:
    """Reload section 4 until it shows Redis down (or up); in every rerun on the way, the
    sidebar and the page say the same, and the breaker is closed exactly when neither warns."""
    url_path = page.url.removeprefix(f"{server.url}/")

    def reloaded() -> bool:
        open_page(page, server, url_path)
        sidebar_warns, page_warns, breaker = redis_state_shown(page)
        assert sidebar_warns == page_warns, (sidebar_warns, page_warns, breaker)
        assert breaker.startswith("closed") != sidebar_warns, (sidebar_warns, breaker)
        return sidebar_warns == down

    wait_until(page, f"Redis shown {'down' if down else 'up'}", reloaded, timeout_seconds=seconds)
    assert_redis_state_agrees(page, down=down)


# --- issue 22: a calm sidebar that fits -------------------------------------------------------

# Every element of a sidebar button or link that shows text (icons left out) whose text is wider
# than the element: the browser cuts it (or draws an ellipsis).
_CUT_LABELS = """() => Array.from(document.querySelectorAll(
    "[data-testid='stSidebar'] :is(button, a)")).flatMap(control =>
  [control, ...control.querySelectorAll("*")]
    .filter(element => !element.closest("[data-testid='stIconMaterial']"))
    .filter(element => element.innerText && element.innerText.trim())
    .filter(element => element.scrollWidth > element.clientWidth + 1)
    .map(element => [control.innerText.trim(), element.innerText.trim(),
                     element.scrollWidth, element.clientWidth]))"""
_IN_VIEW = """text => {
  const sidebar = document.querySelector("[data-testid='stSidebarContent']");
  const found = Array.from(document.querySelectorAll("[data-testid='stSidebar'] *"))
    .filter(element => element.children.length === 0 && element.innerText
                       && element.innerText.includes(text));
  if (!found.length) return "missing";
  const box = found[0].getBoundingClientRect();
  const frame = sidebar.getBoundingClientRect();
  return sidebar.scrollTop === 0 && box.top >= frame.top && box.bottom <= frame.bottom
    && box.bottom <= window.innerHeight ? "visible" : `at ${box.top}-${box.bottom}`;
}"""


def test_at_1280_by_720_no_sidebar_label_is_cut_and_progress_and_download_show(browser, app_server):
    with fresh_visitor(browser, width=1280, height=720) as page:
        for title in ("Introduction", "4. Caching with Redis"):
            if title == "Introduction":
                open_page(page, app_server)
            else:
                go_to_section(page, title)
            cut = page.evaluate(_CUT_LABELS)
            assert not cut, f"sidebar labels cut on {title}: {cut}"
            for text in ("Your progress", "Download my sandbox"):
                assert page.evaluate(_IN_VIEW, text) == "visible", (title, text)


# --- issue 22: starting afresh asks first ------------------------------------------------------


def test_reset_my_sandbox_asks_first_and_deletes_only_when_confirmed(page, app_server):
    sandbox = sandbox_id(page)
    initialize(page)
    before = row_counts(app_server, sandbox)
    assert before["users"] == 2, before

    click(page, "Reset my sandbox", dialog=True)
    assert "Yes, reset my sandbox" in page.locator("[role='dialog']").inner_text()
    assert row_counts(app_server, sandbox) == before  # asked, nothing deleted yet
    page.keyboard.press("Escape")  # changed their mind
    page.locator("[role='dialog']").wait_for(state="detached")
    assert row_counts(app_server, sandbox) == before

    click(page, "Reset my sandbox", dialog=True)
    click(page, "Yes, reset my sandbox")
    assert row_counts(app_server, sandbox) == NO_ROWS
    assert sandbox_id(page) == sandbox
    assert "Your sandbox is empty again." in sidebar_text(page)


def test_new_sandbox_asks_first_and_switches_only_when_confirmed(page, app_server):
    sandbox = sandbox_id(page)
    initialize(page)
    before = row_counts(app_server, sandbox)

    def url_sandbox() -> list[str]:
        return parse_qs(urlsplit(page.url).query).get(SANDBOX_URL_PARAMETER, [])

    click(page, "New sandbox", dialog=True)
    assert url_sandbox() == [sandbox] and sandbox_id(page) == sandbox  # asked, not switched
    assert sandbox in page.locator("[role='dialog']").inner_text()  # its link is shown first

    click(page, "Yes, start a new sandbox")
    new = sandbox_id(page)
    assert new != sandbox and url_sandbox() == [new]
    assert row_counts(app_server, new) == NO_ROWS
    assert row_counts(app_server, sandbox) == before  # the old one keeps its data


# --- issue 22: links and coming back ------------------------------------------------------------


def test_a_ctrl_click_on_a_sidebar_link_opens_a_new_tab_and_leaves_this_one(page, app_server):
    go_to_section(page, "1. Data Models")
    url, sandbox = page.url, sandbox_id(page)
    tab = open_in_new_tab(page, "4. Caching with Redis", modifier="Control")
    assert current_section(tab) == "4. Caching with Redis" and sandbox_id(tab) == sandbox
    assert page.url == url and current_section(page) == "1. Data Models"
    assert len(page.context.pages) == 2


def test_a_bare_url_offers_the_last_sandbox_back_or_a_new_one(page, app_server):
    sandbox = sandbox_id(page)
    go_to_section(page, "1. Data Models")
    fill(page, "Email", "coming.back@example.com")
    fill(page, "Name", "Coming Back")
    click(page, "Create User")
    [created] = shown_ids(page)
    wait_until(
        page,
        "the browser remembering its sandbox",
        lambda: any(cookie["name"] == LAST_SANDBOX_COOKIE for cookie in page.context.cookies()),
    )

    open_page(page, app_server, framed=False)  # a bare URL, later, in the same browser
    assert "Welcome back to QuLab" in headings(page), headings(page)
    assert sandbox in main_text(page)
    click(page, "Continue your last sandbox")
    assert sandbox_id(page) == sandbox
    go_to_section(page, "5. Eventing (Outbox Pattern)")
    assert created in shown_ids(page)  # the user made before, in the same sandbox
    assert app_server.stored_users(sandbox) == [(created, "coming.back@example.com")]

    open_page(page, app_server, framed=False)
    assert "Welcome back to QuLab" in headings(page), headings(page)
    click(page, "Start a new sandbox")
    new = sandbox_id(page)
    assert new != sandbox
    go_to_section(page, "5. Eventing (Outbox Pattern)")
    assert created not in main_text(page) and app_server.stored_users(new) == []
    assert app_server.stored_users(sandbox) == [(created, "coming.back@example.com")]


# --- issue 20: fragments, and a reload -----------------------------------------------------------


def runs_of_click(page, label: str) -> list[bool]:
    """Click; for each script run that finished because of it: True for a full run."""
    before = len(finished_runs(page))
    click(page, label)
    return [run.full for run in finished_runs(page)[before:]]


def test_a_demo_click_reruns_its_fragment_and_a_reload_keeps_rows_and_progress(page, app_server):
    sandbox = sandbox_id(page)
    initialize(page)
    go_to_section(page, "4. Caching with Redis")
    done = steps_done(page)

    assert runs_of_click(page, FETCH_USER) == [False]  # a miss, no step done: the demo only
    assert metrics(page)["Outcome"] == "MISS" and steps_done(page) == done
    assert runs_of_click(page, FETCH_USER) == [True]  # the hit completes a step: one app run
    assert metrics(page)["Outcome"] == "HIT"
    done_now = steps_done(page)
    assert done_now > done
    counts = (metrics(page)["Hits"], metrics(page)["Misses"])
    users = app_server.stored_users(sandbox)

    open_page(page, app_server, page.url.removeprefix(f"{app_server.url}/"))  # a reload
    assert current_section(page) == "4. Caching with Redis" and sandbox_id(page) == sandbox
    assert not alerts(page, "error"), alerts(page)
    assert steps_done(page) == done_now
    assert app_server.stored_users(sandbox) == users
    assert (metrics(page)["Hits"], metrics(page)["Misses"]) == counts  # the sandbox counted them
