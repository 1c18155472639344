"""What each operation a page runs proved, in the journal's words: recorded where it is run.

Lab.run calls run_and_record: the operation runs, and once it has returned its describer turns
the result into one journal entry ("N+1 fetch: 5 statements for N = 3 (user …)"). The lesson's
functions carry no bookkeeping of their own: an operation is journaled because it is listed in
DESCRIBERS, and only when a page (or a script through a Lab) runs it, never when another
operation calls it (a burst of 500 scores is one entry, not 501).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import source
from classroom.cache.coherence import CacheInvalidation
from classroom.demos import caching, eventing, n_plus_one, pooling
from classroom.outbox.service import outbox_service, start_event_publisher, stop_event_publisher
from classroom.progress.journal import Evidence, record_evidence
from classroom.progress.publication import publication_watch
from classroom.sandboxes.reset import initialize_sandbox

if TYPE_CHECKING:
    from classroom.sandboxes.sandbox import Sandbox

logger = logging.getLogger("qulab")
T = TypeVar("T")
Describer = Callable[["Sandbox", Any], Optional[Evidence]]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _user_created(sandbox: Sandbox, user: source.User) -> Evidence:
    return Evidence(
        "user_created", f"User {user.id} created: a new row in users.", {"user_id": user.id}
    )


def _initialized(sandbox: Sandbox, users: list[source.User]) -> Optional[Evidence]:
    names = " and ".join(user.name for user in users)
    return Evidence(
        "initialized",
        f"Initialized: schema ready, data cleared, {len(users)} sample users ({names}).",
        {"sample_user_ids": [user.id for user in users]},
    )


def _pool_experiment(sandbox: Sandbox, experiment: pooling.PoolExperiment) -> Evidence:
    pooled, unpooled = experiment.pooled, experiment.unpooled
    return Evidence(
        "pool_experiment",
        f"Pool experiment, {pooled.requests} queries {pooled.concurrency} at a time: the pool "
        f"opened {pooled.connections_opened} connections ({pooled.throughput:,.0f}/s), NullPool "
        f"{unpooled.connections_opened} ({unpooled.throughput:,.0f}/s).",
        {
            "pooled_connections": pooled.connections_opened,
            "unpooled_connections": unpooled.connections_opened,
        },
    )


def _sample_scores_added(sandbox: Sandbox, scores: list[source.AIRScore]) -> Evidence:
    user_id = scores[0].user_id if scores else ""
    return Evidence(
        "sample_scores_added",
        f"{len(scores)} sample scores added for user {user_id}.",
        {"user_id": user_id, "count": len(scores)},
    )


def _user_and_scores_fetched(sandbox: Sandbox, fetch: n_plus_one.UserScoresFetch) -> Evidence:
    label = "N+1 fetch" if fetch.path == "naive" else "Eager fetch"
    count, n = fetch.statements.count, len(fetch.scores)
    return Evidence(
        "user_and_scores_fetched",
        f"{label}: {count} statements for N = {n} (user {fetch.user.id}).",
        {"path": fetch.path, "user_id": fetch.user.id, "scores": n, "statements": count},
    )


def _strategies_compared(sandbox: Sandbox, comparison: n_plus_one.StrategyComparison) -> Evidence:
    runs = comparison.at(comparison.largest)
    counts = ", ".join(f"{strategy} {run.statements}" for strategy, run in runs.items())
    return Evidence(
        "loading_strategies_compared",
        f"Strategies compared up to N = {comparison.largest:,} users; statements then: {counts}.",
        {"sizes": comparison.sizes, "identical_results": comparison.identical_results},
    )


def _cache_read(sandbox: Sandbox, fetch: caching.CachedFetch) -> Evidence:
    metrics, read = fetch.metrics, fetch.read
    what = "user" if fetch.kind == "user" else "latest AIRScore"
    return Evidence(
        "cache_read",
        f"Cache read ({what}): {read.outcome} on key {read.key}; "
        f"{_count(metrics.hits, 'hit')} of {_count(metrics.requests, 'read')}.",
        {
            "read": fetch.kind,
            "outcome": read.outcome,
            "key": read.key,
            "user_id": fetch.user_id,
            "hits": metrics.hits,
            "misses": metrics.misses,
            "requests": metrics.requests,
        },
    )


def _cache_invalidated(sandbox: Sandbox, invalidation: CacheInvalidation) -> Evidence:
    outcome = "deleted" if invalidation.applied else "pending (Redis did not answer)"
    return Evidence(
        "cache_invalidated",
        f"Cache invalidated on request: {len(invalidation.keys)} keys {outcome}.",
        {"keys": list(invalidation.keys), "applied": invalidation.applied},
    )


def _airscore_stored(sandbox: Sandbox, stored: source.StoredAIRScore) -> Evidence:
    score, event = stored.score, stored.event
    return Evidence(
        "airscore_stored",
        f"AIRScore {score.id} and its {event.event_type} event {event.id} committed in one "
        f"transaction, the event {event.status}.",
        {"score_id": score.id, "event_id": event.id, "event_status": event.status},
    )


def _airscore_burst(sandbox: Sandbox, burst: eventing.BurstResult) -> Evidence:
    return Evidence(
        "airscore_burst",
        f"Burst: {burst.writes:,} scores with their events, {burst.concurrency} at a time, "
        f"in {burst.seconds:.2f} s.",
        {"writes": burst.writes},
    )


def _publisher_switched(kind: str, verb: str) -> Describer:
    def describe(sandbox: Sandbox, switched: bool) -> Optional[Evidence]:
        if not switched:  # it already was running (or stopped): nothing happened
            return None
        service = outbox_service(sandbox)
        circuit = service.circuit
        publication_watch(sandbox).new_run(outages=circuit.outages, outage_now=circuit.is_open)
        name = service.publisher.name
        at = f"{source.utc_now():%H:%M:%S}"
        return Evidence(kind, f"Publisher {name} {verb} at {at}.", {"publisher": name})

    return describe


DESCRIBERS: dict[Callable[..., Awaitable[Any]], Describer] = {
    source.create_user: _user_created,
    initialize_sandbox: _initialized,
    pooling.run_pool_experiment: _pool_experiment,
    source.add_sample_scores: _sample_scores_added,
    n_plus_one.fetch_naive: _user_and_scores_fetched,
    n_plus_one.fetch_eager: _user_and_scores_fetched,
    n_plus_one.compare_loading_strategies: _strategies_compared,
    n_plus_one.scale_up_and_compare: _strategies_compared,
    caching.fetch_user_cached: _cache_read,
    caching.fetch_latest_airscore_cached: _cache_read,
    caching.invalidate_user_cache: _cache_invalidated,
    source.calculate_and_store_airscore: _airscore_stored,
    eventing.store_airscore_burst: _airscore_burst,
    start_event_publisher: _publisher_switched("publisher_started", "started in the background"),
    stop_event_publisher: _publisher_switched("publisher_stopped", "stopped"),
}


def describe(operation: Callable[..., Any], sandbox: Sandbox, result: Any) -> Optional[Evidence]:
    """What the operation proved (None: nothing worth a line, or not a journaled operation)."""
    describer = DESCRIBERS.get(operation)
    if describer is None:
        return None
    try:
        return describer(sandbox, result)
    except Exception:  # a describer's bug must not fail an operation that already succeeded
        logger.exception("could not describe %s in sandbox %s", operation.__name__, sandbox.id)
        return None


async def run_and_record(
    operation: Callable[..., Awaitable[T]], sandbox: Sandbox, /, **kwargs: Any
) -> T:
    """Run `operation(sandbox, **kwargs)`; once it returned, journal what it proved."""
    result = await operation(sandbox, **kwargs)
    await record_evidence(sandbox, describe(operation, sandbox, result))
    return result
