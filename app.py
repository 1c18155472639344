"""QuLab entry point: the codelab's navigation and a calm sidebar.

Run with `streamlit run app.py`. Pages live in pages/ (one per codelab section); they run the
lesson (source.py) through the classroom package, which gives each learner a sandbox. The
sidebar holds what a learner needs: the sections, their progress and "Download my sandbox" on
top, their sandbox next; the server's details wait in a collapsed expander.
"""

import streamlit as st

import source
from classroom.browser import (
    SANDBOX_URL_PARAMETER,
    choose_sandbox,
    lab_for_browser_session,
    remember_sandbox_script,
    remembered_sandbox,
    switch_to_new_sandbox,
)
from classroom.errors import OperationTimeoutError
from classroom.runtime import Lab
from classroom.sandboxes.admission import ClassFullError
from classroom.sandboxes.reset import reset_sandbox
from classroom.sandboxes.sandbox import new_sandbox_id
from classroom.status import RuntimeStatus, runtime_status
from pages.common import browser_session_hold, plain_text
from pages.common.instructor import instructor_key, render_class_message, render_instructor_sees
from pages.common.progress import render_progress
from pages.common.sections import INSTRUCTOR, SECTIONS
from pages.common.sidebar import remember_redis_shown, render_server_details

st.set_page_config(
    page_title="QuLab: Data Architecture & Persistence", page_icon="🧪", layout="wide"
)

PAGES = [
    st.Page(s.script, title=s.title, icon=s.icon, default=s.default, url_path=s.url_path)
    for s in SECTIONS
]
# The introduction again, at /introduction, for its link on the other pages: Streamlit gives a
# link to the default page the empty path, so on /caching its href "?sandbox=…" would open
# /caching.
INTRODUCTION_ELSEWHERE = st.Page(
    SECTIONS[0].script,
    title=SECTIONS[0].title,
    icon=SECTIONS[0].icon,
    url_path="introduction",
    visibility="hidden",
)
# Not in the learners' navigation: the instructor opens it at its own path.
INSTRUCTOR_PAGE = st.Page(
    INSTRUCTOR.script, title=INSTRUCTOR.title, url_path=INSTRUCTOR.url_path, visibility="hidden"
)
# Hidden: st.navigation's own links carry no query parameters, so a section opened in a new tab
# would start an empty sandbox. render_navigation draws the links, each with ?sandbox=<id>.
navigation = st.navigation([*PAGES, INTRODUCTION_ELSEWHERE, INSTRUCTOR_PAGE], position="hidden")
# Ctrl/Cmd/Shift-click on a sidebar link opens a new tab, as on any link: the app's own click
# handler never hears those clicks, so the browser does what it always does.
LINK_SCRIPT = """if (!window.qulabLinks) { window.qulabLinks = true;
document.addEventListener("click", (event) => {
  const link = event.target.closest("[data-testid='stSidebar'] a[href]");
  if (link && (event.ctrlKey || event.metaKey || event.shiftKey)) event.stopImmediatePropagation();
}, true); }"""


def render_navigation(sandbox_id: str) -> None:
    """The section links, in order, each keeping this learner's sandbox in its href."""
    on_the_root = navigation.url_path == ""
    links = st.sidebar.container(key="qulab_navigation")
    for page in PAGES:
        if page.url_path == "" and not on_the_root:
            page = INTRODUCTION_ELSEWHERE
        links.page_link(page, query_params={SANDBOX_URL_PARAMETER: sandbox_id}, width="stretch")


@st.dialog("Start a new sandbox?")
def confirm_new_sandbox(sandbox_id: str) -> None:
    """New sandbox, asked first: the current one is left as it is, reachable by its link."""
    st.markdown(
        "You get a new, empty sandbox and a new link. Your current sandbox keeps its data, "
        "but only its link leads back to it:"
    )
    st.code(sandbox_id, language=None)
    if st.button("Yes, start a new sandbox", type="primary"):
        switch_to_new_sandbox(st.session_state, st.query_params)
        st.rerun()


@st.dialog("Reset your sandbox?")
def confirm_reset(lab: Lab) -> None:
    """Reset my sandbox, asked first: say what is lost."""
    st.markdown(
        "This deletes everything in your sandbox: every user, score and event, its cached "
        "values, and **your progress**. Its link stays the same. This cannot be undone."
    )
    if st.button("Yes, reset my sandbox", type="primary"):
        try:
            lab.run(reset_sandbox)
        except source.QuLabError as error:
            st.error(f"Nothing was reset. {error}")
        else:
            st.session_state["qulab_reset_done"] = True
            st.rerun()


def render_sandbox(lab: Lab, status: RuntimeStatus) -> None:
    """The learner's sandbox: its id, and the two ways to start afresh (each asks first)."""
    sidebar = st.sidebar
    sidebar.caption(
        "**Your sandbox**",
        help="Your own database and Redis keys. The link in your address bar (?sandbox=…) brings "
        "you back to it; anyone you give it to sees and changes the same data.",
    )
    sidebar.code(status.sandbox_id, language=None)
    if sidebar.button("New sandbox", key="qulab_new_sandbox", width="stretch"):
        confirm_new_sandbox(status.sandbox_id)
    if sidebar.button("Reset my sandbox", key="qulab_reset_sandbox", width="stretch"):
        confirm_reset(lab)
    if st.session_state.pop("qulab_reset_done", False):
        sidebar.success("Your sandbox is empty again.")
    if not status.redis_answers:
        sidebar.warning("Redis is not answering right now: reads come from the database.")


def render_class_full(error: ClassFullError) -> None:
    """The page a newcomer sees when every place is taken: nobody else's work is touched."""
    st.title("The class is full")
    st.warning(
        f"Every place on this server is taken: {error.in_class} learners are working right now. "
        "Nobody's sandbox is closed to make room for a newcomer."
    )
    minutes = max(1, round(error.retry_after_seconds / 60))
    st.markdown(
        f"A place frees as soon as a learner closes their tab. Reload this page in about "
        f"{minutes} minute{'s' if minutes != 1 else ''}. If you had a sandbox link "
        "(?sandbox=…), keep it: your data is still there."
    )


def render_welcome_back(remembered: str) -> None:
    """A bare address, and this browser has a sandbox: offer it, or a new one."""
    st.title("Welcome back to QuLab")
    st.markdown("This browser used a sandbox here before. Go on where you left off?")
    st.code(remembered, language=None)
    left, right = st.columns(2)
    left.button(
        "Continue your last sandbox",
        type="primary",
        on_click=choose_sandbox,
        args=(st.session_state, st.query_params, remembered),
    )
    right.button(
        "Start a new sandbox",
        on_click=choose_sandbox,
        args=(st.session_state, st.query_params, new_sandbox_id()),
    )


if navigation.url_path == INSTRUCTOR.url_path:  # the instructor is not a learner: no sandbox
    navigation.run()
    st.stop()
if remembered := remembered_sandbox(st.session_state, st.query_params, st.context.cookies):
    render_welcome_back(remembered)
    st.stop()
try:
    hold = browser_session_hold(st.session_state.setdefault("qulab_session_key", new_sandbox_id()))
    lab = lab_for_browser_session(st.session_state, st.query_params, hold=hold)
    render_navigation(lab.sandbox_id)  # first: the links show whatever happens next
    status = runtime_status(lab)
    remember_redis_shown(status)  # section 4, drawn in this run, says the same
    render_progress(lab)
    render_sandbox(lab, status)
    render_server_details(status)
    # Looked up once a run: without a secrets file, each look is a failed parse.
    configured_key = instructor_key()
    render_instructor_sees(lab, configured_key)  # only with a key set; drawn only while open
    if st.session_state.get("qulab_remembered") != lab.sandbox_id:  # once per session and id
        st.session_state["qulab_remembered"] = lab.sandbox_id
        script = remember_sandbox_script(lab.sandbox_id) + LINK_SCRIPT
        st.sidebar.html(f"<script>{script}</script>", unsafe_allow_javascript=True)
except ClassFullError as error:
    render_class_full(error)
    st.stop()
except OperationTimeoutError:  # the server is overloaded, not broken: say so, and what to do
    st.warning(
        "The server is very busy: your sandbox did not open in time. Reload the page in a "
        "moment; nothing of yours is lost."
    )
    st.stop()
except source.QuLabError as error:
    st.error(f"QuLab cannot start its data layer: {plain_text(str(error))}")  # a URL: no Markdown
    st.stop()

if status.sandbox_notice:
    st.info(status.sandbox_notice)
render_class_message(configured_key)  # only with a key set: a small fragment, plain text
navigation.run()
