"""QuLab entry point: the codelab's navigation and the sidebar status panel.

Run with `streamlit run app.py`. Pages live in pages/ (one per codelab section) and call
source.py, where the whole data layer lives.
"""

import streamlit as st

import source
from pages import browser_session_hold
from pages.progress import render_progress

st.set_page_config(page_title="QuLab: Data Architecture & Persistence", page_icon="🧪", layout="wide")

PAGES = [  # url_path="" frees "introduction" (a page's identity is its url_path) for the second address below
    st.Page("pages/introduction.py", title="Introduction", icon=":material/flag:", default=True, url_path=""),
    st.Page("pages/data_models.py", title="1. Data Models", icon=":material/schema:"),
    st.Page("pages/connectivity_pooling.py", title="2. DB Connectivity & Pooling", icon=":material/cable:"),
    st.Page("pages/repository_n_plus_one.py", title="3. Repository Pattern & N+1", icon=":material/repeat:"),
    st.Page("pages/caching.py", title="4. Caching with Redis", icon=":material/bolt:"),
    st.Page("pages/eventing_outbox.py", title="5. Eventing (Outbox Pattern)", icon=":material/outbox:"),
]
# The introduction again, at /introduction, for its link on the other pages: Streamlit gives a link
# to the default page the empty path, so on /caching its href "?sandbox=…" would open /caching.
INTRODUCTION_ELSEWHERE = st.Page(
    "pages/introduction.py", title="Introduction", icon=":material/flag:", url_path="introduction", visibility="hidden"
)
# Hidden: st.navigation's own sidebar links carry no query parameters, so a section opened in a new
# tab would start an empty sandbox. render_navigation draws the links, each with ?sandbox=<id>.
navigation = st.navigation([*PAGES, INTRODUCTION_ELSEWHERE], position="hidden")
sidebar_navigation = st.sidebar.container(key="qulab_navigation")  # the sidebar's top; filled once the sandbox is known


def render_navigation(sandbox_id: str) -> None:
    """The section links, in order, each keeping this learner's sandbox (?sandbox=<id>) in its href.

    A click changes page without a reload, as st.navigation's links do; a middle-click or "open in
    new tab" opens the same sandbox. st.page_link highlights the page being shown.
    """
    on_the_root = navigation.url_path == ""
    for page in PAGES:
        if page.url_path == "" and not on_the_root:
            page = INTRODUCTION_ELSEWHERE
        sidebar_navigation.page_link(page, query_params={source.SANDBOX_URL_PARAMETER: sandbox_id}, width="stretch")


def render_status(status: source.RuntimeStatus) -> None:
    """The sidebar panel: where the data lives, how it is pooled, which Redis answers, the class.

    Few elements, each with several lines: every element costs server CPU on every rerun of every
    learner (bench/rerun_cost.py), so the panel is one caption, the sandbox id, two buttons and one
    caption about the class.
    """
    sidebar = st.sidebar
    redis_label = "real Redis server" if status.redis_mode == "redis" else "fakeredis (in-process Redis)"
    redis_warning = (
        "Outage switch on: your sandbox cannot reach Redis." if status.redis_cut_off
        else "Cache degraded: the last Redis call failed; reads fall back to the database." if status.redis_degraded
        else ""
    )  # fmt: skip
    sidebar.caption(paragraphs(
        "**Status**",
        lines(
            f"**Database:** {'PostgreSQL' if status.backend == 'postgresql' else 'SQLite'}",
            status.database,
            f"Note: {status.database_note}." if status.database_note else "",
            f"Pool: {status.pool_size} connection{'s' if status.pool_size != 1 else ''} + {status.max_overflow} overflow, "
            f"{status.pool_timeout_seconds:g} s checkout timeout, pre-ping {'on' if status.pool_pre_ping else 'off'}.",
        ),
        lines(f"**Redis:** {redis_label}", status.redis_reason, f"Breaker {status.redis_breaker}."),
        "" if redis_warning else "**Your sandbox**",
    ))  # fmt: skip
    if redis_warning:  # under the Redis lines, and the sandbox's label stays next to its id
        sidebar.warning(redis_warning)
        sidebar.caption("**Your sandbox**")
    sidebar.code(status.sandbox_id, language=None)
    new_column, reset_column = sidebar.columns(2)
    if new_column.button("New sandbox", key="qulab_new_sandbox", help="Start over in a fresh, empty sandbox with a new link."):
        source.switch_to_new_sandbox(st.session_state, st.query_params)
        st.rerun()
    if reset_column.button("Reset my sandbox", key="qulab_reset_sandbox", help="Delete every row and cached key in this sandbox; keep its link."):
        try:
            source.lab_for_browser_session(st.session_state).run(source.reset_sandbox)
        except source.QuLabError as error:
            sidebar.error(f"Reset failed; nothing was changed. {error}")
        else:
            sidebar.success("Your sandbox is empty again.")
    states, durability = status.sandbox_states, status.broker_durability
    sidebar.caption(lines(
        "The link in your address bar (?sandbox=…) is the key to this sandbox: bookmark it to come back, "
        "and anyone you give it to sees and changes the same data. While your tab is open it stays active; "
        f"{status.sandbox_grace_seconds:g} s after you close it, it goes dormant (data kept), and "
        f"{status.sandbox_idle_minutes:g} minutes after that its data is deleted.",
        f"Class on this process: {states['active']} active, {states['idle']} idle, {states['dormant']} dormant; "
        f"room for {status.capacity} awake (set by {status.capacity_limited_by}). "
        f"Connections: {status.connections_in_use} of {status.connection_budget} in use.",
        # the outbox's promise depends on the broker keeping its stream
        f"Outbox: a broker restart could lose events. {durability.description}"
        if durability.restart_can_lose_events else "",
    ))  # fmt: skip
    if status.sandbox_notice:
        st.info(status.sandbox_notice)


def lines(*texts: str) -> str:
    """Several lines in one Markdown element (a hard line break between the non-empty ones)."""
    return "  \n".join(text for text in texts if text)


def paragraphs(*texts: str) -> str:
    """Several paragraphs in one Markdown element."""
    return "\n\n".join(text for text in texts if text)


def render_class_full(error: source.ClassFullError) -> None:
    """The page a newcomer sees when every place is taken: nobody else's work is touched to make room."""
    st.title("The class is full")
    st.warning(
        f"The class is full: {error.in_class} learners are working on this server right now, and it has "
        f"room for {error.capacity} (set by {error.limited_by}). Nobody's sandbox is closed to make room."
    )
    st.markdown(
        f"A place frees as soon as a learner closes their tab. Reload this page in about "
        f"{max(1, round(error.retry_after_seconds / 60))} minute(s). If you had a sandbox link (?sandbox=…), keep "
        "it: your data is still there."
    )


try:
    hold = browser_session_hold(st.session_state.setdefault("qulab_session_key", source.new_sandbox_id()))
    lab = source.lab_for_browser_session(st.session_state, st.query_params, hold=hold)
    render_navigation(lab.sandbox_id)  # before anything that can stop the run: the links always show
    render_status(lab.status())
except source.ClassFullError as error:
    render_class_full(error)
    st.stop()
except source.QuLabError as error:
    st.error(f"QuLab cannot start its data layer: {error}")
    st.stop()

navigation.run()
render_progress(lab)  # after the page: counts this click too
