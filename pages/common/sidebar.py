"""The sidebar's "Server details": where the data lives, how it is pooled, which Redis answers,
and how the class stands. Collapsed, and drawn only while open: a learner rarely needs it, and
every element costs server CPU on every rerun of every learner."""

from __future__ import annotations

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from classroom.status import RuntimeStatus

DETAILS_KEY = "qulab_server_details"
_REDIS_SHOWN = "qulab_redis_shown_this_run"


def remember_redis_shown(status: RuntimeStatus) -> None:
    """Keep what the sidebar says about Redis in this script run, for the page drawn after it."""
    context = get_script_run_ctx()
    if context is not None:  # each run has a new `cursors` dict: its identity marks this run
        shown = (status.redis_answers, status.redis_breaker)
        st.session_state[_REDIS_SHOWN] = (context.cursors, shown)


def redis_as_the_sidebar_says(answers: bool, breaker: str) -> tuple[bool, str]:
    """Whether Redis answers, and its breaker, as the sidebar drawn in this same run says; else
    (a fragment's rerun, no sidebar drawn) the page's own reading. The reading both share lasts
    2 s, and may end between the sidebar and the page: in one run they must not disagree."""
    context = get_script_run_ctx()
    kept = st.session_state.get(_REDIS_SHOWN)
    if context is not None and kept is not None and kept[0] is context.cursors:
        return kept[1]
    return answers, breaker


def render_server_details(status: RuntimeStatus) -> None:
    """The collapsed expander; its lines are drawn only while it is open."""
    details = st.sidebar.expander("Server details", key=DETAILS_KEY, on_change="rerun")
    if details.open:
        details.markdown(server_details(status))


def server_details(status: RuntimeStatus) -> str:
    """The details as Markdown lines (configuration names appear here and in the docs only)."""
    states = status.sandbox_states
    connections = "connection" if status.pool_size == 1 else "connections"
    redis = "a Redis server" if status.redis_mode == "redis" else "fakeredis (Redis, in-process)"
    answers = (
        "cut off for your sandbox (the switch in section 4 or 5)"
        if status.redis_cut_off
        else "answering"
        if status.redis_answers
        else "not answering: reads use the database"
    )
    lines = [
        f"**Database:** {'PostgreSQL' if status.backend == 'postgresql' else 'SQLite'}, "
        f"{status.database}",
        f"Note: {status.database_note}." if status.database_note else "",
        f"**Pool:** {status.pool_size} {connections} + {status.max_overflow} overflow, "
        f"{status.pool_timeout_seconds:g} s to wait for one, pre-ping "
        f"{'on' if status.pool_pre_ping else 'off'}.",
        f"**Redis:** {redis}, {answers}. {status.redis_reason}.",
        f"Breaker (skips Redis while it fails): {status.redis_breaker}.",
        f"**Class on this server:** {states['active']} connected, {states['idle']} idle, "
        f"{states['dormant']} asleep; room for {status.capacity} at once (set by "
        f"{status.capacity_limited_by}). Connections in use: {status.connections_in_use} of "
        f"{status.connection_budget}.",
        f"**Your sandbox** stays awake while your tab is open; "
        f"{status.sandbox_grace_seconds:g} s after you close it, it sleeps (data kept, "
        f"QULAB_SANDBOX_GRACE_SECONDS), and {status.sandbox_idle_minutes:g} minutes after "
        "that its data is deleted (QULAB_SANDBOX_IDLE_SECONDS). Anyone with its link sees it.",
        f"**Outbox broker:** {status.broker_durability.description}",
    ]
    return "  \n".join(line for line in lines if line)
