"""Section 5's page through AppTest: the guide's flow, the outage switch, the burst, retries.

The page's publisher really runs on the app's runtime loop; tests wait for what it does with
bounded polling through the session's Lab, then check what the page shows.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pandas as pd
import pytest
from pagetools import (
    click,
    initialize_in_section_2,
    lab_of,
    open_listings,
    open_page,
    start_app,
    texts,
)
from sqlalchemy import text
from streamlit.testing.v1 import AppTest

import source
from classroom.demos import eventing
from classroom.demos.n_plus_one import SCALE_UP_NAME_PREFIX, grow_scale_up_users
from classroom.outbox.service import outbox_service
from classroom.outbox.settings import OutboxSettings
from classroom.outbox.status import OutboxStatus, outbox_status
from classroom.sandboxes.reset import initialize_sandbox

PAGE = "pages/eventing_outbox.py"
CALCULATE = "Calculate & Store AIRScore (Creates Pending Event)"
START = "Start Event Publisher (Background)"
STOP = "Stop Event Publisher"
REFRESH = "Refresh Event Status Now"
RETRY = "Retry failed events"
BURST = "Store Burst of AIRScores"
FAST = replace(
    OutboxSettings(),
    idle_wait_seconds=0.05,
    idle_wait_max_seconds=0.2,
    outage_backoff_base_seconds=0.01,
    outage_backoff_max_seconds=0.05,
    broker_timeout_seconds=0.3,
    stop_timeout_seconds=5,
)


async def install_fast_outbox(sandbox: source.Sandbox) -> None:
    outbox_service(sandbox, FAST)


@pytest.fixture
def app(fresh_global_runtime) -> AppTest:
    app = start_app()
    lab_of(app).run(install_fast_outbox)
    return app


@pytest.fixture
def app_with_users(app) -> AppTest:
    lab_of(app).run(initialize_sandbox)  # section 2's Initialize
    return open_page(app, PAGE)


def wait_for_status(app: AppTest, condition, timeout: float = 15.0) -> OutboxStatus:
    """Poll the sandbox's outbox status until `condition(status)` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        status = lab_of(app).run(outbox_status)
        if condition(status):
            return status
        assert time.monotonic() < deadline, f"still not there after {timeout:g} s: {status}"
        time.sleep(0.02)


def table_with(app: AppTest, column: str) -> pd.DataFrame:
    """The one table on the page that has this column."""
    matches = [table.value for table in app.table if column in table.value.columns]
    assert len(matches) == 1, [list(table.value.columns) for table in app.table]
    return matches[0]


def metric(app: AppTest, label: str) -> str:
    return next(m.value for m in app.metric if m.label == label)


def test_without_users_the_page_says_to_initialize_first(app):
    open_page(app, PAGE)
    assert "no users yet" in texts(app)
    assert CALCULATE not in [b.label for b in app.button]
    assert metric(app, "Pending") == "0" and not app.error


def test_the_guides_flow_stores_publishes_and_delivers_an_event(app_with_users):
    app = app_with_users
    assert "Alex Smith" in app.selectbox[0].format_func(app.selectbox[0].value)
    click(app, CALCULATE)
    assert any("pending" in s.value for s in app.success)
    [event_id] = [row["id"] for row in lab_of(app).run(outbox_status).pending_events]
    assert table_with(app, "next_attempt_at")["id"].tolist() == [event_id]
    assert metric(app, "Pending") == "1" and metric(app, "Published") == "0"

    click(app, START)
    assert any("started" in s.value for s in app.success)
    wait_for_status(app, lambda status: status.published == 1 and status.delivered == 1)
    click(app, REFRESH)
    published = table_with(app, "published_at")
    assert published["id"].tolist() == [event_id] and published["status"].tolist() == ["published"]
    assert published["published_at"].notna().all() and published["delivered_at"].notna().all()
    counts = [metric(app, label) for label in ("Pending", "Published", "Delivered")]
    assert counts == ["0", "1", "1"]

    click(app, STOP)
    assert any("Stopped" in s.value for s in app.success)
    assert not lab_of(app).run(eventing.event_publisher_state).running


def test_the_publisher_keeps_running_across_page_changes(app_with_users):
    app = app_with_users
    click(app, START)
    open_page(app, "pages/data_models.py")
    open_page(app, "pages/connectivity_pooling.py")
    user = lab_of(app).run(source.list_users)[0]
    stored = lab_of(app).run(
        source.calculate_and_store_airscore, user_id=user.id, occupation_code="15-1252"
    )
    wait_for_status(app, lambda status: status.delivered == 1)
    open_page(app, PAGE)
    assert table_with(app, "published_at")["id"].tolist() == [stored.event.id]
    assert lab_of(app).run(eventing.event_publisher_state).running
    click(app, STOP)


def test_bad_occupation_codes_are_refused_and_nothing_is_stored(app_with_users):
    app = app_with_users
    for bad in ("<script>alert(1)</script>", "'; DROP TABLE domain_events; --", ""):
        [occupation] = [t for t in app.text_input if t.label == "Occupation code (SOC)"]
        occupation.input(bad).run()
        click(app, CALCULATE)
        assert any("Occupation code" in e.value for e in app.error), [e.value for e in app.error]
    counts = lab_of(app).run(source.count_rows)
    assert (counts["air_scores"], counts["domain_events"]) == (0, 0)


def test_a_broker_outage_keeps_events_pending_until_the_switch_is_turned_off(app_with_users):
    app = app_with_users
    click(app, START)
    app.toggle[0].set_value(True).run()
    assert lab_of(app).run(eventing.event_publisher_state).broker_cut_off
    assert any("outage" in w.value.lower() for w in app.warning)
    click(app, CALCULATE)
    wait_for_status(
        app, lambda status: status.pending == 1 and status.broker_outage_seconds is not None
    )
    click(app, REFRESH)
    pending = table_with(app, "next_attempt_at")
    assert pending["attempts"].iloc[0] == 0, "an outage spends no attempt"
    assert metric(app, "Delivered") == "0"
    assert any("relay paused" in w.value for w in app.warning), [w.value for w in app.warning]

    app.toggle[0].set_value(False).run()
    assert not lab_of(app).run(eventing.event_publisher_state).broker_cut_off
    status = wait_for_status(app, lambda status: status.published == 1 and status.delivered == 1)
    assert status.stream_length == 1 and status.failed == 0
    click(app, STOP)


def test_a_burst_shows_what_it_committed_and_its_measured_throughput(app_with_users):
    app = app_with_users
    app.number_input[0].set_value(120).run()
    click(app, BURST)
    assert metric(app, "Score+event transactions") == "120"
    assert metric(app, "Write throughput").endswith("per second")
    counts = lab_of(app).run(source.count_rows)
    assert (counts["air_scores"], counts["domain_events"]) == (120, 120)
    assert metric(app, "Pending") == "120"


async def add_failed_event(sandbox: source.Sandbox) -> str:
    event = source.DomainEvent(
        event_type="Test",
        aggregate_type="Test",
        aggregate_id=source.new_id(),
        payload={},
        status="failed",
        attempts=10,
        last_error="message is 70000 bytes; the broker limit is 65536",
    )
    async with source.get_session(sandbox) as session:
        session.add(event)
    return event.id


def test_failed_events_are_shown_and_can_be_retried(app_with_users):
    app = app_with_users
    event_id = lab_of(app).run(add_failed_event)
    click(app, REFRESH)
    assert table_with(app, "last_error")["id"].tolist() == [event_id]
    assert metric(app, "Failed") == "1"
    click(app, RETRY)
    assert any("1 failed events are pending again" in s.value for s in app.success)
    assert metric(app, "Failed") == "0" and metric(app, "Pending") == "1"


def test_the_page_shows_the_outbox_code_from_the_live_source(app_with_users):
    open_listings(app_with_users)
    expanders = app_with_users.expander
    [lesson] = [e for e in expanders if e.label == "The outbox code, read from the running source"]
    [faults] = [e for e in expanders if e.label == "How it survives faults"]
    listings = [code.value for code in lesson.code]
    assert "async def calculate_and_store_airscore(" in listings[0]
    assert "async def run_publisher(" in listings[1]  # the relay's loop, then its batch
    assert "async def publish_due_batch(" in listings[2]
    assert "async def consume_batch(" in listings[3]
    lengths = [listing.count("\n") for listing in listings]
    assert all(length <= 80 for length in lengths), lengths
    hardening = "\n".join(code.value for code in faults.code)
    assert "with_for_update(skip_locked=True)" in hardening and "class BrokerCircuit:" in hardening
    assert "class PublishedEventAudit" not in hardening and "async def run(self)" in hardening


def test_each_click_shows_a_new_score_and_event_and_then_its_live_status(app_with_users):
    app = app_with_users
    seen = []
    for click_number in (1, 2, 3):
        click(app, CALCULATE)
        [message] = [s.value for s in app.success if "one transaction stored" in s.value]
        assert message.startswith(f"Click {click_number}:"), message
        event_id = lab_of(app).run(outbox_status).pending_events[-1]["id"]
        assert event_id in message and event_id not in seen
        seen.append(event_id)
    assert any("That event now: **pending**" in m.value for m in app.markdown)
    click(app, START)
    wait_for_status(app, lambda status: status.published == 3 and status.delivered == 3)
    click(app, REFRESH)
    app.run()
    shown = [m.value for m in app.markdown]
    assert any("That event now: **published**" in value for value in shown), shown
    click(app, STOP)


async def grow_class_sized_user_list(sandbox: source.Sandbox) -> None:
    await grow_scale_up_users(sandbox, target_users=1000)


def test_the_user_box_offers_the_learners_own_users_even_with_a_thousand_scale_up_users(
    app_with_users,
):
    app = app_with_users
    lab_of(app).run(grow_class_sized_user_list)
    app.run()
    [box] = app.selectbox
    names = list(box.options)  # as the learner reads them
    assert names[0] == "Alex Smith" and box.format_func(box.value) == "Alex Smith"
    assert len(names) == 2 and not any(name.startswith(SCALE_UP_NAME_PREFIX) for name in names)


async def refuse_events_after(sandbox: source.Sandbox, *, allowed: int) -> None:
    """A real trigger: once `allowed` events exist, every further event insert fails (and its
    score rolls back)."""
    async with sandbox.engine.begin() as connection:
        if sandbox.backend == "sqlite":
            await connection.execute(
                text(
                    "CREATE TRIGGER refuse_events BEFORE INSERT ON domain_events "
                    f"WHEN (SELECT count(*) FROM domain_events) >= {allowed} "
                    "BEGIN SELECT RAISE(ABORT, 'the event store is full'); END"
                )
            )
        else:
            schema = f'"{sandbox.location}"'
            # The burst's writers run concurrently: under READ COMMITTED each would count without
            # the others' uncommitted rows, so the trigger takes a transaction lock to count.
            await connection.execute(
                text(
                    f"CREATE FUNCTION {schema}.refuse_events() RETURNS trigger LANGUAGE plpgsql "
                    "AS $$ BEGIN "
                    "PERFORM pg_advisory_xact_lock(hashtext(TG_TABLE_SCHEMA || '.refuse_events')); "
                    f"IF (SELECT count(*) FROM {schema}.domain_events) >= {allowed} THEN "
                    "RAISE EXCEPTION 'the event store is full'; END IF; RETURN NEW; END $$"
                )
            )
            await connection.execute(
                text(
                    f"CREATE TRIGGER refuse_events BEFORE INSERT ON {schema}.domain_events "
                    f"FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_events()"
                )
            )


def test_a_burst_that_fails_halfway_says_exactly_what_was_committed(app_with_users):
    app = app_with_users
    lab_of(app).run(refuse_events_after, allowed=20)
    app.number_input[0].set_value(100).run()
    click(app, BURST)
    counts = lab_of(app).run(source.count_rows)
    # each write whole, or not at all
    assert (counts["air_scores"], counts["domain_events"]) == (20, 20)
    [error] = [e.value for e in app.error]
    # one burst of 100: the 80 writes after the 20th were each refused whole
    assert "80 writes failed and stored nothing" in error and "20 committed whole" in error, error
    assert "the event store is full" in error and "nothing was changed" not in error.lower()
    assert metric(app, "Score+event transactions") == "20"


@pytest.mark.parametrize("size", [0, -5, 99999999])
def test_a_burst_size_out_of_range_writes_nothing_and_says_why(app_with_users, size):
    """Issue 22: a bounded number box kept its last valid value (500) while showing the invalid
    one, and the burst wrote 500 scores. The value as shown reaches the burst, which refuses it."""
    app = app_with_users
    before = lab_of(app).run(source.count_rows)
    [burst_size] = [box for box in app.number_input if box.label == "Scores in the burst"]
    burst_size.set_value(size).run()
    click(app, BURST)
    assert [e.value for e in app.error] == [
        "Nothing was written. Burst writes must be a whole number from 1 to 2,000."
    ]
    assert "Score+event transactions" not in [m.label for m in app.metric]
    assert lab_of(app).run(source.count_rows) == before


def test_a_stored_score_deleted_since_is_not_shown_when_the_learner_comes_back(app_with_users):
    app = click(app_with_users, CALCULATE)
    [stored] = [s.value for s in app.success if "one transaction stored AIRScore" in s.value]
    assert app.json

    initialize_in_section_2(app)  # deletes the score and its event with everything else
    open_page(app, PAGE)
    assert not [s.value for s in app.success if "one transaction stored AIRScore" in s.value]
    assert not app.json
    assert [i.value for i in app.info if "last stored score and its event are gone" in i.value]
    assert lab_of(app).run(source.count_rows)["air_scores"] == 0
