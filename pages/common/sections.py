"""The codelab's sections, in order: what app.py's navigation is built from (and the tests read)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    """One page of the codelab: its script, its title in the sidebar, its icon and its address."""

    script: str
    title: str
    icon: str
    url_path: str  # "" for the introduction: Streamlit serves the default page at the root

    @property
    def default(self) -> bool:
        """True for the page served at the root URL."""
        return self.url_path == ""


SECTIONS = (
    Section("pages/introduction.py", "Introduction", ":material/flag:", ""),
    Section("pages/data_models.py", "1. Data Models", ":material/schema:", "data_models"),
    Section(
        "pages/connectivity_pooling.py",
        "2. DB Connectivity & Pooling",
        ":material/cable:",
        "connectivity_pooling",
    ),
    Section(
        "pages/repository_n_plus_one.py",
        "3. Repository Pattern & N+1",
        ":material/repeat:",
        "repository_n_plus_one",
    ),
    Section("pages/caching.py", "4. Caching with Redis", ":material/bolt:", "caching"),
    Section(
        "pages/eventing_outbox.py",
        "5. Eventing (Outbox Pattern)",
        ":material/outbox:",
        "eventing_outbox",
    ),
)

# The instructor's page: at its own address, never in the learners' navigation.
INSTRUCTOR = Section("pages/instructor.py", "Instructor", ":material/school:", "instructor")
