"""Words a section uses before it teaches them: one short explanation each.

The introduction lists them all (its glossary); a page that uses one gives it as a tooltip.
"""

PRE_PING = (
    "Pre-ping: before lending a pooled connection, the pool checks it still works (a tiny "
    "query), so a connection the server dropped is replaced instead of failing your request."
)
WAL = (
    "WAL (write-ahead log): SQLite writes changes to a side file first and folds them into the "
    "database later, so readers never wait for a writer."
)
BREAKER = (
    "Breaker: after Redis fails, QuLab stops calling it for a few seconds (reads go straight to "
    "the database) and tries it again in the background, instead of making every read wait."
)
EPOCH = (
    "Epoch: a token stored with every cached value. Changing it makes every cached value of "
    "your sandbox count as missing at once, in every server process."
)
FENCE = (
    "Fence: a token moved by every invalidation. A read that was at the database while a write "
    "committed sees it moved, and does not keep its (possibly old) copy."
)
DORMANT = (
    "Asleep (dormant): a sandbox nobody has open for a while gives back its connections and "
    "memory; its data stays, and it wakes the moment you come back."
)
OUTBOX = (
    "Outbox: a table of events written in the same transaction as the change they announce, "
    "sent to the broker afterwards."
)
RELAY = "Relay (publisher): the background task that moves outbox rows to the broker."
INBOX = (
    "Inbox: the consumer's table of event ids it has handled, so an event delivered twice is "
    "acted on once."
)
STREAM = (
    "Stream: a Redis log of messages, read by consumer groups, each message kept until "
    "every group has acknowledged it."
)

GLOSSARY = {
    "pre-ping": PRE_PING,
    "WAL": WAL,
    "breaker": BREAKER,
    "epoch": EPOCH,
    "fence": FENCE,
    "dormant": DORMANT,
    "outbox": OUTBOX,
    "relay": RELAY,
    "inbox": INBOX,
    "stream": STREAM,
}
