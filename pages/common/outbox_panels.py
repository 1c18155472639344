"""Section 5's status panel: what the outbox, the stream and the consumer hold now.

The page (pages/eventing_outbox.py) places it; this only draws an OutboxStatus.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

import source
from classroom.demos import eventing
from classroom.outbox.status import RATE_WINDOW_SECONDS, OutboxStatus
from classroom.runtime import Lab

WATCH_SECONDS = 5.0  # an idle status panel looks this often whether the outbox moved
CHANGES_SEEN_KEY = "outbox_changes_seen"


def moment(value) -> str:
    """A UTC time to the millisecond (batches are milliseconds apart), or a dash."""
    return "—" if value is None else f"{value:%H:%M:%S.%f}"[:-3]


def show_table(title: str, rows: list[dict], columns: list[str], total: int) -> None:
    """A heading and the latest rows of one kind of event (or a note that there are none)."""
    st.markdown(f"**{title}** ({total:,})")
    if not rows:
        st.caption("None.")
        return
    table = pd.DataFrame(rows)[columns]
    for column in (name for name in columns if name.endswith("_at")):
        table[column] = (
            pd.to_datetime(table[column], utc=True).dt.strftime("%H:%M:%S.%f").str[:-3].fillna("")
        )
    st.table(table)
    if total > len(rows):
        st.caption(f"Showing {len(rows)} of {total:,}.")


def show_metrics(status: OutboxStatus) -> None:
    """Counts by status, then pace: rate, backlog age, latency, duplicates."""
    counts = [
        ("Pending", status.pending),
        ("Published", status.published),
        ("Failed", status.failed),
    ]
    # four columns, four figures: a figure without its column would silently go missing
    figures = [*counts, ("Delivered", status.delivered)]
    for column, (label, value) in zip(st.columns(4), figures, strict=True):
        column.metric(label, f"{value:,}")
    median, age = status.median_latency_ms, status.oldest_pending_age_seconds
    pace = [
        (f"Events/s (last {RATE_WINDOW_SECONDS:g} s)", f"{status.events_per_second:,.1f}"),
        ("Oldest pending", "none" if age is None else f"{age:,.1f} s"),
        ("Commit-to-publish (median)", "n/a" if median is None else f"{median:,.1f} ms"),
        ("Duplicates ignored", f"{status.duplicates_ignored:,}"),
    ]
    for column, (label, value) in zip(st.columns(4), pace, strict=True):
        column.metric(label, value)


def show_broker(status: OutboxStatus) -> None:
    """The broker's side: outage, durability, stream length, consumer lag, what the audit found."""
    if status.broker_outage_seconds is not None:
        st.warning(
            f"Broker unreachable for {status.broker_outage_seconds:,.0f} s: "
            "relay paused, no event loses an attempt."
        )
    if status.durability.restart_can_lose_events and status.durability.kind != "in-process":
        # fakeredis lives and dies with this server, and so does an embedded sandbox: a restart
        # loses the sandbox with its events, not events alone. A real Redis without its log does.
        st.warning(
            "This server's Redis keeps no log of its stream on disk: if it restarts, events it "
            "holds for the consumer are lost. The audit below notices and sends them again."
        )
    length = "unreachable" if status.stream_length is None else f"{status.stream_length:,}"
    lag = "unknown" if status.consumer_lag is None else f"{status.consumer_lag:,}"
    st.caption(
        f"Stream length: {length}; consumer lag: {lag} unread, "
        f"{status.consumer_unacknowledged or 0:,} read but not acknowledged. "
        "Retention trims only entries the consumer group acknowledged. "
        f"{status.pruned:,} older events, published and consumed, were pruned from the outbox."
    )
    if audit := status.last_audit:
        st.caption(
            f"Audit at {moment(audit.at)} UTC: {audit.checked} published events not yet consumed "
            f"were looked up in the stream, {audit.missing} were gone (lost by the broker), "
            f"{audit.republished} republished ({status.republished_by_audits} so far)."
        )


def show_event_status(status: OutboxStatus) -> None:
    """The whole panel for one status reading (and what it showed, for watch_for_changes)."""
    st.session_state[CHANGES_SEEN_KEY] = status.changes
    show_metrics(status)
    show_broker(status)
    columns = [
        "id",
        "event_type",
        "status",
        "attempts",
        "created_at",
        "next_attempt_at",
        "last_error",
    ]
    show_table("Pending Events", status.pending_events, columns, status.pending)
    columns = [
        "id",
        "event_type",
        "status",
        "attempts",
        "created_at",
        "published_at",
        "delivered_at",
    ]
    show_table("Published Events", status.published_events, columns, status.published)
    show_table(
        "Failed Events",
        status.failed_events,
        ["id", "event_type", "attempts", "last_error"],
        status.failed,
    )
    if status.activity:
        st.markdown("**Publisher and consumer activity** (newest first)")
        st.code("\n".join(status.activity[:15]), language=None, wrap_lines=True)


def watch_for_changes(lab: Lab, *, refresh_key: str, watching: bool) -> None:
    """While the status panel does not refresh itself, look every WATCH_SECONDS whether the outbox
    moved since the panel read it (another tab's score, another replica's commit, a batch); if it
    did, redraw the page. Call it after the panel: show_event_status notes what the panel showed.

    A look reads one counter (source.outbox_changes), no query: an idle tab stays almost free.
    """

    @st.fragment(run_every=WATCH_SECONDS if watching else None)
    def look_for_changes() -> None:
        try:
            moved = lab.run(eventing.outbox_changes) != st.session_state.get(CHANGES_SEEN_KEY)
        except source.QuLabError:
            return  # the next look, or the learner's next click, will tell
        if moved:
            st.session_state[refresh_key] = True  # the panel refreshes itself while events move
            st.rerun()

    look_for_changes()
