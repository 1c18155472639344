"""A learner returning at the idle limit while another replica deletes the sandbox.

Two runtimes (two replicas, each its own loop thread and connections) share one PostgreSQL and
one Redis. A learner's sandbox reaches the idle limit; the learner comes back through replica A
exactly while replica B deletes it, the two started together with a varying stagger. Either the
wake wins (B sees the renewed lease and keeps everything) or the learner gets a new, working
sandbox and is told the old one was deleted after the idle limit. Never an error, never a
silent empty sandbox. Two ways B deletes it:

- "asleep on A": A served the sandbox and let it sleep; B's reaper finds its lease expired.
- "moved to A": B served the sandbox (it sleeps there) and the learner's reload lands on A, which
  never had it, while B's own lifecycle deletes it after the idle limit.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial

import pytest
from databases import fresh_database
from sqlalchemy import text

import source
from classroom.config import Settings
from classroom.runtime import Runtime
from classroom.sandboxes.sandbox import new_sandbox_id
from classroom.sandboxes.stores import SANDBOX_LEASE_TABLE

RACES = 30
IDLE_SECONDS = 3600.0  # long: nothing but the race deletes anything
STAGGERS_MS = [0, 1, 2, 4, 8]  # how much later one side starts than the other


@pytest.fixture
def replicas(settings, postgres_url, real_redis_url) -> Iterator[tuple[Runtime, Runtime]]:
    with fresh_database(postgres_url) as database_url:
        on_servers = Settings(
            **{
                **settings.__dict__,
                "database_url": database_url,
                "redis_url": real_redis_url,
                "sandbox_idle_seconds": IDLE_SECONDS,
                "sandbox_grace_seconds": IDLE_SECONDS,  # sleep only when the test says
            }
        )
        first = Runtime(on_servers)
        try:
            second = Runtime(on_servers)
            try:
                yield first, second
            finally:
                second.close()
        finally:
            first.close()


async def age_to_the_idle_limit(runtime: Runtime, sandbox_id: str) -> None:
    """The sandbox sleeps, unused since past the idle limit: here and in its lease."""
    registry = runtime.sandboxes
    sandbox = registry.get_existing(sandbox_id)
    assert sandbox is not None
    await registry.dormancy.sleep(sandbox)
    past = IDLE_SECONDS + 2 * registry.lease_renewal_seconds
    sandbox.last_used -= past
    sandbox.unheld_since -= past
    sandbox.lease_renewed_at -= past
    async with (await registry.store.engine()).begin() as connection:
        await connection.execute(
            text(
                f"UPDATE {SANDBOX_LEASE_TABLE} "
                "SET last_used = now() - make_interval(secs => :seconds) "
                "WHERE schema_name = :schema"
            ),
            {"schema": sandbox.location, "seconds": past},
        )


async def make_sandbox_with_a_user(runtime: Runtime, sandbox_id: str) -> str:
    sandbox = await runtime.sandboxes.acquire(sandbox_id, holder="before")
    user = await source.create_user(sandbox, email="mine@example.com", name="Mine")
    runtime.sandboxes.release_holder("before")
    await age_to_the_idle_limit(runtime, sandbox_id)
    return user.id


async def come_back(runtime: Runtime, sandbox_id: str, holder: str):
    """What the learner's page does on return: open the sandbox, read it, keep working."""
    sandbox = await runtime.sandboxes.acquire(sandbox_id, holder=holder)
    users = [user.id for user in await source.list_users(sandbox)]
    await source.create_user(sandbox, email="after@example.com", name="After")
    return users, sandbox.notice


def race(*sides) -> list[object]:
    """Run the sides at once (each in its own thread, on its own runtime): results or errors."""
    results: list[object] = [None] * len(sides)
    start = threading.Barrier(len(sides))

    def run(index, side):
        start.wait()
        try:
            results[index] = side()
        except Exception as error:  # an outcome to count, not a test failure by itself
            results[index] = error

    threads = [threading.Thread(target=run, args=pair) for pair in enumerate(sides)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def staggered(runtime: Runtime, coroutine_function, delay_seconds: float):
    def side():
        if delay_seconds:
            time.sleep(delay_seconds)  # a stagger between the two sides, not a wait for either
        return runtime.run(coroutine_function())

    return side


def test_thirty_wakes_racing_a_deletion_keep_the_sandbox_or_say_it_was_deleted(replicas):
    here, there = replicas  # the learner comes back through `here`; `there` deletes
    outcomes: Counter[str] = Counter()
    errors = []
    notices = set()
    for number in range(RACES):
        sandbox_id = new_sandbox_id()
        moved = number % 2 == 1
        owner = there if moved else here
        user_id = owner.run(make_sandbox_with_a_user(owner, sandbox_id))
        if moved:  # its lifecycle deletes what sat idle past the limit
            delete = there.sandboxes.sweep
        else:  # its reaper drops schemas whose lease expired and that it does not serve

            async def delete():
                return await there.sandboxes.reap_abandoned_schemas(
                    expired_after_seconds=IDLE_SECONDS
                )

        stagger = STAGGERS_MS[(number // 2) % len(STAGGERS_MS)] / 1000
        wake_delay, delete_delay = (stagger, 0.0) if number % 4 < 2 else (0.0, stagger)
        returned, deleted = race(
            staggered(here, partial(come_back, here, sandbox_id, f"learner-{number}"), wake_delay),
            staggered(there, delete, delete_delay),
        )
        if isinstance(returned, Exception) or isinstance(deleted, Exception):
            errors.append((number, returned, deleted))
            outcomes["error"] += 1
            continue
        users, notice = returned
        if users == [user_id]:
            outcomes["kept"] += 1
        elif users == [] and notice:
            outcomes["told it was deleted"] += 1
            notices.add(notice)
        else:
            outcomes["silent empty" if users == [] else "something else"] += 1
        here.run(here.sandboxes.release(sandbox_id))

    print(f"{RACES} races: {dict(outcomes)}; errors: {errors[:3]}")
    assert errors == []
    assert outcomes["silent empty"] == outcomes["something else"] == 0
    assert outcomes["kept"] + outcomes["told it was deleted"] == RACES
    assert all("deleted" in notice and "idle" in notice for notice in notices), notices
