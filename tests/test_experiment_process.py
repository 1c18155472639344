"""Long experiments run in a process of their own, one at a time; a dead one is a clear error."""

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

import source
from classroom.demos.eventing import store_airscore_burst
from classroom.demos.n_plus_one import (
    SCALE_UP_SCORES_PER_USER,
    compare_loading_strategies,
    grow_scale_up_users,
)
from classroom.demos.pooling import run_pool_experiment
from classroom.errors import UnexpectedError
from classroom.experiments import HeavyWorkPacer, experiment_worker


async def until(condition, seconds: float = 60.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


async def test_the_comparison_runs_in_another_process_and_counts_the_same_statements(sandbox):
    await grow_scale_up_users(sandbox, target_users=30)
    worker = experiment_worker()
    worker.close()
    comparison = await compare_loading_strategies(sandbox, sizes=[30], repeats=1)
    assert worker.process_id not in (None, os.getpid())  # the comparison started it
    assert {run.strategy: run.statements for run in comparison.at(30).values()} == {
        "lazy": 31, "selectinload": 2, "joinedload": 1, "subqueryload": 2,
    }  # fmt: skip
    assert comparison.identical_results and {run.scores for run in comparison.runs} == {
        30 * SCALE_UP_SCORES_PER_USER
    }


async def test_a_refusal_inside_the_experiment_process_reaches_the_caller_as_it_was(sandbox):
    await grow_scale_up_users(sandbox, target_users=5)
    with pytest.raises(source.ValidationError, match="Only 5 scale-up users") as refused:
        await compare_loading_strategies(sandbox, sizes=[6], repeats=1)
    assert refused.value.field == "users"


async def test_experiments_queue_one_at_a_time(sandbox_with_users, tmp_path):
    """An experiment arriving while another runs waits for it whole, however quick either is."""
    worker = experiment_worker()
    fifo = tmp_path / "hold"
    os.mkfifo(fifo)
    # The first occupant reads a named pipe: it runs, in the experiment process, until we write.
    holding = asyncio.create_task(worker.run(Path.read_text, self=fifo))
    writer: list[int] = []

    def release() -> bool:  # opens once the experiment process has the pipe open for reading
        try:
            writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            return False
        os.write(writer[0], b"go")
        os.close(writer[0])
        return True

    try:
        await until(lambda: worker.queued == 1)
        second = asyncio.create_task(
            run_pool_experiment(sandbox_with_users, requests=50, concurrency=5, pool_size=2)
        )
        await until(lambda: worker.queued == 2)
        held_from = time.monotonic()
        await asyncio.wait({second}, timeout=0.5)
        assert not second.done()  # half a second in line, behind the first
        await until(release)
        held_seconds = time.monotonic() - held_from
    finally:
        if not writer:
            worker.close()
    (text, _), pooling = await asyncio.gather(holding, second)
    assert text == "go" and worker.queued == 0
    assert pooling.waited_seconds >= held_seconds >= 0.5  # it waited for the first, whole
    assert pooling.pooled.requests == pooling.unpooled.requests == 50


async def test_a_killed_experiment_process_is_a_clear_error_and_the_next_one_starts_a_new_process(
    sandbox,
):
    await grow_scale_up_users(sandbox, target_users=1000, max_new_users=1000)
    worker = experiment_worker()
    worker.close()
    running = asyncio.create_task(compare_loading_strategies(sandbox, sizes=[1000], repeats=20))
    await until(lambda: worker.process_id is not None)
    dead = worker.process_id
    os.kill(dead, signal.SIGKILL)
    with pytest.raises(UnexpectedError, match="experiment process stopped"):
        await running
    comparison = await compare_loading_strategies(sandbox, sizes=[10], repeats=1)
    assert worker.process_id not in (None, dead)
    assert comparison.at(10)["lazy"].statements == 11


async def test_a_paced_experiment_rests_between_slices_and_no_unit_runs_during_a_rest():
    pacer = HeavyWorkPacer(slice_seconds=0.01, rest_ratio=1.0)
    seen_resting, four_at_a_time = [], asyncio.Semaphore(4)

    async def unit() -> None:
        async with four_at_a_time, pacer.unit():
            seen_resting.append(pacer.resting)
            await asyncio.sleep(0.002)
            seen_resting.append(pacer.resting)

    await asyncio.gather(*(unit() for _ in range(60)))
    assert pacer.rests >= 1 and pacer.rested_seconds > 0
    assert len(seen_resting) == 120 and not any(seen_resting)


async def test_a_paced_burst_still_commits_every_write_with_its_event(sandbox_with_users):
    sandbox = sandbox_with_users
    burst = await store_airscore_burst(sandbox, count=60)
    assert (burst.writes, burst.failed) == (60, 0)
    rows = await source.count_rows(sandbox)
    assert (rows["air_scores"], rows["domain_events"]) == (60, 60)
