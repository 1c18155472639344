"""The outbox's counts, kept by the database: the status panel reads a few rows, whatever history.

Section 5's panel shows how many events are pending, published, failed and delivered (published,
and in the consumer's inbox), and how many were published in the last few seconds. Counted on
every refresh, each figure walked the table: with 20,000 published events not yet pruned a
refresh cost 3× (SQLite) to 7× (PostgreSQL) what it cost at 100. Triggers now keep the counts in
`qulab_outbox_counts`, in the very transaction that inserts, updates or deletes an event or an
inbox row, so they can never disagree with the rows; `published_total` only ever grows (every
event that became published), and the rate is its growth between two readings.

- SQLite: row triggers on one row. SQLite has one writer at a time, so nothing races.
- PostgreSQL: statement triggers that read the statement's transition tables (one UPDATE of the
  counts per statement, not per row), on one of COUNT_SLOTS rows chosen by the backend's pid, so
  concurrent writers seldom wait on one another. "Delivered" joins two tables written by two
  transactions (the relay marks an event published while the consumer records it): those
  triggers take a transaction-level advisory lock first, so the second of the two sees the
  first's committed row and counts the event once; they write to a row of their own.

install_outbox_counts runs whenever a sandbox opens: once per database (per schema), under a lock,
it creates the table and the triggers and counts the rows already there.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

from sqlalchemy import BigInteger, Column, Integer, MetaData, Table, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

COUNTS_TABLE = "qulab_outbox_counts"
COUNT_SLOTS = 8  # PostgreSQL: rows the counts are spread over (a writer updates its pid's row),
# and one more for the triggers that hold the advisory lock
COUNTED = ("pending", "published", "failed", "delivered", "published_total")

outbox_counts = Table(
    COUNTS_TABLE,
    MetaData(),
    Column("slot", Integer, primary_key=True),
    *(Column(name, BigInteger, nullable=False, default=0) for name in COUNTED),
)


def counts_statement() -> Any:
    """One row: each count summed over the slots."""
    return select(*(func.coalesce(func.sum(outbox_counts.c[name]), 0) for name in COUNTED))


# --- SQLite: row triggers -------------------------------------------------------------------------

_SQLITE_INBOX_HAS = "EXISTS (SELECT 1 FROM consumed_events WHERE event_id = {row}.id)"
_SQLITE_PUBLISHED = (
    "EXISTS (SELECT 1 FROM domain_events WHERE id = {row}.event_id AND status = 'published')"
)


def _sqlite_counts_change(*rows: tuple[str, str]) -> str:
    """SET clauses adding (+) or taking away (-) each (row, sign)'s counts."""

    def change(column: str, term: str) -> str:
        return f"{column} = {column}" + "".join(
            f" {sign} {term.format(row=row)}" for row, sign in rows
        )

    delivered = f"({{row}}.status = 'published' AND {_SQLITE_INBOX_HAS})"
    return ", ".join(
        [
            *(change(status, f"({{row}}.status = '{status}')") for status in COUNTED[:3]),
            change("delivered", delivered),
        ]
    )


_SQLITE_BECAME_PUBLISHED = "published_total = published_total + (NEW.status = 'published')"
SQLITE_STATEMENTS = (
    f"CREATE TABLE IF NOT EXISTS {COUNTS_TABLE} (slot INTEGER PRIMARY KEY, "
    + ", ".join(f"{name} INTEGER NOT NULL DEFAULT 0" for name in COUNTED)
    + ")",
    f"INSERT OR IGNORE INTO {COUNTS_TABLE} (slot) VALUES (0)",
    "CREATE TRIGGER IF NOT EXISTS qulab_count_event_inserted AFTER INSERT ON domain_events BEGIN "
    f"UPDATE {COUNTS_TABLE} SET {_sqlite_counts_change(('NEW', '+'))}, "
    f"{_SQLITE_BECAME_PUBLISHED}; END",
    "CREATE TRIGGER IF NOT EXISTS qulab_count_event_deleted AFTER DELETE ON domain_events BEGIN "
    f"UPDATE {COUNTS_TABLE} SET {_sqlite_counts_change(('OLD', '-'))}; END",
    "CREATE TRIGGER IF NOT EXISTS qulab_count_event_changed "
    "AFTER UPDATE OF status ON domain_events WHEN OLD.status IS NOT NEW.status BEGIN "
    f"UPDATE {COUNTS_TABLE} SET {_sqlite_counts_change(('OLD', '-'), ('NEW', '+'))}, "
    f"{_SQLITE_BECAME_PUBLISHED}; END",
    "CREATE TRIGGER IF NOT EXISTS qulab_count_inbox_inserted "
    "AFTER INSERT ON consumed_events BEGIN "
    f"UPDATE {COUNTS_TABLE} SET delivered = delivered + {_SQLITE_PUBLISHED.format(row='NEW')}; "
    "END",
    "CREATE TRIGGER IF NOT EXISTS qulab_count_inbox_deleted "
    "AFTER DELETE ON consumed_events BEGIN "
    f"UPDATE {COUNTS_TABLE} SET delivered = delivered - {_SQLITE_PUBLISHED.format(row='OLD')}; "
    "END",
)


SQLITE_TRIGGERS = (
    "qulab_count_event_inserted",
    "qulab_count_event_deleted",
    "qulab_count_event_changed",
    "qulab_count_inbox_inserted",
    "qulab_count_inbox_deleted",
)
SQLITE_REMOVAL = (  # for a copy that leaves QuLab: the lesson's tables without the bookkeeping
    *(f"DROP TRIGGER IF EXISTS {name}" for name in SQLITE_TRIGGERS),
    f"DROP TABLE IF EXISTS {COUNTS_TABLE}",
)


# --- PostgreSQL: statement triggers over transition tables ----------------------------------------

POSTGRESQL_TRIGGERS = (  # name (also its function's), table, event, transition tables
    ("qulab_count_events_inserted", "domain_events", "INSERT", "NEW TABLE AS new_rows"),
    ("qulab_count_events_deleted", "domain_events", "DELETE", "OLD TABLE AS old_rows"),
    (
        "qulab_count_events_changed",
        "domain_events",
        "UPDATE",
        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
    ),
    ("qulab_count_inbox_inserted", "consumed_events", "INSERT", "NEW TABLE AS new_rows"),
    ("qulab_count_inbox_deleted", "consumed_events", "DELETE", "OLD TABLE AS old_rows"),
)


def counts_removal(backend: str, quoted_schema: str = "", *, keep_table: bool = False) -> list[str]:
    """The statements that take the counts off a sandbox (its triggers, and its table unless
    keep_table): a copy that leaves QuLab, or a sandbox as an older QuLab left it."""
    if backend == "sqlite":
        return list(SQLITE_REMOVAL[:-1] if keep_table else SQLITE_REMOVAL)
    s = quoted_schema
    drops = [
        f"DROP TRIGGER IF EXISTS {name} ON {s}.{table}" for name, table, *_ in POSTGRESQL_TRIGGERS
    ]
    return drops if keep_table else [*drops, f"DROP TABLE IF EXISTS {s}.{COUNTS_TABLE}"]


def _postgresql_statements(schema: str) -> list[str]:
    """The table, its slots' rows, the trigger functions and the triggers, in one schema."""
    s = schema  # quoted
    # A trigger that takes the lock writes to the lock holders' own row (slot COUNT_SLOTS): it
    # never waits on a row a writer without the lock holds while asking for the lock (a reset
    # that deletes events, then the inbox), so the lock and the rows make no cycle.
    lock = (
        f"PERFORM pg_advisory_xact_lock(hashtext({_literal(schema)} || '.outbox_counts')); "
        f"slot_number := {COUNT_SLOTS};"
    )
    inbox_has = f"EXISTS (SELECT 1 FROM {s}.consumed_events c WHERE c.event_id = r.id)"

    def add(pending: str, published: str, failed: str, delivered: str, total: str) -> str:
        return (
            f"UPDATE {s}.{COUNTS_TABLE} SET pending = pending + {pending}, "
            f"published = published + {published}, failed = failed + {failed}, "
            f"delivered = delivered + {delivered}, published_total = published_total + {total} "
            "WHERE slot = slot_number;"
        )

    def function(name: str, body: str) -> str:
        return (
            f"CREATE OR REPLACE FUNCTION {s}.{name}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "DECLARE d record; delivered_change bigint := 0; "
            f"slot_number integer := pg_backend_pid() % {COUNT_SLOTS}; "
            f"BEGIN {body} RETURN NULL; END $$"
        )

    def by_status(rows: str) -> str:
        return (
            "SELECT count(*) FILTER (WHERE r.status = 'pending') AS pending, "
            "count(*) FILTER (WHERE r.status = 'published') AS published, "
            f"count(*) FILTER (WHERE r.status = 'failed') AS failed INTO d FROM {rows} r;"
        )

    events_inserted = function(
        "qulab_count_events_inserted",
        by_status("new_rows")
        + f" IF d.published > 0 THEN {lock} SELECT count(*) INTO delivered_change FROM new_rows r "
        f"WHERE r.status = 'published' AND {inbox_has}; END IF;"
        + " IF d.pending + d.published + d.failed > 0 THEN "
        + add("d.pending", "d.published", "d.failed", "delivered_change", "d.published")
        + " END IF;",
    )
    events_deleted = function(
        "qulab_count_events_deleted",
        by_status("old_rows")
        + f" IF d.published > 0 THEN {lock} SELECT count(*) INTO delivered_change FROM old_rows r "
        f"WHERE r.status = 'published' AND {inbox_has}; END IF;"
        + " IF d.pending + d.published + d.failed > 0 THEN "
        + add("-d.pending", "-d.published", "-d.failed", "-delivered_change", "0")
        + " END IF;",
    )
    changed = "old_rows o JOIN new_rows r ON r.id = o.id WHERE o.status IS DISTINCT FROM r.status"
    events_changed = function(
        "qulab_count_events_changed",
        "SELECT count(*) AS changed, "
        "coalesce(sum((r.status = 'pending')::int - (o.status = 'pending')::int), 0) AS pending, "
        "coalesce(sum((r.status = 'published')::int - (o.status = 'published')::int), 0) "
        "AS published, "
        "coalesce(sum((r.status = 'failed')::int - (o.status = 'failed')::int), 0) AS failed, "
        "count(*) FILTER (WHERE r.status = 'published') AS became_published, "
        "count(*) FILTER (WHERE 'published' IN (r.status, o.status)) AS touches_published "
        f"INTO d FROM {changed};"
        f" IF d.touches_published > 0 THEN {lock} "
        "SELECT coalesce(sum((r.status = 'published')::int - (o.status = 'published')::int), 0) "
        f"INTO delivered_change FROM {changed} AND {inbox_has}; END IF;"
        + " IF d.changed > 0 THEN "
        + add("d.pending", "d.published", "d.failed", "delivered_change", "d.became_published")
        + " END IF;",
    )

    def inbox_changed(name: str, rows: str, sign: str) -> str:
        """Inbox rows added (+) or removed (-): those of published events move "delivered"."""
        published = f"{s}.domain_events e ON e.id = r.event_id AND e.status = 'published'"
        return function(
            name,
            f"IF EXISTS (SELECT 1 FROM {rows}) THEN {lock} "
            f"SELECT count(*) INTO delivered_change FROM {rows} r JOIN {published}; "
            + add("0", "0", "0", f"{sign}delivered_change", "0")
            + " END IF;",
        )

    inbox_inserted = inbox_changed("qulab_count_inbox_inserted", "new_rows", "")
    inbox_deleted = inbox_changed("qulab_count_inbox_deleted", "old_rows", "-")

    def trigger(name: str, table: str, when: str, referencing: str) -> str:
        return (
            f"CREATE OR REPLACE TRIGGER {name} AFTER {when} ON {s}.{table} "
            f"REFERENCING {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {s}.{name}()"
        )

    return [
        f"CREATE TABLE {s}.{COUNTS_TABLE} (slot integer PRIMARY KEY, "
        + ", ".join(f"{name} bigint NOT NULL DEFAULT 0" for name in COUNTED)
        + ")",
        f"INSERT INTO {s}.{COUNTS_TABLE} (slot) SELECT generate_series(0, {COUNT_SLOTS})",
        events_inserted,
        events_deleted,
        events_changed,
        inbox_inserted,
        inbox_deleted,
        *(trigger(*spec) for spec in POSTGRESQL_TRIGGERS),
    ]


def _literal(quoted_schema: str) -> str:
    """The schema's name as an SQL string literal (the quoted identifier's name, re-quoted)."""
    name = quoted_schema.strip('"').replace('""', '"')
    return "'" + name.replace("'", "''") + "'"


# --- installing -----------------------------------------------------------------------------------


def _recount_statement(prefix: str) -> str:
    """Set slot 0 to the counts of the rows there now and every other slot to 0, in ONE
    statement: a write before it is counted by it, a write after it by the triggers."""
    events, inbox = f"{prefix}domain_events", f"{prefix}consumed_events"

    def status(name: str) -> str:
        return f"(SELECT count(*) FROM {events} WHERE status = '{name}')"

    delivered = (
        f"(SELECT count(*) FROM {events} e JOIN {inbox} c ON c.event_id = e.id "
        "WHERE e.status = 'published')"
    )
    values = {
        "pending": status("pending"),
        "published": status("published"),
        "failed": status("failed"),
        "delivered": delivered,
        "published_total": status("published"),
    }
    assignments = ", ".join(
        f"{name} = CASE WHEN slot = 0 THEN {value} ELSE 0 END" for name, value in values.items()
    )
    return f"UPDATE {prefix}{COUNTS_TABLE} SET {assignments}"


async def install_outbox_counts(connection: AsyncConnection, quoted_schema: str = "") -> bool:
    """Create the counts and their triggers unless they exist; True when it installed them.

    On PostgreSQL `connection` is in the transaction that created the lesson's tables, and
    `quoted_schema` names the sandbox's schema: the events and the inbox are locked against
    writers until the commit, so none writes between the recount and the triggers. On SQLite
    each statement commits as it runs (Python's sqlite3 opens no transaction for DDL): the
    triggers exist before the one-statement recount, which runs under SQLite's write lock.
    """
    if connection.dialect.name == "sqlite":
        found = await connection.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?",
            (SQLITE_TRIGGERS[-1],),  # the last one created
        )
        if found.first() is not None:
            return False
        statements, prefix = [*SQLITE_STATEMENTS], ""
    else:
        await connection.exec_driver_sql(
            f"SELECT pg_advisory_xact_lock(hashtext({_literal(quoted_schema)} || '.counts'))"
        )
        regclass = f"{quoted_schema}.{COUNTS_TABLE}".replace("'", "''")
        found = await connection.exec_driver_sql(f"SELECT to_regclass('{regclass}')")
        if found.scalar() is not None:
            return False
        await connection.exec_driver_sql(
            f"LOCK TABLE {quoted_schema}.domain_events, {quoted_schema}.consumed_events "
            "IN SHARE ROW EXCLUSIVE MODE"
        )
        statements, prefix = _postgresql_statements(quoted_schema), f"{quoted_schema}."
    for statement in statements:
        await connection.execute(text(statement))
    await connection.exec_driver_sql(_recount_statement(prefix))
    return True


class PublishedRate:
    """Events published per second over the last `window` seconds, from readings of
    published_total (which only grows): its growth since the window began, the total then
    interpolated between the two readings around that moment."""

    def __init__(self, window_seconds: float) -> None:
        self.window_seconds = window_seconds
        self._readings: deque[tuple[float, int]] = deque()  # (monotonic seconds, total)

    def per_second(self, published_total: int, now: float) -> Optional[float]:
        """The rate, or None when no reading is between one and two windows old (the first
        reading, or one after a long quiet): then the caller counts the window's events."""
        readings, window = self._readings, self.window_seconds
        readings.append((now, published_total))
        while len(readings) > 2 and now - readings[1][0] >= window:
            readings.popleft()  # keep the newest reading at least a window old, and the rest
        then, total_then = readings[0]
        if not window <= now - then <= 2 * window:
            return None
        after, total_after = readings[1]  # the first reading inside the window
        start = now - window
        at_start = total_then + (total_after - total_then) * (start - then) / (after - then)
        return max(0.0, published_total - at_start) / window
