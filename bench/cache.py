"""Benchmark: what a cache hit saves, and what the cache itself costs on top of Redis.

Two ratios, each the median over rounds of one round's ratio (the variants run back to back in
every round, in rotating order, so drift on a shared machine cancels out):
- uncached read (a new session per request, the primary-key lookup) ÷ cache hit: target >= 5;
- cache hit (source.CachedUserRepository.get_user on the CoherentCache QuLab runs, as
  classroom.cache.coherent.cached_users gives it) ÷ a bare redis.asyncio GET + json.loads of
  the same key: target <= 1.3;
- while Redis hangs (a redis-server of its own, frozen with SIGSTOP), after the first timeout:
  a cached read ÷ an uncached read: target <= 1.5 (the breaker skips Redis); then SIGCONT, and
  the seconds until a read is answered by Redis again, with no restart.
Measured against a real Redis (REDIS_URL, else a redis-server started here when installed)
and against fakeredis. The database is DATABASE_URL's, else the embedded SQLite.

Run from the project root: python3 bench/cache.py
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

import source  # noqa: E402
from classroom.cache.coherent import cached_users  # noqa: E402
from classroom.cache.link import RedisService  # noqa: E402
from classroom.config import Settings  # noqa: E402
from classroom.demos.caching import create_cache_demo_user  # noqa: E402
from classroom.sandboxes.registry import SandboxRegistry  # noqa: E402
from classroom.sandboxes.reset import initialize_sandbox  # noqa: E402
from classroom.sandboxes.sandbox import new_sandbox_id  # noqa: E402

ROUNDS = 40
CALLS_PER_ROUND = 40
HIT_SPEEDUP_TARGET = 5.0
HIT_OVERHEAD_TARGET = 1.3
HUNG_READ_TARGET = 1.5
HUNG_ROUNDS = 20


async def _mean_ms(operation: Callable[[], Awaitable[Any]], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await operation()
    return (time.perf_counter() - started) * 1000 / calls


async def measure(
    settings: Settings, *, rounds: int = ROUNDS, calls: int = CALLS_PER_ROUND
) -> dict[str, Any]:
    """Median per-call times of the three reads, measured in interleaved rounds, and the median
    per-round ratios."""
    redis_service = await RedisService.connect(settings)
    registry = SandboxRegistry(settings, redis_service)
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        await initialize_sandbox(sandbox)
        user_id = (await create_cache_demo_user(sandbox)).user_id  # Alex Smith, a sample user
        cache = cached_users(sandbox)
        key = cache.user_key(user_id)
        client = sandbox.redis.client

        async def uncached_read() -> None:
            async with sandbox.session_factory() as session:
                await source.UserRepository(session).get(user_id)

        async def cache_hit() -> None:
            if (await cache.get_user(user_id=user_id)).outcome != source.HIT:
                raise RuntimeError("expected a cache hit; is Redis evicting keys?")

        async def bare_get() -> None:
            json.loads(await client.get(key))

        await cache.get_user(user_id=user_id)  # the miss that stores the value
        variants = {
            "uncached read": uncached_read,
            "cache hit": cache_hit,
            "bare GET + json.loads": bare_get,
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for operation in variants.values():  # warm connections and code paths
            await _mean_ms(operation, calls)
        for round_number in range(rounds):
            order = list(variants)
            order = (
                order[round_number % 3 :] + order[: round_number % 3]
            )  # rotate to spread drift evenly
            for name in order:
                samples[name].append(await _mean_ms(variants[name], calls))

        def ratio(numerator: str, denominator: str) -> float:
            # Each round's two blocks ran back to back: their ratio shares the machine's mood then.
            return statistics.median(
                a / b for a, b in zip(samples[numerator], samples[denominator], strict=True)
            )

        return {
            "redis": redis_service.mode,
            "redis_detail": redis_service.reason,
            "database": registry.describe_database(),
            "reads_per_variant": rounds * calls,
            **{f"{name} (ms)": statistics.median(values) for name, values in samples.items()},
            "uncached ÷ hit": ratio("uncached read", "cache hit"),
            "hit ÷ bare GET": ratio("cache hit", "bare GET + json.loads"),
        }
    finally:
        await registry.close()
        await redis_service.close()


async def measure_hung_redis(
    settings: Settings, redis_url: str, process: Any, *, rounds: int = HUNG_ROUNDS
) -> dict[str, Any]:
    """Freeze the Redis at redis_url (SIGSTOP): the first read's cost, then cached ÷ uncached
    reads, then recovery."""
    hung = replace(settings, redis_url=redis_url)
    redis_service = await RedisService.connect(hung)
    registry = SandboxRegistry(hung, redis_service)
    try:
        sandbox = await registry.acquire(new_sandbox_id())
        user_id = (await create_cache_demo_user(sandbox)).user_id  # the Cache Demo User
        cache = cached_users(sandbox)
        await cache.get_user(user_id=user_id)  # cached

        async def uncached_read() -> None:
            async with sandbox.session_factory() as session:
                await source.UserRepository(session).get(user_id)

        # The floor: the same row by a bare engine on the same file, no QuLab code at all.
        bare = None
        if registry.backend == "sqlite":
            bare = create_async_engine(f"sqlite+aiosqlite:///{sandbox.location}")

        async def bare_engine_read() -> None:
            assert bare is not None
            async with bare.connect() as connection:
                await connection.execute(
                    text("SELECT * FROM users WHERE id = :id"), {"id": user_id}
                )

        async def cached_read_while_hung() -> None:
            if (await cache.get_user(user_id=user_id)).outcome != source.FALLBACK:
                raise RuntimeError("expected the database to answer while Redis hangs")

        process.send_signal(signal.SIGSTOP)
        try:
            started = time.perf_counter()
            await cached_read_while_hung()  # waits one command timeout; the breaker opens
            first_ms = (time.perf_counter() - started) * 1000
            samples: dict[str, list[float]] = {"uncached": [], "hung": [], "bare": []}
            for round_number in range(rounds):
                pairs = [("uncached", uncached_read), ("hung", cached_read_while_hung)]
                if bare is not None:
                    pairs.append(("bare", bare_engine_read))
                for name, operation in pairs if round_number % 2 else reversed(pairs):
                    samples[name].append(await _mean_ms(operation, CALLS_PER_ROUND))
            trips = redis_service.breaker.trips
        finally:
            process.send_signal(signal.SIGCONT)
            if bare is not None:
                await bare.dispose()
        thawed = time.monotonic()
        while (await cache.get_user(user_id=user_id)).outcome == source.FALLBACK:
            if time.monotonic() - thawed > 120:
                raise RuntimeError("Redis answers again but the cache did not recover within 120 s")
            await asyncio.sleep(0.05)
        return {
            "first read while hung (ms)": first_ms,
            "uncached read (ms)": statistics.median(samples["uncached"]),
            "cached read while hung (ms)": statistics.median(samples["hung"]),
            "hung ÷ uncached": statistics.median(
                h / u for h, u in zip(samples["hung"], samples["uncached"], strict=True)
            ),
            "hung ÷ bare engine": statistics.median(
                h / b for h, b in zip(samples["hung"], samples["bare"], strict=True)
            )
            if samples["bare"]
            else None,
            "breaker trips": trips,
            "recovery (s)": time.monotonic() - thawed,
            "cooling (s)": redis_service.breaker.cooling_seconds,
        }
    finally:
        await registry.close()
        await redis_service.close()


def _print_hung(result: dict[str, Any]) -> None:
    ratio = result["hung ÷ uncached"]
    print(
        f"Redis frozen (SIGSTOP): first read {result['first read while hung (ms)']:.0f} ms "
        f"(one timeout), then a cached read {result['cached read while hung (ms)']:.3f} ms "
        f"vs uncached {result['uncached read (ms)']:.3f} ms: "
        f"{ratio:.2f}× (≤ {HUNG_READ_TARGET:g}×: {'yes' if ratio <= HUNG_READ_TARGET else 'NO'})"
        + (
            f"; {result['hung ÷ bare engine']:.2f}× a bare engine's read of the row"
            if result["hung ÷ bare engine"] is not None
            else ""
        )
        + f"; breaker opened {result['breaker trips']}×; after SIGCONT Redis answered again in "
        f"{result['recovery (s)']:.1f} s (cooling {result['cooling (s)']:g} s), no restart"
    )


def _print_table(results: list[dict[str, Any]]) -> None:
    columns = [
        ("redis", "{}"),
        ("uncached read (ms)", "{:.3f}"),
        ("cache hit (ms)", "{:.3f}"),
        ("bare GET + json.loads (ms)", "{:.3f}"),
        ("uncached ÷ hit", "{:.2f}×"),
        ("hit ÷ bare GET", "{:.2f}×"),
    ]
    rows = [[fmt.format(result[name]) for name, fmt in columns] for result in results]
    widths = [max(len(name), *(len(row[i]) for row in rows)) for i, (name, _) in enumerate(columns)]
    print(" | ".join(name.ljust(width) for (name, _), width in zip(columns, widths, strict=True)))
    print("-+-".join("-" * width for width in widths))
    for row in rows:
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for result in results:
        speedup_ok = result["uncached ÷ hit"] >= HIT_SPEEDUP_TARGET
        overhead_ok = result["hit ÷ bare GET"] <= HIT_OVERHEAD_TARGET
        print(
            f"{result['redis']}: hit ≥ {HIT_SPEEDUP_TARGET:g}× faster than uncached: "
            f"{'yes' if speedup_ok else 'NO'}; "
            f"hit ≤ {HIT_OVERHEAD_TARGET:g}× a bare GET: {'yes' if overhead_ok else 'NO'} "
            f"({result['reads_per_variant']} reads each; {result['redis_detail']}; "
            f"database: {result['database']})"
        )


def main() -> list[dict[str, Any]]:
    """Run the benchmark on a real Redis (when one is available) and on fakeredis; print and
    return the rows."""
    base = Settings.from_environment()
    results = []
    with ExitStack() as stack:
        real_url: Optional[str] = os.environ.get("REDIS_URL") or None
        if real_url is None and shutil.which("redis-server"):
            import servers

            real_url = stack.enter_context(servers.redis_server())
        if real_url is None:
            print("No real Redis: set REDIS_URL or install redis-server. Measuring fakeredis only.")
        else:
            real = asyncio.run(measure(replace(base, redis_url=real_url)))
            if real["redis"] != "redis":
                print(f"The real Redis did not answer ({real['redis_detail']}).")
            results.append(real)
    results.append(asyncio.run(measure(replace(base, redis_url=None))))
    _print_table(results)
    if shutil.which("redis-server"):  # a server of our own: we freeze it, never REDIS_URL's
        import servers

        with servers.redis_server_process() as (url, process):
            hung = asyncio.run(measure_hung_redis(base, url, process))
        _print_hung(hung)
        results.append({"redis": "redis (frozen)", "hung": hung})
    return results


if __name__ == "__main__":
    main()
