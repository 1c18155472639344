"""Pages, driven through Streamlit's AppTest: each renders, and sections 1-2 do what they say.

Each later section has its own tests/test_page_<section>.py, using the helpers in pagetools.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pagetools import (
    button,
    charts,
    lab_of,
    open_listings,
    open_page,
    open_server_details,
    sidebar_text,
    start_app,
    text_input,
)
from streamlit.testing.v1 import AppTest

import source
from classroom.browser import SANDBOX_STATE_KEY
from classroom.sandboxes.reset import initialize_sandbox
from classroom.status import runtime_status
from pages.common.formatting import milliseconds_text

PAGES = [
    "pages/introduction.py",
    "pages/data_models.py",
    "pages/connectivity_pooling.py",
    "pages/repository_n_plus_one.py",
    "pages/caching.py",
    "pages/eventing_outbox.py",
]
INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
YEARS = "Years of experience (optional, 0 to 80)"


@pytest.fixture
def app(fresh_global_runtime) -> AppTest:
    return start_app()


def sandbox_users(app: AppTest) -> list[source.User]:
    return lab_of(app).run(source.list_users)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_an_exception(app, page):
    open_page(app, page)
    assert app.title, "each page has a title"
    assert not app.error


def test_sidebar_shows_backends_and_the_sandbox(app):
    details = sidebar_text(open_server_details(app))  # in the collapsed "Server details"
    assert "Database:" in details and "Redis:" in details
    assert app.session_state[SANDBOX_STATE_KEY] in [code.value for code in app.sidebar.code]


def test_data_models_page_shows_the_live_model_source(app):
    open_page(app, "pages/data_models.py")
    shown = "\n".join(code.value for code in app.code)
    assert "class User(Base, TimestampMixin):" in shown
    assert 'cascade="all, delete-orphan"' in shown


def fill_create_user(app: AppTest, *, email: str, name: str) -> AppTest:
    text_input(app, "Email").input(email)
    text_input(app, "Name").input(name)
    return button(app, "Create User").click().run()


def test_create_user_through_the_form_shows_the_new_id(app):
    open_page(app, "pages/data_models.py")
    fill_create_user(app, email="alex.new@example.com", name="Alex New")
    users = sandbox_users(app)
    assert [u.email for u in users] == ["alex.new@example.com"]
    assert any(users[0].id == code.value for code in app.code)
    assert app.success and not app.error


@pytest.mark.parametrize(
    ("email", "name", "message"),
    [
        ("", "Alex", "Email is required"),
        ("   ", "Alex", "Email is required"),
        ("a" * 300 + "@example.com", "Alex", "too long"),
        ("not-an-email", "Alex", "not a valid email"),
        ("ok@example.com", "<script>alert(1)</script>", "markup"),
        ("ok@example.com", "'; DROP TABLE users; --", "only letters"),
        ("'; DROP TABLE users; --", "Alex", "not a valid email"),
        ("ok@example.com", "x" * 300, "too long"),
    ],
)
def test_create_user_with_bad_input_shows_a_clear_message_and_writes_nothing(
    app, email, name, message
):
    open_page(app, "pages/data_models.py")
    fill_create_user(app, email=email, name=name)
    assert not app.exception
    assert [e.value for e in app.error if message in e.value], [e.value for e in app.error]
    assert not app.success
    assert sandbox_users(app) == []


def test_duplicate_email_in_another_case_is_refused_in_the_ui(app):
    open_page(app, "pages/data_models.py")
    fill_create_user(app, email="jane@example.com", name="Jane")
    fill_create_user(app, email="JANE@Example.com", name="Jane Again")
    assert any("already exists" in e.value for e in app.error)
    assert [u.name for u in sandbox_users(app)] == ["Jane"]


def test_initialize_button_creates_the_sample_users_and_shows_their_ids(app):
    open_page(app, "pages/data_models.py")
    fill_create_user(app, email="temp@example.com", name="Temp")
    open_page(app, "pages/connectivity_pooling.py")
    button(app, INITIALIZE).click().run()
    assert not app.exception and not app.error
    users = sandbox_users(app)
    assert sorted(u.name for u in users) == ["Alex Smith", "Jane Doe"]
    shown = app.table[0].value.to_dict("records")
    assert sorted(row["id"] for row in shown) == sorted(u.id for u in users)


def test_pool_experiment_runs_from_the_page_and_shows_measured_throughput(app):
    open_page(app, "pages/connectivity_pooling.py")
    button(app, "Run Pooling Experiment").click().run()
    assert not app.exception and not app.error
    labels = [metric.label for metric in app.metric]
    assert "Pooled throughput" in labels and "NullPool throughput" in labels
    rows = app.table[0].value.to_dict("records")
    assert [row["connections opened"] for row in rows] == ["0", rows[1]["requests"]]
    assert [row["requests"] for row in rows] == ["300", "300"]  # the slider's default R
    one_at_a_time = [caption.value for caption in app.caption if "one at a time" in caption.value]
    if app.session_state["pool_experiment_result"].opened_at_once is None:  # SQLite: no gate
        assert one_at_a_time == []
    else:  # PostgreSQL: the page says NullPool's connections were opened one at a time
        assert one_at_a_time and "at most 1 at once" in one_at_a_time[0]


def test_the_pool_table_shows_figures_as_text_at_a_sensible_precision(app):
    """A table pads floats to four decimals ("2,565.9000"): each cell is text, rounded for what it
    measures."""
    open_page(app, "pages/connectivity_pooling.py")
    button(app, "Run Pooling Experiment").click().run()
    trials = app.session_state["pool_experiment_result"].trials
    rows = app.table[0].value.to_dict("records")
    assert all(isinstance(cell, str) for row in rows for cell in row.values()), rows
    for row, trial in zip(rows, trials, strict=True):
        assert (
            row["throughput (req/s)"] == f"{trial.throughput:,.0f}"
            and "." not in row["throughput (req/s)"]
        )
        assert row["median latency (ms)"] == milliseconds_text(trial.median_latency_ms)
        assert len(row["seconds"].partition(".")[2]) == 3
    assert [milliseconds_text(value) for value in (7.4123, 47.04, 1864.1, None)] == [
        "7.41",
        "47.0",
        "1,864.1",
        "n/a",
    ]
    [(spec, bars)] = charts(app)
    # The pools' names whole, not "QueuePool (pool…".
    assert spec["encoding"]["y"]["axis"]["labelLimit"] == 0
    assert bars["throughput (req/s)"].tolist() == [trial.throughput for trial in trials]


def test_two_browser_sessions_get_separate_sandboxes(fresh_global_runtime):
    first, second = start_app(), start_app()
    open_page(first, "pages/data_models.py")
    fill_create_user(first, email="only.first@example.com", name="First")
    assert first.session_state[SANDBOX_STATE_KEY] != second.session_state[SANDBOX_STATE_KEY]
    assert sandbox_users(second) == []


def test_page_one_names_and_explains_every_table_its_diagram_draws(app):
    open_page(app, "pages/data_models.py")
    listed = app.table[0].value.to_dict("records")
    # The lesson's tables (the progress journal, lab_journal, is the platform's: not drawn here).
    assert [row["table"] for row in listed] == [
        "users",
        "assessments",
        "air_scores",
        "domain_events",
        "consumed_events",
    ]
    assert all(row["what it holds"].strip() for row in listed)
    diagram = app.get("graphviz_chart")[0].proto.spec
    drawn = {table.name for table in source.Base.metadata.sorted_tables}
    assert drawn == {row["table"] for row in listed} and all(
        f"<b>{name}</b>" in diagram for name in drawn
    )
    assert "class ConsumedEvent(Base):" in "\n".join(code.value for code in app.code)


@pytest.mark.parametrize("years", ["-5", "1000000000"])
def test_years_of_experience_out_of_range_gets_a_clear_message(app, years):
    open_page(app, "pages/data_models.py")
    text_input(app, YEARS).input(years)  # a text box: what it shows is what is sent
    fill_create_user(app, email="years@example.com", name="Years")
    assert [e.value for e in app.error] == [
        "User not created. Years of experience must be between 0 and 80."
    ]
    assert sandbox_users(app) == []


def test_page_one_says_that_initialize_starts_fresh(app):
    open_page(app, "pages/data_models.py")
    assert "initialize button starts your sandbox fresh" in " ".join(
        info.value for info in app.info
    )


def test_no_page_has_a_bare_expression_that_streamlit_magic_would_draw():
    """Streamlit's magic st.writes every bare expression statement but a call: section 3's
    `st.table(...) if scores else st.info(...)` line drew the whole help text of a
    DeltaGenerator."""
    drawn = []
    for page in ["app.py", *PAGES]:
        tree = ast.parse((Path(source.__file__).parent / page).read_text())
        for body in (
            node.body for node in ast.walk(tree) if isinstance(getattr(node, "body", None), list)
        ):
            for index, statement in enumerate(body):
                if not isinstance(statement, ast.Expr) or isinstance(
                    statement.value, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom)
                ):
                    continue
                if (
                    index == 0
                    and isinstance(statement.value, ast.Constant)
                    and isinstance(statement.value.value, str)
                ):
                    continue  # a docstring: magic leaves it alone
                drawn.append(f"{page}, line {statement.lineno}: {ast.unparse(statement)[:60]}")
    assert not drawn, drawn


PAGES_WITHOUT_LISTINGS = {"pages/introduction.py"}


@pytest.mark.parametrize("page", PAGES)
def test_a_pages_listings_are_lesson_sized(app, page):
    lab_of(app).run(initialize_sandbox)
    open_page(app, page)
    listings = [code.value for code in open_listings(app).code if code.language == "python"]
    assert listings or page in PAGES_WITHOUT_LISTINGS
    assert all(listing.count("\n") + 1 <= 80 for listing in listings), [
        listing.splitlines()[0] for listing in listings
    ]


def test_beside_the_initialize_button_the_page_says_what_it_really_works_on(app):
    open_page(app, "pages/connectivity_pooling.py")
    status = runtime_status(lab_of(app))
    expected = "its own SQLite file" if status.backend == "sqlite" else "its own schema"
    captions = " ".join(caption.value for caption in app.caption)
    assert (
        f"Not in memory on this server: your sandbox is {expected} ({status.sandbox_location})"
        in captions
    )


def elements_in_order(app: AppTest) -> list[tuple[str, str]]:
    """(type, text) of everything the main area draws, in page order."""
    return [(element.type, str(getattr(element, "value", ""))) for element in app.main]


@pytest.mark.parametrize("years", ["1e309", "NaN", "inf", "abc", "٥", "0.0000001", "-5"])
def test_years_of_experience_the_form_cannot_store_as_shown_is_refused_beside_the_form(app, years):
    """Issue 22: a number box blanked what it could not read, and the user was created without a
    word (0.0000001 was stored as it came). Typed text now reaches the check as it is shown."""
    open_page(app, "pages/data_models.py")
    text_input(app, YEARS).input(years)
    fill_create_user(app, email="years@example.com", name="Years")
    [refusal] = [e.value for e in app.error]
    assert refusal.startswith("User not created. Years of experience "), refusal
    assert not app.success
    shown = elements_in_order(app)
    form = next(i for i, (kind, _) in enumerate(shown) if kind == "form")
    listed = shown.index(("subheader", "Users in your sandbox"))
    assert form < shown.index(("error", refusal)) < listed  # next to the form, above the users
    assert lab_of(app).run(source.count_rows)["users"] == 0


def test_years_of_experience_with_a_decimal_is_stored_as_typed(app):
    open_page(app, "pages/data_models.py")
    text_input(app, YEARS).input("2.5")
    fill_create_user(app, email="years@example.com", name="Years")
    assert app.success and not app.error
    assert [user.years_experience for user in sandbox_users(app)] == [2.5]


def test_the_introduction_explains_the_words_pages_use_before_teaching_them(app):
    open_page(app, "pages/introduction.py")
    app.session_state["qulab_glossary_open"] = True  # the learner opens it: drawn while open
    app.run()
    [glossary] = [
        expander
        for expander in app.main.expander
        if expander.label == "Words you will meet before a section explains them"
    ]
    words = "\n".join(str(markdown.value) for markdown in glossary.markdown)
    for term in ("breaker", "pre-ping", "WAL", "dormant", "epoch", "fence"):
        assert f"- **{term}**: " in words, term
