"""Starting a sandbox afresh: section 2's initialize, and the sidebar's Reset my sandbox.

The lesson's init_db empties its tables and creates the sample users in one transaction. What
the platform adds afterwards is the same for both: every part of the sandbox that remembers
something (cache metrics, the outbox's activity, the publication watch) hears the reset, and the
sandbox's Redis keys go (its cached values, its event stream and consumer group).
"""

from __future__ import annotations

from sqlalchemy import delete

import source
from classroom.cache.breaker import REDIS_ERRORS
from classroom.progress.journal import JournalBase
from classroom.sandboxes.sandbox import Sandbox
from classroom.sandboxes.stores import create_schema


async def after_reset(sandbox: Sandbox) -> None:
    """Tell the reset listeners, then delete the sandbox's Redis keys (a failure is noted)."""
    for listener in list(sandbox.reset_listeners):
        await listener(sandbox)
    try:
        await sandbox.redis.delete_namespace()
        sandbox.redis.health.record_success()
    except REDIS_ERRORS as error:
        sandbox.redis.health.record_failure(error)


async def initialize_sandbox(sandbox: Sandbox) -> list[source.User]:
    """Section 2's button: the lesson's init_db (tables, emptied, two sample users), then reset."""
    users = await source.init_db(sandbox, reset=True)
    await after_reset(sandbox)
    return users


async def reset_sandbox(sandbox: Sandbox) -> dict[str, int]:
    """The sidebar's Reset: every row deleted (progress too) and its Redis keys; its id kept."""
    await create_schema(sandbox)
    async with source.get_session(sandbox) as session:
        for metadata in (source.Base.metadata, JournalBase.metadata):
            for table in reversed(metadata.sorted_tables):
                await session.execute(delete(table))
    await after_reset(sandbox)
    return await source.count_rows(sandbox)
