"""What every codelab page does first. (Streamlit never lists __init__.py as a page.)

Why this exists: Streamlit serves a folder named pages/ the old "v1" way until the first
st.navigation call in the process. A deep link opened before that (say /caching, right after a
restart) runs pages/caching.py on its own, without app.py: no status panel, the raw file list as
navigation. open_page() notices, leaves that mode and reruns, so app.py draws the frame and routes
to the same page (its url_path is the file name in both modes).
"""

import streamlit as st

import source

try:  # Streamlit's own switch for the v1 mode; if a future version drops it, there is no v1 mode to leave.
    from streamlit.runtime.pages_manager import PagesManager
except ImportError:  # pragma: no cover
    PagesManager = None


def open_page() -> source.Lab:
    """Make sure app.py framed this page, then return this browser session's Lab (its sandbox)."""
    if PagesManager is not None and PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        # app.py gives every session it frames a sandbox id. A session without one is on its
        # first page load (no click to lose), so rerunning through app.py is safe.
        if source.SANDBOX_STATE_KEY not in st.session_state:
            st.rerun()
    return source.lab_for_browser_session(st.session_state)
