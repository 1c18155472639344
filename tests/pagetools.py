"""Helpers for driving pages with Streamlit's AppTest (shared by the tests/test_page_*.py files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow
from streamlit.testing.v1 import AppTest

from classroom.browser import SANDBOX_STATE_KEY, SANDBOX_URL_PARAMETER
from classroom.runtime import Lab, get_runtime
from pages.common.sidebar import DETAILS_KEY

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


def reload(app: AppTest, page: str | None = None, *, details: bool = False) -> AppTest:
    """The browser reloaded: a new session that finds its sandbox through ?sandbox= in the URL.

    On `page` (e.g. 'pages/caching.py') when given, as a deep link opens it; else the root. With
    details=True the sidebar's "Server details" expander is open in that first run.
    (AppTest runs app.py, and so draws the sidebar, only on a session's first run and when a page
    calls st.rerun; in a browser every rerun draws it. To read the sidebar after a click, reload.)
    """
    again = AppTest.from_file(str(APP), default_timeout=60)
    again.query_params[SANDBOX_URL_PARAMETER] = app.session_state[SANDBOX_STATE_KEY]
    if details:
        again.session_state[DETAILS_KEY] = True
    if page is not None:
        again.switch_page(page)  # before the first run: the page whose url_path is its file name
    again.run()
    assert not again.exception, [e.value for e in again.exception]
    return again


def open_server_details(app: AppTest) -> AppTest:
    """Open the sidebar's collapsed "Server details", as a learner clicking it does.

    (Its lines are drawn only while it is open. Use it on a run that draws the sidebar: a new
    session's first run, or reload().)
    """
    app.session_state[DETAILS_KEY] = True
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def sidebar_text(app: AppTest) -> str:
    """Every text the sidebar draws (not its tooltips), joined."""
    return "\n".join(
        str(element.value)
        for element in app.sidebar
        if element.type in ("markdown", "caption", "code", "error", "warning", "info", "success")
    )


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


INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"


def initialize_in_section_2(app: AppTest) -> AppTest:
    """Open section 2 and click its initialize button, as the learner does: the sandbox starts
    afresh (every row deleted, then Alex Smith and Jane Doe created)."""
    open_page(app, "pages/connectivity_pooling.py")
    return click(app, INITIALIZE)


def lab_of(app: AppTest) -> Lab:
    """The Lab (sandbox) of this AppTest's browser session, to check what really got written."""
    return get_runtime().lab(app.session_state[SANDBOX_STATE_KEY])


def texts(app: AppTest) -> str:
    """Everything the page shows as text (markdown, plain text, captions, alerts, metrics)."""
    parts = [
        str(e.value)
        for e in (
            *app.markdown, *app.text, *app.caption, *app.success, *app.info, *app.warning,
            *app.error,
        )
    ]  # fmt: skip
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


def markdown_tables(app: AppTest) -> list[list[dict[str, str]]]:
    """Every Markdown table the main area draws, as rows of {header: cell} (escapes removed)."""
    tables = []
    for element in app.main.markdown:
        lines = [line.strip() for line in str(element.value).splitlines()]
        for index, line in enumerate(lines[:-1]):
            if line.startswith("|") and lines[index + 1].startswith("|---"):
                header = _cells(line)
                body = []
                for row in lines[index + 2 :]:
                    if not row.startswith("|"):
                        break
                    body.append(dict(zip(header, _cells(row), strict=True)))
                tables.append(body)
    return tables


def table_value(app: AppTest, label: str) -> str:
    """The cell under the header `label` in the first one-row Markdown table that has it."""
    return next(table[0][label] for table in markdown_tables(app) if table and label in table[0])


def _cells(line: str) -> list[str]:
    return [re.sub(r"\\(.)", r"\1", cell.strip()) for cell in line.strip().strip("|").split(" | ")]


def as_shown(markdown: str) -> str:
    """Markdown that went through pages.common.plain_text, as the browser shows it."""
    return re.sub(r"\\(.)", r"\1", markdown).replace("\u2060", "")
