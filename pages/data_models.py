"""Section 1: every table, its model read from the live source, and the Create User form."""

import pandas as pd
import streamlit as st

import source
from pages.common import (
    SEEN_USER_IDS,
    kept_outcome,
    open_page,
    run_and_keep,
    run_or_report,
    source_code,
)
from pages.common.formatting import USER_COLUMNS, entity_relationship_dot, user_as_row
from pages.common.progress import demo_fragment, show_section_progress

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


FIELDS = ("email", "name", "occupation_code", "education_level", "years_experience")
CREATED = "create_user_outcome"


def create_user_from_form() -> None:
    """The form's callback: create the user from what the form shows, and keep the outcome."""
    values = {field: st.session_state[f"new_user_{field}"] for field in FIELDS}
    run_and_keep(lab, CREATED, "User not created.", source.create_user, **values)


@demo_fragment(lab)
def create_user_demo() -> None:
    """The Create User form and the users it made: a click reruns this part of the page only."""
    st.subheader("Try it: create a user")
    st.info(
        "Section 2's initialize button starts your sandbox fresh: it deletes every user, this one "
        "too, before creating Alex Smith and Jane Doe. For section 3, use those sample users, or "
        "a user you create here after initializing."
    )
    with st.form("create_user"):
        st.text_input("Email", placeholder="alex.smith@example.com", key="new_user_email")
        st.text_input("Name", placeholder="Alex Smith", key="new_user_name")
        left, middle, right = st.columns(3)
        left.text_input(
            "Occupation code (optional)", placeholder="15-1252.00", key="new_user_occupation_code"
        )
        middle.selectbox(
            "Education level (optional)",
            ["", *source.EDUCATION_LEVELS],
            key="new_user_education_level",
        )
        # Text, not a number box: a browser's number box blanks what it cannot read, and the
        # user would be created without a word. Here every refusal is said, next to the form.
        right.text_input(
            "Years of experience (optional, 0 to 80)",
            placeholder="4.5",
            key="new_user_years_experience",
        )
        st.form_submit_button("Create User", type="primary", on_click=create_user_from_form)
    users = run_or_report(lab, "Could not list users.", source.list_users) or []
    if user := kept_outcome(CREATED, keep=True):
        if user.id in {listed.id for listed in users}:
            st.session_state.setdefault(SEEN_USER_IDS, set()).add(user.id)
            st.success("User created. Their id (until an initialize starts your sandbox fresh):")
            st.code(user.id, language=None)
        else:  # a result about a row that is gone describes nothing: say so once, then drop it
            st.session_state.pop(CREATED, None)
            st.info("The user you created last is gone: your sandbox was started afresh since.")
    render_users(users)


def render_users(users: list[source.User]) -> None:
    """The users in this learner's sandbox, newest first."""
    st.subheader("Users in your sandbox")
    if users:
        rows = pd.DataFrame([user_as_row(user) for user in users])
        st.dataframe(rows, hide_index=True, column_config=USER_COLUMNS)
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
create_user_demo()
show_section_progress(lab, section=1)
