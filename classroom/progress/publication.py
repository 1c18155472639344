"""The one journal entry no click writes: an event published by the background publisher.

Section 5's step "see an event published in the background" must be proven by the publisher
itself, never by a button. The publisher journals the first events it publishes in each run
(a run starts when the learner starts it), and again the first time after each broker outage
it survived: one line per run and per outage, not one per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

import source
from classroom.progress.journal import Evidence, record_evidence
from classroom.statements import statements_hidden

if TYPE_CHECKING:
    from classroom.sandboxes.sandbox import Sandbox

logger = logging.getLogger("qulab")


@dataclass
class PublicationWatch:
    """Per sandbox: whether this publisher run journaled a publication, and the outages then."""

    recorded_this_run: bool = False
    outages_recorded: int = 0  # the circuit's outage count when a publication was last journaled

    def new_run(self, *, outages: int, outage_now: bool) -> None:
        """The publisher was started or stopped: its next publication is journaled again.

        An outage still going on counts as not yet survived.
        """
        self.recorded_this_run = False
        self.outages_recorded = outages - (1 if outage_now else 0)

    async def forget_run(self, sandbox: Sandbox) -> None:
        """The sandbox was reset (its journal emptied): the next publication is journaled again."""
        self.recorded_this_run = False


def publication_watch(sandbox: Sandbox) -> PublicationWatch:
    """The sandbox's watch, created on first use."""

    def create(owner: Sandbox) -> PublicationWatch:
        watch = PublicationWatch()
        owner.reset_listeners.append(watch.forget_run)
        return watch

    return sandbox.service("publication_watch", create)


async def journal_background_publication(
    sandbox: Sandbox, *, publisher: str, report: source.BatchReport, outages: int
) -> None:
    """From the publisher's loop: journal its first publication in a run, and after an outage."""
    watch = publication_watch(sandbox)
    after_outage = outages > watch.outages_recorded
    if not report.published or (watch.recorded_this_run and not after_outage):
        return
    watch.recorded_this_run, watch.outages_recorded = True, outages
    events = source.DomainEvent
    newest = (
        select(events.id, events.published_at, events.aggregate_id)
        .where(events.status == "published")
        .order_by(events.published_at.desc())
        .limit(1)
    )
    try:
        with statements_hidden():
            async with sandbox.engine.connect() as connection:
                event_id, published_at, score_id = (await connection.execute(newest)).one()
    except Exception:
        logger.warning("could not read the published event of %s", sandbox.id, exc_info=True)
        return
    survived = ", once the broker answered again after an outage" if after_outage else ""
    await record_evidence(
        sandbox,
        Evidence(
            "published_after_outage" if after_outage else "events_published",
            f"Event {event_id} published at {published_at:%H:%M:%S} by the background publisher "
            f"{publisher}{survived} ({report.published} in that batch).",
            {
                "event_id": event_id,
                "score_id": score_id,
                "publisher": publisher,
                "batch": report.published,
            },
        ),
    )
