"""Section 1: every table, its model read from the live source, and the Create User form."""

import pandas as pd
import streamlit as st

import source
from pages.common import SEEN_USER_IDS, open_page, run_or_report, source_code
from pages.common.formatting import USER_COLUMNS, entity_relationship_dot, user_as_row
from pages.common.progress import show_section_progress

lab = open_page()
MODELS = source.MODEL_CLASSES  # the guide's four, and the inbox of section 5's consumer


def render_models() -> None:
    """What each table holds, each model's code as it runs, and how the tables relate."""
    st.subheader(f"The {len(MODELS)} tables")
    st.table(
        pd.DataFrame(
            [
                {
                    "table": model.__tablename__,
                    "model": model.__name__,
                    "what it holds": model.__doc__.splitlines()[0],
                }
                for model in MODELS
            ]
        )
    )
    st.markdown(
        "The first four are the guide's. `consumed_events` belongs to section 5: the service "
        "that receives the published events writes down each event id it has handled, so an "
        "event delivered twice is acted on once."
    )
    st.caption(
        "The code below is read from source.py with inspect.getsource: "
        "it is the code the app executes."
    )
    shown = [source.Base, source.TimestampMixin, *MODELS]
    for tab, model in zip(st.tabs([model.__name__ for model in shown]), shown, strict=True):
        tab.code(source_code(model), language="python")
    st.markdown(
        """
`cascade="all, delete-orphan"` on `User.scores` and `User.assessments` means deleting a user
deletes what they own. Emails are unique **ignoring letter case** (a unique index on
`lower(email)`), and SQLite is told to enforce foreign keys, so a score can never point at a
user who does not exist.
"""
    )
    st.subheader("How the tables relate")
    st.graphviz_chart(entity_relationship_dot())


def render_create_user() -> None:
    """The Create User form; bad input gets a message naming the field, and writes nothing."""
    st.subheader("Try it: create a user")
    st.info(
        "Section 2's initialize button starts your sandbox fresh: it deletes every user, this "
        "one too, before creating Alex Smith and Jane Doe. For section 3, use those sample users, "
        "or a user you create here after initializing."
    )
    with st.form("create_user"):
        email = st.text_input("Email", placeholder="alex.smith@example.com")
        name = st.text_input("Name", placeholder="Alex Smith")
        left, middle, right = st.columns(3)
        occupation_code = left.text_input("Occupation code (optional)", placeholder="15-1252.00")
        education_level = middle.selectbox(
            "Education level (optional)", ["", *source.EDUCATION_LEVELS]
        )
        # No min/max on the widget: out-of-range input reaches source.py's validation,
        # which says what is wrong.
        years_experience = right.number_input(
            "Years of experience (optional, 0 to 80)", value=None, step=0.5
        )
        submitted = st.form_submit_button("Create User", type="primary")
    if not submitted:
        return
    user = run_or_report(
        lab,
        "User not created.",
        source.create_user,
        email=email,
        name=name,
        occupation_code=occupation_code,
        education_level=education_level,
        years_experience=years_experience,
    )
    if user is not None:
        st.session_state.setdefault(SEEN_USER_IDS, set()).add(user.id)
        st.success(
            "User created. Their id (until an initialize in section 2 starts your sandbox fresh):"
        )
        st.code(user.id, language=None)


def render_users() -> None:
    """The users in this learner's sandbox, newest first."""
    st.subheader("Users in your sandbox")
    users = run_or_report(lab, "Could not list users.", source.list_users) or []
    if users:
        st.dataframe(
            pd.DataFrame([user_as_row(user) for user in users]),
            hide_index=True,
            column_config=USER_COLUMNS,
        )
    else:
        st.info("No users yet. Create one above, or initialize the sample users in section 2.")


st.title("1. Data Models")
st.markdown(
    """
Alex starts by deciding what the platform stores: **users**, their **assessment** sessions, the
**AI-Readiness (AIR) scores** the system calculates, and **domain events** that tell other
services what happened. SQLAlchemy 2.0 maps each class to a table; the type hints
(`Mapped[str]`, `Mapped[Optional[float]]`) decide the column types and whether NULL is allowed.

Relationships turn joins into attribute access. Asking for a user's assessments is the relational
query below; in Python it is `user.assessments`.
"""
)
st.latex(
    r"\pi_{\text{Assessment.*}}\left(\text{Users} "
    r"\bowtie_{\text{Users.id} = \text{Assessments.user\_id}} "
    r"\text{Assessments}\right)"
)
render_models()
render_create_user()
render_users()
show_section_progress(lab, section=1)
