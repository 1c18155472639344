"""The sidebar's sandbox panel and the class around it, driven through AppTest.

Each AppTest is one browser session: it holds its sandbox while it lives, as a connected tab does.
"""

from __future__ import annotations

import pytest
from pagetools import click, open_page, start_app, text_input, texts
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
    assert "2 learners are working" in shown and "room for 2" in shown and "minute" in shown
    assert emails_in(first.session_state[SANDBOX_STATE_KEY]) == ["first@example.com"]
    assert emails_in(second.session_state[SANDBOX_STATE_KEY]) == ["second@example.com"]
    first.run()  # the first two still work as before
    assert not first.exception and "The class is full" not in [title.value for title in first.title]


def test_the_sidebar_says_the_link_is_the_key_and_shows_the_class(fresh_global_runtime):
    app = start_app()
    sidebar = " ".join(str(caption.value) for caption in app.sidebar.caption)
    assert "is the key to this sandbox" in sidebar and "?sandbox=" in sidebar
    assert "private to this browser tab" not in sidebar.lower()
    assert "1 active" in sidebar and "room for" in sidebar
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
    message = " ".join(error.value for error in app.error)
    assert "QuLab cannot start its data layer" in message and "did not answer" in message
    assert "127.0.0.1:1" in message and "DATABASE_URL" in message and "s3cr3t" not in message


def test_an_unreachable_redis_at_start_up_is_named_with_its_password_masked(
    monkeypatch, fresh_global_runtime
):
    monkeypatch.setenv("REDIS_URL", "redis://:s3cr3t@127.0.0.1:1/0")
    app = start_app()
    assert not app.exception
    sidebar = " ".join(str(caption.value) for caption in app.sidebar.caption)
    assert "did not answer" in sidebar and "127.0.0.1:1" in sidebar and "s3cr3t" not in sidebar
