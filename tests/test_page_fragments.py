"""A click reruns only the demo it belongs to; a click that completes a step redraws the app once.

Streamlit's AppTest reruns the whole script for any click, so these drive a real
`streamlit run app.py` over its websocket, as the browser does (tests/streamlit_socket.py): a
button drawn inside an st.fragment is pressed with the fragment's id, and the server answers
with that fragment's elements only (FINISHED_FRAGMENT_RUN_SUCCESSFULLY).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from e2e.browsertools import AppServer, start_app_server
from streamlit_socket import RunOutcome, StreamlitTab

INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
FETCH_USER = "Fetch User (Cached)"


@pytest.fixture(scope="module")
def app_server() -> Iterator[AppServer]:
    """One `streamlit run app.py` for the module."""
    with start_app_server() as server:
        yield server


def steps_shown(outcome: RunOutcome) -> int:
    """The sidebar's step count in this run ("Your progress: 3 of 14 steps"), -1 if not drawn."""
    for text in outcome.texts:
        if found := re.search(r"Your progress:\*\* (\d+) of", text):
            return int(found[1])
    return -1


def last_read_outcome(outcome: RunOutcome) -> str:
    """The outcome in the "Last read" table drawn in this run ('' if none)."""
    for text in outcome.texts:
        if text.startswith("**Last read:**"):
            header, _, values = text.splitlines()[2:5]
            return values.strip("| ").split(" | ")[header.strip("| ").split(" | ").index("Outcome")]
    return ""


async def learner_at_section_4(server: AppServer) -> tuple[StreamlitTab, RunOutcome]:
    """A new learner who initialized in section 2 and opened section 4."""
    tab = StreamlitTab(int(server.url.rsplit(":", 1)[1]))
    await tab.open()
    page = await tab.go_to("connectivity_pooling")
    await tab.press(page, INITIALIZE)
    return tab, await tab.go_to("caching")


async def test_a_demo_click_reruns_its_fragment_only(app_server):
    tab, page = await learner_at_section_4(app_server)
    try:
        assert page.buttons[FETCH_USER] in page.fragment_of, "the fetch button is not in a fragment"
        first = await tab.press(page, FETCH_USER)  # a miss: no step is done by it alone
        assert first.fragment_run
        assert first.elements_outside_fragments == 0  # nothing else of the page was sent again
        assert last_read_outcome(first) == "MISS"
        assert 0 < first.elements < page.elements
    finally:
        await tab.close()


async def test_a_click_that_completes_a_step_redraws_the_sidebars_count(app_server):
    tab, page = await learner_at_section_4(app_server)
    try:
        before = steps_shown(page)
        assert before >= 1  # the initialize
        first = await tab.press(page, FETCH_USER)
        assert first.fragment_run and steps_shown(first) == -1
        second = await tab.press(first, FETCH_USER)  # miss, then hit: a step done
        assert not second.fragment_run  # the whole app was drawn again, once
        # Two steps at once: a miss then a hit, and metrics that count both.
        assert steps_shown(second) == before + 2
        assert last_read_outcome(second) == "HIT"
    finally:
        await tab.close()
