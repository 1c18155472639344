"""The caching page through AppTest: the buttons, real hits and misses, outage, experiment."""

from __future__ import annotations

import os
import re

import pytest
from pagetools import (
    button,
    charts,
    click,
    lab_of,
    open_listings,
    open_page,
    reload,
    start_app,
    text_input,
    texts,
)
from streamlit.testing.v1 import AppTest

import source
from classroom.demos.caching import fetch_latest_airscore_cached
from classroom.sandboxes.reset import initialize_sandbox

PAGE = "pages/caching.py"
FETCH_USER, FETCH_SCORE = "Fetch User (Cached)", "Fetch Latest AIRScore (Cached)"
INVALIDATE = "Invalidate Cache for this User"
CREATE_DEMO_USER = "Create the Cache Demo User"
FALLBACK_WARNING = "Redis did not answer, so the database did. The read still succeeded."


@pytest.fixture
def fresh(fresh_global_runtime) -> AppTest:
    """The page opened on a new, empty sandbox."""
    return open_page(start_app(), PAGE)


@pytest.fixture
def app(fresh: AppTest) -> AppTest:
    """The page with its demo user: the Cache Demo User, created with the page's button."""
    return click(fresh, CREATE_DEMO_USER)


def metric(app: AppTest, label: str) -> str:
    return next(m.value for m in app.metric if m.label == label)


def shown_code(app: AppTest) -> str:
    return "\n".join(code.value for code in app.code)


def redis_commands_shown(app: AppTest) -> list[str]:
    """The command lines of the last read's Redis command block (reply lines start with spaces)."""
    block = next(code.value for code in app.code if code.value.startswith(("MGET ", "MULTI")))
    return [line.split()[0] for line in block.splitlines() if not line.startswith(" ")]


def test_opening_the_page_on_a_fresh_sandbox_writes_nothing(fresh):
    assert set(lab_of(fresh).run(source.count_rows).values()) == {0}
    assert any("Cache Demo User" in info.value for info in fresh.info)
    assert button(fresh, CREATE_DEMO_USER)
    assert not [b for b in fresh.button if b.label in (FETCH_USER, FETCH_SCORE, INVALIDATE)]
    fresh.run()  # drawn again: still nothing written
    assert set(lab_of(fresh).run(source.count_rows).values()) == {0}


def test_an_empty_sandbox_gets_a_cache_demo_user_with_a_score(fresh):
    assert lab_of(fresh).run(source.list_users) == []
    app = click(fresh, CREATE_DEMO_USER)
    users = lab_of(app).run(source.list_users)
    assert [u.name for u in users] == ["Cache Demo User"]
    score = lab_of(app).run(fetch_latest_airscore_cached, user_id=users[0].id).read.value
    assert [app.code[0].value, app.code[1].value] == [users[0].id, score["id"]]
    # The mode the environment asks for, and only that one (REDIS_URL set: a real server answers).
    shown, real = texts(app), bool(os.environ.get("REDIS_URL"))
    assert ("Reads go to a real Redis server" in shown) is real
    assert ("runs **fakeredis**" in shown) is not real
    assert "Redis breaker: closed" in shown


def test_the_sample_user_is_used_when_present(app):
    lab_of(app).run(initialize_sandbox)  # section 2's Initialize
    app.run()
    alex = next(u for u in lab_of(app).run(source.list_users) if u.name == "Alex Smith")
    assert app.code[0].value == alex.id
    assert app.table[0].value.to_dict("records") == [{"demo user": "Alex Smith"}]


def test_fetches_show_miss_then_hit_with_their_commands_and_the_metrics_count_them(app):
    click(app, FETCH_USER)
    assert (metric(app, "Outcome"), metric(app, "Database statements")) == ("MISS", "1")
    # A miss reads the fence; the sandbox's first value starts its epoch (SET NX, GET);
    # SET … EX, fence again.
    assert redis_commands_shown(app) == ["MGET", "GET", "SET", "GET", "SET", "GET"]
    assert "MGET qulab:" in shown_code(app)
    click(app, FETCH_USER)
    assert (metric(app, "Outcome"), metric(app, "Database statements")) == ("HIT", "0")
    assert redis_commands_shown(app) == ["MGET"]
    click(app, FETCH_SCORE)
    click(app, FETCH_SCORE)
    assert metric(app, "Outcome") == "HIT"
    assert (metric(app, "Hits"), metric(app, "Misses"), metric(app, "Errors")) == ("2", "2", "0")
    assert metric(app, "Hit ratio H") == "50.0%"
    for label in ("T_cache (mean)", "T_db (mean)", "T_avg predicted", "T_avg measured"):
        assert metric(app, label).endswith(" ms")
    assert not app.error


def test_invalidate_makes_the_next_fetch_miss(app):
    click(app, FETCH_USER)
    click(app, INVALIDATE)
    assert any("Redis deleted 1" in s.value for s in app.success)
    click(app, FETCH_USER)
    assert metric(app, "Outcome") == "MISS"
    assert (metric(app, "Hits"), metric(app, "Misses")) == ("0", "2")


def test_a_rename_invalidates_and_the_next_fetch_shows_the_new_name(app):
    click(app, FETCH_USER)
    text_input(app, "New name for the demo user").input("Renamed Learner")
    click(app, "Rename User")
    assert app.success and not app.error
    click(app, FETCH_USER)
    assert metric(app, "Outcome") == "MISS"
    assert app.json[0].value and "Renamed Learner" in app.json[0].value
    assert any(
        "a write committed (User)" in row["why"] for row in app.table[-1].value.to_dict("records")
    )


def test_a_bad_name_is_refused_with_a_message_and_the_cache_keeps_its_hit(app):
    click(app, FETCH_USER)
    text_input(app, "New name for the demo user").input("<b>bold</b>")
    click(app, "Rename User")
    assert any("markup" in e.value for e in app.error)
    click(app, FETCH_USER)
    assert metric(app, "Outcome") == "HIT"
    assert [u.name for u in lab_of(app).run(source.list_users)] == ["Cache Demo User"]


def test_a_new_score_is_what_the_next_fetch_returns(app):
    click(app, FETCH_SCORE)
    click(app, "Add a New AIRScore")
    click(app, FETCH_SCORE)
    assert metric(app, "Outcome") == "MISS"
    # the latest AIRScore id shown above is the new one
    assert app.code[1].value in app.json[0].value


def test_an_outage_keeps_reads_answered_and_recovery_brings_hits_back(app):
    click(app, FETCH_USER)
    click(app, "Cut Redis for My Sandbox")
    assert any("Redis is cut off for your sandbox" in w.value for w in app.main.warning)
    reloaded = reload(app)
    assert any("cannot reach Redis" in w.value for w in reloaded.sidebar.warning)
    shown = [(element.type, str(getattr(element, "value", ""))) for element in reloaded.sidebar]
    warning_at = next(i for i, (kind, _) in enumerate(shown) if kind == "warning")
    # the warning sits under the Redis lines, and the sandbox's label stays next to its id
    assert "Redis:" in shown[warning_at - 1][1] and "Your sandbox" not in shown[warning_at - 1][1]
    assert (
        shown[warning_at + 1] == ("caption", "**Your sandbox**")
        and shown[warning_at + 2][0] == "code"
    )
    click(app, FETCH_USER)
    assert metric(app, "Outcome") == "FALLBACK" and not app.error
    assert metric(app, "Errors") == "1"
    click(app, "Reconnect Redis")
    assert not reload(app).sidebar.warning
    # The last read stays shown (with its FALLBACK warning) until the next fetch; nothing else
    # warns.
    assert [w.value for w in app.main.warning] == [FALLBACK_WARNING]
    click(app, FETCH_USER)
    assert metric(app, "Outcome") == "HIT" and not app.main.warning


def test_the_experiment_shows_measured_hit_ratios_and_charts(app):
    app.slider[0].set_value(20)
    app.multiselect[0].set_value([0.0, 0.5, 1.0])
    click(app, "Run Cache Experiment")
    rows = app.table[-1].value.to_dict("records")
    assert [(r["hits"], r["misses"], r["measured H"]) for r in rows] == [
        ("0", "20", "0.0%"),
        ("10", "10", "50.0%"),
        ("20", "0", "100.0%"),
    ]
    # Text at three decimals, never a float a table pads to four ("0.0960"); no database time
    # at H = 100%.
    times = [
        row[column]
        for row in rows
        for column in ("T_cache (ms)", "T_db (ms)", "T_avg predicted (ms)", "T_avg measured (ms)")
    ]
    assert all(time == "n/a" or re.fullmatch(r"\d+\.\d{3}", time) for time in times), times
    assert rows[-1]["T_db (ms)"] == "n/a"
    [(spec, points)] = charts(app)  # the chart draws numbers, not the table's text
    assert {layer["mark"]["type"] for layer in spec["layer"]} == {"line", "circle"}
    assert points["measured H"].tolist() == [0.0, 0.5, 1.0]
    assert metric(app, "Hits") == "0"  # the page's own counters are untouched


def test_the_redis_commands_of_a_read_wrap_instead_of_scrolling_sideways(app):
    click(app, FETCH_USER)
    [block] = [code for code in app.code if code.value.startswith("MGET ")]
    assert block.proto.wrap_lines  # an MGET of two namespaced keys is wider than the page


def test_the_page_shows_the_lesson_and_the_hardening_on_request(app):
    assert not [
        code for code in app.code if "def " in code.value
    ]  # drawn only once their expander opens
    listings = [code.value for code in open_listings(app).code if "def " in code.value]
    # The lesson's read-through pattern first (GET, on a miss load and SET), then the hardening
    # QuLab runs it with: the epoch-checked get, the breaker.
    assert listings[0].lstrip().startswith("async def read(") and "self.get(key)" in listings[0]
    lengths = [len(listing.splitlines()) for listing in listings]
    assert all(length <= 80 for length in lengths), lengths
    assert any("coherence.get" in listing for listing in listings[1:])
    assert any("def record_failure" in listing for listing in listings[1:])
    assert "How it survives faults" in [e.label for e in app.expander]
    assert button(app, FETCH_USER) and button(app, FETCH_SCORE) and button(app, INVALIDATE)
