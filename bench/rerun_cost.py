"""Server CPU per click and per bare rerun of QuLab's pages, against a trivial 3-line page.

A click (issue 20's measure): one learner walks the guide over the websocket, pressing each
button as the browser does (inside its fragment); the server's CPU around each interaction is
sorted by kind: a demo click, a navigation, a first render. Each kind's median (and the demo
clicks' p90) is divided by the trivial page's bare rerun, measured in the same run.

A bare rerun is what a page costs when nothing is clicked: a learner changing pages, a reload,
a widget edit. One simulated learner (bench/learners.py's websocket client, as in
bench/classroom.py) opens the app, initializes its sandbox, then reruns each page RERUNS times in
a row; the server's CPU (utime + stime of the whole process, from /proc) over those reruns,
divided by their number, is the cost.

Controls with no QuLab call, each in its own server started the same way with the same
.streamlit/config.toml: a trivial 3-line page; the introduction's Streamlit calls with constant
values (Streamlit's floor for a page of that shape); a fragment of as many elements as a demo
click's median redraw, with a button (Streamlit's floor for a click). All four servers stay up,
and each round measures every one in turn: ratios are taken within a round, and each row gives
the median of ROUNDS rounds with their min and max (a slow minute of the shared machine falls on
a control and its measure alike).

    python3 bench/rerun_cost.py                       # embedded defaults
    python3 bench/rerun_cost.py --reruns 60 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchtools import PROJECT_ROOT, print_table, spread_result
from learners import (
    CREATE_USER,
    FETCH_USER,
    INITIALIZE,
    STORE_SCORE,
    SimulatedLearner,
    start_replica,
    stop_replica,
)

PAGES = {
    "Introduction": "",
    "1. Data Models": "data_models",
    "2. Connectivity": "connectivity_pooling",
    "3. Repository & N+1": "repository_n_plus_one",
    "4. Caching": "caching",
    "5. Outbox": "eventing_outbox",
}
TRIVIAL_PAGE = (
    'import streamlit as st\n\nst.title("Hello")\nst.write("A trivial page: a title and a line.")\n'
)
# The introduction as Streamlit draws it, with no QuLab call: the same page configuration, the
# same st.navigation of 8 pages (7 hidden, the links drawn by hand with ?sandbox=), the same
# sidebar and main-area elements (22, counted over the websocket), constant values instead of
# what QuLab reads. What Streamlit alone spends on a page of that shape: the floor under the
# introduction's ratio.
STATIC_INTRODUCTION = """import streamlit as st

st.set_page_config(page_title="A title", page_icon="🧪", layout="wide")


def introduction():
    st.title("A title")
    st.markdown("An introduction. " * 40)
    st.subheader("What you will be able to do")
    st.markdown("- a point\\n" * 6)
    st.subheader("On the bench")
    left, right = st.columns(2)
    left.markdown("- a point\\n" * 4)
    right.markdown("- a point\\n" * 4)
    st.info("Use the sidebar.")
    st.expander("Words", key="words", on_change="rerun")


def section():
    st.title("A section")


pages = [st.Page(introduction, title="Introduction", default=True)] + [
    st.Page(section, title=f"Section {number}", url_path=f"section{number}")
    for number in range(1, 8)
]
navigation = st.navigation(pages, position="hidden")
links = st.sidebar.container(key="links")
for page in pages[:6]:
    links.page_link(page, query_params={"sandbox": "0123456789abcdef"}, width="stretch")
st.sidebar.progress(0.5, text="**Your progress:** 7 of 14 steps")
st.sidebar.caption("Next: section 2, a step.", help="Beyond the guide.")
st.sidebar.download_button("Download my sandbox", data=b"x", on_click="ignore")
st.sidebar.caption("**Your sandbox**", help="Your own database.")
st.sidebar.code("0123456789abcdef", language=None)
st.sidebar.button("New sandbox", width="stretch")
st.sidebar.button("Reset my sandbox", width="stretch")
st.sidebar.expander("Server details", key="details", on_change="rerun")
navigation.run()
"""
# A fragment with a button and {elements} Markdown elements, and nothing else: what Streamlit
# alone spends on a click that redraws that many elements (the floor under a demo click).
STATIC_FRAGMENT = """import streamlit as st

st.title("A title")
st.markdown("A page around the fragment. " * 20)


@st.fragment
def demo():
    st.button("Click")
    for number in range({elements} - 1):
        st.markdown(f"A result line {{number}}.")


demo()
"""
FULL_RENDER_TARGET = 1.25  # the introduction's full render ÷ the static page of its shape
CLICK_TARGET, CLICK_P90_TARGET = 3.0, 6.0  # a demo click ÷ the trivial page's bare rerun
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


async def _cost_per_rerun(learner: SimulatedLearner, reruns: int) -> tuple[float, float]:
    """(server CPU seconds, wall seconds) per rerun of the learner's current page."""
    for _ in range(3):  # warm: first renders compile, cache and journal what they need once
        await learner.rerun()
    before = learner.replica.proc_status()["cpu_seconds"]
    started = time.perf_counter()
    for _ in range(reruns):
        await learner.rerun()
    wall = time.perf_counter() - started
    after = learner.replica.proc_status()["cpu_seconds"]
    return (after - before) / reruns, wall / reruns


async def _measure_qulab(replica: Any, reruns: int) -> dict[str, tuple[float, float]]:
    learner = SimulatedLearner(0, replica)
    await learner.open()
    page = await learner.go_to("connectivity_pooling")
    await learner.press(page, INITIALIZE)
    costs = {}
    for title, path in PAGES.items():
        await learner.go_to(path)
        costs[title] = await _cost_per_rerun(learner, reruns)
    await learner.socket.close()
    if learner.report.errors:
        raise RuntimeError(f"the learner saw errors: {learner.report.errors[:3]}")
    return costs


REPEATS = 10  # each interaction is timed this many times in a row: /proc counts in 10 ms ticks


async def _walk_costs(replica: Any) -> dict[str, dict[str, float]]:
    """Server CPU seconds of each interaction of the guide's walk, by kind and name: every click
    of the walk (and every page change, and a first render) repeated REPEATS times in a row, its
    CPU divided by REPEATS (the process's CPU is read in 10 ms ticks)."""
    costs: dict[str, dict[str, float]] = {"first render": {}, "navigation": {}, "demo click": {}}
    costs["elements"] = {}  # what each demo click's last repeat drew

    async def timed(kind: str, name: str, action: Any) -> Any:
        before = replica.proc_status()["cpu_seconds"]
        for _ in range(REPEATS):
            outcome = await action()
        costs[kind][name] = (replica.proc_status()["cpu_seconds"] - before) / REPEATS
        if kind == "demo click":
            costs["elements"][name] = outcome.elements if outcome.fragment_run else float("nan")
        return outcome

    newcomers = [SimulatedLearner(number, replica) for number in range(1, REPEATS + 1)]
    await timed("first render", "introduction", lambda: newcomers.pop().open())
    learner = SimulatedLearner(0, replica)
    await learner.open()
    emails = (f"walker{number}@example.com" for number in range(10 * REPEATS))
    walk = (
        ("connectivity_pooling", [(INITIALIZE, lambda: {})]),
        ("data_models", [(CREATE_USER, lambda: {"Email": next(emails), "Name": "Walker"})]),
        ("caching", [(FETCH_USER, dict), ("Fetch Latest AIRScore (Cached)", dict)]),
        (
            "repository_n_plus_one",
            [
                ("Add 3 Sample Scores for User", None),
                ("Fetch User & Scores (Simulated N+1)", None),
                ("Fetch User & Scores (Eager Loading)", None),
            ],
        ),
        ("eventing_outbox", [(STORE_SCORE, dict)]),
    )
    user_id = ""
    previous = ""
    for path, clicks in walk:
        # A navigation: from the previous page to this one, REPEATS times (back untimed).
        before = replica.proc_status()["cpu_seconds"]
        for _ in range(REPEATS):
            page = await learner.go_to(path)
            spent = replica.proc_status()["cpu_seconds"]
            await learner.go_to(previous)
            before += replica.proc_status()["cpu_seconds"] - spent
        costs["navigation"][path] = (replica.proc_status()["cpu_seconds"] - before) / REPEATS
        page = await learner.go_to(path)
        user_id = user_id or next((code for code in page.codes if UUID.fullmatch(code)), "")
        for label, inputs in clicks:

            async def click(
                label: str = label, inputs: Any = inputs, page: Any = page, user: str = user_id
            ) -> Any:
                typed = {"User ID": user} if inputs is None else inputs()
                return await learner.press(page, label, typed)

            await timed("demo click", label, click)
        previous = path
    await learner.close()
    for newcomer in newcomers:
        await newcomer.close()
    if learner.report.errors:
        raise RuntimeError(f"the walker saw errors: {learner.report.errors[:3]}")
    return costs


async def _measure_static(replica: Any, reruns: int) -> tuple[float, float]:
    learner = SimulatedLearner(0, replica)
    await learner.open()
    cost = await _cost_per_rerun(learner, reruns)
    await learner.close()
    return cost


async def _measure_static_click(replica: Any, clicks: int) -> tuple[float, float]:
    """(server CPU seconds, wall seconds) per click of the static fragment's button."""
    learner = SimulatedLearner(0, replica)
    page = await learner.open()
    for _ in range(3):
        await learner.press(page, "Click")
    before = replica.proc_status()["cpu_seconds"]
    started = time.perf_counter()
    for _ in range(clicks):
        outcome = await learner.press(page, "Click")
        assert outcome.fragment_run, "the static button must rerun its fragment only"
    wall = time.perf_counter() - started
    after = replica.proc_status()["cpu_seconds"]
    await learner.close()
    return (after - before) / clicks, wall / clicks


def _serve_script(script: str, name: str, workspace: Path, environment: dict[str, str]) -> Any:
    """Serve `script` from its own folder, with QuLab's .streamlit/config.toml."""
    app = workspace / name / "app.py"
    (app.parent / ".streamlit").mkdir(parents=True)
    app.write_text(script)
    shutil.copy(
        PROJECT_ROOT / ".streamlit" / "config.toml", app.parent / ".streamlit" / "config.toml"
    )
    return start_replica(environment, workspace, [], app=app)


ROUNDS = 5


def main(reruns: int = 30, rounds: int = ROUNDS) -> list[dict[str, Any]]:
    """For bench/run_all.py: every server up at once, measured round after round in turn
    (trivial, static introduction, static fragment, QuLab's walk and pages), so a slow minute
    of the machine falls on all of them; each ratio is taken within a round, and the rows give
    the median of the rounds with their min and max."""
    workspace = Path(tempfile.mkdtemp(prefix="qulab-rerun-cost-"))
    environment = dict(os.environ, QULAB_SANDBOX_DIR=str(workspace / "sandboxes"))
    servers: list[Any] = []
    ratios: dict[str, list[float]] = collections.defaultdict(list)
    shown: dict[str, list[float]] = collections.defaultdict(list)  # ms, for the measures' names
    try:
        trivial = _serve_script(TRIVIAL_PAGE, "trivial", workspace, environment)
        static = _serve_script(STATIC_INTRODUCTION, "static", workspace, environment)
        qulab = start_replica(environment, workspace, [])
        servers += [trivial, static, qulab]
        warm = asyncio.run(_walk_costs(qulab))  # compiles and caches; counts what clicks draw
        drawn = [count for count in warm["elements"].values() if count == count]
        fragment_elements = round(statistics.median(drawn)) if drawn else 10
        fragment = _serve_script(
            STATIC_FRAGMENT.format(elements=fragment_elements), "fragment", workspace, environment
        )
        servers.append(fragment)
        for _ in range(rounds):
            trivial_cpu = asyncio.run(_measure_static(trivial, reruns))[0]
            static_cpu = asyncio.run(_measure_static(static, reruns))[0]
            fragment_cpu = asyncio.run(_measure_static_click(fragment, reruns))[0]
            walk = asyncio.run(_walk_costs(qulab))
            pages = asyncio.run(_measure_qulab(qulab, reruns))
            _round_ratios(ratios, shown, trivial_cpu, static_cpu, fragment_cpu, walk, pages)
    finally:
        for server in servers:
            stop_replica(server)
        shutil.rmtree(workspace, ignore_errors=True)
    rows = _rows(ratios, shown, fragment_elements)
    print_table(rows)
    return rows


def _round_ratios(
    ratios: dict[str, list[float]],
    shown: dict[str, list[float]],
    trivial: float,
    static: float,
    fragment: float,
    walk: dict[str, dict[str, float]],
    pages: dict[str, tuple[float, float]],
) -> None:
    """One round's measures, each divided by its control measured in the same round."""
    clicks = sorted(walk["demo click"].values())
    click_median = statistics.median(clicks)
    click_p90 = clicks[min(len(clicks) - 1, int(len(clicks) * 0.9))]
    for name, value in (("trivial", trivial), ("static", static), ("fragment", fragment)):
        shown[name].append(value * 1000)
    shown["click"].append(click_median * 1000)
    shown["click p90"].append(click_p90 * 1000)
    ratios["static ÷ trivial"].append(static / trivial)
    ratios["introduction ÷ static"].append(pages["Introduction"][0] / static)
    ratios["fragment ÷ trivial"].append(fragment / trivial)
    ratios["click ÷ fragment"].append(click_median / fragment)
    ratios["click ÷ trivial"].append(click_median / trivial)
    ratios["click p90 ÷ trivial"].append(click_p90 / trivial)
    for kind in ("navigation", "first render"):
        ratios[f"{kind} ÷ trivial"].append(statistics.median(walk[kind].values()) / trivial)
    for title, (cpu, _) in pages.items():
        ratios[f"{title} ÷ trivial"].append(cpu / trivial)
    for name, cpu in walk["demo click"].items():
        shown[f"click: {name}"].append(cpu * 1000)


def _rows(
    ratios: dict[str, list[float]], shown: dict[str, list[float]], fragment_elements: int
) -> list[dict[str, Any]]:
    def ms(name: str) -> str:
        return f"{statistics.median(shown[name]):.1f} ms"

    bench = "rerun_cost"
    rows = [
        spread_result(bench, "trivial 3-line page: server CPU per bare rerun", shown["trivial"],
                      unit=" ms"),
        spread_result(bench, f"static introduction (same Streamlit calls, no QuLab; "
                      f"{ms('static')}) ÷ trivial", ratios["static ÷ trivial"]),
        spread_result(bench, "Introduction's full render ÷ that static page: QuLab's part",
                      ratios["introduction ÷ static"], target=FULL_RENDER_TARGET),
        spread_result(bench, f"static fragment of {fragment_elements} elements (a demo click's "
                      f"median), no QuLab ({ms('fragment')}) ÷ trivial: Streamlit's floor for a "
                      "click", ratios["fragment ÷ trivial"]),
        spread_result(bench, "demo click's median ÷ that static fragment's click: QuLab's part",
                      ratios["click ÷ fragment"]),
        spread_result(bench, f"demo click: median server CPU ({ms('click')}) ÷ trivial rerun",
                      ratios["click ÷ trivial"], target=CLICK_TARGET),
        spread_result(bench, f"demo click: p90 server CPU ({ms('click p90')}) ÷ trivial rerun",
                      ratios["click p90 ÷ trivial"], target=CLICK_P90_TARGET),
        spread_result(bench, "navigation: median server CPU ÷ trivial rerun",
                      ratios["navigation ÷ trivial"]),
        spread_result(bench, "first render: server CPU ÷ trivial rerun",
                      ratios["first render ÷ trivial"]),
    ]  # fmt: skip
    rows += [
        spread_result(
            bench, f"{title}: CPU per bare rerun ÷ trivial page", ratios[f"{title} ÷ trivial"]
        )
        for title in PAGES
    ]
    rows += [
        spread_result(bench, f"{name}: server CPU per click", values, unit=" ms")
        for name, values in shown.items()
        if name.startswith("click: ")
    ]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--reruns", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    arguments = parser.parse_args()
    main(arguments.reruns, arguments.rounds)
