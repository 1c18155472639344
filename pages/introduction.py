"""Introduction: the story, what the learner will be able to do, and the tools on the bench."""

import streamlit as st

from pages.common import open_page
from pages.common.words import GLOSSARY

GLOSSARY_KEY = "qulab_glossary_open"

open_page()

st.title("QuLab: Data Architecture & Persistence for AI Applications")

st.markdown(
    """
Meet **Alex**, a senior engineer at *InnovateAI Solutions*. The company's assessment platform
measures people's skills and turns the results into AI-generated readiness scores. Usage is
growing fast, and the data layer under it has to keep up: more users at once, richer data per
user, and other services that need to hear when something important happens.

Over the next five sections you build that data layer with Alex. Nothing here is a mock-up:
each button runs real SQL against a real database, real commands against Redis (or fakeredis,
an in-process Redis), and a real background worker. The pages show you the statements, the
timings and the rows that result.
"""
)

st.subheader("What you will be able to do")
st.markdown(
    """
- **Remember** the relationship types SQLAlchemy offers and the Redis structures used here
  (strings with a TTL, streams with consumer groups).
- **Understand** why async database access and connection pooling raise throughput.
- **Apply** the repository pattern with SQLAlchemy 2.0's typed, declarative models.
- **Analyze** caching strategies by their measured hit ratio and access time.
- **Create** an event table that lets services publish reliably (the transactional outbox).
"""
)

st.subheader("On the bench")
left, right = st.columns(2)
left.markdown(
    """
- **SQLAlchemy 2.0** with `asyncio`: typed models, async sessions, eager loading.
- **Connection pooling**: reuse connections instead of opening one per request.
- **Repository pattern**: one place for data access, easy to test and to swap.
- **The N+1 problem**: spot it in the SQL log, remove it with eager loading.
"""
)
right.markdown(
    """
- **Redis**: a read-through cache with hit and miss metrics.
- **Async I/O**: one event loop serving many learners without blocking.
- **Transactional outbox**: write the change and its event together, publish later.
- **Your sandbox**: a private database and Redis namespace for this browser session.
"""
)

st.info(
    "Use the sidebar to move through the sections in order. Your progress is there too, checked "
    "against your own sandbox, with a button to download everything in it."
)
# Drawn only while open, as the code listings are: most reruns of the page never look at it.
words = st.expander(
    "Words you will meet before a section explains them", key=GLOSSARY_KEY, on_change="rerun"
)
if words.open:
    words.markdown(
        "\n".join(
            f"- **{term}**: {meaning.split(': ', 1)[-1]}" for term, meaning in GLOSSARY.items()
        )
    )
