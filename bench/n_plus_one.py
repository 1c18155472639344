"""Benchmark: the N+1 problem against eager loading, on the configured backend.

For N = 10, 100 and 1,000 users with 5 scores each, every loading strategy is warmed up, then
timed REPEATS times in turn (each run in a fresh session); the median is kept. The ratio
lazy ÷ selectinload is taken from medians measured in this same run, so machine noise largely
cancels. Run from the project root: `python3 bench/n_plus_one.py` (DATABASE_URL / REDIS_URL as
for the app; unset means the embedded SQLite).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import source  # noqa: E402

SIZES = (10, 100, 1000)
REPEATS = 5
# Issue 3 expects lazy ÷ selectinload of at least 10x at N=100 on the embedded default (SQLite).
RATIO_TARGET = 10.0
RATIO_TARGET_USERS = 100


def expected_statements(strategy: str, users: int) -> int:
    """The count each strategy must issue: 1 + N, 1 + one IN query per 500 parents, 1, 2."""
    return {"lazy": 1 + users, "selectinload": 1 + -(-users // 500), "joinedload": 1, "subqueryload": 2}[strategy]


async def _measure(settings: source.Settings, sizes: tuple[int, ...], repeats: int) -> tuple[str, source.StrategyComparison]:
    redis_service = await source.RedisService.connect(settings)
    registry = source.SandboxRegistry(settings, redis_service)
    try:
        sandbox = await registry.acquire(source.new_sandbox_id())
        await source.grow_scale_up_users(sandbox, target_users=max(sizes), max_new_users=max(sizes))
        return sandbox.backend, await source.compare_loading_strategies(sandbox, sizes=sizes, repeats=repeats)
    finally:
        await registry.close()
        await redis_service.close()


def main(sizes: tuple[int, ...] = SIZES, repeats: int = REPEATS) -> dict[str, Any]:
    """Measure, print a table, and return the rows and the lazy ÷ selectinload ratio per N."""
    backend, comparison = asyncio.run(_measure(source.Settings.from_environment(), sizes, repeats))
    rows = []
    for run in comparison.runs:
        selectin = comparison.at(run.users)["selectinload"]
        rows.append(
            {
                "users": run.users,
                "strategy": run.strategy,
                "statements": run.statements,
                "expected": expected_statements(run.strategy, run.users),
                "median_ms": run.median_ms,
                "vs_selectinload": run.median_ms / selectin.median_ms,
            }
        )
    ratios = {size: comparison.at(size)["lazy"].median_ms / comparison.at(size)["selectinload"].median_ms for size in comparison.sizes}
    print(f"N+1 vs eager loading on {backend}: {source.SCALE_UP_SCORES_PER_USER} scores per user, median of {repeats} runs")
    print(f"{'N':>6}  {'strategy':<13} {'statements':>10} {'expected':>8} {'median ms':>10} {'÷ selectin':>10}")
    for row in rows:
        print(
            f"{row['users']:>6}  {row['strategy']:<13} {row['statements']:>10} {row['expected']:>8} "
            f"{row['median_ms']:>10.2f} {row['vs_selectinload']:>9.1f}×"
        )
    counts_ok = all(row["statements"] == row["expected"] for row in rows)
    print("statement counts:", "as expected" if counts_ok else "NOT as expected")
    print("identical results across strategies:", comparison.identical_results)
    print("lazy ÷ selectinload:", ", ".join(f"N={size}: {ratio:.1f}×" for size, ratio in ratios.items()))
    return {
        "backend": backend,
        "repeats": repeats,
        "rows": rows,
        "lazy_over_selectinload": ratios,
        "statement_counts_as_expected": counts_ok,
        "identical_results": comparison.identical_results,
    }


if __name__ == "__main__":
    main()
