"""The caching page through AppTest: the buttons, real hits and misses, outage, experiment."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import servers
from pagetools import (
    button,
    charts,
    click,
    initialize_in_section_2,
    lab_of,
    markdown_tables,
    open_listings,
    open_page,
    reload,
    sidebar_text,
    start_app,
    table_value,
    text_input,
    texts,
)
from streamlit.testing.v1 import AppTest

import classroom.status
import source
from classroom.browser import SANDBOX_STATE_KEY
from classroom.cache.link import RedisReading, RedisService
from classroom.demos.caching import fetch_latest_airscore_cached
from classroom.progress.steps import learner_progress
from classroom.runtime import shutdown_runtime
from classroom.sandboxes.reset import initialize_sandbox

PAGE = "pages/caching.py"
FORGETS_KEY = "cache_forgets_open"  # the invalidations expander, open
FETCH_USER, FETCH_SCORE = "Fetch User (Cached)", "Fetch Latest AIRScore (Cached)"
INVALIDATE = "Invalidate Cache for this User"
CREATE_DEMO_USER = "Create the Cache Demo User"
FALLBACK_WARNING = "Redis did not answer, so the database did. The read still succeeded."
SIDEBAR_WARNING = "Redis is not answering right now: reads come from the database."


@pytest.fixture
def fresh(fresh_global_runtime) -> AppTest:
    """The page opened on a new, empty sandbox."""
    return open_page(start_app(), PAGE)


@pytest.fixture
def app(fresh: AppTest) -> AppTest:
    """The page with its demo user: the Cache Demo User, created with the page's button."""
    return click(fresh, CREATE_DEMO_USER)


def metric(app: AppTest, label: str) -> str:
    """A value the page shows in its one-row tables (the last read, the cache metrics)."""
    return table_value(app, label)


def invalidations_shown(app: AppTest) -> list[dict[str, str]]:
    """The rows of "What the cache was told to forget", opened as a learner opens it."""
    app.session_state[FORGETS_KEY] = True
    app.run()
    return next(table for table in markdown_tables(app) if table and "why" in table[0])


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
    assert "Breaker: closed" in shown


def test_the_sample_user_is_used_when_present(app):
    lab_of(app).run(initialize_sandbox)  # section 2's Initialize
    app.run()
    alex = next(u for u in lab_of(app).run(source.list_users) if u.name == "Alex Smith")
    assert app.code[0].value == alex.id
    assert any("The demo user: **Alex Smith**" in caption.value for caption in app.caption)


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
    assert any("a write committed (User)" in row["why"] for row in invalidations_shown(app))


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
    reloaded = reload(app, details=True)
    assert [w.value for w in reloaded.sidebar.warning] == [SIDEBAR_WARNING]
    shown = [(element.type, str(getattr(element, "value", ""))) for element in reloaded.sidebar]
    # the sandbox's label stays next to its id; the details say why Redis is not answering
    label_at = shown.index(("caption", "**Your sandbox**"))
    assert shown[label_at + 1] == ("code", reloaded.session_state[SANDBOX_STATE_KEY])
    assert "cut off for your sandbox" in sidebar_text(reloaded)
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


def test_a_read_of_a_user_deleted_since_is_not_shown_when_the_learner_comes_back(fresh):
    app = initialize_in_section_2(fresh)
    click(open_page(app, PAGE), FETCH_USER)
    assert [m.value for m in app.markdown if m.value.startswith("**Last read:**")]
    assert metric(app, "Outcome") == "MISS" and app.json

    initialize_in_section_2(app)  # Alex Smith is deleted and created again, with a new id
    open_page(app, PAGE)
    assert not [m.value for m in app.markdown if m.value.startswith("**Last read:**")]
    assert "Outcome" not in [m.label for m in app.metric] and not app.json
    assert not [c for c in app.code if c.value.startswith(("MGET ", "MULTI"))]


def test_the_journal_counts_one_hit_as_one_hit(app):
    click(app, FETCH_USER)
    click(app, FETCH_USER)
    journal = lab_of(app).run(learner_progress).journal
    reads = [line.detail for line in journal if line.kind == "cache_read"]
    assert [read.rpartition("; ")[2] for read in reads] == [
        "0 hits of 1 read.",
        "1 hit of 2 reads.",
    ]
    assert "1 hits" not in texts(app)  # nor the page (its progress panel)


@pytest.fixture
def freezable_redis(monkeypatch, fresh_global_runtime):
    """A redis-server of this test's own, which the app's runtime uses (REDIS_URL); the test can
    freeze it (SIGSTOP). Never the server the environment names: other tests share that one."""
    with servers.redis_server_process() as (url, process):
        monkeypatch.setenv("REDIS_URL", url)
        try:
            yield process
        finally:
            process.send_signal(signal.SIGCONT)
            shutdown_runtime()  # while the server still runs: closing its clients is quick


def test_with_redis_not_answering_the_sidebar_and_the_page_say_so_in_the_same_run(
    freezable_redis,
):
    app = click(open_page(start_app(), PAGE), CREATE_DEMO_USER)
    assert "Reads go to a real Redis server" in texts(app)  # the runtime is on this server
    click(app, FETCH_USER)
    freezable_redis.send_signal(signal.SIGSTOP)  # hung: its connections stay open, no answer

    deadline = time.monotonic() + 60  # every run agrees; within a few runs both say it is down
    while True:
        shown = reload(app, PAGE, details=True)  # one run: app.py's sidebar, then section 4
        sidebar_says_down = [w.value for w in shown.sidebar.warning] == [SIDEBAR_WARNING]
        page_says_down = any(
            w.value.startswith("Redis is not answering right now") for w in shown.main.warning
        )
        breaker = [c.value for c in shown.main.caption if c.value.startswith("Breaker: ")]
        details = sidebar_text(shown)
        assert sidebar_says_down == page_says_down, (shown.sidebar.warning, shown.main.warning)
        assert len(breaker) == 1
        if sidebar_says_down:
            break
        assert breaker[0].startswith("Breaker: closed") and "answering." in details
        assert time.monotonic() < deadline, "Redis is frozen, yet the pages say it answers"
    assert not breaker[0].startswith("Breaker: closed"), breaker
    assert "not answering: reads use the database" in details
    assert "Breaker (skips Redis while it fails): closed" not in details


def test_the_page_says_what_the_sidebar_said_though_the_reading_changed_in_between(
    fresh, monkeypatch
):
    """The Redis reading the sidebar and section 4 share lasts 2 s; when it ends between the two
    (the next probe finds Redis gone), one run must still say one thing. Here it ends right after
    the sidebar's status, every time."""
    sidebar_statuses = []
    sidebar_status = classroom.status.runtime_status
    own_reading = RedisService.reading

    def status_then_reading_ends(lab):
        sidebar_statuses.append(sidebar_status(lab))
        return sidebar_statuses[-1]

    async def reading(service):
        if sidebar_statuses:
            return RedisReading(False, time.monotonic(), "ConnectionError: gone since")
        return await own_reading(service)

    monkeypatch.setattr(classroom.status, "runtime_status", status_then_reading_ends)
    monkeypatch.setattr(RedisService, "reading", reading)
    shown = reload(fresh, PAGE)  # one run: app.py's sidebar, then section 4
    assert [status.redis_answers for status in sidebar_statuses] == [True]
    assert not shown.sidebar.warning
    assert not [w.value for w in shown.main.warning if "not answering" in w.value]
    assert [c.value for c in shown.main.caption if c.value.startswith("Breaker: closed")]
