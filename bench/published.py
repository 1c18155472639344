"""docs/benchmarks.md, written by run_all.py from what it measured: never pasted by hand.

Each run replaces, in docs/benchmarks.json, the rows of every (benchmark, backend) it ran, with
when and on what machine they were measured; rows it did not run stay as they were, with their
own date. docs/benchmarks.md is then written again from that file.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from benchtools import print_table

DOCS = Path(__file__).resolve().parent.parent / "docs"
STORE = DOCS / "benchmarks.json"
PAGE = DOCS / "benchmarks.md"
COLUMNS = ("measure", "backend", "value", "unit", "target", "met")
INTRODUCTION = """# Benchmarks

Written by `bench/run_all.py` (do not edit by hand): each run replaces the rows of the benchmarks
it ran and keeps the others, each with when and where it was measured. Speed is compared as
ratios measured in the same run, variants interleaved round by round, the table showing the
median of the rounds (with min and max where a benchmark has them); `met` reads the median.
The machines are shared: a latency beside its run's machine speed, never alone.

```bash
.venv/bin/python bench/run_all.py                 # everything: embedded, then PostgreSQL + Redis
.venv/bin/python bench/run_all.py --only cache    # one benchmark
```
"""


def publish(rows: list[dict[str, Any]], context: list[str]) -> None:
    """Merge this run's rows into docs/benchmarks.json and write docs/benchmarks.md again."""
    store: dict[str, Any] = json.loads(STORE.read_text()) if STORE.exists() else {}
    ran: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        ran.setdefault(f"{row['benchmark']} / {row['backend']}", []).append(row)
    for key, measured in ran.items():
        store[key] = {"context": context, "rows": measured}
    DOCS.mkdir(exist_ok=True)
    STORE.write_text(json.dumps(store, indent=1, sort_keys=True, default=str) + "\n")
    PAGE.write_text(render(store))


def render(store: dict[str, Any]) -> str:
    """The page: the introduction, then one table per benchmark and backend, with its context."""
    parts = [INTRODUCTION]
    for key in sorted(store):
        entry = store[key]
        table = io.StringIO()
        with redirect_stdout(table):
            print_table(entry["rows"], COLUMNS)
        context = "\n".join(f"- {line}" for line in entry["context"])
        parts.append(f"## {key}\n\n{context}\n\n{table.getvalue()}")
    return "\n".join(parts)
