"""How results look on a page: rows for tables, metric tiles, the models' diagram.

Pages only render; these turn the typed results of source.py and classroom into what Streamlit
draws (text for tables, so a table never pads a float to four decimals).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import streamlit as st

import source
from classroom.cache.coherence import CacheInvalidation
from classroom.demos.caching import CacheTrial
from pages.common import plain_text

# Short headers and minute-precise times, so a users table fits a laptop-wide page.
USER_COLUMNS = {
    "occupation_code": "occupation",
    "education_level": "education",
    "years_experience": st.column_config.NumberColumn("years", format="%g"),
    "created_at": st.column_config.DatetimeColumn("created (UTC)", format="D MMM HH:mm"),
}


def user_as_row(user: source.User) -> dict[str, Any]:
    """The user's columns as plain values, for tables on a page."""
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "occupation_code": user.occupation_code or "",
        "education_level": user.education_level or "",
        "years_experience": user.years_experience,
        "created_at": user.created_at,
    }


def score_as_row(score: source.AIRScore) -> dict[str, str]:
    """A score's id and parts, each as stored (text: one decimal stays one decimal)."""
    return {"id": score.id, **{name: str(getattr(score, name)) for name in source.SCORE_FIELDS}}


def milliseconds_text(value: Optional[float]) -> str:
    """A time in ms: two decimals below 10 ms, one above; 'n/a' when there is none."""
    if value is None:
        return "n/a"
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}"


def pool_trial_row(trial: source.PoolTrial) -> dict[str, str]:
    """One row of the pool experiment's table."""
    return {
        "pool": trial.label,
        "requests": f"{trial.requests:,}",
        "in flight": f"{trial.concurrency:,}",
        "seconds": f"{trial.seconds:,.3f}",
        "throughput (req/s)": f"{trial.throughput:,.0f}",
        "median latency (ms)": milliseconds_text(trial.median_latency_ms),
        "connections opened": f"{trial.connections_opened:,}",
    }


def markdown_table(rows: list[dict[str, str]]) -> str:
    """Rows as one Markdown table, every cell escaped (so no text renders as Markdown or HTML).

    One st.markdown element instead of a tile per value or a DataFrame: a click that redraws
    its result costs Streamlit about 0.2 ms per element, and a DataFrame converts through Arrow.
    """
    if not rows:
        return ""
    header = list(rows[0])
    lines = [
        "| " + " | ".join(plain_text(name) for name in header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(plain_text(str(row[name])) for name in header) + " |" for row in rows),
    ]
    return "\n".join(lines)


def _ms(value: Optional[float], suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.3f}{suffix}"


def cache_metric_rows(metrics: source.CacheMetrics) -> list[dict[str, str]]:
    """The cache page's two rows of metrics: counts and H, then the four times."""
    hit_ratio = "n/a" if metrics.hit_ratio is None else f"{metrics.hit_ratio:.1%}"
    return [
        {
            "Hits": f"{metrics.hits:,}",
            "Misses": f"{metrics.misses:,}",
            "Errors": f"{metrics.errors:,}",
            "Hit ratio H": hit_ratio,
        },
        {
            "T_cache (mean)": _ms(metrics.mean_cache_ms, " ms"),
            "T_db (mean)": _ms(metrics.mean_database_ms, " ms"),
            "T_avg predicted": _ms(metrics.predicted_average_ms, " ms"),
            "T_avg measured": _ms(metrics.measured_average_ms, " ms"),
        },
    ]


def invalidation_row(invalidation: CacheInvalidation) -> dict[str, str]:
    """One row of the page's table of recent invalidations."""
    commands = "; ".join(f"{c.command} -> {c.reply}" for c in invalidation.redis_commands)
    applied = "yes" if invalidation.applied else "no: Redis failed; settled before the next read"
    return {"why": invalidation.reason, "commands": commands, "applied": applied}


def cache_trial_row(trial: CacheTrial) -> dict[str, str]:
    """One row of the cache experiment's table: counts, measured H and the four times (ms)."""
    metrics = trial.metrics
    return {
        "target H": f"{trial.target_hit_ratio:.0%}",
        "hits": f"{metrics.hits:,}",
        "misses": f"{metrics.misses:,}",
        "errors": f"{metrics.errors:,}",
        "measured H": "n/a" if metrics.hit_ratio is None else f"{metrics.hit_ratio:.1%}",
        "T_cache (ms)": _ms(metrics.mean_cache_ms),
        "T_db (ms)": _ms(metrics.mean_database_ms),
        "T_avg predicted (ms)": _ms(metrics.predicted_average_ms),
        "T_avg measured (ms)": _ms(metrics.measured_average_ms),
    }


def cache_trial_point(trial: CacheTrial) -> dict[str, Optional[float]]:
    """One trial as numbers for the experiment's chart."""
    metrics = trial.metrics
    return {
        "measured H": metrics.hit_ratio,
        "T_avg predicted (ms)": metrics.predicted_average_ms,
        "T_avg measured (ms)": metrics.measured_average_ms,
    }


@functools.cache  # the metadata is fixed once source.py is imported
def entity_relationship_dot() -> str:
    """A Graphviz diagram of the lesson's tables, columns and foreign keys, from live metadata."""
    lines = [
        "digraph models {",
        '  rankdir=LR; node [shape=plaintext, fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    tables = source.Base.metadata.sorted_tables
    for table in tables:
        rows = "".join(
            f'<tr><td align="left">{"<b>PK</b> " if column.primary_key else ""}{column.name}</td>'
            f'<td align="left"><font color="#555555">{column.type.compile()}</font></td></tr>'
            for column in table.columns
        )
        lines.append(
            f'  {table.name} [label=<<table border="0" cellborder="1" cellspacing="0">'
            f'<tr><td colspan="2" bgcolor="#e8eefc"><b>{table.name}</b></td></tr>{rows}</table>>];'
        )
    for table in tables:
        for foreign_key in table.foreign_keys:
            lines.append(
                f"  {foreign_key.column.table.name} -> {table.name} "
                f'[label="1 : many\\n{table.name}.{foreign_key.parent.name}"];'
            )
    lines.append("}")
    return "\n".join(lines)
