"""Section 5: events through a transactional outbox (coming next)."""

import streamlit as st

st.title("5. Eventing (Outbox Pattern)")
st.markdown(
    "Here you will store a score and its event in one transaction, and watch a background publisher "
    "deliver the event to a Redis stream."
)
st.info("Coming next: this section's demo is being built. Sections 1 and 2 are ready.")
