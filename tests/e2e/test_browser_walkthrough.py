"""A new learner walks the codelab in Chromium, section by section, as the user guide says.

Each test is a new learner (a browser page and a sandbox of their own) who first does what the
guide asks before that section (section 2's initialize button), so any test runs alone:
`pytest tests/e2e -k section_4`. The last one walks every section with one learner. Each section
saves a screenshot in tests/e2e/screenshots/. A section's test goes to it with go_to_section,
clicks the guide's buttons with click, and asserts what alerts, tables, metrics and the sandbox's
rows show.
What a page shows with no click (section 5's self-refreshing status panel) is awaited with
wait_until or wait_for_text, never a fixed sleep.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from classroom.progress.steps import STEPS

from .browsertools import (
    AppServer,
    alerts,
    app_pages,
    cache_counts,
    chart_texts,
    click,
    clipped_chart_texts,
    code_blocks,
    current_section,
    dataframe_hidden_widths,
    fill,
    flip,
    fresh_visitor,
    go_to_section,
    headings,
    main_text,
    metric_values,
    metrics,
    open_page,
    sandbox_id,
    screenshot,
    section_titles,
    server_details,
    shown_ids,
    sidebar_text,
    sidebar_tooltip,
    tables,
    tables_with_column,
    wait_for_text,
    wait_until,
)

pytestmark = pytest.mark.e2e

INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
ADD_SCORES = "Add 3 Sample Scores for User"
FETCH_NAIVE = "Fetch User & Scores (Simulated N+1)"
FETCH_EAGER = "Fetch User & Scores (Eager Loading)"
FETCH_USER = "Fetch User (Cached)"
FETCH_SCORE = "Fetch Latest AIRScore (Cached)"
STORE_SCORE = "Calculate & Store AIRScore (Creates Pending Event)"
START_PUBLISHER = "Start Event Publisher (Background)"
STOP_PUBLISHER = "Stop Event Publisher"
# The sidebar's one-line warning while Redis does not answer this sandbox (cut off, or down).
REDIS_DOWN = "Redis is not answering right now"
FROM_SCORES = re.compile(r"\bFROM (\w+\.)?air_scores\b")  # PostgreSQL names the sandbox's schema


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

    def stored_user_names(self) -> list[str]:
        """The names of the users stored in this learner's sandbox."""
        return [
            name
            for (name,) in self.server.stored_rows(
                self.sandbox_id, "users", ("name",), order_by="name"
            )
        ]

    def stored_scores(self) -> list[tuple[str, str]]:
        """(id, user_id) of every AIRScore stored in this learner's sandbox."""
        return self.server.stored_rows(
            self.sandbox_id, "air_scores", ("id", "user_id"), order_by="id"
        )

    def latest_score_id(self, user_id: str) -> str:
        """The id of the user's most recent stored AIRScore (latest created_at, then highest id)."""
        rows = self.server.stored_rows(
            self.sandbox_id, "air_scores", ("created_at", "id", "user_id"), order_by="id"
        )
        return max(
            (created_at, score_id) for created_at, score_id, owner in rows if owner == user_id
        )[1]

    def stored_events(self) -> list[tuple[str, str, int, Any]]:
        """(id, status, attempts, published_at) of every domain event in this learner's outbox,
        oldest first."""
        columns = ("id", "status", "attempts", "published_at")
        return self.server.stored_rows(
            self.sandbox_id, "domain_events", columns, order_by="created_at"
        )

    def inbox(self) -> list[str]:
        """The event ids the downstream consumer has recorded (its inbox), in id order."""
        return self.server.stored_inbox(self.sandbox_id)


@pytest.fixture
def learner(browser, app_server) -> Iterator[Learner]:
    """A new learner on the introduction page, with an empty sandbox of their own."""
    with fresh_visitor(browser) as page:
        open_page(page, app_server)
        yield Learner(page, app_server, sandbox_id=sandbox_id(page))


def initialize_unless_done(learner: Learner) -> None:
    """What the guide asks before sections 3 to 5: section 2's initialize, unless this learner did
    it."""
    if "alex_id" not in learner.notes:
        initialize(learner)


def initialize(learner: Learner) -> None:
    """Section 2's initialize button; notes the sample users' ids."""
    go_to_section(learner.page, "2. DB Connectivity & Pooling")
    click(learner.page, INITIALIZE)
    assert any("2 sample users" in text for text in alerts(learner.page, "success")), alerts(
        learner.page
    )
    [sample_users] = tables_with_column(learner.page, "email")
    shown = {row["name"]: row["id"] for row in sample_users}
    assert sorted(shown) == ["Alex Smith", "Jane Doe"]
    learner.notes.update(alex_id=shown["Alex Smith"], jane_id=shown["Jane Doe"])


def shows_error(page, *parts: str) -> bool:
    """True when one error alert in the main area contains every one of these texts."""
    return any(all(part in text for part in parts) for text in alerts(page, "error"))


def delivered_row(page, event_id: str) -> dict[str, str]:
    """The event's row in Published Events once it shows a delivered_at and nothing is pending,
    else {}."""
    shown = tables(page)
    if any(rows and "next_attempt_at" in rows[0] for rows in shown):  # the Pending Events table
        return {}
    for rows in (rows for rows in shown if rows and "published_at" in rows[0]):
        for row in rows:
            if row["id"] == event_id and row["delivered_at"]:
                return row
    return {}


def create_user(learner: Learner, *, email: str, name: str) -> None:
    fill(learner.page, "Email", email)
    fill(learner.page, "Name", name)
    click(learner.page, "Create User")


def test_introduction_lists_every_section_and_the_sidebar_status(learner):
    page = learner.page
    assert current_section(page) == "Introduction"
    assert section_titles(page) == [title for title, _ in app_pages()]
    assert any("QuLab" in heading for heading in headings(page))
    assert learner.sandbox_id in sidebar_text(page)
    status = server_details(page)  # drawn only while its expander is open
    assert "Database:" in status and "Redis:" in status, status
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
    [hidden] = dataframe_hidden_widths(
        page
    )  # the users table: every column in view (it hid 200 px at 1280 wide)
    assert hidden < 16, hidden
    screenshot(page, "1-data-models")


def test_section_2_initializes_the_sample_users_and_measures_pooling(learner):
    page = learner.page
    go_to_section(page, "1. Data Models")
    create_user(learner, email="sam.learner@example.com", name="Sam Learner")
    assert len(learner.stored_users()) == 1

    initialize(learner)
    stored = sorted(user_id for user_id, _ in learner.stored_users())
    assert stored == sorted(
        [learner.notes["alex_id"], learner.notes["jane_id"]]
    )  # the section-1 user is gone

    click(page, "Run Pooling Experiment")
    shown_metrics = metrics(page)
    for label in ("Pooled throughput", "NullPool throughput", "Pooled ÷ NullPool"):
        assert label in shown_metrics, shown_metrics
    # The initialize's table stays above it (a demo keeps its result until its rows are gone).
    [(pooled, unpooled)] = tables_with_column(page, "pool")
    assert pooled["pool"].startswith("QueuePool") and unpooled["pool"].startswith("NullPool")
    assert pooled["connections opened"] == "0"  # the warmed pool lent its connections out
    assert unpooled["connections opened"] == unpooled["requests"]  # one new connection per query
    for row in (
        pooled,
        unpooled,
    ):  # text at a sensible precision, never padded to four decimals ("2,565.9000")
        assert re.fullmatch(r"\d{1,3}(,\d{3})*", row["throughput (req/s)"]), row
        assert re.fullmatch(r"[\d,]+\.\d{1,2}", row["median latency (ms)"]), row
    # The bar chart names both pools whole (Vega-Lite draws it a moment after the run).
    wait_until(
        page,
        "the chart's pool names",
        lambda: {pooled["pool"], unpooled["pool"]} <= set(chart_texts(page)),
    )
    assert not [text for text in chart_texts(page) if text.endswith("…")], chart_texts(page)
    assert not clipped_chart_texts(
        page
    )  # the axis's last label ("1,600") used to run past the chart's edge
    screenshot(page, "2-pooling")


def test_section_3_adds_scores_and_counts_the_statements_of_each_loading_strategy(learner):
    page = learner.page
    initialize_unless_done(learner)
    go_to_section(page, "3. Repository Pattern & N+1")
    alex_id = learner.notes["alex_id"]

    # A malformed id and an unknown one: a clear error from every button, and nothing written.
    for bad_id, message in (
        ("not-a-user-id", "not a valid user id"),
        (str(uuid.uuid4()), "No user has the id"),
    ):
        fill(page, "User ID", bad_id)
        click(page, ADD_SCORES)
        assert shows_error(page, "No scores were added.", message), alerts(page)
        for fetch in (FETCH_NAIVE, FETCH_EAGER):
            click(page, fetch)
            assert shows_error(page, "Nothing was fetched.", message), alerts(page)
        assert not alerts(page, "success") and not metric_values(page, "SQL statements")
    assert learner.stored_scores() == []

    fill(page, "User ID", alex_id)
    click(page, ADD_SCORES)
    assert any("Added 3 sample scores" in text for text in alerts(page, "success")), alerts(page)
    [added_rows] = tables_with_column(page, "air_score")  # step 1's users table is above it
    added = [row["id"] for row in added_rows]
    assert sorted(added) == sorted(
        score_id for score_id, user_id in learner.stored_scores() if user_id == alex_id
    )
    assert len(added) == 3

    # N+1: the user (1), the ids of the scores (1), then each score (N = 3).
    click(page, FETCH_NAIVE)
    assert metric_values(page, "SQL statements") == ["5"]
    [naive_sql] = [code for code in code_blocks(page) if code.startswith("-- statement 1:")]
    assert naive_sql.count("-- statement ") == 5 and len(FROM_SCORES.findall(naive_sql)) == 4, (
        naive_sql
    )
    # The scores it fetched, under the kept result of step 1 (the 3 scores added).
    [kept_added, fetched] = tables_with_column(page, "air_score")
    assert [row["id"] for row in kept_added] == added
    assert sorted(row["id"] for row in fetched) == sorted(added)

    # Eager loading: the user, then all the scores in one IN query; the N+1 result stays beside it.
    click(page, FETCH_EAGER)
    assert metric_values(page, "SQL statements") == ["5", "2"]
    assert len(metric_values(page, "Time taken")) == 2
    eager_sql = [code for code in code_blocks(page) if code.startswith("-- statement 1:")][1]
    assert eager_sql.count("-- statement ") == 2 and " IN (" in eager_sql, eager_sql
    # Still one full-width table of the scores fetched, under step 1's kept one.
    assert [len(rows) for rows in tables_with_column(page, "air_score")] == [3, 3]
    screenshot(page, "3-n-plus-one", heading="Step 2: fetch the user and their scores, two ways")

    # Scale up, kept small: N = 10 only.
    click(page, "Remove 100")
    click(page, "Remove 1000")
    click(page, "Compare Loading Strategies")
    assert any("exactly the same users" in text for text in alerts(page, "success")), alerts(page)
    [comparison] = tables_with_column(page, "strategy")
    assert {row["strategy"]: row["statements"] for row in comparison} == {
        "lazy": "11",
        "selectinload": "2",
        "joinedload": "1",
        "subqueryload": "2",
    }
    assert {(row["N (users)"], row["scores loaded"]) for row in comparison} == {("10", "50")}
    wait_until(
        page, "the chart's y title", lambda: "median time (ms, log scale)" in chart_texts(page)
    )
    assert not clipped_chart_texts(
        page
    )  # the y title's glyphs used to run past the chart's left edge
    scale_up_users = [
        name for name in learner.stored_user_names() if name.startswith("Scale-up user #")
    ]
    assert len(scale_up_users) == 10

    click(page, "Remove Scale-up Users")
    assert any("Removed 10 scale-up users" in text for text in alerts(page, "success")), alerts(
        page
    )
    assert sorted(learner.stored_user_names()) == ["Alex Smith", "Jane Doe"]
    assert len(learner.stored_scores()) == 3  # Alex's, untouched


def test_section_4_reads_through_the_cache_and_survives_a_redis_outage(learner):
    page = learner.page
    initialize_unless_done(learner)
    go_to_section(page, "4. Caching with Redis")
    alex_id = learner.notes["alex_id"]
    # Opening the page writes nothing: Alex's latest score is shown if section 3 gave him one.
    has_scores = any(user_id == alex_id for _, user_id in learner.stored_scores())
    latest_id = learner.latest_score_id(alex_id) if has_scores else "none yet"
    shown = code_blocks(page)
    assert alex_id in shown and latest_id in shown, shown
    assert "The demo user: Alex Smith (" in main_text(page)
    assert cache_counts(page) == ("0", "0", "0")

    def fetch(label: str, expected_outcome: str) -> None:
        click(page, label)
        shown_metrics = metrics(page)
        assert shown_metrics["Outcome"] == expected_outcome, (label, shown_metrics, alerts(page))
        # A hit answers from Redis alone; a miss or a fallback reads the database.
        assert (shown_metrics["Database statements"] == "0") == (expected_outcome == "HIT"), (
            shown_metrics
        )

    fetch(FETCH_USER, "MISS")
    fetch(FETCH_USER, "HIT")
    fetch(FETCH_SCORE, "MISS")
    fetch(FETCH_SCORE, "HIT")
    assert cache_counts(page) == ("2", "2", "0")
    assert metrics(page)["Hit ratio H"] == "50.0%"

    click(page, "Invalidate Cache for this User")
    assert any("Redis deleted 2" in text for text in alerts(page, "success")), alerts(page)
    fetch(FETCH_USER, "MISS")
    assert cache_counts(page) == ("2", "3", "0")

    # The outage switch: reads still succeed, from the database, and the sidebar says Redis is cut
    # off.
    click(page, "Cut Redis for My Sandbox")
    assert any("Redis is cut off" in text for text in alerts(page, "warning")), alerts(page)
    assert REDIS_DOWN in sidebar_text(page)
    fetch(FETCH_USER, "FALLBACK")
    assert any("so the database did" in text for text in alerts(page, "warning")), alerts(page)
    assert any("-> failed: " in code for code in code_blocks(page)), code_blocks(
        page
    )  # the GET Redis refused
    assert REDIS_DOWN in sidebar_text(page)
    assert cache_counts(page) == ("2", "3", "1")
    screenshot(page, "4-cache", heading="Interactive caching demonstration")

    click(page, "Reconnect Redis")
    assert REDIS_DOWN not in sidebar_text(page) and "degraded" not in sidebar_text(page)
    fetch(FETCH_USER, "HIT")  # the copy stored before the outage is served again
    assert cache_counts(page) == ("3", "3", "1")

    # The experiment: its table is text at three decimals (never padded to four), its chart fits.
    click(page, "Run Cache Experiment")
    [trials] = tables_with_column(page, "measured H")
    assert [row["measured H"] for row in trials] == ["0.0%", "50.0%", "80.0%", "100.0%"], trials
    times = [row[column] for row in trials for column in row if column.endswith("(ms)")]
    assert all(time == "n/a" or re.fullmatch(r"\d+\.\d{3}", time) for time in times), times
    wait_until(page, "the experiment's chart", lambda: "hit ratio H" in chart_texts(page))
    assert not clipped_chart_texts(
        page
    )  # "T_avg (ms)" used to touch, and cross, the chart's left edge

    # The code listings are drawn when their expander opens (a rerun), not on every rerun before.
    assert not any(code.startswith("async def read(") for code in code_blocks(page))
    page.locator("[data-testid='stExpander'] summary", has_text="The read-through pattern").click()
    wait_until(
        page,
        "the cache's listing",
        lambda: any(code.startswith("async def read(") for code in code_blocks(page)),
    )


def test_section_5_publishes_events_in_the_background_and_loses_none_in_a_broker_outage(learner):
    page = learner.page
    initialize_unless_done(learner)
    go_to_section(page, "5. Eventing (Outbox Pattern)")
    alex_id = learner.notes["alex_id"]
    assert alex_id in code_blocks(page)
    assert learner.stored_events() == []

    click(page, STORE_SCORE)
    assert any("status pending" in text for text in alerts(page, "success")), alerts(page)
    [(event_id, status, attempts, published_at)] = learner.stored_events()
    assert (status, attempts, published_at) == ("pending", 0, None)
    [pending] = tables_with_column(page, "next_attempt_at")
    assert [(row["id"], row["status"]) for row in pending] == [(event_id, "pending")]

    click(page, "Refresh Event Status Now")
    assert [row["id"] for row in tables_with_column(page, "next_attempt_at")[0]] == [event_id]
    assert metrics(page)["Pending"] == "1" and not tables_with_column(page, "published_at")

    # The publisher runs in the background; the status panel refreshes itself: no click needed.
    click(page, START_PUBLISHER)
    wait_for_text(page, "Publisher and consumer started.")
    published = wait_until(
        page, "the event delivered, none pending", lambda: delivered_row(page, event_id)
    )
    assert published["status"] == "published" and published["published_at"], published
    [(_, status, _, published_at)] = learner.stored_events()
    assert status == "published" and published_at is not None
    assert learner.inbox() == [event_id]

    click(page, STOP_PUBLISHER)
    wait_for_text(page, "Stopped after finishing the current batch.")

    # A broker outage while the publisher runs: the relay pauses, the new event waits and goes out
    # after.
    click(page, START_PUBLISHER)
    wait_for_text(page, "Publisher and consumer started.")
    flip(page, "Broker outage")
    wait_for_text(page, "Broker outage: your sandbox's connections to Redis really fail now.")
    assert REDIS_DOWN in sidebar_text(page)
    click(page, STORE_SCORE)
    wait_until(page, "a second event stored", lambda: len(learner.stored_events()) == 2)
    [second_id] = [event for event, *_ in learner.stored_events() if event != event_id]

    def paused_and_waiting() -> (
        Any
    ):  # the relay pauses for the outage; the event keeps its attempts
        if not any("relay paused" in text for text in alerts(page, "warning")):
            return []
        pending = [row for rows in tables_with_column(page, "next_attempt_at") for row in rows]
        return [row for row in pending if row["id"] == second_id]

    [waiting] = wait_until(page, "the relay paused, the new event pending", paused_and_waiting)
    assert waiting["status"] == "pending" and waiting["attempts"] == "0", waiting
    [(status, attempts, published_at)] = [
        row[1:] for row in learner.stored_events() if row[0] == second_id
    ]
    assert status == "pending" and attempts == 0 and published_at is None
    screenshot(page, "5-outbox", heading="Current event status")

    flip(page, "Broker outage")
    wait_until(
        page,
        "the sidebar without the outage",
        lambda: REDIS_DOWN not in sidebar_text(page),
    )
    assert "degraded" not in sidebar_text(page), sidebar_text(page)
    wait_until(page, "the event delivered after the outage", lambda: delivered_row(page, second_id))
    assert {status for _, status, _, _ in learner.stored_events()} == {"published"}
    assert sorted(learner.inbox()) == sorted([event_id, second_id])  # none lost, none twice
    # The panel refreshes itself while events move: its counters catch up with the inbox.
    wait_until(
        page,
        "the panel counting both",
        lambda: (metrics(page)["Published"], metrics(page)["Delivered"]) == ("2", "2"),
    )

    click(page, STOP_PUBLISHER)
    wait_for_text(page, "Stopped after finishing the current batch.")


def test_the_walk_through_ends_with_every_step_done(learner):
    """The sidebar's progress counts what the sandbox's journal shows: every step this walk took.

    One learner walks every section above in order (so this test, too, runs alone)."""
    for walk_section in (
        test_section_1_creates_a_user_and_refuses_duplicates_and_bad_input,
        test_section_2_initializes_the_sample_users_and_measures_pooling,
        test_section_3_adds_scores_and_counts_the_statements_of_each_loading_strategy,
        test_section_4_reads_through_the_cache_and_survives_a_redis_outage,
        test_section_5_publishes_events_in_the_background_and_loses_none_in_a_broker_outage,
    ):
        walk_section(learner)
    page = learner.page
    go_to_section(page, "Introduction")
    required = sum(not step.optional for step in STEPS)
    optional = len(STEPS) - required
    shown = sidebar_text(page)
    assert (
        f"{required} of {required} steps" in shown and "Every step of the guide is done." in shown
    ), shown
    # The optional steps are counted in the tooltip of the "Every step of the guide is done."
    beyond = sidebar_tooltip(page, "Every step of the guide is done.")
    assert f"Beyond the guide: {optional} of {optional} optional steps." in beyond, beyond
