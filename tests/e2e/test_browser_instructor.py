"""The instructor's page in Chromium, with a class at different steps.

Three learners: two in browsers, one scripted over Streamlit's websocket (tests/streamlit_socket.py,
as the benchmarks' simulated learners are). The instructor page must show the exact funnel and
who is stuck (QULAB_STUCK_MINUTES is 3 s here), a posted message must reach a learner's page
within 5 s as plain text, and nothing of a learner's own data (emails, row ids, sandbox links)
may appear anywhere in the instructor's page. On PostgreSQL + Redis, learners of two app
processes appear on one instructor page. Each test is a class of its own (QULAB_CLASS).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs

import pytest
from streamlit_socket import StreamlitTab

from classroom.config import resolve_database_target
from classroom.progress.steps import STEPS

from .browsertools import (
    _query_postgres,
    alerts,
    click,
    fill,
    fresh_visitor,
    go_to_section,
    main_text,
    metrics,
    open_expander,
    open_page,
    sandbox_id,
    sidebar_text,
    start_app_server,
    tables,
    wait_until,
)

pytestmark = pytest.mark.e2e

KEY = "an instructor key for the browser suite"
INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
FUNNEL_COLUMN = "learners who completed it"
TITLES = {step.key: step.title for step in STEPS}


def default_name(sandbox: str) -> str:
    return "Learner " + hashlib.sha256(sandbox.encode()).hexdigest()[:6]


def class_environment(**more: str) -> dict[str, str]:
    return {
        "QULAB_INSTRUCTOR_KEY": KEY,
        "QULAB_CLASS": f"e2e{secrets.token_hex(4)}",
        "QULAB_STUCK_MINUTES": "0.05",  # 3 s
        **more,
    }


def drop_class_tables(database_url: str | None, class_name: str) -> None:
    """The test's class tables go (PostgreSQL; a SQLite class file goes with its process)."""
    target = resolve_database_target(database_url)
    if target.kind == "postgresql":
        for table in ("roster", "servers", "message"):
            _query_postgres(target, f"DROP TABLE IF EXISTS qulab_class_{class_name}_{table}")


class ScriptedLearner:
    """A learner with no browser: a websocket tab on its own loop thread, held open (so its
    sandbox stays active) until closed."""

    def __init__(self, port: int) -> None:
        self.tab = StreamlitTab(port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def do(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(120)

    def initialize(self) -> str:
        """Open the app, go to section 2 and press its initialize button; the sandbox id."""
        self.do(self.tab.open())
        page = self.do(self.tab.go_to("connectivity_pooling"))
        pressed = self.do(self.tab.press(page, INITIALIZE))
        assert not pressed.errors, pressed.errors
        return parse_qs(self.tab.query_string)["sandbox"][0]

    def close(self) -> None:
        self.do(self.tab.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def scripted_learner(port: int) -> Iterator[ScriptedLearner]:
    learner = ScriptedLearner(port)
    try:
        yield learner
    finally:
        learner.close()


def create_user(page, email: str) -> None:
    go_to_section(page, "1. Data Models")
    fill(page, "Email", email)
    fill(page, "Name", "A Learner")
    click(page, "Create User")


def enter_as_instructor(page, server) -> None:
    open_page(page, server, "instructor", framed=False)
    fill(page, "Instructor key", KEY)
    page.get_by_role("button", name="Enter", exact=True).click()  # no sidebar links to wait for
    wait_until(page, "the class at a glance", lambda: "Where the class is" in main_text(page))


def post_to_the_class(page, message: str) -> float:
    """Post a message from the instructor's page; when the page showed it was posted."""
    fill(page, "Message to the class", message)
    page.get_by_role("button", name="Post to the class", exact=True).click()
    wait_until(page, "the message posted", lambda: message in main_text(page))
    return time.monotonic()


def funnel(page) -> dict[str, str]:
    found = [rows for rows in tables(page) if rows and FUNNEL_COLUMN in rows[0]]
    return {row["step"]: row[FUNNEL_COLUMN] for row in found[0]} if found else {}


def stuck(page) -> set[tuple[str, str]]:
    found = [rows for rows in tables(page) if rows and "for" in rows[0]]
    return {(row["learner"], row["step"]) for row in found[0]} if found else set()


def expected_funnel(done: list[set[str]]) -> dict[str, str]:
    return {
        step.title + (" (optional)" if step.optional else ""): str(
            sum(step.key in steps for steps in done)
        )
        for step in STEPS
    }


def class_message(page) -> list[str]:
    return [text for text in alerts(page, "info") if "From your instructor" in text]


def test_the_instructor_sees_the_exact_funnel_who_is_stuck_and_no_learners_data(browser):
    environment = class_environment()
    with (
        start_app_server(environment) as server,
        fresh_visitor(browser) as ada,
        fresh_visitor(browser) as bea,
        fresh_visitor(browser) as instructor,
        scripted_learner(int(server.url.rsplit(":", 1)[1])) as cy,
    ):
        try:
            open_page(ada, server)
            create_user(ada, "ada.e2e@example.com")
            open_expander(ada, "What your instructor sees")
            fill(ada, "Display name", "Ada")
            click(ada, "Save name")
            assert "Name: Ada" in sidebar_text(ada)
            open_page(bea, server)
            create_user(bea, "bea.e2e@example.com")
            go_to_section(bea, "2. DB Connectivity & Pooling")
            click(bea, INITIALIZE)
            cy_sandbox = cy.initialize()
            bea_sandbox, ada_sandbox = sandbox_id(bea), sandbox_id(ada)

            enter_as_instructor(instructor, server)
            done = [{"create_user"}, {"create_user", "initialize"}, {"initialize"}]
            wait_until(
                instructor,
                "the exact funnel",
                lambda: funnel(instructor) == expected_funnel(done),
            )
            everyone_stuck = {
                ("Ada", TITLES["initialize"]),
                (default_name(bea_sandbox), TITLES["add_scores"]),
                (default_name(cy_sandbox), TITLES["create_user"]),
            }
            wait_until(instructor, "who is stuck", lambda: stuck(instructor) == everyone_stuck)
            assert metrics(instructor) == {"Active": "3", "Idle": "0", "Dormant": "0"}

            shown = instructor.content() + main_text(instructor)
            learners_data = [ada_sandbox, bea_sandbox, cy_sandbox, "@example.com"]
            for sandbox in (ada_sandbox, bea_sandbox, cy_sandbox):
                learners_data += [row_id for row_id, _ in server.stored_users(sandbox)]
            assert [data for data in learners_data if data in shown] == []
            with instructor.expect_download() as pending:
                instructor.get_by_role("button", name="Download the class's progress (CSV)").click()
            exported = pending.value.path().read_text()
            assert exported.count("\n") == 1 + 4  # the header, then one line per completed step
            assert [data for data in learners_data if data in exported] == []

            message = "**Break** until <b>11:00</b>"
            posted = post_to_the_class(instructor, message)
            wait_until(ada, "the message", lambda: class_message(ada))
            assert time.monotonic() - posted <= 5
            assert class_message(ada) == [f"From your instructor: {message}"]  # shown as typed
            click(ada, "Dismiss")
            wait_until(ada, "the message dismissed", lambda: class_message(ada) == [])
        finally:
            drop_class_tables(server.database_url, environment["QULAB_CLASS"])


def test_on_postgresql_learners_on_two_app_processes_appear_on_one_instructor_page(
    browser, postgres_url, real_redis_url
):
    environment = class_environment(DATABASE_URL=postgres_url, REDIS_URL=real_redis_url)
    with (
        start_app_server(environment) as first,
        start_app_server(environment) as second,
        fresh_visitor(browser) as here,
        fresh_visitor(browser) as there,
        fresh_visitor(browser) as instructor,
    ):
        try:
            open_page(here, first)
            create_user(here, "here.e2e@example.com")
            open_page(there, second)

            enter_as_instructor(instructor, first)
            wait_until(
                instructor,
                "both processes' learners",
                lambda: (
                    funnel(instructor) == expected_funnel([{"create_user"}, set()])
                    and metrics(instructor)["Active"] == "2"
                ),
            )
            assert "Every server's learners: 2 servers share this class." in main_text(instructor)

            posted = post_to_the_class(instructor, "Hello from the first server")
            wait_until(there, "the message on the other process", lambda: class_message(there))
            assert time.monotonic() - posted <= 5
            assert class_message(there) == ["From your instructor: Hello from the first server"]
        finally:
            drop_class_tables(postgres_url, environment["QULAB_CLASS"])
