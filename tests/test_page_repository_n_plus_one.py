"""Section 3's page through AppTest: add scores, both fetch buttons, the scale-up comparison,
bad ids."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from pagetools import (
    button,
    click,
    initialize_in_section_2,
    lab_of,
    markdown_tables,
    open_page,
    start_app,
    text_input,
    texts,
)
from streamlit.testing.v1 import AppTest

import source
from classroom.demos.n_plus_one import (
    SCALE_UP_SCORES_PER_USER,
    count_scale_up_users,
    list_users_with_score_counts,
)
from classroom.sandboxes.reset import initialize_sandbox
from pages.common.formatting import score_as_row

PAGE = "pages/repository_n_plus_one.py"
ADD = "Add 3 Sample Scores for User"
NAIVE = "Fetch User & Scores (Simulated N+1)"
EAGER = "Fetch User & Scores (Eager Loading)"
COMPARE = "Compare Loading Strategies"
UNKNOWN_ID = "3f2b9c1e-8d4a-4c7e-9b1f-2a6d5e8c0f11"


@pytest.fixture
def app(fresh_global_runtime) -> AppTest:
    """A browser session whose sandbox holds the sample users, on this section's page."""
    app = start_app()
    lab_of(app).run(initialize_sandbox)
    return open_page(app, PAGE)


def sample_user_id(app: AppTest, name: str) -> str:
    listed = lab_of(app).run(list_users_with_score_counts)
    return next(user.id for user in listed.users if user.name == name)


def scores_of(app: AppTest, user_id: str) -> list[source.AIRScore]:
    _, scores = lab_of(app).run(source.fetch_user_and_scores_eager, user_id=user_id)
    return scores


def metric_values(app: AppTest, label: str) -> list[str]:
    """Each fetch's measured value under `label` (its one-row table), left to right."""
    return [table[0][label] for table in markdown_tables(app) if table and label in table[0]]


def score_tables(app: AppTest) -> list[pd.DataFrame]:
    """The tables of scores the page shows (their columns as the page names them)."""
    return [
        pd.DataFrame(table) for table in markdown_tables(app) if table and "air_score" in table[0]
    ]


def test_the_pick_list_fills_the_id_and_add_scores_writes_three_valid_scores(app):
    alex = sample_user_id(app, "Alex Smith")
    app.selectbox[0].set_value(alex).run()
    assert text_input(app, "User ID").value == alex
    click(app, ADD)
    assert any("Added 3 sample scores" in message.value for message in app.success)
    stored = scores_of(app, alex)
    assert len(stored) == 3 and all(
        score.ci_lower <= score.air_score <= score.ci_upper for score in stored
    )
    assert sorted(score_tables(app)[0]["id"]) == sorted(score.id for score in stored)
    assert scores_of(app, sample_user_id(app, "Jane Doe")) == []
    listed = app.dataframe[0].value.set_index("name")["scores"].to_dict()
    assert listed == {
        "Alex Smith": 3,
        "Jane Doe": 0,
    }  # the list above the button is already up to date


def test_both_fetch_buttons_show_the_user_the_scores_every_statement_and_the_time(app):
    alex = sample_user_id(app, "Alex Smith")
    lab_of(app).run(source.add_sample_scores, user_id=alex)
    text_input(app, "User ID").input(alex).run()
    click(app, NAIVE)
    assert metric_values(app, "SQL statements") == ["5"]
    assert "1 + 1 + N with N = 3" in texts(app)
    sql = "\n".join(code.value for code in app.code if code.language == "sql")
    assert sql.count("-- statement ") == 5 and sql.count("air_scores.id = ") == 3
    click(app, EAGER)
    assert metric_values(app, "SQL statements") == ["5", "2"]  # both results stay side by side
    assert all(value.endswith(" ms") for value in metric_values(app, "Time taken"))
    stored = scores_of(app, alex)
    [table] = score_tables(app)  # one full-width table: both fetches read the same rows
    assert table["id"].tolist() == [score.id for score in stored]
    assert list(table.columns) == [
        "id",
        "air_score",
        "vr_score",
        "hr_score",
        "synergy_score",
        "ci_lower",
        "ci_upper",
    ]
    assert table["air_score"].tolist() == [
        str(score.air_score) for score in stored
    ]  # as stored, not padded
    assert "Alex Smith" in texts(app)
    assert not app.error


def test_a_new_invalid_id_does_not_keep_the_previous_fetch(app):
    alex = sample_user_id(app, "Alex Smith")
    text_input(app, "User ID").input(alex).run()
    click(app, NAIVE)
    assert metric_values(app, "SQL statements") == ["2"]  # 1 + 1 + N with N = 0
    text_input(app, "User ID").input(UNKNOWN_ID).run()
    # the old result is not shown under the new id
    assert not metric_values(app, "SQL statements") and not score_tables(app)
    click(app, NAIVE)
    assert any("No user has the id" in error.value for error in app.error)
    assert not metric_values(app, "SQL statements") and not score_tables(app)


def test_an_id_removed_by_initialize_is_named_as_such(app):
    alex = sample_user_id(
        app, "Alex Smith"
    )  # listed on this page, then initialize starts the sandbox fresh
    lab_of(app).run(initialize_sandbox)
    text_input(app, "User ID").input(alex).run()
    assert any("section 2's initialize starts it fresh" in warning.value for warning in app.warning)
    text_input(app, "User ID").input(
        sample_user_id(app, "Alex Smith")
    ).run()  # the new Alex is fine
    assert not app.warning


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("", "Enter a user id"),
        ("not-a-uuid", "not a valid user id"),
        ("'; DROP TABLE users; --", "not a valid user id"),
        (UNKNOWN_ID, "No user has the id"),
    ],
)
def test_bad_ids_get_a_clear_message_and_nothing_is_written(app, typed, message):
    text_input(app, "User ID").input(typed).run()
    for label in (ADD, NAIVE, EAGER):
        click(app, label)
        assert [error.value for error in app.error if message in error.value], [
            e.value for e in app.error
        ]
    assert not app.success and not metric_values(app, "SQL statements")
    assert lab_of(app).run(source.count_rows)["air_scores"] == 0


def test_the_scale_up_comparison_creates_users_and_shows_measured_counts(app):
    app.multiselect[0].set_value([10, 50]).run()
    click(app, COMPARE)
    assert lab_of(app).run(count_scale_up_users) == 50
    assert any("exactly the same users" in message.value for message in app.success)
    rows = app.table[0].value
    assert set(rows["median ms"].map(lambda text: len(text.split(".")[1]))) == {
        1
    }  # one decimal, no padding
    encoding = json.loads(app.get("vega_lite_chart")[0].proto.spec)["encoding"]
    assert (
        encoding["x"]["scale"] == encoding["y"]["scale"] == {"type": "log"}
    )  # N = 10 and 100 stay apart
    assert encoding["x"]["axis"]["labelLimit"] == 0  # labels are never cut short
    counts = {(row["N (users)"], row["strategy"]): row["statements"] for _, row in rows.iterrows()}
    assert counts == {
        (n, strategy): expected
        for n in (10, 50)
        for strategy, expected in (
            ("lazy", 1 + n),
            ("selectinload", 2),
            ("joinedload", 1),
            ("subqueryload", 2),
        )
    }
    assert set(rows["scores loaded"]) == {
        10 * SCALE_UP_SCORES_PER_USER,
        50 * SCALE_UP_SCORES_PER_USER,
    }
    listed = lab_of(app).run(list_users_with_score_counts)
    assert [user.name for user in listed.users] == ["Alex Smith", "Jane Doe"]

    click(app, "Remove Scale-up Users")
    assert any("Removed 50 scale-up users" in message.value for message in app.success)
    assert lab_of(app).run(source.count_rows)["users"] == 2


def test_the_page_explains_what_to_do_when_the_sandbox_is_empty(fresh_global_runtime):
    app = open_page(start_app(), PAGE)
    assert "no users yet" in texts(app)
    assert button(app, ADD) and button(app, NAIVE) and button(app, EAGER)


def test_the_score_table_shows_each_part_as_stored_whole_numbers_included():
    score = source.AIRScore(
        id="s", air_score=71.0, vr_score=65.5, hr_score=80, synergy_score=0.0,
        ci_lower=66.9, ci_upper=75.1,
    )  # fmt: skip
    row = score_as_row(score)
    assert row == {
        "id": "s",
        "air_score": "71.0",
        "vr_score": "65.5",
        "hr_score": "80.0",
        "synergy_score": "0.0",
        "ci_lower": "66.9",
        "ci_upper": "75.1",
    }


def test_a_comparison_whose_users_were_deleted_since_is_not_shown_again(app):
    app.multiselect[0].set_value([10]).run()
    click(app, COMPARE)
    assert [table for table in app.table if "strategy" in table.value.columns]

    initialize_in_section_2(app)  # deletes the scale-up users with everything else
    open_page(app, PAGE)
    assert not [table for table in app.table if "strategy" in table.value.columns]
    assert not app.get("vega_lite_chart")
    assert any("comparison's users are gone" in info.value for info in app.info)
    assert lab_of(app).run(count_scale_up_users) == 0


def test_no_email_is_drawn_as_markdown_where_it_would_become_a_link(app):
    """Markdown turns a bare email into a mailto: link, escaped or not: a learner's email is
    drawn as plain text or in a table, never in Markdown."""
    alex = sample_user_id(app, "Alex Smith")
    lab_of(app).run(source.add_sample_scores, user_id=alex)
    text_input(app, "User ID").input(alex).run()
    click(app, NAIVE)
    email = next(u.email for u in lab_of(app).run(source.list_users) if u.id == alex)
    assert email in texts(app)  # shown
    assert not [m.value for m in app.markdown if "innovateai" in str(m.value).replace("\\", "")]
