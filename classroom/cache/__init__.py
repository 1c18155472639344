"""How the lesson's read-through cache survives faults: section 4's "How it survives faults".

source.ReadThroughCache holds the pattern (GET; on a miss, read the database and SET EX). QuLab
runs it through CoherentCache (coherent.py), whose get, load and set add, one concern a module:

- link.py          - the process's Redis (a server, or fakeredis when none is configured) and each
                     sandbox's guarded view of it: a timeout per call and a shared breaker
- breaker.py       - skip a Redis that hangs, probe it in the background, close again by itself
- coherence.py     - no stale read after any write, in any process: epoch and fence tokens
- single_flight.py - concurrent misses on one key share one database read
- tracing.py       - the commands a read really sent, with their replies and times
- coherent.py      - the cache QuLab runs, and the invalidation each commit sends
"""
