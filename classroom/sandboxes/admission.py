"""Admission: how many sandboxes may be awake at once, and who gets in when the class is full.

Capacity is the smallest of three limits: the memory budget ÷ what one awake sandbox costs, the
connection budget (SQLite: each sandbox's pool may open its connections; room is kept for one
pool experiment at its maximum) and QULAB_MAX_SANDBOXES. At capacity, idle sandboxes go dormant
to make room; when every awake sandbox is held by a connected learner, the newcomer gets
ClassFullError and nobody's sandbox is touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import source
from classroom.budget import ConnectionBudget
from classroom.config import Settings
from classroom.sandboxes.sandbox import Sandbox

# What one awake sandbox may cost in memory beyond the process's base. bench/sandboxes.py
# measured 0.58 MB (SQLite) after initialize and a read; this leaves room for a burst's caches.
AWAKE_SANDBOX_MEMORY_MB = {"sqlite": 1.0, "postgresql": 1.0}
# Connections one pool experiment may take at most (section 2's slider), kept free for one.
MAX_POOL_EXPERIMENT_CONCURRENCY = 50


class ClassFullError(source.QuLabError):
    """Every place is taken by a connected learner; nobody's sandbox is released for a newcomer."""

    def __init__(
        self, *, in_class: int, capacity: int, limited_by: str, retry_after_seconds: float
    ) -> None:
        super().__init__(
            f"The class is full: {in_class} learners are working here (room for {capacity}). "
            "A place frees as soon as a learner closes their tab; try again in about "
            f"{max(1, round(retry_after_seconds / 60))} minute(s)."
        )
        self.in_class = in_class
        self.capacity = capacity
        self.limited_by = limited_by
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True)
class SandboxCapacity:
    """How many sandboxes may be awake at once, and which budget sets it."""

    limits: dict[str, int]  # budget name -> awake sandboxes it allows
    memory_mb_per_sandbox: float
    connections_per_sandbox: int

    @property
    def sandboxes(self) -> int:
        """The smallest of the limits."""
        return max(1, min(self.limits.values()))

    @property
    def limited_by(self) -> str:
        """The budget that sets the capacity."""
        return min(self.limits, key=lambda name: self.limits[name])


class Admission:
    """Decides whether one more sandbox may wake, and which idle ones go dormant to make room."""

    def __init__(
        self, settings: Settings, budget: ConnectionBudget, backend: str, connections_each: int
    ) -> None:
        self.settings = settings
        self.budget = budget
        self.backend = backend
        self.connections_each = connections_each

    def capacity(self) -> SandboxCapacity:
        """Awake sandboxes this process can afford: its memory, connection and count limits."""
        memory_each = AWAKE_SANDBOX_MEMORY_MB[self.backend]
        limits = {
            "the memory budget": int(self.settings.memory_budget_mb // memory_each),
            "QULAB_MAX_SANDBOXES": self.settings.max_sandboxes,
        }
        if self.connections_each:  # keep room for one pool experiment at its maximum
            spare = self.budget.total - MAX_POOL_EXPERIMENT_CONCURRENCY
            limits["the connection budget"] = max(1, spare // self.connections_each)
        return SandboxCapacity(limits, memory_each, self.connections_each)

    def make_room(self, sandboxes: Iterable[Sandbox]) -> list[Sandbox]:
        """The idle sandboxes to put to sleep so one more can wake (least recently used first).

        Raises ClassFullError when every awake sandbox is held or busy: nobody is released.
        """
        capacity = self.capacity()
        awake = [sandbox for sandbox in sandboxes if sandbox.awake]
        if len(awake) < capacity.sandboxes:
            return []
        sleepers = sorted(
            (
                sandbox
                for sandbox in awake
                if not sandbox.holders and not sandbox.operations_in_flight
            ),
            key=lambda sandbox: sandbox.last_used,
        )
        if len(awake) - len(sleepers) >= capacity.sandboxes:
            raise ClassFullError(
                in_class=len(awake),
                capacity=capacity.sandboxes,
                limited_by=capacity.limited_by,
                retry_after_seconds=max(60.0, self.settings.sandbox_grace_seconds),
            )
        return sleepers[: len(awake) - capacity.sandboxes + 1]
