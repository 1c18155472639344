"""The page a learner gets when QuLab cannot use its PostgreSQL: the cause and what to check, the
URL masked, no traceback. Real failures (tests/test_startup_errors.py has the API's side)."""

from __future__ import annotations

import pytest
from pagetools import as_shown, start_app
from sqlalchemy.engine import make_url
from test_startup_errors import (  # noqa: F401  (fixtures, by name)
    SECRET,
    password_checking_postgres,
    silent_port,
)

from classroom.runtime import shutdown_runtime

PREFIX = "QuLab cannot start its data layer: "


@pytest.fixture
def database_url(monkeypatch, fresh_global_runtime):
    """Set DATABASE_URL (and a short connect timeout) for the app's runtime."""
    monkeypatch.setenv("QULAB_DATABASE_CONNECT_TIMEOUT", "1")

    def use(url: str) -> None:
        shutdown_runtime()
        monkeypatch.setenv("DATABASE_URL", url)

    return use


def shown(app) -> str:
    assert not app.exception, [e.value for e in app.exception]
    everything = [str(e.value) for e in (*app.error, *app.warning, *app.markdown, *app.caption)]
    assert SECRET not in "\n".join(everything)
    [error] = [as_shown(e.value) for e in app.error if e.value.startswith(PREFIX)]
    return error


def test_a_wrong_password_is_named_on_the_page(database_url, request):
    url = make_url(request.getfixturevalue("password_checking_postgres")).set(password=SECRET)
    database_url(url.render_as_string(hide_password=False))
    message = shown(start_app())
    assert 'refused the password of user "postgres"' in message
    assert "DATABASE_URL" in message and "postgres:***@" in message


def test_a_server_that_never_answers_is_named_on_the_page(database_url, request):
    port = request.getfixturevalue("silent_port")
    database_url(f"postgresql+asyncpg://qulab:{SECRET}@127.0.0.1:{port}/qulab")
    message = shown(start_app())
    assert f"127.0.0.1:{port}" in message and "answers nothing at all" in message
    assert "QULAB_DATABASE_CONNECT_TIMEOUT" in message
