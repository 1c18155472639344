"""Section 5: a score and its event commit together; a background publisher delivers the event."""

import inspect

import streamlit as st

import source
from pages import kept_outcome, open_page, plain_text, run_and_keep, run_or_report, show_code, show_section_progress
from pages.outbox_panels import moment, show_event_status, watch_for_changes, write_burst

lab = open_page()
OUTAGE_KEY, STORED_KEY, CLICKS_KEY, REFRESH_KEY = "outbox_broker_outage", "outbox_stored", "outbox_clicks", "outbox_refresh"
SWITCH_KEY = "outbox_switch"

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


def stored_a_score(**arguments) -> None:
    """Button callback: store a score and its event, and count the clicks (a new row every time)."""
    run_and_keep(lab, STORED_KEY, "Nothing was stored.", source.calculate_and_store_airscore, **arguments)
    if st.session_state[STORED_KEY].error is None:
        st.session_state[CLICKS_KEY] = st.session_state.get(CLICKS_KEY, 0) + 1
    st.session_state[REFRESH_KEY] = True


st.subheader("Generate an AIRScore and its pending event")
users = run_or_report(lab, "Could not read your sandbox's users.", source.list_learner_users)
if users == []:
    st.info("Your sandbox has no users yet. Initialize it on page 2 (it creates Alex Smith and Jane Doe), then return.")
elif users:
    by_id = {user.id: user for user in users}
    default = next((i for i, user in enumerate(users) if user.name == "Alex Smith"), 0)
    user_id = st.selectbox("User", list(by_id), index=default, format_func=lambda key: by_id[key].name)
    st.caption(f"One of your own {len(users)} users (section 3's scale-up users are left out). User ID:")
    st.code(user_id, language=None)
    suggested = by_id[user_id].occupation_code or "15-1252.00"
    occupation = st.text_input("Occupation code (SOC)", value=suggested, key=f"occupation_{user_id}")
    arguments = {"user_id": user_id, "occupation_code": occupation}
    st.button("Calculate & Store AIRScore (Creates Pending Event)", type="primary", on_click=stored_a_score, kwargs=arguments)
    if stored := kept_outcome(STORED_KEY, keep=True):
        score, event = stored.score, stored.event
        st.success(
            f"Click {st.session_state.get(CLICKS_KEY, 1)}: one transaction stored AIRScore {score.air_score:.2f} "
            f"(95% interval {score.ci_lower:.2f} to {score.ci_upper:.2f}), id `{score.id}`, and its "
            f"{event.event_type} event `{event.id}` at {moment(event.created_at)} UTC, committed with status pending."
        )
        if now := run_or_report(lab, "Could not read the event.", source.event_delivery, event_id=event.id):
            error = f"; last error: {plain_text(now.last_error)}" if now.last_error else ""
            st.markdown(f"That event now: **{now.status}**; published {moment(now.published_at)}, delivered {moment(now.delivered_at)}{error}")
        st.json(event.payload)
    with st.expander("How the score is calculated"):
        st.code(inspect.getdoc(source.calculate_airscore), language=None)

st.subheader("Event publisher")
left, middle, right = st.columns(3)
if left.button("Start Event Publisher (Background)"):
    started = run_or_report(lab, "The publisher did not start.", source.start_event_publisher)
    if started is not None:  # kept: the status panel may rerun the page as events start to move
        st.session_state[SWITCH_KEY] = "Publisher and consumer started." if started else "The publisher was already running."
if middle.button("Stop Event Publisher"):
    stopped = run_or_report(lab, "The publisher did not stop.", source.stop_event_publisher)
    if stopped is not None:
        st.session_state[SWITCH_KEY] = "Stopped after finishing the current batch." if stopped else "The publisher was not running."
if switched := st.session_state.get(SWITCH_KEY):
    st.success(switched)
publisher = run_or_report(lab, "Could not read the publisher's state.", source.event_publisher_state)
if publisher is None:
    st.stop()
settings = publisher.settings
st.markdown(f"""The publisher runs in the background across reruns and page changes until you stop it; when your
sandbox sleeps after you leave, it first publishes what is pending and starts again on your return. A commit wakes it
at once (on PostgreSQL, a commit in any process, via LISTEN/NOTIFY); with nothing pending it just waits for that (looking
on its own every {settings.quiet_look_seconds / 60:g} min). Each round leases up to {settings.batch_size} events, adds them to the stream in one pipeline and marks them published.""")
st.session_state[OUTAGE_KEY] = publisher.broker_cut_off  # the switch shows the real state


def switch_outage() -> None:
    """Toggle callback: cut or restore this sandbox's broker connection for real."""
    cut = bool(st.session_state[OUTAGE_KEY])
    run_and_keep(lab, "outbox_outage", "The outage switch failed.", source.set_broker_outage, cut=cut)
    st.session_state[REFRESH_KEY] = True


right.toggle("Broker outage", key=OUTAGE_KEY, on_change=switch_outage)
kept_outcome("outbox_outage")
if publisher.broker_cut_off:
    st.warning("Broker outage: your sandbox's connections to Redis really fail now. The publisher pauses and probes the broker "
               f"with growing waits (at most {settings.outage_backoff_max_seconds:g} s); events stay pending and keep their attempts. "
               "Turn the switch off: they all go out, no retry needed. Only an event the broker refuses for itself fails, at once.")

st.subheader("Burst: many scores at once")
burst_size = int(st.number_input("Scores in the burst", 1, source.MAX_BURST_WRITES, 500, step=50))
if st.button("Store Burst of AIRScores"):
    st.session_state[REFRESH_KEY] = True
    st.session_state["outbox_burst"] = write_burst(lab, burst_size)
burst = st.session_state.get("outbox_burst")
if burst and burst[2]:  # kept until the next burst: what committed, and why the rest did not
    st.error(burst[2])
if burst and burst[0] and burst[1] > 0:
    one, two = st.columns(2)
    one.metric("Score+event transactions", f"{burst[0]:,}")
    two.metric("Write throughput", f"{burst[0] / burst[1]:,.0f} per second")
    st.caption(f"Each write is its own transaction, {source.BURST_CONCURRENCY} at a time; the publisher's pace shows below.")

refreshing = publisher.running and st.session_state.get(REFRESH_KEY, False)


@st.fragment(run_every=1.0 if refreshing else None)
def event_status_panel() -> None:
    """Counts, backlog, latencies and the latest events; refreshes itself only while events are moving."""
    st.subheader("Current event status")
    refresh, retry = st.columns(2)
    refresh.button("Refresh Event Status Now")
    retried = run_or_report(lab, "Nothing was retried.", source.retry_failed_events) if retry.button("Retry failed events") else None
    if retried is not None:
        done = f"{retried} failed events are pending again, with a fresh set of attempts."
        (st.success if retried else st.info)(done if retried else "No event has failed, so there is nothing to retry.")
    status = run_or_report(lab, "Could not read the event status.", source.outbox_status, limit=10)
    if status is None:
        return
    moving = status.pending > 0 or status.published != status.delivered or status.broker_outage_seconds is not None
    if publisher.running and moving != refreshing:  # start refreshing when events move, stop when they settle
        st.session_state[REFRESH_KEY] = moving
        st.rerun()
    state = "running" if status.publisher_running else "stopped"
    st.caption(f"Publisher {state}; " + ("refreshing every second while events move." if refreshing else "nothing moving."))
    show_event_status(status)


event_status_panel()
watch_for_changes(lab, refresh_key=REFRESH_KEY, watching=not refreshing)  # another tab's events show too
show_code(source.calculate_and_store_airscore, source.OutboxPublisher.publish_due_batch, source.StreamConsumer.consume_batch,
          label="The outbox code, read from the running source")
show_code(source.OutboxPublisher.claim_due_events, source.OutboxPublisher.send_to_stream, source.BrokerCircuit,
          source.trim_acknowledged_entries, source.PublishedEventAudit.run, label="How this survives faults")
show_section_progress(lab, section=5)
