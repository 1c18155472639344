"""What one batch of the relay QuLab runs did: the lesson's report, and the events left over."""

from __future__ import annotations

from dataclasses import dataclass

import source


@dataclass
class RelayReport(source.BatchReport):
    """The lesson's batch report, and what the guarded relay did with the events left over."""

    failed: int = 0  # refused by the broker for what they are: 'failed' at once
    released: int = 0  # not sent, the broker being down: pending again, attempts untouched
    broker_error: str = ""
