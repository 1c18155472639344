"""A circuit breaker for the broker: an outage pauses the relay instead of failing its events."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class BrokerCircuit:
    """Closed while the broker answers; open (relay paused, probing with backoff) while it does not.

    An outage belongs to the broker, not to any event: while the circuit is open no event is
    claimed, so none spends an attempt, and the outage is reported once when it opens and once
    when it closes, never once per pass.
    """

    base_seconds: float = 0.5
    max_seconds: float = 30.0
    opened_at: Optional[float] = None  # time.monotonic() when the outage began
    error: str = ""
    probes_failed: int = 0
    outages: int = 0
    closed_at: Optional[float] = None  # time.monotonic() when the last outage ended
    _random: random.Random = field(default_factory=random.Random, repr=False)

    @property
    def is_open(self) -> bool:
        """True while the broker is considered down."""
        return self.opened_at is not None

    def open(self, error: BaseException | str) -> bool:
        """Record a broker failure; True only when it starts an outage (report it then)."""
        self.error = (error if isinstance(error, str) else f"{type(error).__name__}: {error}")[:300]
        if self.opened_at is not None:
            return False
        self.opened_at = time.monotonic()
        # Soon after the last (a broker at the edge of its memory): go on with that backoff.
        relapse = self.closed_at is not None and self.opened_at - self.closed_at < self.max_seconds
        self.probes_failed = self.probes_failed + 1 if relapse else 0
        self.outages += 1
        return True

    def probe_failed(self) -> None:
        """The broker still does not answer: the next probe waits longer."""
        self.probes_failed += 1

    def close(self) -> Optional[float]:
        """The broker answers again; returns how long the outage lasted (None if there was none)."""
        if self.opened_at is None:
            return None
        self.closed_at = time.monotonic()
        lasted = self.closed_at - self.opened_at
        self.opened_at, self.error = None, ""  # probes_failed kept, for a relapse
        return lasted

    def seconds_until_probe(self) -> float:
        """Exponential backoff with jitter between probes.

        The delay is base·2^n, capped; half of it is fixed, half random.
        """
        delay = min(self.max_seconds, self.base_seconds * 2 ** min(self.probes_failed, 30))
        return delay / 2 + self._random.uniform(0, delay / 2)

    def seconds_open(self) -> float:
        """How long the current outage has lasted (0 when closed)."""
        return 0.0 if self.opened_at is None else time.monotonic() - self.opened_at
