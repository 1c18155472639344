"""What open tabs on the outbox page cost the server when nothing happens, in real Chromium tabs.

Run from the project root: `python3 bench/outbox_tabs.py` (or
`bench/run_all.py --only outbox_tabs`). It measures the backend DATABASE_URL and REDIS_URL name
(the embedded defaults when unset).

Two servers run side by side: `streamlit run app.py` and a trivial 3-line Streamlit page with the
same .streamlit/config.toml. Headless Chromium (Playwright, /usr/bin/chromium) opens one tab on
each. The app's learner initializes its sandbox, opens section 5, starts the publisher, stores one
score and waits until its event was delivered and the status panel stopped refreshing: the idle
state after real activity. After a settling pause each server's CPU is read over the same window
(the process's CPU time, ended threads included, from /proc/PID/stat). Then 19 more
learners, each in a browser context of its own (own session, own sandbox), do the same and the
app server's CPU is read again. The tabs' script runs during the windows are counted too: no full
rerun (the panel refreshes only while something moves), and one look every WATCH_SECONDS per tab
by the panel's watcher, which redraws the page only when the outbox moved. The tabs are real: a
fragment's run_every is timed by the browser, so a panel that kept refreshing would show here.

Targets (issue 10): one idle tab with the publisher on <= 2x the trivial page's CPU; 20 such tabs
< 20% of one core in total. Ratios come from one run; the machine is shared, so the load average
is printed with them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests" / "e2e"))
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH.parent))  # first: bench/classroom.py must not hide the package

import browsertools as bt  # noqa: E402
import servers  # noqa: E402
from benchtools import PROJECT_ROOT, print_table, process_cpu_seconds, result  # noqa: E402

from pages.common.outbox_panels import WATCH_SECONDS  # noqa: E402

SECTION = "5. Eventing (Outbox Pattern)"
INITIALIZE_SECTION = "2. DB Connectivity & Pooling"
INITIALIZE = "Initialize In-Memory SQLite Database & Create Sample Users"
START = "Start Event Publisher (Background)"
STORE = "Calculate & Store AIRScore (Creates Pending Event)"
TABS = 20
SETTLE_SECONDS = 15.0  # after the last tab opened: its reruns, the publishers' first looks
WINDOW_SECONDS = 60.0
TRIVIAL_PAGE = (
    'import streamlit as st\n\nst.title("A trivial page")\nst.write("Nothing happens here.")\n'
)


@contextmanager
def trivial_server() -> Iterator[bt.AppServer]:
    """A 3-line Streamlit page, with QuLab's .streamlit/config.toml, on a free loopback port."""
    workspace = Path(tempfile.mkdtemp(prefix="qulab-trivial-"))
    (workspace / ".streamlit").mkdir()
    shutil.copy(
        PROJECT_ROOT / ".streamlit" / "config.toml", workspace / ".streamlit" / "config.toml"
    )
    (workspace / "trivial.py").write_text(TRIVIAL_PAGE)
    port = servers.free_port()
    log_path = workspace / "streamlit.log"
    command = [
        sys.executable, "-m", "streamlit", "run", "trivial.py",
        "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=workspace, stdout=log, stderr=subprocess.STDOUT)
    server = bt.AppServer(f"http://127.0.0.1:{port}", process, log_path, None, None)
    try:
        deadline = time.monotonic() + bt.SERVER_START_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the trivial page did not start:\n{server.log_tail()}"
                    ) from None
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workspace, ignore_errors=True)


def open_outbox_tab(browser: Any, server: bt.AppServer, contexts: list[Any]) -> Any:
    """A new learner (browser context of its own) initializes, opens section 5, starts the
    publisher and stores one score; returns the tab once its event was delivered and the panel
    stopped refreshing."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    context.add_init_script(bt._COUNT_RECEIVED_MESSAGES)
    contexts.append(context)
    page = context.new_page()
    page.on("websocket", bt._ScriptRuns.attach(page))
    bt.open_section(page, server, INITIALIZE_SECTION)
    bt.click(page, INITIALIZE)
    bt.go_to_section(page, SECTION)
    bt.click(page, START)
    bt.click(page, STORE)
    # While the event moves the panel refreshes itself every second; once it is delivered the
    # panel says so and stops: that is the idle state measured.
    deadline = time.monotonic() + 120
    while not (
        bt.metrics(page).get("Delivered") == "1"
        and page.get_by_text("Publisher running; nothing moving.").count()
    ):
        if time.monotonic() > deadline:
            raise AssertionError(f"section 5 did not settle: {bt.metrics(page)}")
        page.wait_for_timeout(200)
    return page


def script_runs(pages: list[Any]) -> tuple[int, int]:
    """(full, fragment) script runs the server has finished for these tabs so far."""
    return (
        sum(page.qulab_runs.full_runs for page in pages),
        sum(page.qulab_runs.fragment_runs for page in pages),
    )


def runs_between(before: tuple[int, int], after: tuple[int, int]) -> tuple[int, int]:
    return after[0] - before[0], after[1] - before[1]


def open_trivial_tab(browser: Any, server: bt.AppServer, contexts: list[Any]) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    contexts.append(context)
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_selector(bt.IDLE, timeout=60_000)


def idle_cpu_shares(pids: list[int], page: Any) -> list[float]:
    """Each process's share of one core over WINDOW_SECONDS (the browser keeps serving its tabs
    meanwhile)."""
    before = [process_cpu_seconds(pid) for pid in pids]
    started = time.perf_counter()
    page.wait_for_timeout(WINDOW_SECONDS * 1000)  # Playwright keeps delivering websocket frames
    seconds = time.perf_counter() - started
    return [
        (process_cpu_seconds(pid) - was) / seconds for pid, was in zip(pids, before, strict=True)
    ]


def measure() -> dict[str, float]:
    """Shares of one core: trivial page with one tab, the app with one idle outbox tab, then with
    TABS."""
    contexts: list[Any] = []
    with bt.start_app_server() as app, trivial_server() as trivial, bt.chromium() as browser:
        open_trivial_tab(browser, trivial, contexts)
        tabs = [open_outbox_tab(browser, app, contexts)]
        clock = contexts[0].pages[0]
        clock.wait_for_timeout(SETTLE_SECONDS * 1000)
        runs_before = script_runs(tabs)
        trivial_one, app_one = idle_cpu_shares([trivial.process.pid, app.process.pid], clock)
        runs_one = runs_between(runs_before, script_runs(tabs))
        load_one = os.getloadavg()[0]
        tabs += [open_outbox_tab(browser, app, contexts) for _ in range(TABS - 1)]
        clock.wait_for_timeout(SETTLE_SECONDS * 1000)
        runs_before = script_runs(tabs)
        trivial_again, app_many = idle_cpu_shares([trivial.process.pid, app.process.pid], clock)
        runs_many = runs_between(runs_before, script_runs(tabs))
        load_many = os.getloadavg()[0]
        for context in contexts:
            context.close()
    return {
        "trivial_one": trivial_one,
        "app_one": app_one,
        "trivial_again": trivial_again,
        "app_many": app_many,
        "load_one": load_one,
        "load_many": load_many,
        "full_runs_idle": runs_one[0] + runs_many[0],
        "looks_idle": runs_one[1] + runs_many[1],
    }


def main() -> list[dict[str, Any]]:
    """Measure and print; return rows in benchtools.result()'s shape."""
    missing = bt.browser_missing_reason()
    if missing:
        print(f"outbox_tabs: skipped, {missing}")
        return []
    shares = measure()
    ratio = shares["app_one"] / max(shares["trivial_one"], 1e-9)
    many = shares["app_many"] * 100
    window = f"{WINDOW_SECONDS:g} s window"
    rows = [
        result(
            "outbox_tabs",
            f"trivial 3-line page, 1 idle tab: % of one core ({window})",
            shares["trivial_one"] * 100,
            unit="%",
        ),
        result(
            "outbox_tabs",
            "QuLab, 1 idle tab on section 5, publisher on: % of one core",
            shares["app_one"] * 100,
            unit="%",
        ),
        result(
            "outbox_tabs",
            f"1 idle outbox tab ÷ trivial page (load average {shares['load_one']:.1f})",
            ratio,
            target="≤ 2×",
            met=ratio <= 2,
        ),
        result(
            "outbox_tabs",
            f"{TABS} idle outbox tabs, publishers on: % of one core "
            f"(load average {shares['load_many']:.1f})",
            many,
            unit="%",
            target="< 20%",
            met=many < 20,
        ),
        result(
            "outbox_tabs",
            "trivial page over the same window (context)",
            shares["trivial_again"] * 100,
            unit="%",
        ),
        result(
            "outbox_tabs",
            "full reruns the idle outbox tabs got during both windows "
            "(the page redraws only when the outbox moved)",
            shares["full_runs_idle"],
            unit="",
            target="= 0",
            met=shares["full_runs_idle"] == 0,
        ),
        result(
            "outbox_tabs",
            "looks of the idle panels' watcher (a fragment run, no query) during both windows, "
            f"1 + {TABS} tabs",
            shares["looks_idle"],
            unit="",
            target=f"≤ 1 a tab every {WATCH_SECONDS:g} s",
            met=shares["looks_idle"] <= (1 + TABS) * (WINDOW_SECONDS / WATCH_SECONDS + 1),
        ),
    ]
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
