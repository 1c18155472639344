"""Section 5: a score and its event commit together; a background publisher delivers the event."""

import inspect

import streamlit as st

import source
from classroom.demos import eventing
from classroom.outbox.audit import PublishedEventAudit
from classroom.outbox.broker import trim_acknowledged_entries
from classroom.outbox.circuit import BrokerCircuit
from classroom.outbox.relay import GuardedPublisher
from pages.common import (
    kept_outcome,
    open_page,
    plain_text,
    run_and_keep,
    run_or_report,
    show_code,
)
from pages.common.outbox_panels import moment, show_event_status, watch_for_changes
from pages.common.progress import show_section_progress

lab = open_page()
STORED, CLICKS, REFRESH = "outbox_stored", "outbox_clicks", "outbox_refresh"
SWITCH, OUTAGE, BURST = "outbox_switch", "outbox_broker_outage", "outbox_burst"

st.title("5. Eventing (Outbox Pattern)")
st.markdown("""
When a score is saved, other services (recommendations, notifications, analytics) must hear
about it. Saving the score and then calling the message broker are two separate steps: a crash
between them loses the message, and a broker outage fails the request. The **outbox pattern**
turns the message into a row. The `AIRScore` and an `AIRScoreCalculated` row in `domain_events`
commit in the **same transaction**, so both exist or neither does. A separate **publisher** (an
outbox relay) then moves pending rows to the broker, here a Redis Stream, and marks them
`published`.

Delivery is *at least once*: a publisher that dies after sending but before marking will send
again. So the downstream consumer keeps an inbox of the event ids it has handled and ignores
repeats. The services agree a moment later rather than instantly: **eventual consistency**.
""")


def stored_a_score(**arguments) -> None:
    """Button callback: store a score and its event, and count the clicks (a new row each time)."""
    operation = source.calculate_and_store_airscore
    run_and_keep(lab, STORED, "Nothing was stored.", operation, **arguments)
    if st.session_state[STORED].error is None:
        st.session_state[CLICKS] = st.session_state.get(CLICKS, 0) + 1
    st.session_state[REFRESH] = True


def render_stored(stored: source.StoredAIRScore) -> None:
    """What the last click committed, and where its event is now."""
    score, event = stored.score, stored.event
    st.success(
        f"Click {st.session_state.get(CLICKS, 1)}: one transaction stored AIRScore "
        f"{score.air_score:.2f} (95% interval {score.ci_lower:.2f} to {score.ci_upper:.2f}), id "
        f"`{score.id}`, and its {event.event_type} event `{event.id}` at "
        f"{moment(event.created_at)} UTC, committed with status pending."
    )
    now = run_or_report(
        lab, "Could not read the event.", eventing.event_delivery, event_id=event.id
    )
    if now is not None:
        error = f"; last error: {plain_text(now.last_error)}" if now.last_error else ""
        st.markdown(
            f"That event now: **{now.status}**; published {moment(now.published_at)}, "
            f"delivered {moment(now.delivered_at)}{error}"
        )
    st.json(event.payload)


st.subheader("Generate an AIRScore and its pending event")
users = run_or_report(lab, "Could not read your sandbox's users.", eventing.list_learner_users)
if users == []:
    st.info("Your sandbox has no users yet. Initialize it in section 2 (Alex Smith, Jane Doe).")
elif users:
    by_id = {user.id: user for user in users}
    default = next((i for i, user in enumerate(users) if user.name == "Alex Smith"), 0)
    user_id = st.selectbox(
        "User", list(by_id), index=default, format_func=lambda key: by_id[key].name
    )
    st.caption("One of your own users (section 3's scale-up users are left out). User ID:")
    st.code(user_id, language=None)
    suggested = by_id[user_id].occupation_code or source.SAMPLE_OCCUPATION_CODE
    occupation = st.text_input(
        "Occupation code (SOC)", value=suggested, key=f"occupation_{user_id}"
    )
    st.button(
        "Calculate & Store AIRScore (Creates Pending Event)",
        type="primary",
        on_click=stored_a_score,
        kwargs={"user_id": user_id, "occupation_code": occupation},
    )
    if stored := kept_outcome(STORED, keep=True):
        render_stored(stored)
    with st.expander("How the score is calculated"):
        st.code(inspect.getdoc(source.calculate_airscore), language=None)

st.subheader("Event publisher")
left, middle, right = st.columns(3)
if left.button("Start Event Publisher (Background)"):
    started = run_or_report(lab, "The publisher did not start.", eventing.start_event_publisher)
    if started is not None:  # kept: the status panel may rerun the page as events move
        st.session_state[SWITCH] = (
            "Publisher and consumer started." if started else "The publisher was already running."
        )
if middle.button("Stop Event Publisher"):
    stopped = run_or_report(lab, "The publisher did not stop.", eventing.stop_event_publisher)
    if stopped is not None:
        st.session_state[SWITCH] = (
            "Stopped after finishing the current batch."
            if stopped
            else "The publisher was not running."
        )
if switched := st.session_state.get(SWITCH):
    st.success(switched)
publisher = run_or_report(
    lab, "Could not read the publisher's state.", eventing.event_publisher_state
)
if publisher is None:
    st.stop()
settings = publisher.settings
st.markdown(
    "The publisher runs in the background across reruns and page changes until you stop it; "
    "when your sandbox sleeps after you leave, it first publishes what is pending and starts "
    "again on your return. A commit wakes it at once (on PostgreSQL, a commit in any process, "
    "via LISTEN/NOTIFY); with nothing pending it waits for that (looking on its own every "
    f"{settings.quiet_look_seconds / 60:g} min). Each round leases up to {settings.batch_size} "
    "events, adds them to the stream in one pipeline and marks them published."
)
st.session_state[OUTAGE] = publisher.broker_cut_off  # the switch shows the real state


def switch_outage() -> None:
    """Toggle callback: cut or restore this sandbox's broker connection for real."""
    cut = bool(st.session_state[OUTAGE])
    run_and_keep(
        lab, "outbox_outage", "The outage switch failed.", eventing.set_broker_outage, cut=cut
    )
    st.session_state[REFRESH] = True


right.toggle("Broker outage", key=OUTAGE, on_change=switch_outage)
kept_outcome("outbox_outage")
if publisher.broker_cut_off:
    st.warning(
        "Broker outage: your sandbox's connections to Redis really fail now. The publisher pauses "
        "and probes the broker with growing waits (at most "
        f"{settings.outage_backoff_max_seconds:g} s); events stay pending and keep their "
        "attempts. Turn the switch off: they all go out, no retry needed. Only an event the "
        "broker refuses for itself fails, at once."
    )

st.subheader("Burst: many scores at once")
burst_size = int(st.number_input("Scores in the burst", 1, eventing.MAX_BURST_WRITES, 500, step=50))
if st.button("Store Burst of AIRScores"):
    st.session_state[REFRESH] = True
    with st.spinner(f"Writing {burst_size:,} scores and their events…"):
        st.session_state[BURST] = run_or_report(
            lab, "The burst did not run.", eventing.store_airscore_burst, count=burst_size
        )
if burst := st.session_state.get(BURST):
    if burst.failed:  # each write is its own transaction: say exactly what committed
        st.error(
            f"{burst.failed} writes failed and stored nothing ({burst.first_error}); "
            f"{burst.writes:,} committed whole."
        )
    one, two = st.columns(2)
    one.metric("Score+event transactions", f"{burst.writes:,}")
    if burst.writes_per_second is not None:
        two.metric("Write throughput", f"{burst.writes_per_second:,.0f} per second")
    st.caption(
        f"Each write is its own transaction, {burst.concurrency} at a time; "
        "the publisher's pace shows below."
    )

refreshing = publisher.running and st.session_state.get(REFRESH, False)


@st.fragment(run_every=1.0 if refreshing else None)
def event_status_panel() -> None:
    """Counts, backlog, latencies and the latest events; refreshes itself while events move."""
    st.subheader("Current event status")
    refresh, retry = st.columns(2)
    refresh.button("Refresh Event Status Now")
    if retry.button("Retry failed events"):
        retried = run_or_report(lab, "Nothing was retried.", eventing.retry_failed_events)
        if retried:
            st.success(f"{retried} failed events are pending again, with fresh attempts.")
        elif retried == 0:
            st.info("No event has failed, so there is nothing to retry.")
    status = run_or_report(
        lab, "Could not read the event status.", eventing.outbox_status, limit=10
    )
    if status is None:
        return
    if publisher.running and status.moving != refreshing:  # refresh while events move
        st.session_state[REFRESH] = status.moving
        st.rerun()
    state = "running" if status.publisher_running else "stopped"
    doing = "refreshing every second while events move." if refreshing else "nothing moving."
    st.caption(f"Publisher {state}; {doing}")
    show_event_status(status)


event_status_panel()
watch_for_changes(lab, refresh_key=REFRESH, watching=not refreshing)  # another tab's events too
show_code(
    source.calculate_and_store_airscore,
    source.run_publisher,
    source.OutboxPublisher.publish_due_batch,
    source.StreamConsumer.consume_batch,
    label="The outbox code, read from the running source",
)
show_code(
    source.OutboxPublisher.claim_due_events,
    GuardedPublisher.publish_due_batch,
    GuardedPublisher.refused,
    BrokerCircuit,
    trim_acknowledged_entries,
    PublishedEventAudit.run,
    label="How it survives faults",
)
show_section_progress(lab, section=5)
