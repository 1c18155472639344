"""Server CPU per bare rerun of each QuLab page, against a trivial 3-line Streamlit page.

A bare rerun is what a page costs when nothing is clicked: a learner changing pages, a reload,
a widget edit. One simulated learner (bench/learners.py's websocket client, as in
bench/classroom.py) opens the app, initializes its sandbox, then reruns each page RERUNS times in
a row; the server's CPU (utime + stime of the whole process, from /proc) over those reruns,
divided by their number, is the cost. The trivial page runs in its own server, started the
same way with the same .streamlit/config.toml, in the same run; so does a static page with the
introduction's elements and no QuLab call in them, which tells Streamlit's own floor for a page
of that shape from what QuLab adds to it.

    python3 bench/rerun_cost.py              # embedded defaults
    python3 bench/rerun_cost.py --reruns 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchtools import PROJECT_ROOT, print_table, result
from learners import INITIALIZE, SimulatedLearner, start_replica, stop_replica

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
# The introduction's elements (22, counted over the websocket) with no QuLab call in them: what
# Streamlit alone spends on a page of that shape, the floor under the introduction's ratio.
STATIC_INTRODUCTION = """import streamlit as st

for number in range(6):
    st.sidebar.page_link(f"https://example.com/{number}", label=f"Section {number}")
st.sidebar.caption("**Status**\\n\\n" + "A status line. " * 20)
st.sidebar.code("0123456789abcdef", language=None)
left, right = st.sidebar.columns(2)
left.button("New sandbox")
right.button("Reset my sandbox")
st.sidebar.caption("A line about the class. " * 20)
st.sidebar.progress(0.5, text="**Your progress:** 7 of 14 steps")
st.sidebar.caption("Next: section 2, a step.")
st.sidebar.download_button("Download my sandbox", data=b"x", on_click="ignore")
st.title("A title")
st.markdown("An introduction. " * 40)
st.subheader("What you will be able to do")
st.markdown("- a point\\n" * 6)
st.subheader("On the bench")
left, right = st.columns(2)
left.markdown("- a point\\n" * 4)
right.markdown("- a point\\n" * 4)
st.info("Use the sidebar.")
"""
TARGET_RATIO = 1.5


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


async def _measure_static(replica: Any, reruns: int) -> tuple[float, float]:
    learner = SimulatedLearner(0, replica)
    await learner.open()
    cost = await _cost_per_rerun(learner, reruns)
    await learner.socket.close()
    return cost


def _static_page_cost(
    script: str, name: str, workspace: Path, environment: dict[str, str], reruns: int
) -> tuple[float, float]:
    """Serve `script` from its own folder (with QuLab's .streamlit/config.toml) and measure its
    bare rerun."""
    app = workspace / name / "app.py"
    (app.parent / ".streamlit").mkdir(parents=True)
    app.write_text(script)
    shutil.copy(
        PROJECT_ROOT / ".streamlit" / "config.toml", app.parent / ".streamlit" / "config.toml"
    )
    server = start_replica(environment, workspace, [], app=app)
    try:
        return asyncio.run(_measure_static(server, reruns))
    finally:
        stop_replica(server)


def main(reruns: int = 60) -> list[dict[str, Any]]:
    """For bench/run_all.py: each page's bare rerun against the trivial page, both servers
    started here."""
    workspace = Path(tempfile.mkdtemp(prefix="qulab-rerun-cost-"))
    environment = dict(os.environ, QULAB_SANDBOX_DIR=str(workspace / "sandboxes"))
    try:
        trivial_cpu, trivial_wall = _static_page_cost(
            TRIVIAL_PAGE, "trivial", workspace, environment, reruns
        )
        floor_cpu, _ = _static_page_cost(
            STATIC_INTRODUCTION, "static", workspace, environment, reruns
        )
        qulab_server = start_replica(environment, workspace, [])
        try:
            costs = asyncio.run(_measure_qulab(qulab_server, reruns))
        finally:
            stop_replica(qulab_server)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    rows = [
        result(
            "rerun_cost", "trivial 3-line page: server CPU per rerun", trivial_cpu * 1000, unit="ms"
        )
    ]
    rows.append(
        result(
            "rerun_cost",
            f"static page with the introduction's 22 elements, no QuLab ÷ trivial page "
            f"({floor_cpu * 1000:.1f} ms)",
            floor_cpu / trivial_cpu if trivial_cpu else float("inf"),
        )
    )
    introduction_cpu = costs["Introduction"][0]
    rows.append(
        result(
            "rerun_cost",
            "Introduction ÷ that static page (what QuLab adds to Streamlit's floor)",
            introduction_cpu / floor_cpu if floor_cpu else float("inf"),
        )
    )
    for title, (cpu, wall) in costs.items():
        ratio = cpu / trivial_cpu if trivial_cpu else float("inf")
        rows.append(
            result(
                "rerun_cost",
                f"{title}: CPU per bare rerun ÷ trivial page "
                f"({cpu * 1000:.1f} ms, {wall * 1000:.0f} ms wall)",
                ratio,
                target=f"≤ {TARGET_RATIO:g}×",
                met=ratio <= TARGET_RATIO,
            )
        )
    average = sum(cpu for cpu, _ in costs.values()) / len(costs)
    rows.append(
        result(
            "rerun_cost",
            "all six pages, mean CPU per bare rerun ÷ trivial page",
            average / trivial_cpu,
            target=f"≤ {TARGET_RATIO:g}×",
            met=average / trivial_cpu <= TARGET_RATIO,
        )
    )
    print_table(rows)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--reruns", type=int, default=60)
    main(parser.parse_args().reruns)
