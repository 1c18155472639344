"""SQL compiled once per process for every SQLite sandbox, not once per sandbox.

SQLAlchemy caches each statement's compiled form per engine, keyed by the engine's dialect
object. A SQLite sandbox has an engine of its own (its own file), so each learner's first visit
to a page compiled every one of its statements again, on the runtime's one event loop: with a
class arriving at section 5 together, that loop spent its time compiling the same SQL 100 times
and every click waited behind it. PostgreSQL sandboxes share one engine, so they never did.

`share_compilation(engine)` gives a SQLite engine the process's compiled-statement cache and,
from its first connection on, one shared dialect object (the first SQLite dialect that finished
initializing), so the cache keys of every sandbox match. Every SQLite dialect in a process is
the same class with the same configuration: a statement compiled for one is the statement for
all. The engine's pool keeps its own dialect for its connections' lifecycle.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import LRUCache

__all__ = ["share_compilation", "COMPILED_STATEMENTS"]

# Each distinct statement shape is one entry, whatever the sandbox: a few hundred in QuLab.
COMPILED_STATEMENTS: LRUCache = LRUCache(2000)
_shared_dialect: Optional[Any] = None
_lock = threading.Lock()


def share_compilation(engine: AsyncEngine) -> None:
    """Let this SQLite engine use, and add to, the statements every other SQLite engine compiled."""
    sync_engine = engine.sync_engine
    sync_engine._compiled_cache = COMPILED_STATEMENTS
    with _lock:
        if _shared_dialect is not None and type(_shared_dialect) is type(sync_engine.dialect):
            sync_engine.dialect = _shared_dialect  # before its first Connection: every one shares
            return

    @event.listens_for(sync_engine, "connect", once=True)
    def become_the_shared_dialect(dbapi_connection: Any, connection_record: Any) -> None:
        # The first SQLite engine of the process: by now its dialect has initialized (SQLAlchemy
        # does that before "connect" listeners run), so it can serve every engine after it.
        global _shared_dialect
        with _lock:
            if _shared_dialect is None:
                _shared_dialect = sync_engine.dialect
