"""QuLab entry point: the codelab's navigation and the sidebar status panel.

Run with `streamlit run app.py`. Pages live in pages/ (one per codelab section) and call
source.py, where the whole data layer lives.
"""

import streamlit as st

import source

st.set_page_config(page_title="QuLab: Data Architecture & Persistence", page_icon=":material/science:", layout="wide")

navigation = st.navigation(
    [
        st.Page("pages/introduction.py", title="Introduction", icon=":material/flag:", default=True),
        st.Page("pages/data_models.py", title="1. Data Models", icon=":material/schema:"),
        st.Page("pages/connectivity_pooling.py", title="2. DB Connectivity & Pooling", icon=":material/cable:"),
        st.Page("pages/repository_n_plus_one.py", title="3. Repository Pattern & N+1", icon=":material/repeat:"),
        st.Page("pages/caching.py", title="4. Caching with Redis", icon=":material/bolt:"),
        st.Page("pages/eventing_outbox.py", title="5. Eventing (Outbox Pattern)", icon=":material/outbox:"),
    ]
)


def render_status(status: source.RuntimeStatus) -> None:
    """The sidebar panel: where the data lives, how it is pooled, which Redis answers."""
    sidebar = st.sidebar
    sidebar.subheader("Status")
    sidebar.markdown(f"**Database:** {'PostgreSQL' if status.backend == 'postgresql' else 'SQLite'}")
    sidebar.caption(status.database)
    if status.database_note:
        sidebar.caption(f"Note: {status.database_note}.")
    sidebar.caption(
        f"Pool: {status.pool_size} connections + {status.max_overflow} overflow, "
        f"{status.pool_timeout_seconds:g} s checkout timeout, pre-ping on."
    )
    redis_label = "real Redis server" if status.redis_mode == "redis" else "fakeredis (in-process Redis)"
    sidebar.markdown(f"**Redis:** {redis_label}")
    sidebar.caption(status.redis_reason)
    if status.redis_cut_off:
        sidebar.warning("Outage switch on: your sandbox cannot reach Redis.")
    elif status.redis_degraded:
        sidebar.warning("Cache degraded: the last Redis call failed; reads fall back to the database.")
    sidebar.markdown("**Your sandbox**")
    sidebar.code(status.sandbox_id, language=None)
    sidebar.caption(
        f"Private to this browser tab's session; released after {status.sandbox_idle_minutes:g} minutes "
        f"idle. Sandboxes live on this server: {status.live_sandboxes}."
    )
    if status.sandbox_notice:
        st.info(status.sandbox_notice)


try:
    render_status(source.lab_for_browser_session(st.session_state, st.query_params).status())
except source.QuLabError as error:
    st.error(f"QuLab cannot start its data layer: {error}")
    st.stop()

durability = source.lab_for_browser_session(st.session_state).run(source.broker_durability)
if durability.restart_can_lose_events:  # the outbox's promise depends on the broker keeping its stream
    st.sidebar.caption(f"Outbox: a broker restart could lose events. {durability.description}")

navigation.run()
