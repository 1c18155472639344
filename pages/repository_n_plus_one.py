"""Section 3: the repository pattern and the N+1 problem (coming next)."""

import streamlit as st

st.title("3. Repository Pattern & N+1")
st.markdown(
    "Here you will load users and their scores two ways and see every SQL statement each way "
    "issues: one query per user (N+1) against eager loading."
)
st.info("Coming next: this section's demo is being built. Sections 1 and 2 are ready.")
