"""Helpers for driving pages with Streamlit's AppTest (shared by the tests/test_page_*.py files)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow
from streamlit.testing.v1 import AppTest

from classroom.browser import SANDBOX_STATE_KEY, SANDBOX_URL_PARAMETER
from classroom.runtime import Lab, get_runtime

APP = Path(__file__).resolve().parent.parent / "app.py"


def start_app() -> AppTest:
    """A new browser session on the app (its own sandbox), rendered once."""
    app = AppTest.from_file(str(APP), default_timeout=60)
    app.run()
    return app


def open_page(app: AppTest, page: str) -> AppTest:
    """Switch to a page (e.g. 'pages/data_models.py') and check it rendered without an exception."""
    app.switch_page(page).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def reload(app: AppTest) -> AppTest:
    """The browser reloaded: a new session that finds its sandbox through ?sandbox= in the URL.

    (AppTest runs app.py, and so draws the sidebar, only on a session's first run and when a page
    calls st.rerun; in a browser every rerun draws it. To read the sidebar after a click, reload.)
    """
    again = AppTest.from_file(str(APP), default_timeout=60)
    again.query_params[SANDBOX_URL_PARAMETER] = app.session_state[SANDBOX_STATE_KEY]
    return again.run()


def open_listings(app: AppTest) -> AppTest:
    """Open every code listing on the page, as a learner clicking each expander does.

    (show_code draws a listing only while its expander is open.)
    """
    from pages.common import listing_key

    for expander in app.main.expander:
        key = listing_key(expander.label)
        if key in app.session_state:
            app.session_state[key] = True
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def button(app: AppTest, label: str):
    """The one button with exactly this label."""
    matches = [b for b in app.button if b.label == label]
    assert len(matches) == 1, f"{label!r} not unique among {[b.label for b in app.button]}"
    return matches[0]


def click(app: AppTest, label: str) -> AppTest:
    """Click the button with this label, rerun, and check no exception reached the page."""
    button(app, label).click().run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def text_input(app: AppTest, label: str):
    """The one text input with exactly this label."""
    matches = [element for element in app.text_input if element.label == label]
    assert len(matches) == 1, f"{label!r} not unique among {[t.label for t in app.text_input]}"
    return matches[0]


def lab_of(app: AppTest) -> Lab:
    """The Lab (sandbox) of this AppTest's browser session, to check what really got written."""
    return get_runtime().lab(app.session_state[SANDBOX_STATE_KEY])


def texts(app: AppTest) -> str:
    """Everything the page shows as text (markdown, captions, alerts, metrics), joined."""
    parts = [
        str(e.value)
        for e in (*app.markdown, *app.caption, *app.success, *app.info, *app.warning, *app.error)
    ]
    parts += [f"{m.label} {m.value}" for m in app.metric]
    return "\n".join(parts)


def charts(app: AppTest) -> list[tuple[dict, pd.DataFrame]]:
    """Every Altair (Vega-Lite) chart in the main area, in page order: its spec and its data."""
    found = []
    for chart in app.get("vega_lite_chart"):
        data = [
            pyarrow.ipc.open_stream(dataset.data.data).read_all().to_pandas()
            for dataset in chart.proto.datasets
        ]
        found.append((json.loads(chart.proto.spec), pd.concat(data) if data else pd.DataFrame()))
    return found
