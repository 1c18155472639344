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
from pages.common.progress import demo_fragment, refresh_after_click, show_section_progress
from pages.common.words import INBOX, OUTBOX, RELAY, STREAM

lab = open_page()
STORED, CLICKS, REFRESH = "outbox_stored", "outbox_clicks", "outbox_refresh"
SWITCH, OUTAGE, BURST = "outbox_switch", "outbox_broker_outage", "outbox_burst"


def stored_a_score(user_id: str) -> None:
    """Button callback: store a score and its event, and count the clicks (a new row each).
    The occupation code is read from the field as it is now, not as the last run drew it."""
    occupation = st.session_state.get(f"occupation_{user_id}", "")
    operation = source.calculate_and_store_airscore
    run_and_keep(
        lab, STORED, "Nothing was stored.", operation, user_id=user_id, occupation_code=occupation
    )
    if st.session_state[STORED].error is None:
        st.session_state[CLICKS] = st.session_state.get(CLICKS, 0) + 1
    st.session_state[REFRESH] = True


def render_stored(stored: source.StoredAIRScore) -> None:
    """What the last click committed, and where its event is now (or that it is gone)."""
    score, event = stored.score, stored.event
    now = run_or_report(
        lab,
        "Could not read the event.",
        eventing.stored_score_now,
        score_id=score.id,
        event_id=event.id,
    )
    if now is not None and not now.score_exists:
        st.session_state.pop(STORED, None)
        st.info("Your last stored score and its event are gone: your sandbox was started afresh.")
        return
    st.success(
        f"Click {st.session_state.get(CLICKS, 1)}: one transaction stored AIRScore "
        f"{score.air_score:.2f} (95% interval {score.ci_lower:.2f} to {score.ci_upper:.2f}), id "
        f"`{score.id}`, and its {event.event_type} event `{event.id}` at "
        f"{moment(event.created_at)} UTC, committed with status pending."
    )
    if now is not None and now.delivery is None:
        st.markdown(
            "That event was delivered, and has since left the outbox (it keeps the newest)."
        )
    elif now is not None:
        delivery = now.delivery
        error = f"; last error: {plain_text(delivery.last_error)}" if delivery.last_error else ""
        st.markdown(
            f"That event now: **{delivery.status}**; published {moment(delivery.published_at)}, "
            f"delivered {moment(delivery.delivered_at)}{error}"
        )
    st.json(event.payload)


@demo_fragment(lab)
def store_a_score() -> None:
    """The score form and what it stored: a click reruns this part of the page only."""
    st.subheader("Generate an AIRScore and its pending event")
    users = run_or_report(lab, "Could not read your sandbox's users.", eventing.list_learner_users)
    if users == []:
        st.session_state.pop(STORED, None)
        st.info("Your sandbox has no users yet. Initialize it in section 2 (Alex Smith, Jane Doe).")
    if not users:
        return
    by_id = {user.id: user for user in users}
    default = next((i for i, user in enumerate(users) if user.name == "Alex Smith"), 0)
    user_id = st.selectbox(
        "User", list(by_id), index=default, format_func=lambda key: by_id[key].name
    )
    st.caption("One of your own users (section 3's scale-up users are left out). User ID:")
    st.code(user_id, language=None)
    suggested = by_id[user_id].occupation_code or source.SAMPLE_OCCUPATION_CODE
    st.text_input("Occupation code (SOC)", value=suggested, key=f"occupation_{user_id}")
    st.button(
        "Calculate & Store AIRScore (Creates Pending Event)",
        type="primary",
        on_click=stored_a_score,
        kwargs={"user_id": user_id},
    )
    if stored := kept_outcome(STORED, keep=True):
        render_stored(stored)
    with st.expander("How the score is calculated"):
        st.code(inspect.getdoc(source.calculate_airscore), language=None)


def switch_outage() -> None:
    """Toggle callback: cut or restore this sandbox's broker connection for real."""
    cut = bool(st.session_state[OUTAGE])
    run_and_keep(
        lab, "outbox_outage", "The outage switch failed.", eventing.set_broker_outage, cut=cut
    )
    st.session_state[REFRESH] = True
    switched = st.session_state["outbox_outage"].error is None
    st.session_state["outbox_outage_switched"] = switched  # else its error is shown, not redrawn


@st.fragment
def publisher_switches() -> None:
    """Start, stop, and the broker outage switch: each redraws the page once (the panel and the
    sidebar's steps change with them)."""
    st.subheader("Event publisher", help=RELAY)
    left, middle, right = st.columns(3)
    switches = (
        (left, "Start Event Publisher (Background)", eventing.start_event_publisher,
         "The publisher did not start.", "Publisher and consumer started.",
         "The publisher was already running."),
        (middle, "Stop Event Publisher", eventing.stop_event_publisher,
         "The publisher did not stop.", "Stopped after finishing the current batch.",
         "The publisher was not running."),
    )  # fmt: skip
    for column, label, operation, failed, done, unchanged in switches:
        if column.button(label):
            switched = run_or_report(lab, failed, operation)
            if switched is not None:
                st.session_state[SWITCH] = done if switched else unchanged
                st.rerun(scope="app")
    if switched := st.session_state.get(SWITCH):
        st.success(switched)
    state = run_or_report(
        lab, "Could not read the publisher's state.", eventing.event_publisher_state
    )
    if state is None:
        return
    settings = state.settings
    st.markdown(
        "The publisher runs in the background across reruns and page changes until you stop "
        "it; when your sandbox sleeps after you leave, it first publishes what is pending and "
        "starts again on your return. A commit wakes it at once (on PostgreSQL, a commit in any "
        "process, via LISTEN/NOTIFY); with nothing pending it waits for that (looking on its own "
        f"every {settings.quiet_look_seconds / 60:g} min). Each round leases up to "
        f"{settings.batch_size} events, adds them to the stream in one pipeline and marks them "
        "published."
    )
    st.session_state[OUTAGE] = state.broker_cut_off  # the switch shows the real state
    right.toggle("Broker outage", key=OUTAGE, on_change=switch_outage)
    kept_outcome("outbox_outage")
    if st.session_state.pop("outbox_outage_switched", False):
        st.rerun(scope="app")  # the status panel and the sidebar change with it
    if state.broker_cut_off:
        st.warning(
            "Broker outage: your sandbox's connections to Redis really fail now. The publisher "
            "pauses and probes the broker with growing waits (at most "
            f"{settings.outage_backoff_max_seconds:g} s); events stay pending and keep their "
            "attempts. Turn the switch off: they all go out, no retry needed. Only an event "
            "the broker refuses for itself fails, at once."
        )


@demo_fragment(lab)
def burst() -> None:
    """Many scores at once: what the field shows is what is written, or nothing is."""
    st.subheader("Burst: many scores at once")
    # No bounds on the field itself: a browser's bounded number box keeps its last valid value
    # while it shows the invalid one. Here the value as shown reaches the burst, which refuses
    # it with a message when it is out of range, and writes nothing.
    most = eventing.MAX_BURST_WRITES
    size = st.number_input("Scores in the burst", value=500, step=50, help=f"From 1 to {most:,}.")
    if st.button("Store Burst of AIRScores"):
        st.session_state[REFRESH] = True
        with st.spinner(f"Writing {size:,} scores and their events…"):
            st.session_state[BURST] = run_or_report(
                lab, "Nothing was written.", eventing.store_airscore_burst, count=int(size)
            )
    if result := st.session_state.get(BURST):
        if result.failed:  # each write is its own transaction: say exactly what committed
            st.error(
                f"{result.failed} writes failed and stored nothing ({result.first_error}); "
                f"{result.writes:,} committed whole."
            )
        one, two = st.columns(2)
        one.metric("Score+event transactions", f"{result.writes:,}")
        if result.writes_per_second is not None:
            two.metric("Write throughput", f"{result.writes_per_second:,.0f} per second")
        st.caption(
            f"Each write is its own transaction, {result.concurrency} at a time; "
            "the publisher's pace shows below."
        )


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
st.caption("Words on this page:", help="\n\n".join((OUTBOX, RELAY, STREAM, INBOX)))
store_a_score()
publisher_switches()
burst()
publisher = run_or_report(
    lab, "Could not read the publisher's state.", eventing.event_publisher_state
)
refreshing = bool(publisher and publisher.running and st.session_state.get(REFRESH, False))


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
    if publisher and publisher.running and status.moving != refreshing:  # refresh while moving
        st.session_state[REFRESH] = status.moving
        st.rerun(scope="app")
    state = "running" if status.publisher_running else "stopped"
    doing = "refreshing every second while events move." if refreshing else "nothing moving."
    st.caption(f"Publisher {state}; {doing}")
    show_event_status(status)
    refresh_after_click(lab)


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
    source.claim_statement,  # FOR UPDATE SKIP LOCKED: several relays, no event twice
    GuardedPublisher.publish_due_batch,
    GuardedPublisher.send_to_stream,
    GuardedPublisher.settle_undelivered,
    BrokerCircuit,
    trim_acknowledged_entries,
    PublishedEventAudit.run,
    label="How it survives faults",
)
show_section_progress(lab, section=5)
