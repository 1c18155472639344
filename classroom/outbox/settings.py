"""The outbox's limits and timings, in one place (tests shrink the timings)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OutboxSettings:
    """Limits and timings of the publisher, the consumer and the audit (tests shrink them)."""

    batch_size: int = 100
    idle_wait_seconds: float = 1.0  # an idle worker's first wait; a commit wakes it at once
    idle_wait_max_seconds: float = 60.0  # ... each empty look doubles it up to this
    # Nothing pending, and every commit wakes the publisher (in-process on SQLite, LISTEN on
    # PostgreSQL): it waits for that wake-up, looking on its own this rarely as a safety net.
    quiet_look_seconds: float = 600.0
    lease_seconds: float = 30.0  # a claim keeps other publishers off an event this long
    outage_backoff_base_seconds: float = 0.5  # broker down: first wait before probing again
    outage_backoff_max_seconds: float = 30.0
    stream_trim_above: int = 10_000  # longer: drop entries every group acknowledged
    max_message_bytes: int = 64 * 1024
    consumer_batch_size: int = 100
    consumer_reclaim_idle_seconds: float = 30.0  # XAUTOCLAIM entries unacknowledged this long
    broker_timeout_seconds: float = 2.0  # a broker call slower than this counts as an outage
    audit_interval_seconds: float = 30.0  # how often published-but-unconsumed events are checked
    audit_batch_size: int = 500
    # Older events, published AND consumed, are pruned: the panel reads at most these, so its
    # cost stays flat with history.
    keep_published_events: int = 200
    inbox_retention_seconds: float = 86_400.0  # the consumer remembers an id this long
    stop_timeout_seconds: float = 10.0
