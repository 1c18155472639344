"""Two app processes behind HAProxy (deploy/serve.py, deploy/haproxy.cfg) on PostgreSQL + Redis:
each browser sticks to one process by its cookie, and when that process is killed, the learner
on it is sent to the other one, reconnects, and finds their rows.

Kept short (one learner on each process): the class-sized version is bench/classroom.py
--haproxy --kill-at.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import servers
from playwright.sync_api import Page

from .browsertools import (
    AppServer,
    click,
    fill,
    fresh_visitor,
    main_text,
    open_page,
    sandbox_id,
    shown_ids,
    wait_until,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
from serve import SERVER_COOKIE, ClassServers, serve_class  # noqa: E402  (deploy/serve.py)

pytestmark = pytest.mark.e2e
RECONNECT_SECONDS = 30.0  # the frontend retries with a backoff; HAProxy notices within ~2 s


@dataclass
class Class:
    """The processes, HAProxy, and an AppServer view of HAProxy for the browser helpers."""

    servers: ClassServers
    front: AppServer


@pytest.fixture
def two_processes(postgres_url: str, real_redis_url: str) -> Iterator[Class]:
    if not Path("/usr/sbin/haproxy").exists():
        servers.unavailable("HAProxy is not installed (apt-get install haproxy)")
    environment = {"DATABASE_URL": postgres_url, "REDIS_URL": real_redis_url}
    with serve_class(2, environment=environment) as running:
        front = AppServer(running.url, running.haproxy, running.workspace / "haproxy.log",
                          postgres_url, None)  # fmt: skip
        yield Class(running, front)


def server_of(page: Page) -> str:
    """The process HAProxy keeps this browser on ("app1", "app2"), from its cookie."""
    cookies = {cookie["name"]: cookie["value"] for cookie in page.context.cookies()}
    return cookies[SERVER_COOKIE]


def create_user(page: Page, email: str) -> str:
    """Create a user with section 1's form; return the new user's id, as the page shows it."""
    fill(page, "Email", email)
    fill(page, "Name", "Replica Learner")
    click(page, "Create User")
    [user_id] = shown_ids(page)
    return user_id


def test_a_learner_whose_process_dies_is_sent_to_the_other_and_finds_their_rows(
    browser, two_processes
):
    front = two_processes.front
    with fresh_visitor(browser) as first, fresh_visitor(browser) as second:
        for page in (first, second):
            open_page(page, front, "data_models")
        # Round robin: the two browsers are on different processes, and each stays on its own.
        assert {server_of(first), server_of(second)} == {"app1", "app2"}
        victim, survivor = (first, second) if server_of(first) == "app1" else (second, first)
        sandbox = sandbox_id(victim)
        email = f"victim.{sandbox}@example.com"
        user_id = create_user(victim, email)
        assert f"User {user_id} created" in main_text(victim)

        connection_before = victim.qulab_runs  # type: ignore[attr-defined]
        two_processes.servers.kill_app(1)  # SIGKILL: no shutdown, as in a crash

        # The tab reconnects by itself, through HAProxy, to the other process: a new websocket,
        # and a new Streamlit session there that has never drawn this page.
        wait_until(
            victim,
            "the tab's reconnect after its process died",
            lambda: victim.qulab_runs is not connection_before,  # type: ignore[attr-defined]
            timeout_seconds=RECONNECT_SECONDS,
        )
        # The learner's next click, inside a demo, works at once (pages/common/reconnect.py):
        # the other process opens the same sandbox from PostgreSQL and writes into it.
        second_id = create_user(victim, f"after.{sandbox}@example.com")
        assert two_processes.servers.apps[0].poll() is not None  # so the other process drew it
        assert sandbox_id(victim) == sandbox
        assert sorted(front.stored_users(sandbox)) == sorted(
            [(user_id, email), (second_id, f"after.{sandbox}@example.com")]
        )
        # Its progress, read there from its journal, still shows the first user (and its row).
        shown = main_text(victim)
        assert f"User {user_id} created" in shown and "deleted since" not in shown
        # The learner on the surviving process never noticed.
        create_user(survivor, f"second.{sandbox_id(survivor)}@example.com")
        assert len(front.stored_users(sandbox_id(survivor))) == 1
