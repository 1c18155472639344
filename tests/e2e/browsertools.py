"""Helpers for driving the real app in Chromium (shared by the tests/e2e/test_browser_*.py files).

The browser suite starts `streamlit run app.py` as a learner's server would run it, opens pages by
their url_path, clicks buttons by the exact labels the user guide names, and reads what a
learner sees: alerts, code blocks, tables, metrics and the sidebar status. It also reads the
sandbox's own database, so a test can check that an id the page shows is a row that exists.

Playwright for Python drives Debian's Chromium (/usr/bin/chromium); `playwright install` is never
needed. Without Chromium or Playwright the suite skips (fails under QULAB_REQUIRE_SERVERS=1).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import servers
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from classroom.config import DatabaseTarget, resolve_database_target
from classroom.sandboxes.sandbox import SANDBOX_ID_PATTERN
from pages.common.sections import SECTIONS

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import sync_playwright
except ImportError:  # the suite skips with a reason instead of failing to import
    sync_playwright = None
    PlaywrightTimeoutError = TimeoutError

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

PROJECT_ROOT = Path(__file__).resolve().parents[2]
APP = PROJECT_ROOT / "app.py"
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# stApp's data-test-script-state ends a run as notRunning; CONNECTED means the websocket is up.
IDLE = (
    "[data-testid='stApp'][data-test-script-state='notRunning']"
    "[data-test-connection-state='CONNECTED']"
)
SKELETON = "[data-testid='stSkeleton']"
# app.py draws the sidebar's section links itself (st.page_link, each carrying ?sandbox=) in this
# container.
_NAV_LINKS = "[data-testid='stSidebar'] .st-key-qulab_navigation [data-testid='stPageLink-NavLink']"
_NAV_LABEL = "[data-testid='stMarkdownContainer']"
UUID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_FULL_RUN_FINISHED = (ForwardMsg.FINISHED_SUCCESSFULLY, ForwardMsg.FINISHED_WITH_COMPILE_ERROR)
SERVER_START_SECONDS = 60.0
RUN_TIMEOUT_SECONDS = 60.0
# Installed in every page before Streamlit's own code: counts the messages the page's script has
# received on its current websocket, so a test can tell when the page has caught up with a run.
_COUNT_RECEIVED_MESSAGES = """(() => {
  const NativeWebSocket = window.WebSocket;
  window.WebSocket = class extends NativeWebSocket {
    constructor(...args) {
      super(...args);
      window.__qulabMessagesReceived = 0;
      this.addEventListener("message", () => { window.__qulabMessagesReceived += 1; });
    }
  };
})();"""


def browser_missing_reason() -> Optional[str]:
    """Why the browser suite cannot run here, or None when it can."""
    if sync_playwright is None:
        return "Playwright for Python is not installed (pip install -r requirements.txt)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


# --- the app's pages, as app.py declares them ---------------------------------------------------


def app_pages() -> list[tuple[str, str]]:
    """(title, url path) of every section in the sidebar, in order; the default page's is ''."""
    return [(section.title, section.url_path) for section in SECTIONS]


# --- the server ----------------------------------------------------------------------------------


@dataclass
class AppServer:
    """A running `streamlit run app.py` and where its sandboxes keep their data."""

    url: str
    process: subprocess.Popen
    log_path: Path
    database_url: Optional[str]
    sandbox_directory: Optional[Path]

    def log_tail(self, characters: int = 3000) -> str:
        """The end of the server's output, for failure messages."""
        return self.log_path.read_text(errors="replace")[-characters:]

    def stored_rows(
        self, sandbox_id: str, table: str, columns: tuple[str, ...], *, order_by: str
    ) -> list[tuple]:
        """Rows of one table in one sandbox's database, read straight from the database.

        e.g. stored_rows(sandbox, "domain_events", ("event_type", "status"), order_by="created_at")
        """
        if not SANDBOX_ID_PATTERN.fullmatch(sandbox_id):
            raise ValueError(f"not a sandbox id: {sandbox_id!r}")
        for identifier in (table, *columns, order_by):
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", identifier):
                raise ValueError(f"not a plain SQL identifier: {identifier!r}")
        select = f"SELECT {', '.join(columns)} FROM {{table}} ORDER BY {order_by}"
        target = resolve_database_target(self.database_url)
        if target.kind == "postgresql":
            return _query_postgres(target, select.format(table=f'"qulab_{sandbox_id}".{table}'))
        with sqlite3.connect(
            f"file:{self._sqlite_file(target, sandbox_id)}?mode=ro", uri=True
        ) as connection:
            return connection.execute(select.format(table=table)).fetchall()

    def stored_users(self, sandbox_id: str) -> list[tuple[str, str]]:
        """(id, email) of every user row in one sandbox's database, ordered by email."""
        rows = self.stored_rows(sandbox_id, "users", ("id", "email"), order_by="email")
        return [(str(user_id), email) for user_id, email in rows]

    def stored_inbox(self, sandbox_id: str) -> list[str]:
        """The event ids one sandbox's downstream consumer has recorded (its inbox), in id order."""
        rows = self.stored_rows(sandbox_id, "consumed_events", ("event_id",), order_by="event_id")
        return [event_id for (event_id,) in rows]

    def _sqlite_file(self, target: DatabaseTarget, sandbox_id: str) -> Path:
        if target.kind == "embedded":
            assert self.sandbox_directory is not None
            directory = self.sandbox_directory
        else:
            assert target.url is not None and target.url.database
            directory = Path(target.url.database).parent
        found = [
            path
            for path in directory.glob(f"*-{sandbox_id}.*")
            if path.suffix in {".sqlite3", ".db", ".sqlite"}
        ]
        assert len(found) == 1, (
            f"expected one database file for sandbox {sandbox_id} in {directory}, found {found}"
        )
        return found[0]


def _query_postgres(target: DatabaseTarget, sql: str) -> list[tuple[Any, ...]]:
    import asyncpg

    assert target.url is not None
    dsn = target.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def fetch() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(dsn)
        try:
            return [tuple(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    # Playwright's sync API keeps an event loop running on this thread: query from another one.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(asyncio.run, fetch()).result()


@contextmanager
def start_app_server(environment: Optional[dict[str, str]] = None) -> Iterator[AppServer]:
    """Start `python3 -m streamlit run app.py` headless on a free loopback port; stop it afterwards.

    The server inherits DATABASE_URL and REDIS_URL, and the variables in `environment` over them
    (REDIS_URL of a Redis the test can stop, say). On the embedded default its sandbox files go
    to a directory of its own, so the tests can read them and nothing is left behind.
    """
    workspace = Path(tempfile.mkdtemp(prefix="qulab-e2e-"))
    environment = {**os.environ, **(environment or {})}
    database_url = environment.get("DATABASE_URL", "").strip() or None
    sandbox_directory = None
    if database_url is None:
        sandbox_directory = Path(environment.get("QULAB_SANDBOX_DIR") or workspace / "sandboxes")
        environment["QULAB_SANDBOX_DIR"] = str(sandbox_directory)
    port = servers.free_port()
    log_path = workspace / "streamlit.log"
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    server = AppServer(
        f"http://127.0.0.1:{port}", process, log_path, database_url, sandbox_directory
    )
    try:
        _wait_until_healthy(server)
        yield server
    finally:
        process.terminate()  # SIGTERM: Streamlit shuts down and the runtime releases every sandbox
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(workspace, ignore_errors=True)


def _wait_until_healthy(server: AppServer) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"streamlit exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"streamlit did not answer within {SERVER_START_SECONDS:g} s:\n{server.log_tail()}"
    )


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright."""
    assert sync_playwright is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def fresh_visitor(browser: Browser, *, width: int = 1280, height: int = 900) -> Iterator[Page]:
    """A page in a browser context of its own: no cookies or storage, like a new learner's
    browser (a window of width × height)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(30_000)
    context.add_init_script(_COUNT_RECEIVED_MESSAGES)
    # Every page of the context, including a tab a link opens (open_in_new_tab), from its creation
    # on.
    context.on("page", lambda page: page.on("websocket", _ScriptRuns.attach(page)))
    try:
        yield context.new_page()
    finally:
        context.close()


@dataclass(frozen=True)
class FinishedRun:
    """One script run the server finished: a full run (no fragment ids) or a fragment run."""

    fragment_ids: tuple[str, ...]
    messages: int  # messages the page had been sent on this websocket up to and with this one

    @property
    def full(self) -> bool:
        return not self.fragment_ids


class _ScriptRuns:
    """What the server said on a page's current websocket: the script runs it finished, and in
    which fragment it drew each labelled widget.

    A click is done when the server has finished the run it started and the page has received
    every message up to that point; the page's own script-state attribute alone can skip its
    'running' phase when the browser is busy, which makes it unreliable to wait on. A widget
    drawn inside an st.fragment (or an st.dialog) reruns that fragment only when used, which
    ends with FINISHED_FRAGMENT_RUN_SUCCESSFULLY naming the fragment; a fragment that asks for
    the whole app (st.rerun(scope="app"), as a click that completes a step does) ends its own run
    early, and the full run that follows is the one to wait for.
    """

    def __init__(self) -> None:
        self.messages = 0
        self.full_runs = 0
        self.fragment_runs = 0
        self.messages_at_last_finish = 0
        self.finished: list[FinishedRun] = []
        self.fragment_of: dict[str, str] = {}  # widget or expander label -> fragment id ('' none)

    @staticmethod
    def attach(page: Page) -> Callable[[Any], None]:
        page.qulab_runs = _ScriptRuns()  # type: ignore[attr-defined]

        def on_websocket(websocket: Any) -> None:
            runs = page.qulab_runs = _ScriptRuns()  # type: ignore[attr-defined]
            websocket.on("framereceived", runs.record)

        return on_websocket

    def record(self, payload: Any) -> None:
        if not isinstance(payload, bytes):
            return
        self.messages += 1
        message = ForwardMsg()
        message.ParseFromString(payload)
        kind = message.WhichOneof("type")
        if kind == "delta":
            self._note_label(message.delta)
            return
        if kind != "script_finished":
            return
        if message.script_finished in _FULL_RUN_FINISHED:
            self.full_runs += 1
            fragment_ids: tuple[str, ...] = ()
        elif message.script_finished == ForwardMsg.FINISHED_FRAGMENT_RUN_SUCCESSFULLY:
            self.fragment_runs += 1
            # A fragment run the server did not name (never seen) counts as some fragment's.
            fragment_ids = tuple(message.metadata.run.fragment_ids) or ("?",)
        else:
            return  # FINISHED_EARLY_FOR_RERUN: the run that replaces it is the one to wait for
        self.messages_at_last_finish = self.messages
        self.finished.append(FinishedRun(fragment_ids, self.messages))

    def _note_label(self, delta: Any) -> None:
        which = delta.WhichOneof("type")
        if which == "new_element":
            element = delta.new_element
            element_kind = element.WhichOneof("type")
            widget = getattr(element, element_kind) if element_kind else None
            if widget is None or "label" not in widget.DESCRIPTOR.fields_by_name:
                return
            label = widget.label
        elif which == "add_block" and delta.add_block.WhichOneof("type") == "expandable":
            label = delta.add_block.expandable.label
        else:
            return
        if label:
            self.fragment_of[label] = delta.fragment_id

    def count(self, *, fragment: bool) -> int:
        return self.fragment_runs if fragment else self.full_runs

    def done_since(self, start: int, fragment_id: Optional[str]) -> Optional[FinishedRun]:
        """The first run finished after the start-th that ends a click in this fragment ('' for
        none, None when unknown): a full run, or a run of the fragment itself (of any fragment
        when unknown)."""
        for finish in self.finished[start:]:
            if finish.full or fragment_id is None or fragment_id in finish.fragment_ids:
                return finish
        return None


def _runs(page: Page) -> _ScriptRuns:
    return page.qulab_runs  # type: ignore[attr-defined]


def finished_runs(page: Page) -> list[FinishedRun]:
    """The script runs the server finished on this page's websocket, oldest first, each a full
    run or a fragment's (FinishedRun.full); a run cut short by a rerun is left out."""
    return list(_runs(page).finished)


# --- driving a page ------------------------------------------------------------------------------


def open_page(page: Page, server: AppServer, url_path: str = "", *, framed: bool = True) -> Page:
    """Load a page by its url_path ('' for the introduction) and wait until its script finished.

    framed=False for a page drawn without the sidebar's section links (the welcome-back page a
    bare URL shows a browser that used a sandbox before).
    """
    page.qulab_runs = _ScriptRuns()  # type: ignore[attr-defined]  # until the new page's websocket opens
    page.goto(f"{server.url}/{url_path}")
    _wait_for_runs(page, full_runs=1, framed=framed)
    return page


def open_section(page: Page, server: AppServer, title: str) -> Page:
    """Open a section by its link (a deep link), as a learner following a shared URL would."""
    [url_path] = [path for shown, path in app_pages() if shown == title]
    open_page(page, server, url_path)
    assert current_section(page) == title
    return page


def _section_link(page: Page, title: str) -> Any:
    link = page.locator(_NAV_LINKS).filter(
        has=page.locator(_NAV_LABEL).get_by_text(title, exact=True)
    )
    assert link.count() == 1, (
        f"expected one sidebar link {title!r}, found {link.count()}: {section_titles(page)}"
    )
    return link


def go_to_section(page: Page, title: str) -> None:
    """Follow the sidebar link with this exact title, as the guide tells the learner to."""
    link = _section_link(page, title)
    expected = _runs(page).count(fragment=False) + 1
    link.click()
    _wait_for_runs(page, full_runs=expected)
    # The run that just finished may be one already under way when the link was clicked (CI saw
    # it once): wait for the section's own run, and say where the page is if it never comes.
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while current_section(page) != title:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"still on {current_section(page)!r}, not {title!r}: {_run_state(page)}"
            )
        page.wait_for_timeout(50)
        _wait_for_runs(page, full_runs=_runs(page).count(fragment=False))


def open_in_new_tab(page: Page, title: str, *, modifier: Optional[str] = None) -> Page:
    """Open the sidebar link with this exact title in a new tab, as a learner does with a
    middle-click (modifier=None) or a Ctrl-click (modifier="Control"); return the new tab once
    its first script run finished. The first tab stays as it is."""
    link = _section_link(page, title)
    with page.context.expect_page() as opened:
        if modifier is None:
            link.click(button="middle")
        else:
            link.click(modifiers=[modifier])
    tab = opened.value
    _wait_for_runs(tab, full_runs=1)
    return tab


@dataclass(frozen=True)
class PendingRun:
    """A click whose rerun may still be running (see press and wait_for_rerun)."""

    page: Page
    finished_before: int  # runs the page had seen finish when it was clicked
    # The fragment the clicked widget is drawn in ('' for none; None for a control that is no
    # widget of its own, such as a multiselect's "Remove 100": then any run that finishes).
    fragment_id: Optional[str]
    dialog: bool = False  # the click opens a dialog (st.dialog), which stays open after it


def _pending(page: Page, label: str, *, dialog: bool = False) -> PendingRun:
    runs = _runs(page)
    return PendingRun(page, len(runs.finished), runs.fragment_of.get(label), dialog)


def fill(page: Page, label: str, value: str) -> None:
    """Type into the text or number input with this exact label (replacing what it held).

    In a form, the value goes with the form's submit button. Elsewhere Streamlit applies a
    value on Enter (or when the field loses focus) with a rerun, of the field's fragment only
    when it is drawn in one: that rerun is pressed here and waited for, so the click that
    follows is a run of its own.
    """
    field = page.get_by_label(label, exact=True)
    if field.evaluate("element => Boolean(element.closest(\"[data-testid='stForm']\"))"):
        field.fill(value)
        return
    if field.input_value() == value:
        return
    pending = _pending(page, label)
    field.fill(value)
    field.press("Enter")
    wait_for_rerun(pending)


def flip(page: Page, label: str) -> None:
    """Flip the st.toggle with this exact label (on to off or back) and wait for its rerun."""
    switch = page.get_by_role("switch", name=label, exact=True)
    pending = _pending(page, label)
    page.locator("[data-testid='stCheckbox'] label").filter(has=switch).click()
    wait_for_rerun(pending)


def press(page: Page, label: str, *, dialog: bool = False) -> PendingRun:
    """Click the one button with this exact label and return at once; wait_for_rerun waits.

    A button drawn in an st.fragment (or an st.dialog) reruns that fragment only; if the click
    asks for the whole app (it completed a step, say), the full run that follows is waited for.
    dialog=True for a button that opens a dialog.
    """
    pending = _pending(page, label, dialog=dialog)
    page.get_by_role("button", name=label, exact=True).click()
    return pending


def wait_for_rerun(pending: PendingRun) -> None:
    """Wait until a pressed button's rerun has finished and the page shows it; check it is
    healthy."""
    page = pending.page
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while (finish := _runs(page).done_since(pending.finished_before, pending.fragment_id)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the script run did not finish within {RUN_TIMEOUT_SECONDS:g} s: "
                f"{_run_state(page)}"
            )
        page.wait_for_timeout(20)  # lets Playwright deliver the websocket frames meanwhile
    _settle(page, finish.messages, dialog=pending.dialog)


def click(page: Page, label: str, *, dialog: bool = False) -> None:
    """Click the button with this exact label, wait for its rerun, check no exception showed.

    dialog=True for a button that opens a dialog (the dialog is then expected, not an error).
    """
    wait_for_rerun(press(page, label, dialog=dialog))


def open_expander(page: Page, label: str) -> Any:
    """Open the collapsed expander with this label (its content is drawn by the rerun opening
    it starts) and wait for that rerun; return the expander."""
    expander = page.locator("[data-testid='stExpander']").filter(
        has=page.locator("summary", has_text=label)
    )
    assert expander.count() == 1, f"expected one expander {label!r}, found {expander.count()}"
    if expander.locator("details").get_attribute("open") is None:
        pending = _pending(page, label)
        expander.locator("summary").click()
        wait_for_rerun(pending)
    return expander


def _wait_for_runs(page: Page, *, full_runs: int, framed: bool = True) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while _runs(page).full_runs < full_runs:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the script run did not finish within {RUN_TIMEOUT_SECONDS:g} s: "
                f"{_run_state(page)}"
            )
        page.wait_for_timeout(20)  # lets Playwright deliver the websocket frames meanwhile
    _settle(page, _runs(page).messages_at_last_finish, framed=framed)


def _settle(page: Page, received: int, *, framed: bool = True, dialog: bool = False) -> None:
    """Wait until the page has taken in the first `received` messages and drawn them."""
    page.wait_for_function(f"() => (window.__qulabMessagesReceived || 0) >= {received}")
    page.wait_for_selector(IDLE)
    # Some elements (code blocks among them) load their renderer lazily, showing a skeleton first.
    page.wait_for_function(f'() => document.querySelectorAll("{SKELETON}").length === 0')
    if framed:
        page.locator(_NAV_LINKS).first.wait_for()
    assert_page_healthy(page, dialog=dialog)


def _run_state(page: Page) -> dict[str, Any]:
    app = page.locator("[data-testid='stApp']")
    return {
        "runs finished": {
            "full": _runs(page).full_runs,
            "fragment": _runs(page).fragment_runs,
            "last": _runs(page).finished[-3:],
            "messages": _runs(page).messages,
        },
        "messages received by the page": page.evaluate("window.__qulabMessagesReceived"),
        "script state": app.get_attribute("data-test-script-state"),
        "connection state": app.get_attribute("data-test-connection-state"),
        "url": page.url,
        "screenshot": str(screenshot(page, "failure")),
    }


def assert_page_healthy(page: Page, *, dialog: bool = False) -> None:
    """No exception box, and no modal dialog (such as 'Page not found') on the page, unless
    dialog=True: then the dialog a click opened (st.dialog) is on screen."""
    exceptions = page.locator("[data-testid='stException']").all_inner_texts()
    assert not exceptions, f"the page shows an exception: {exceptions}"
    dialogs = page.locator("[role='dialog']")
    if dialog:
        dialogs.first.wait_for(state="visible")
        return
    if dialogs.count():  # a dialog the run closed may take a moment to leave the page
        try:
            dialogs.first.wait_for(state="detached", timeout=5_000)
        except PlaywrightTimeoutError:
            pass
    shown = dialogs.all_inner_texts()
    assert not shown, f"the page shows a dialog: {shown}"


# --- reading what the learner sees ---------------------------------------------------------------

# Each read is one evaluate call, so a fragment that redraws itself meanwhile cannot tear the
# result.
# A table is an st.table or a Markdown table (pages draw measured values as one Markdown element).
_TABLES = (
    "[data-testid='stMain'] [data-testid='stTable'], "
    "[data-testid='stMain'] [data-testid='stMarkdownContainer'] table"
)
_READ_TABLES = """() => Array.from(document.querySelectorAll(TABLES)).map(table => {
  const headers = Array.from(table.querySelectorAll("thead th")).map(cell => cell.innerText.trim());
  return Array.from(table.querySelectorAll("tbody tr")).map(row => {
    const cells = Array.from(row.querySelectorAll("th, td")).map(cell => cell.innerText.trim());
    const names = headers.slice(headers.length - cells.length);
    return Object.fromEntries(names.map((name, i) => [name, cells[i]]));
  });
})""".replace("TABLES", json.dumps(_TABLES))
# A measured value is an st.metric tile, or a column of a one-row Markdown table (its header the
# label, its cell the value): both in page order.
_READ_METRICS = """() => Array.from(document.querySelectorAll(
  "[data-testid='stMain'] :is([data-testid='stMetric'], [data-testid='stMarkdownContainer'] table)"
)).flatMap(shown => {
  if (shown.matches("[data-testid='stMetric']")) return [[
    shown.querySelector("[data-testid='stMetricLabel']").innerText.trim(),
    shown.querySelector("[data-testid='stMetricValue']").innerText.trim(),
  ]];
  const rows = shown.querySelectorAll("tbody tr");
  if (rows.length !== 1) return [];
  const labels = Array.from(shown.querySelectorAll("thead th")).map(cell => cell.innerText.trim());
  const values = Array.from(rows[0].querySelectorAll("td")).map(cell => cell.innerText.trim());
  return labels.map((label, i) => [label, values[i]]);
})"""
_READ_ALERTS = """kind => Array.from(
    document.querySelectorAll("[data-testid='stMain'] [data-testid='stAlert']")
  )
  .filter(alert => !kind || alert.querySelector(`[data-testid='stAlertContent${kind}']`))
  .map(alert => alert.innerText.trim())"""


def alerts(page: Page, kind: Optional[str] = None) -> list[str]:
    """Texts of the alerts in the main area; kind 'success', 'info', 'warning' or 'error'
    filters."""
    return page.evaluate(_READ_ALERTS, kind.capitalize() if kind else "")


def code_blocks(page: Page) -> list[str]:
    """Texts of the code blocks in the main area (those in hidden tabs and expanders too)."""
    return [
        text.strip()
        for text in page.locator(
            "[data-testid='stMain'] [data-testid='stCode']"
        ).all_text_contents()
    ]


def shown_ids(page: Page) -> list[str]:
    """Every UUID shown alone in a code block of the main area (new ids are shown that way)."""
    return [text for text in code_blocks(page) if UUID_PATTERN.match(text)]


def tables(page: Page) -> list[list[dict[str, str]]]:
    """Every table in the main area (st.table or Markdown), in page order, each as rows of
    {column: cell text}."""
    return page.evaluate(_READ_TABLES)


def table_rows(page: Page, index: int = 0) -> list[dict[str, str]]:
    """The rows of the index-th table in the main area, as {column: cell text}."""
    return tables(page)[index]


def tables_with_column(page: Page, column: str) -> list[list[dict[str, str]]]:
    """The tables in the main area that have this column (e.g. 'published_at'), in page order."""
    return [rows for rows in tables(page) if rows and column in rows[0]]


def metric_values(page: Page, label: str) -> list[str]:
    """The values of every measured value with this label in the main area (an st.metric, or a
    column of a one-row Markdown table), in page order (left to right)."""
    return [value for shown_label, value in page.evaluate(_READ_METRICS) if shown_label == label]


def metrics(page: Page) -> dict[str, str]:
    """{label: value} of every measured value in the main area: st.metric tiles and the columns
    of one-row Markdown tables (a repeated label keeps its last value)."""
    return dict(page.evaluate(_READ_METRICS))


def cache_counts(page: Page) -> tuple[str, str, str]:
    """Section 4's cache metrics as shown: (hits, misses, errors)."""
    shown = metrics(page)
    return shown["Hits"], shown["Misses"], shown["Errors"]


def dataframe_hidden_widths(page: Page) -> list[int]:
    """For each st.dataframe in the main area: how many pixels of its columns lie beyond its right
    edge, which a learner would have to scroll sideways to see (the grid itself keeps a few pixels
    of margin)."""
    return page.evaluate("""() => Array.from(document.querySelectorAll(
        "[data-testid='stMain'] [data-testid='stDataFrame'] .dvn-scroller"))
        .map(grid => grid.scrollWidth - grid.clientWidth)""")


def clipped_chart_texts(page: Page) -> list[str]:
    """Texts the main area's charts draw partly outside their own drawing area, where they are cut
    off (an axis title whose glyphs run past the chart's left edge, say)."""
    return page.evaluate("""() => Array.from(
        document.querySelectorAll("[data-testid='stMain'] svg text")
    ).filter(text => {
        const box = text.getBoundingClientRect();
        const frame = text.ownerSVGElement.getBoundingClientRect();
        return box.width > 0 && (box.left < frame.left - 0.5 || box.right > frame.right + 0.5
                                 || box.top < frame.top - 0.5 || box.bottom > frame.bottom + 0.5);
    }).map(text => text.textContent)""")


def chart_texts(page: Page) -> list[str]:
    """Every text the main area's charts draw (axis labels and titles, legends), as Vega-Lite drew
    it.

    Vega-Lite cuts a long label short with an ellipsis ("QueuePool (pool…") unless told not to.
    """
    return page.locator("[data-testid='stMain'] svg text").all_text_contents()


def main_text(page: Page) -> str:
    """Everything the main area shows, as text."""
    return page.locator("[data-testid='stMain']").inner_text()


def wait_until(
    page: Page, what: str, condition: Callable[[], Any], *, timeout_seconds: float = 20.0
) -> Any:
    """Check condition() (reading the page or the database) until it returns something true;
    return that.

    For what a page shows on its own, with no click: a fragment that refreshes itself, a background
    worker's progress. Fails with `what` and the page's state after timeout_seconds.
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not seen within {timeout_seconds:g} s: {_run_state(page)}"
            )
        page.wait_for_timeout(100)  # lets Playwright deliver the websocket frames meanwhile


def wait_for_text(page: Page, text: str, *, timeout_seconds: float = 20.0) -> None:
    """Wait until the main area shows this text (after a click on a page that redraws part of
    itself)."""
    wait_until(
        page, f"the text {text!r}", lambda: text in main_text(page), timeout_seconds=timeout_seconds
    )


def headings(page: Page) -> list[str]:
    """Texts of the main area's titles and headers (h1-h3)."""
    return [
        text.strip()
        for text in page.locator("[data-testid='stMain'] :is(h1, h2, h3)").all_inner_texts()
    ]


# st.page_link marks the page being shown by setting its label in bold (and shading it): no
# attribute says so.
_READ_NAV_LINKS = f"""() => Array.from(
  document.querySelectorAll({json.dumps(_NAV_LINKS)})
).map(link => {{
  const label = link.querySelector({json.dumps(_NAV_LABEL)});
  const text = label.firstElementChild || label;  // the <p> the bold style applies to
  return [label.innerText.trim(), link.href, Number(getComputedStyle(text).fontWeight) >= 600];
}})"""


def current_section(page: Page) -> str:
    """The title of the sidebar link marked as the current page ('' if none is)."""
    current = [title for title, _, bold in page.evaluate(_READ_NAV_LINKS) if bold]
    assert len(current) <= 1, f"more than one sidebar link is marked current: {current}"
    return current[0] if current else ""


def section_titles(page: Page) -> list[str]:
    """The titles of the sidebar's navigation links, in order (icons left out)."""
    return [title for title, _, _ in page.evaluate(_READ_NAV_LINKS)]


def section_links(page: Page) -> dict[str, str]:
    """{title: absolute URL} of the sidebar's navigation links: where a middle-click would open
    them."""
    return {title: href for title, href, _ in page.evaluate(_READ_NAV_LINKS)}


def sidebar_text(page: Page) -> str:
    """Everything the sidebar shows, as text."""
    return page.locator("[data-testid='stSidebar']").inner_text()


def sidebar_tooltip(page: Page, caption: str) -> str:
    """The tooltip of the sidebar caption that shows this text (its help icon, hovered)."""
    shown = page.locator("[data-testid='stSidebar'] [data-testid='stCaptionContainer']")
    shown.filter(has_text=caption).locator("[data-testid='stTooltipHoverTarget']").hover()
    tooltip = page.locator("[data-testid='stTooltipContent']").first
    tooltip.wait_for(state="visible")
    return tooltip.inner_text()


def server_details(page: Page) -> str:
    """The lines of the sidebar's "Server details" expander (database, pool, Redis, breaker,
    class), opened first: they are drawn only while it is open."""
    return open_expander(page, "Server details").inner_text()


def sandbox_id(page: Page) -> str:
    """This browser session's sandbox id, as the sidebar status panel shows it."""
    codes = page.locator("[data-testid='stSidebar'] [data-testid='stCode']")
    codes.first.wait_for()
    shown = codes.all_inner_texts()
    ids = [text.strip() for text in shown if SANDBOX_ID_PATTERN.fullmatch(text.strip())]
    assert len(ids) == 1, f"expected one sandbox id in the sidebar, found {shown}"
    return ids[0]


_SCROLL_HEADING_TO_TOP = """text => {
  const heading = Array.from(document.querySelectorAll("[data-testid='stMain'] :is(h1, h2, h3)"))
    .find(element => element.innerText.trim() === text);
  if (!heading) return false;
  heading.scrollIntoView({block: "start"});
  const main = heading.closest("[data-testid='stMain']");
  main.scrollTop = Math.max(0, main.scrollTop - 70);  // clear of the app's top bar
  return true;
}"""


def screenshot(page: Page, name: str, *, heading: Optional[str] = None) -> Path:
    """Save what the learner sees now as tests/e2e/screenshots/<name>.png (git-ignored).

    Streamlit scrolls its main area inside the window, so this is the window as it stands:
    after a click, the part of the page around the button and its result. With heading, the
    main area is first scrolled to put that heading (its exact text) at the top.
    """
    if heading is not None:
        assert page.evaluate(_SCROLL_HEADING_TO_TOP, heading), (
            f"no heading {heading!r}: {headings(page)}"
        )
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path
