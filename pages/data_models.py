"""Section 1: the four models, read from the live source, and the Create User form."""

import pandas as pd
import streamlit as st

import source
from pages import open_page
from pages.progress import show_section_progress

lab = open_page()

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
st.latex(r"\pi_{\text{Assessment.*}}\left(\text{Users} \bowtie_{\text{Users.id} = \text{Assessments.user\_id}} \text{Assessments}\right)")

st.subheader("The models, exactly as they run")
st.caption("Read from source.py with inspect.getsource, so this is the code the app executes.")
shown = [source.Base, source.TimestampMixin, *source.MODEL_CLASSES]
for tab, model in zip(st.tabs([model.__name__ for model in shown]), shown):
    tab.code(source.source_code(model), language="python")
st.markdown(
    """
`cascade="all, delete-orphan"` on `User.scores` and `User.assessments` means deleting a user
deletes what they own. Emails are unique **ignoring letter case** (a unique index on
`lower(email)`), and SQLite is told to enforce foreign keys, so a score can never point at a
user who does not exist.
"""
)

st.subheader("How the tables relate")
st.graphviz_chart(source.entity_relationship_dot())
st.caption("`lab_journal` is QuLab's own: what each demo measured in your sandbox, read by the progress checks.")

st.subheader("Try it: create a user")
with st.form("create_user"):
    email = st.text_input("Email", placeholder="alex.smith@example.com")
    name = st.text_input("Name", placeholder="Alex Smith")
    left, middle, right = st.columns(3)
    occupation_code = left.text_input("Occupation code (optional)", placeholder="15-1252.00")
    education_level = middle.selectbox("Education level (optional)", ["", *source.EDUCATION_LEVELS])
    years_experience = right.number_input(
        "Years of experience (optional)", min_value=0.0, max_value=80.0, value=None, step=0.5
    )
    submitted = st.form_submit_button("Create User", type="primary")

if submitted:
    try:
        user = lab.run(
            source.create_user,
            email=email,
            name=name,
            occupation_code=occupation_code,
            education_level=education_level,
            years_experience=years_experience,
        )
    except source.QuLabError as error:
        st.error(f"User not created. {error}")
    else:
        st.success("User created. Their id (you will use it in section 3):")
        st.code(user.id, language=None)

st.subheader("Users in your sandbox")
try:
    users = lab.run(source.list_users)
except source.QuLabError as error:
    st.error(f"Could not list users. {error}")
    users = []
if users:
    st.dataframe(pd.DataFrame([source.user_as_row(user) for user in users]), hide_index=True)
else:
    st.info("No users yet. Create one above, or initialize the sample users in section 2.")

show_section_progress(lab, section=1)
