"""How QuLab's Redis cache survives faults: the plumbing that the cache page shows only on request.

source.py holds the lesson (the read-through cache: GET, miss, load, SET EX). This package holds
what keeps it correct and fast when things go wrong, one concern per module:

- breaker.py       - skip a Redis that hangs, probe it in the background, close again by itself
- tracing.py       - the commands a read really sent, with their replies and times
- single_flight.py - concurrent misses on one key share one database read
- coherence.py     - no stale read after any write, in any process: epoch and fence tokens in Redis

Nothing here imports source.py, so each unit can be read (and tested) on its own.
"""

from qulab_redis.breaker import REDIS_ERRORS, CircuitBreaker, RedisSkipped
from qulab_redis.coherence import CacheCoherence, CacheInvalidation, CachedEntry
from qulab_redis.single_flight import SingleFlight
from qulab_redis.tracing import CommandTrace, RedisCommand

__all__ = [
    "REDIS_ERRORS",
    "CacheCoherence",
    "CacheInvalidation",
    "CachedEntry",
    "CircuitBreaker",
    "CommandTrace",
    "RedisCommand",
    "RedisSkipped",
    "SingleFlight",
]
