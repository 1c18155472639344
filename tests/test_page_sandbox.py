"""The sidebar's sandbox panel and the class around it, driven through AppTest.

Each AppTest is one browser session: it holds its sandbox while it lives, as a connected tab does.
"""

from __future__ import annotations

import pytest
from pagetools import (
    as_shown,
    click,
    open_page,
    open_server_details,
    sidebar_text,
    start_app,
    text_input,
    texts,
)
from streamlit.testing.v1 import AppTest

import source
from classroom.browser import SANDBOX_STATE_KEY
from classroom.config import Settings, resolve_database_target
from classroom.runtime import get_runtime


def create_user(app: AppTest, *, email: str, name: str) -> None:
    open_page(app, "pages/data_models.py")
    text_input(app, "Email").input(email)
    text_input(app, "Name").input(name)
    click(app, "Create User")


def emails_in(sandbox_id: str) -> list[str]:
    return [user.email for user in get_runtime().lab(sandbox_id).run(source.list_users)]


@pytest.fixture
def class_of_two(monkeypatch, fresh_global_runtime):
    monkeypatch.setenv("QULAB_MAX_SANDBOXES", "2")


def test_a_third_learner_sees_the_class_is_full_and_the_first_two_keep_their_data(class_of_two):
    first, second = start_app(), start_app()
    create_user(first, email="first@example.com", name="First")
    create_user(second, email="second@example.com", name="Second")

    third = start_app()

    assert not third.exception
    assert [title.value for title in third.title] == ["The class is full"]
    shown = texts(third)
    assert "2 learners are working" in shown and "Every place" in shown and "minute" in shown
    assert "QULAB_" not in shown  # a learner cannot change the server's settings
    assert emails_in(first.session_state[SANDBOX_STATE_KEY]) == ["first@example.com"]
    assert emails_in(second.session_state[SANDBOX_STATE_KEY]) == ["second@example.com"]
    first.run()  # the first two still work as before
    assert not first.exception and "The class is full" not in [title.value for title in first.title]


def test_the_sidebar_says_the_link_is_the_key_and_shows_the_class(fresh_global_runtime):
    app = start_app()
    [label] = [caption for caption in app.sidebar.caption if caption.value == "**Your sandbox**"]
    key = label.proto.help  # the label's tooltip
    assert "?sandbox=" in key and "brings you back to it" in key and "anyone you give it" in key
    assert "private to this browser tab" not in key.lower()
    sidebar = sidebar_text(open_server_details(app))  # the class is in "Server details"
    assert "1 connected" in sidebar and "room for" in sidebar
    on_postgresql = (
        resolve_database_target(Settings.from_environment().database_url).kind == "postgresql"
    )
    assert (
        "pre-ping on" if on_postgresql else "pre-ping off"
    ) in sidebar  # a local file never drops a connection


def test_the_sidebar_offers_new_sandbox_and_reset_my_sandbox(fresh_global_runtime):
    # What the buttons call is tested in tests/test_sandboxes.py (reset_sandbox) and
    # tests/test_runtime.py (switch_to_new_sandbox): AppTest drops the sidebar after its first run.
    app = start_app()
    assert {"New sandbox", "Reset my sandbox"} <= {b.label for b in app.sidebar.button}


def test_an_unreachable_database_at_start_up_gets_quLabs_own_message(
    monkeypatch, fresh_global_runtime
):
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://alex:s3cr3t@127.0.0.1:1/qulab")
    app = start_app()
    assert not app.exception
    message = " ".join(as_shown(error.value) for error in app.error)
    assert "QuLab cannot start its data layer" in message and "did not answer" in message
    assert "127.0.0.1:1" in message and "DATABASE_URL" in message and "s3cr3t" not in message


def test_an_unreachable_redis_at_start_up_is_named_with_its_password_masked(
    monkeypatch, fresh_global_runtime
):
    monkeypatch.setenv("REDIS_URL", "redis://:s3cr3t@127.0.0.1:1/0")
    app = start_app()
    assert not app.exception
    warnings = [warning.value for warning in app.sidebar.warning]
    assert "Redis is not answering right now: reads come from the database." in warnings
    sidebar = sidebar_text(open_server_details(app))
    assert "did not answer" in sidebar and "127.0.0.1:1" in sidebar and "s3cr3t" not in sidebar
    # that server, probed until it answers: never an in-process fakeredis instead
    assert "a Redis server, not answering" in sidebar and "fakeredis" not in sidebar


# What "Server details" holds: none of it is drawn in the sidebar until the learner opens it.
SERVER_LINES = ("database", "pool", "redis", "breaker")


def test_the_sidebar_is_calm_until_server_details_is_opened(fresh_global_runtime):
    app = start_app()
    calm = sidebar_text(app)
    assert app.session_state[SANDBOX_STATE_KEY] in calm  # the sidebar is drawn
    assert [word for word in SERVER_LINES if word in calm.lower()] == []
    assert "QULAB_" not in calm and not app.sidebar.warning
    assert [expander.label for expander in app.sidebar.expander] == ["Server details"]

    details = sidebar_text(open_server_details(app))
    assert [word for word in SERVER_LINES if word not in details.lower()] == []
    assert "QULAB_" in details  # the settings a server's operator can change


def test_reset_my_sandbox_asks_first_and_deletes_nothing_yet(fresh_global_runtime):
    """Confirming ("Yes, reset my sandbox") reruns the dialog alone, which AppTest cannot do (it
    reruns the whole script, where the dialog is not opened): the browser suite confirms it."""
    app = start_app()
    get_runtime().lab(app.session_state[SANDBOX_STATE_KEY]).run(
        source.create_user, email="kept@example.com", name="Kept"
    )
    [reset] = [b for b in app.sidebar.button if b.label == "Reset my sandbox"]
    reset.click().run()
    assert not app.exception
    [dialog] = app.get("dialog")
    assert dialog.proto.dialog.title == "Reset your sandbox?"
    assert "your progress" in " ".join(str(m.value) for m in dialog.markdown)
    assert [b.label for b in dialog.button] == ["Yes, reset my sandbox"]
    assert emails_in(app.session_state[SANDBOX_STATE_KEY]) == ["kept@example.com"]
