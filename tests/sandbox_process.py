"""A QuLab process for tests that need one to die, or to run beside another one.

    python tests/sandbox_process.py hold 3      # 3 sandboxes with data and Redis keys, held
    python tests/sandbox_process.py pool 3      # on "go": 3 pool experiments at their maximum

Settings come from the environment, as the app's do (DATABASE_URL, REDIS_URL, QULAB_*). Each
mode prints one JSON line when it is ready, then reads stdin: `hold` waits for "close" (a clean
shutdown; SIGKILL is a crash), `pool` waits for "go", runs its experiments at once (as learners
pressing the button together), prints their outcomes as a second JSON line, and stops on
"stop".
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from classroom.demos.caching import create_cache_demo_user, fetch_user_cached  # noqa: E402
from classroom.demos.pooling import run_pool_experiment  # noqa: E402
from classroom.runtime import Runtime  # noqa: E402
from classroom.sandboxes.admission import MAX_POOL_EXPERIMENT_CONCURRENCY  # noqa: E402
from classroom.sandboxes.reset import initialize_sandbox  # noqa: E402
from classroom.sandboxes.sandbox import new_sandbox_id  # noqa: E402

POOL_EXPERIMENT_REQUESTS = 200


def say(message: dict) -> None:
    print(json.dumps(message), flush=True)


def hold(runtime: Runtime, count: int) -> None:
    """Sandboxes with rows (SQLite file or schema) and Redis keys, held by Labs until the end."""
    made, labs = [], []
    for _ in range(count):
        sandbox_id = new_sandbox_id()
        lab = runtime.lab(sandbox_id)
        lab.run(initialize_sandbox)
        demo = lab.run(create_cache_demo_user)
        lab.run(fetch_user_cached, user_id=demo.user_id)  # a cached row: keys in Redis
        sandbox = runtime.sandboxes.get_existing(sandbox_id)
        assert sandbox is not None
        made.append({"id": sandbox_id, "location": sandbox.location})
        labs.append(lab)
    say({"pid": os.getpid(), "sandboxes": made})
    for line in sys.stdin:
        if line.strip() == "close":
            runtime.close()
            say({"closed": True})
            return


def pool(runtime: Runtime, count: int) -> None:
    """On "go", `count` learners run the pool experiment at its maximum, all at once."""
    labs = [runtime.lab(new_sandbox_id()) for _ in range(count)]
    for lab in labs:
        lab.run(initialize_sandbox)
    say({"pid": os.getpid(), "ready": True})
    if sys.stdin.readline().strip() != "go":
        return

    def experiment(lab):
        try:
            result = lab.run(
                run_pool_experiment,
                requests=POOL_EXPERIMENT_REQUESTS,
                concurrency=MAX_POOL_EXPERIMENT_CONCURRENCY,
                pool_size=MAX_POOL_EXPERIMENT_CONCURRENCY,
                timeout=600,
            )
        except Exception as error:
            cause = error.__cause__
            return {"error": f"{type(error).__name__}: {error} (cause: {cause!r})"}
        return {
            "waited_seconds": result.waited_seconds,
            "capped": result.capped_by_budget,
            "connections_opened": result.unpooled.connections_opened,
        }

    with ThreadPoolExecutor(count) as learners:
        outcomes = list(learners.map(experiment, labs))
    budget = runtime.sandboxes.budget
    connections = getattr(runtime.sandboxes.store, "connections", None)
    say(
        {
            "outcomes": outcomes,
            "budget_total": budget.total,
            "peak_in_use": budget.peak_in_use,
            "replicas_seen": getattr(connections, "replicas_seen", None),
        }
    )
    sys.stdin.readline()  # "stop": the other replicas may still be counting this one
    runtime.close()


def main() -> None:
    mode, count = sys.argv[1], int(sys.argv[2])
    runtime = Runtime()
    {"hold": hold, "pool": pool}[mode](runtime, count)


if __name__ == "__main__":
    main()
