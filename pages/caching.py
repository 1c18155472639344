"""Section 4: a Redis read-through cache (coming next)."""

import streamlit as st

st.title("4. Caching with Redis")
st.markdown(
    "Here you will read user profiles and their latest AIR score through a read-through cache and "
    "watch the hit ratio and the average access time move."
)
st.info("Coming next: this section's demo is being built. Sections 1 and 2 are ready.")
