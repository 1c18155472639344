"""Section 5: a score and its event commit together; a background publisher delivers the event."""

import inspect

import pandas as pd
import streamlit as st

import source
from pages import open_page

lab = open_page()
OUTAGE_KEY = "outbox_broker_outage"
BURST_CHUNK = 50

st.title("5. Eventing (Outbox Pattern)")
st.markdown(
    """
When a score is saved, other services (recommendations, notifications, analytics) must hear about
it. Saving the score and then calling the message broker are two separate steps: a crash between
them loses the message, and a broker outage fails the request. The **outbox pattern** turns the
message into a row. The `AIRScore` and an `AIRScoreCalculated` row in `domain_events` commit in the
**same transaction**, so both exist or neither does. A separate **publisher** (an outbox relay)
then moves pending rows to the broker, here a Redis Stream, and marks them `published`.

Delivery is *at least once*: a publisher that dies after sending but before marking will send
again. So the downstream consumer keeps an inbox of the event ids it has handled and ignores
repeats. The services agree a moment later rather than instantly: **eventual consistency**.
"""
)


def show_table(title: str, rows: list[dict], columns: list[str], total: int) -> None:
    """A heading and the latest rows of one kind of event (or a note that there are none)."""
    st.markdown(f"**{title}** ({total})")
    if rows:
        table = pd.DataFrame(rows)[columns]
        for column in columns:
            if column.endswith("_at"):  # UTC to the millisecond: batches are milliseconds apart
                moments = pd.to_datetime(table[column], utc=True).dt.strftime("%Y-%m-%d %H:%M:%S.%f")
                table[column] = moments.str[:-3].fillna("")  # empty: not delivered yet
        st.table(table)
        if total > len(rows):
            st.caption(f"Showing the latest {len(rows)} of {total}.")
    else:
        st.caption("None.")


def switch_publisher(operation, *, done: str, nothing_to_do: str, failure: str) -> None:
    """Start or stop the publisher and say what happened."""
    try:
        changed = lab.run(operation)
    except source.QuLabError as error:
        st.error(f"{failure} {error}")
    else:
        st.success(done if changed else nothing_to_do)


def apply_outage_switch() -> None:
    """Toggle callback: cut or restore this sandbox's broker connection."""
    try:
        lab.run(source.set_broker_outage, cut=bool(st.session_state[OUTAGE_KEY]))
    except source.QuLabError as error:
        st.session_state["outbox_outage_error"] = str(error)


st.subheader("Generate an AIRScore and its pending event")
try:
    users = lab.run(source.list_users)
except source.QuLabError as error:
    st.error(f"Could not read your sandbox's users. {error}")
    st.stop()
if not users:
    st.info("Your sandbox has no users yet. Initialize it on page 2 (it creates Alex Smith and Jane Doe), then return.")
else:
    by_id = {user.id: user for user in users}
    default = next((i for i, user in enumerate(users) if user.name == "Alex Smith"), 0)
    user_id = st.selectbox("User", list(by_id), index=default, format_func=lambda key: by_id[key].name)
    st.caption("User ID for this demonstration:")
    st.code(user_id, language=None)
    occupation_code = st.text_input(
        "Occupation code (SOC)", value=by_id[user_id].occupation_code or "15-1252.00", key=f"occupation_{user_id}"
    )
    if st.button("Calculate & Store AIRScore (Creates Pending Event)", type="primary"):
        try:
            stored = lab.run(source.calculate_and_store_airscore, user_id=user_id, occupation_code=occupation_code)
        except source.QuLabError as error:
            st.error(f"Nothing was stored. {error}")
        else:
            st.session_state["outbox_stored"] = stored
    stored = st.session_state.get("outbox_stored")
    if stored is not None:
        score = stored.score
        st.success(
            f"One transaction stored AIRScore {score.air_score:.2f} (95% interval {score.ci_lower:.2f} to "
            f"{score.ci_upper:.2f}) and its {stored.event.event_type} event, status **{stored.event.status}**."
        )
        st.json(stored.event.payload)
    with st.expander("How the score is calculated"):
        st.code(inspect.getdoc(source.calculate_airscore), language=None)

st.subheader("Event publisher")
explanation = st.container()  # filled below, once the publisher's settings are read
left, middle, right = st.columns(3)
if left.button("Start Event Publisher (Background)"):
    switch_publisher(
        source.start_event_publisher,
        done="Publisher and consumer started.",
        nothing_to_do="The publisher was already running.",
        failure="The publisher did not start.",
    )
if middle.button("Stop Event Publisher"):
    switch_publisher(
        source.stop_event_publisher,
        done="Stopped after finishing the current batch.",
        nothing_to_do="The publisher was not running.",
        failure="The publisher did not stop.",
    )

try:
    publisher = lab.run(source.event_publisher_state)
except source.QuLabError as error:
    st.error(f"Could not read the publisher's state. {error}")
    st.stop()
settings = publisher.settings
explanation.markdown(
    f"""
This publisher is real, not a stand-in that runs a few rounds. It is a background task on QuLab's
server loop and keeps running across reruns and page changes until you stop it (your sandbox's
release stops it too). A commit that adds an event wakes it at once; with nothing to do it looks
again after {settings.idle_wait_seconds:g} s, then less and less often (at most every
{settings.idle_wait_max_seconds:g} s), so an idle publisher costs almost nothing. Each round it
leases up to {settings.batch_size} events, oldest first, adds them to the stream in one pipeline
and marks them published in one statement. A consumer group on the stream plays the downstream
service. **Stop** lets both finish the batch in hand.
"""
)
st.session_state[OUTAGE_KEY] = publisher.broker_cut_off  # the switch shows the real state
right.toggle("Broker outage", key=OUTAGE_KEY, on_change=apply_outage_switch)
if message := st.session_state.pop("outbox_outage_error", None):
    st.error(f"The outage switch failed. {message}")
if publisher.broker_cut_off:
    st.warning(
        "Broker outage: your sandbox's connections to Redis really fail now. The publisher pauses and "
        "checks the broker again with growing waits (at most "
        f"{settings.outage_backoff_max_seconds:g} s); new events stay pending and keep their attempts, because "
        "the outage is the broker's fault, not theirs. Turn the switch off: they all go out, with no retry needed. "
        "Only an event the broker refuses for itself (too large, say) is marked failed, at once, with the reason."
    )

st.subheader("Burst: many scores at once")
burst_size = st.number_input("Scores in the burst", 1, source.MAX_BURST_WRITES, 500, step=50)
if st.button("Store Burst of AIRScores"):
    progress = st.progress(0.0, text="Writing…")
    done, seconds = 0, 0.0
    try:
        while done < burst_size:
            chunk = lab.run(source.store_airscore_burst, count=min(BURST_CHUNK, int(burst_size) - done))
            done, seconds = done + chunk.writes, seconds + chunk.seconds
            progress.progress(done / burst_size, text=f"{done} of {burst_size} scores and events committed")
    except source.QuLabError as error:
        st.error(f"The burst stopped after {done} writes (each committed whole). {error}")
    st.session_state["outbox_burst"] = (done, seconds)
if burst := st.session_state.get("outbox_burst"):
    writes, seconds = burst
    if writes and seconds > 0:
        one, two = st.columns(2)
        one.metric("Score+event transactions", f"{writes:,}")
        two.metric("Write throughput", f"{writes / seconds:,.0f} per second")
        st.caption(
            f"Each write is its own transaction, {source.BURST_CONCURRENCY} at a time. "
            "The publisher's pace shows below as events/s."
        )


@st.fragment(run_every=1.0 if publisher.running else None)
def event_status_panel() -> None:
    """Counts, rates, latencies and the latest events; refreshes itself while the publisher runs."""
    st.subheader("Current event status")
    refresh, retry = st.columns(2)
    refresh.button("Refresh Event Status Now")
    if retry.button("Retry failed events"):
        try:
            retried = lab.run(source.retry_failed_events)
        except source.QuLabError as error:
            st.error(f"Nothing was retried. {error}")
        else:
            if retried:
                st.success(f"{retried} failed events are pending again, with a fresh set of attempts.")
            else:
                st.info("No event has failed, so there is nothing to retry.")
    try:
        status = lab.run(source.outbox_status, limit=10)
    except source.QuLabError as error:
        st.error(f"Could not read the event status. {error}")
        return
    st.caption(
        f"Publisher {'running, this panel refreshes every second' if status.publisher_running else 'stopped'}."
    )
    counts = st.columns(4)
    counts[0].metric("Pending", status.pending)
    counts[1].metric("Published", status.published)
    counts[2].metric("Failed", status.failed)
    counts[3].metric("Delivered", status.delivered)
    rates = st.columns(4)
    rates[0].metric(f"Events/s (last {source.RATE_WINDOW_SECONDS:g} s)", f"{status.events_per_second:,.1f}")
    age = status.oldest_pending_age_seconds
    rates[1].metric("Oldest pending", "none" if age is None else f"{age:,.1f} s")
    median = status.median_latency_ms
    rates[2].metric("Commit-to-publish (median)", "n/a" if median is None else f"{median:,.1f} ms")
    rates[3].metric("Duplicates ignored", status.duplicates_ignored)
    if status.broker_outage_seconds is not None:
        st.warning(f"Broker unreachable for {status.broker_outage_seconds:,.0f} s: relay paused, no event loses an attempt.")
    if status.durability.restart_can_lose_events:
        st.warning(f"A broker restart could lose events: {status.durability.description}")
    lag = "unknown" if status.consumer_lag is None else f"{status.consumer_lag:,}"
    st.caption(
        f"Stream length: {'unreachable' if status.stream_length is None else f'{status.stream_length:,}'}; "
        f"consumer lag: {lag} unread, {status.consumer_unacknowledged or 0:,} read but not acknowledged. "
        "The stream is trimmed only of entries the consumer group acknowledged. "
        "Latency runs from the event's created_at, stamped in its transaction just before the commit, so "
        "events written while the publisher was stopped or the broker cut off count that wait too; "
        f"p95: {'n/a' if status.p95_latency_ms is None else f'{status.p95_latency_ms:,.1f} ms'}."
    )
    show_table(
        "Pending Events",
        status.pending_events,
        ["id", "event_type", "status", "attempts", "created_at", "next_attempt_at", "last_error"],
        status.pending,
    )
    show_table(
        "Published Events",
        status.published_events,
        ["id", "event_type", "status", "attempts", "created_at", "published_at", "delivered_at"],
        status.published,
    )
    show_table(
        "Failed Events", status.failed_events, ["id", "event_type", "attempts", "last_error"], status.failed
    )
    if status.last_audit is not None:
        audit = status.last_audit
        st.caption(
            f"Audit at {audit.at:%H:%M:%S} UTC: {audit.checked} published events not yet consumed were looked up "
            f"in the stream, {audit.missing} were gone (the broker lost them) and {audit.republished} were "
            f"republished; {status.republished_by_audits} republished so far."
        )
    if status.activity:
        st.markdown("**Publisher and consumer activity** (newest first)")
        st.code("\n".join(status.activity[:15]), language=None)


event_status_panel()

with st.expander("The outbox code, read from the running source"):
    for shown in (
        source.calculate_and_store_airscore,
        source.OutboxPublisher,
        source.StreamConsumer,
        source.OutboxService,
    ):
        st.code(source.source_code(shown), language="python")
