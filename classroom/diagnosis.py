"""Why QuLab could not connect to its PostgreSQL, in words an operator can act on.

as_qulab_error asks here first. The driver's own errors say little a page should show ("DBAPIError",
"TypeError", a bare timeout): here each cause QuLab can tell apart gets a sentence naming it and
what to check, with the URL masked. Read from the error itself (the server's SQLSTATE, the
driver's complaint); only a connection that timed out is looked at again, with one bounded probe,
to tell a port that is not PostgreSQL's from a server that never answers.
"""

from __future__ import annotations

import re
import socket
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from classroom.config import Settings, mask_url

# PostgreSQL's SQLSTATEs for the refusals at connect time
INVALID_PASSWORD = "28P01"
INVALID_AUTHORIZATION = "28000"  # "role … does not exist", or no pg_hba.conf entry
INVALID_CATALOG_NAME = "3D000"  # "database … does not exist"
PROBE_TIMEOUT_SECONDS = 1.0
_UNEXPECTED_PARAMETER = re.compile(r"unexpected keyword argument '(\w+)'")


@dataclass(frozen=True)
class Diagnosis:
    """What went wrong, as a page may show it; configuration: only a change of settings helps."""

    message: str
    configuration: bool = False


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error, what it wraps (SQLAlchemy's .orig), its cause and context: each once."""
    seen: set[int] = set()
    pending = [error]
    while pending and len(seen) < 12:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for inner in (getattr(current, "orig", None), current.__cause__, current.__context__):
            if isinstance(inner, BaseException):
                pending.append(inner)


def _raised_while_connecting(error: BaseException) -> bool:
    """True when the error came out of asyncpg's connect (not out of a query that timed out)."""
    for frame in traceback.extract_tb(error.__traceback__):
        path = frame.filename.replace("\\", "/")
        if path.endswith("asyncpg/connect_utils.py") or (
            path.endswith("asyncpg/connection.py") and frame.name == "connect"
        ):
            return True
    return False


def diagnose_database_failure(error: BaseException, settings: Settings) -> Optional[Diagnosis]:
    """A sentence for a PostgreSQL connection that failed for a cause QuLab can name; else None."""
    if not settings.database_url:
        return None
    try:
        url = make_url(settings.database_url)
    except ArgumentError:
        return None
    if url.get_backend_name() not in {"postgresql", "postgres"}:
        return None
    host, port = url.host or "localhost", url.port or 5432
    user = url.username or "(the operating system's user name)"
    database = url.database or user
    server, where = f"PostgreSQL at {host}:{port}", mask_url(settings.database_url)
    for cause in _causes(error):
        sqlstate = getattr(cause, "sqlstate", None)
        said = " ".join(str(getattr(cause, "message", "") or cause).split())
        if sqlstate == INVALID_PASSWORD:
            return Diagnosis(
                f'{server} refused the password of user "{user}" (password authentication '
                f"failed). Check the password in DATABASE_URL ({where}); an @, : or / in it "
                "must be percent-encoded.",
                configuration=True,
            )
        if sqlstate == INVALID_CATALOG_NAME:
            return Diagnosis(
                f'{server} has no database "{database}". Check the name at the end of '
                f"DATABASE_URL ({where}), or create it: createdb --owner {user} {database}.",
                configuration=True,
            )
        if sqlstate == INVALID_AUTHORIZATION:
            if "role" in said and "does not exist" in said:
                return Diagnosis(
                    f'{server} has no role (user) "{user}". Check the user name in DATABASE_URL '
                    f"({where}), or create it: createuser --pwprompt {user}.",
                    configuration=True,
                )
            return Diagnosis(
                f'{server} refused user "{user}": {said[:200]}. Check that its pg_hba.conf lets '
                f"this user connect to {database} from this machine, and DATABASE_URL ({where}).",
                configuration=True,
            )
        if isinstance(cause, TypeError) and (unexpected := _UNEXPECTED_PARAMETER.search(said)):
            return Diagnosis(
                f"DATABASE_URL ({where}) has a parameter the PostgreSQL driver (asyncpg) does "
                f"not take: {unexpected.group(1)}. Remove it from the URL (asyncpg takes, for "
                "example, ssl=require for TLS and application_name=…).",
                configuration=True,
            )
        if isinstance(cause, TimeoutError) and _raised_while_connecting(cause):
            seconds = settings.database_connect_timeout_seconds
            answer = what_answers(host, port)
            return Diagnosis(_no_handshake(f"{host}:{port}", where, seconds, answer))
    return None


def what_answers(host: str, port: int) -> str:
    """What a port says to a line of text: 'redis', 'http', 'other', 'closed' (PostgreSQL closes
    on a startup packet it cannot read), 'silent' (accepts and never answers) or 'unreachable'."""
    if not host or host.startswith("/"):
        return "unreachable"  # a Unix socket: nothing to learn by probing it this way
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_SECONDS) as probe:
            probe.settimeout(PROBE_TIMEOUT_SECONDS)
            probe.sendall(b"PING\r\n")
            reply = probe.recv(64)
    except TimeoutError:
        return "silent"
    except OSError:
        return "unreachable"
    if not reply:
        return "closed"
    if reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR", b"-DENIED", b"-WRONGPASS")):
        return "redis"
    if reply.startswith(b"HTTP/"):
        return "http"
    return "other"


def _no_handshake(address: str, where: str, seconds: float, answer: str) -> str:
    """The message for a connection that took longer than the connect timeout."""
    waited = (
        f"The database server at {address} took the connection but did not answer as "
        f"PostgreSQL within {seconds:g} s"
    )
    check = f"Check the host and port in DATABASE_URL ({where})"
    if answer == "redis":
        return f"{waited}: that port answers like Redis, not PostgreSQL. {check}."
    if answer == "http":
        return f"{waited}: that port answers like a web server, not PostgreSQL. {check}."
    if answer == "other":
        return f"{waited}: something else listens there, not PostgreSQL. {check}."
    if answer == "silent":
        return (
            f"{waited}, and it answers nothing at all (a hung server, a firewall that drops "
            f"packets, or another service listening there). {check}, and that the server runs. "
            "QULAB_DATABASE_CONNECT_TIMEOUT sets how long to wait."
        )
    return (
        f"{waited}: the server may be overloaded or starting up. {check}; "
        "QULAB_DATABASE_CONNECT_TIMEOUT sets how long to wait."
    )
