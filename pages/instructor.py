"""The instructor's view of the class, at /instructor (not in the learners' navigation).

Behind a key (QULAB_INSTRUCTOR_KEY, or instructor_key in .streamlit/secrets.toml), typed in a
password field. Then: a word to the class, and the class at a glance, refreshing itself while
anything changes. app.py gives this page no sandbox: the instructor is not a learner.
"""

import streamlit as st

from pages.common.class_view import (
    render_class,
    render_how_to_set_a_key,
    render_key_form,
    render_leave_button,
    render_message_board,
    signed_in,
)
from pages.common.instructor import instructor_key

st.title("Instructor: the class at a glance")
key = instructor_key()
if key is None:
    render_how_to_set_a_key()
    st.stop()
if not signed_in(key):
    render_key_form(key)
    st.stop()
render_leave_button()
render_message_board()
render_class()
