"""qulab_turns: at most N reruns run Python at once, first come first served; waiting for the loop gives a turn up.

Real threads throughout; what is checked is who was inside a turn at the same moment and in
which order waiting threads got theirs, never how long anything took.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import qulab_turns
import source


def wait_until(condition, *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition still false"
        time.sleep(0.005)


def in_a_turn(turns: qulab_turns.ScriptTurns, action) -> threading.Thread:
    """A thread that runs `action` once it has a turn."""

    def run() -> None:
        with turns.turn():
            action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_no_more_threads_than_turns_run_at_once():
    turns = qulab_turns.ScriptTurns(2)
    inside, most, lock = 0, 0, threading.Lock()

    def rerun() -> None:
        nonlocal inside, most
        with turns.turn():
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.01)
            with lock:
                inside -= 1

    threads = [threading.Thread(target=rerun) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert 1 <= most <= 2 and inside == 0 and turns.waiting == 0


def test_waiting_threads_get_their_turn_in_the_order_they_arrived():
    turns = qulab_turns.ScriptTurns(1)
    order: list[int] = []
    with turns.turn():
        threads = []
        for number in range(4):
            thread = in_a_turn(turns, lambda n=number: order.append(n))
            wait_until(lambda n=number: turns.waiting == n + 1)
            threads.append(thread)
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3]


def test_a_thread_that_gives_its_turn_up_lets_another_run_then_gets_one_again():
    turns = qulab_turns.ScriptTurns(1)
    other_ran = threading.Event()
    with turns.turn():
        with turns.given_up():
            other = in_a_turn(turns, other_ran.set)
            assert other_ran.wait(10)
        assert turns.held
    other.join(10)
    assert not turns.held and turns.waiting == 0


def test_a_turn_is_reentrant_and_given_back_on_an_exception():
    turns = qulab_turns.ScriptTurns(1)
    with pytest.raises(RuntimeError):
        with turns.turn():
            with turns.turn():
                raise RuntimeError("a rerun stopped (st.stop, st.rerun)")
    assert not turns.held
    with turns.turn():  # the turn came back: this would wait forever otherwise
        assert turns.held


def test_a_rerun_waiting_for_the_runtimes_loop_gives_its_turn_to_another(runtime):
    """Every turn is taken; one holder waits in Runtime.run for work that needs a turn itself."""
    turns = source.SCRIPT_TURNS
    holders_in, release_holders = threading.Barrier(turns.slots), threading.Event()

    def hold_a_turn() -> None:
        with turns.turn():
            holders_in.wait(10)
            release_holders.wait(10)

    holders = [threading.Thread(target=hold_a_turn) for _ in range(turns.slots - 1)]
    for holder in holders:
        holder.start()

    def take_a_turn() -> str:
        with turns.turn():
            return "ran"

    try:
        with turns.turn():
            holders_in.wait(10)  # every turn is held now, one by this thread
            assert runtime.run(asyncio.to_thread(take_a_turn), timeout=10) == "ran"
    finally:
        release_holders.set()
        for holder in holders:
            holder.join(10)


def test_a_rerun_coming_back_from_a_wait_goes_before_reruns_not_yet_started():
    turns = qulab_turns.ScriptTurns(1)
    order: list[str] = []
    waiting_for_the_loop, loop_answered = threading.Event(), threading.Event()

    def under_way() -> None:
        with turns.given_up():  # as in Runtime.run
            waiting_for_the_loop.set()
            loop_answered.wait(10)
        order.append("under way")

    runner = in_a_turn(turns, under_way)
    assert waiting_for_the_loop.wait(10)
    with turns.turn():  # the turn it gave up
        newcomer = in_a_turn(turns, lambda: order.append("newcomer"))
        wait_until(lambda: turns.waiting == 1)
        loop_answered.set()
        wait_until(lambda: turns.waiting == 2)  # both wait: the newcomer came first
    runner.join(10)
    newcomer.join(10)
    assert order == ["under way", "newcomer"]


def test_a_rerun_holding_a_lock_across_a_wait_never_deadlocks_the_reruns_waiting_for_that_lock():
    """The case get_runtime once had: the turns' holders wait for a lock a waiting rerun holds."""
    turns = qulab_turns.ScriptTurns(2)
    shared, lock_taken, loop_answered = threading.Lock(), threading.Event(), threading.Event()
    finished: list[str] = []

    def starts_the_runtime() -> None:
        with shared:
            lock_taken.set()
            with turns.given_up():  # waits for the loop, lock held
                loop_answered.wait(10)
        finished.append("starter")

    def needs_the_runtime(name: str) -> None:
        with shared:
            finished.append(name)

    starter = in_a_turn(turns, starts_the_runtime)
    assert lock_taken.wait(10)
    others = [in_a_turn(turns, lambda n=name: needs_the_runtime(n)) for name in ("a", "b")]
    wait_until(lambda: turns._free == 0)  # both turns held by reruns blocked on the lock
    loop_answered.set()
    for thread in (starter, *others):
        thread.join(10)
        assert not thread.is_alive()
    assert sorted(finished) == ["a", "b", "starter"]
