"""What every benchmark module shares: the result shape and a sandbox on the configured backend.

A benchmark module (bench/<topic>.py) exposes `main() -> list[dict]` and is listed in
bench/run_all.py's BENCHMARKS. main() measures on whatever DATABASE_URL and REDIS_URL name
(read when it is called: run_all.py sets them per backend), prints its own table, and returns
one dict per measure, made with `result()`:

    {"benchmark": "pool", "measure": "pooled ÷ NullPool throughput", "value": 3.1,
     "unit": "×", "target": "≥ 1.5×", "met": True}

Values are ratios or counts measured in the same run (this machine's timings move by 2× from
minute to minute; ratios much less). "target" says what the design promises ("" if nothing),
"met" whether this run kept the promise (None when there is no target).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH.parent
sys.path.insert(0, str(PROJECT_ROOT))  # first: bench/classroom.py must not hide the package
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # last, for the same reason

from classroom.cache.link import RedisService  # noqa: E402
from classroom.config import Settings  # noqa: E402
from classroom.sandboxes.registry import SandboxRegistry  # noqa: E402
from classroom.sandboxes.reset import initialize_sandbox  # noqa: E402
from classroom.sandboxes.sandbox import Sandbox, new_sandbox_id  # noqa: E402

RESULT_KEYS = ("benchmark", "measure", "value", "unit", "target", "met")


def result(
    benchmark: str,
    measure: str,
    value: float,
    *,
    unit: str = "×",
    target: str = "",
    met: Optional[bool] = None,
) -> dict[str, Any]:
    """One measured row, in the shape run_all.py collects."""
    return {
        "benchmark": benchmark,
        "measure": measure,
        "value": value,
        "unit": unit,
        "target": target,
        "met": met,
    }


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of one measure's rounds."""
    ordered = sorted(values)
    return statistics.median(ordered), ordered[0], ordered[-1]


def spread_result(
    benchmark: str,
    measure: str,
    rounds: list[float],
    *,
    unit: str = "×",
    target: Optional[float] = None,
) -> dict[str, Any]:
    """A row whose value is the median of interleaved rounds, with their min and max beside it;
    `met` (value ≤ target) judges the median."""
    median, low, high = spread(rounds)
    shown_unit = f"{unit} (min {low:.3g}, max {high:.3g}, {len(rounds)} interleaved rounds)"
    if target is None:
        return result(benchmark, measure, median, unit=shown_unit)
    return result(
        benchmark, measure, median, unit=shown_unit, target=f"≤ {target:g}{unit}",
        met=median <= target,
    )  # fmt: skip


def import_bench_module(name: str) -> ModuleType:
    """bench/<name>.py, imported from its file (ModuleNotFoundError when there is none).

    Under its own name, so multiprocessing's spawned children import it again by that name; but
    bench/classroom.py shares its name with the classroom package, so a module whose name is
    taken by another file is imported as bench_<name>.
    """
    path = BENCH / f"{name}.py"
    if not path.exists():
        raise ModuleNotFoundError(f"no bench/{name}.py", name=name)
    loaded = sys.modules.get(name)
    found = loaded.__spec__ if loaded is not None else importlib.util.find_spec(name)
    module_name = name if found is not None and found.origin == str(path) else f"bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


@asynccontextmanager
async def sandbox_on_configured_backend(
    *, with_sample_users: bool = True
) -> AsyncIterator[Sandbox]:
    """A fresh sandbox on the backend the environment names, released (and its data deleted)
    afterwards; with_sample_users: initialized as section 2's button does."""
    settings = Settings.from_environment()
    redis_service = await RedisService.connect(settings)
    registry = SandboxRegistry(settings, redis_service)
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        if with_sample_users:
            await initialize_sandbox(sandbox)
        yield sandbox
    finally:
        await registry.close()
        await redis_service.close()


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a whole process so far, ended threads included (/proc/PID/stat).

    Streamlit runs each script run on a thread of its own, so summing the live threads' CPU would
    miss every run that ended within the window.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_speed_ms() -> float:
    """CPU milliseconds this machine takes for one fixed pure-Python workload, now (best of 3).

    The machines are shared: within one hour the same class cost the server 24 ms and 40 ms of CPU
    per click, the code unchanged. A benchmark measures this before and after its run and reports
    its CPU figures beside it, so runs from a fast and a slow hour can be told apart.
    """
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        table: dict[str, int] = {}
        for number in range(200_000):
            table[f"key-{number % 5_000}"] = table.get(f"key-{number % 5_000}", 0) + number
        best = min(best, time.process_time() - started)
    return best * 1000


def print_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = RESULT_KEYS) -> None:
    """Print rows as a Markdown table (readable in a terminal, pasteable into the README)."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
    ]
    print(
        "| "
        + " | ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True))
        + " |"
    )
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for line in cells:
        print(
            "| "
            + " | ".join(text.ljust(width) for text, width in zip(line, widths, strict=True))
            + " |"
        )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
