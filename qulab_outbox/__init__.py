"""How the outbox survives faults: plumbing that section 5's lesson uses but does not teach.

source.py's Outbox section holds the pattern (the event written with the change, a relay that
leases, sends and marks, a deduplicating consumer). The units here keep it correct over a whole
class: a circuit that pauses the relay while the broker is down without burning attempts, stream
retention that never trims what a consumer group has not acknowledged, reading the broker's
persistence settings, PostgreSQL LISTEN/NOTIFY so a commit in any process wakes the relay, and
one look at Redis per interval for all of a process's idle consumers (watch.py).
None of them imports source.py.
"""

from qulab_outbox.broker import (
    BrokerDurability,
    StreamBacklog,
    is_broker_wide_refusal,
    read_broker_durability,
    read_stream_backlog,
    trim_acknowledged_entries,
)
from qulab_outbox.circuit import BrokerCircuit

__all__ = [
    "BrokerCircuit",
    "BrokerDurability",
    "StreamBacklog",
    "is_broker_wide_refusal",
    "read_broker_durability",
    "read_stream_backlog",
    "trim_acknowledged_entries",
]
