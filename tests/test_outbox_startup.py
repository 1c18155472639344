"""At start-up the runtime asks the broker how it persists, so the sidebar and the outbox page say
from the first render whether a broker restart could lose events (not after some first use)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import servers
from pagetools import open_page, open_server_details, sidebar_text, start_app, texts

from classroom.outbox.status import broker_durability
from classroom.runtime import Runtime
from classroom.sandboxes.sandbox import new_sandbox_id


@pytest.fixture(params=[False, True], ids=["no-persistence", "append-only-file"])
def redis_process(request) -> Iterator[servers.RedisProcess]:
    process = servers.RedisProcess(persistent=request.param).start()
    try:
        yield process
    finally:
        process.close()


def test_the_runtime_reads_the_brokers_persistence_before_any_sandbox_opens(
    settings, redis_process
):
    runtime = Runtime(replace(settings, redis_url=redis_process.url))
    try:
        durability = runtime.broker_durability  # set by start-up itself
        assert sum(runtime.sandboxes.counts().values()) == 0  # nobody has opened anything yet
        if redis_process.persistent:
            assert durability.kind == "aof" and not durability.restart_can_lose_events
        else:
            assert durability.kind == "none" and durability.restart_can_lose_events
        lab = runtime.lab(new_sandbox_id())
        assert lab.run(broker_durability) == durability  # what the pages read is that answer
        lab.close()
    finally:
        runtime.close()


def test_the_first_render_says_a_broker_restart_could_lose_events(
    monkeypatch, fresh_global_runtime
):
    process = servers.RedisProcess(persistent=False).start()
    try:
        monkeypatch.setenv("REDIS_URL", process.url)
        app = open_server_details(start_app())  # the sidebar's details, as a learner opens them
        assert not app.exception
        assert "persists nothing" in sidebar_text(app)
        page = texts(open_page(app, "pages/eventing_outbox.py"))
        assert "if it restarts, events it holds for the consumer are lost" in page
    finally:
        process.close()
