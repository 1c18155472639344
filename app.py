"""QuLab entry point: the codelab's navigation and the sidebar status panel.

Run with `streamlit run app.py`. Pages live in pages/ (one per codelab section); they run the
lesson (source.py) through the classroom package, which gives each learner a sandbox.
"""

import streamlit as st

import source
from classroom.browser import SANDBOX_URL_PARAMETER, lab_for_browser_session, switch_to_new_sandbox
from classroom.sandboxes.admission import ClassFullError
from classroom.sandboxes.reset import reset_sandbox
from classroom.sandboxes.sandbox import new_sandbox_id
from classroom.status import RuntimeStatus, runtime_status
from pages.common import browser_session_hold
from pages.common.progress import render_progress
from pages.common.sections import SECTIONS

st.set_page_config(
    page_title="QuLab: Data Architecture & Persistence", page_icon="🧪", layout="wide"
)

PAGES = [
    st.Page(s.script, title=s.title, icon=s.icon, default=s.default, url_path=s.url_path)
    for s in SECTIONS
]
# The introduction again, at /introduction, for its link on the other pages: Streamlit gives a link
# to the default page the empty path, so on /caching its href "?sandbox=…" would open /caching.
INTRODUCTION_ELSEWHERE = st.Page(
    "pages/introduction.py",
    title="Introduction",
    icon=":material/flag:",
    url_path="introduction",
    visibility="hidden",
)
# Hidden: st.navigation's own sidebar links carry no query parameters, so a section opened in a new
# tab would start an empty sandbox. render_navigation draws the links, each with ?sandbox=<id>.
navigation = st.navigation([*PAGES, INTRODUCTION_ELSEWHERE], position="hidden")
sidebar_navigation = st.sidebar.container(
    key="qulab_navigation"
)  # the sidebar's top; filled once the sandbox is known


def render_navigation(sandbox_id: str) -> None:
    """The section links, in order, each keeping this learner's sandbox (?sandbox=<id>) in its href.

    A click changes page without a reload, as st.navigation's links do; a middle-click or "open in
    new tab" opens the same sandbox. st.page_link highlights the page being shown.
    """
    on_the_root = navigation.url_path == ""
    for page in PAGES:
        if page.url_path == "" and not on_the_root:
            page = INTRODUCTION_ELSEWHERE
        sidebar_navigation.page_link(
            page, query_params={SANDBOX_URL_PARAMETER: sandbox_id}, width="stretch"
        )


def render_status(status: RuntimeStatus) -> None:
    """The sidebar panel: where the data lives, how it is pooled, which Redis answers, the class.

    Few elements, each with several lines: every element costs server CPU on every rerun of every
    learner (bench/rerun_cost.py), so the panel is one caption, the sandbox id, two buttons and one
    caption about the class.
    """
    sidebar = st.sidebar
    redis_label = (
        "real Redis server" if status.redis_mode == "redis" else "fakeredis (in-process Redis)"
    )
    redis_warning = (
        "Outage switch on: your sandbox cannot reach Redis." if status.redis_cut_off
        else "Cache degraded: the last Redis call failed; reads fall back to the database."
        if status.redis_degraded
        else ""
    )  # fmt: skip
    sidebar.caption(paragraphs(
        "**Status**",
        lines(
            f"**Database:** {'PostgreSQL' if status.backend == 'postgresql' else 'SQLite'}",
            status.database,
            f"Note: {status.database_note}." if status.database_note else "",
            f"Pool: {status.pool_size} connection{'s' if status.pool_size != 1 else ''}"
            f" + {status.max_overflow} overflow, "
            f"{status.pool_timeout_seconds:g} s checkout timeout, "
            f"pre-ping {'on' if status.pool_pre_ping else 'off'}.",
        ),
        lines(f"**Redis:** {redis_label}", status.redis_reason, f"Breaker {status.redis_breaker}."),
        "" if redis_warning else "**Your sandbox**",
    ))  # fmt: skip
    if redis_warning:  # under the Redis lines, and the sandbox's label stays next to its id
        sidebar.warning(redis_warning)
        sidebar.caption("**Your sandbox**")
    sidebar.code(status.sandbox_id, language=None)
    new_column, reset_column = sidebar.columns(2)
    if new_column.button(
        "New sandbox",
        key="qulab_new_sandbox",
        help="Start over in a fresh, empty sandbox with a new link.",
    ):
        switch_to_new_sandbox(st.session_state, st.query_params)
        st.rerun()
    if reset_column.button(
        "Reset my sandbox",
        key="qulab_reset_sandbox",
        help="Delete every row and cached key in this sandbox; keep its link.",
    ):
        try:
            lab_for_browser_session(st.session_state).run(reset_sandbox)
        except source.QuLabError as error:
            sidebar.error(f"Reset failed; nothing was changed. {error}")
        else:
            sidebar.success("Your sandbox is empty again.")
    states, durability = status.sandbox_states, status.broker_durability
    sidebar.caption(lines(
        "The link in your address bar (?sandbox=…) is the key to this sandbox: bookmark it to "
        "come back, and anyone you give it to sees and changes the same data. While your tab is "
        "open it stays active; "
        f"{status.sandbox_grace_seconds:g} s after you close it, it goes dormant (data kept), and "
        f"{status.sandbox_idle_minutes:g} minutes after that its data is deleted.",
        f"Class on this process: {states['active']} active, {states['idle']} idle, "
        f"{states['dormant']} dormant; "
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


def render_class_full(error: ClassFullError) -> None:
    """The page a newcomer sees when every place is taken.

    Nobody else's work is touched to make room.
    """
    st.title("The class is full")
    st.warning(
        f"The class is full: {error.in_class} learners are working on this server right now, "
        f"and it has room for {error.capacity} (set by {error.limited_by}). "
        "Nobody's sandbox is closed to make room."
    )
    st.markdown(
        f"A place frees as soon as a learner closes their tab. Reload this page in about "
        f"{max(1, round(error.retry_after_seconds / 60))} minute(s). "
        "If you had a sandbox link (?sandbox=…), keep it: your data is still there."
    )


try:
    hold = browser_session_hold(st.session_state.setdefault("qulab_session_key", new_sandbox_id()))
    lab = lab_for_browser_session(st.session_state, st.query_params, hold=hold)
    render_navigation(
        lab.sandbox_id
    )  # before anything that can stop the run: the links always show
    render_status(runtime_status(lab))
except ClassFullError as error:
    render_class_full(error)
    st.stop()
except source.QuLabError as error:
    st.error(f"QuLab cannot start its data layer: {error}")
    st.stop()

navigation.run()
render_progress(lab)  # after the page: counts this click too
