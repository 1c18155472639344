"""How the lesson's outbox survives a class and its faults: section 5's "How it survives faults".

source.py holds the pattern: the score and its event in one transaction, OutboxPublisher
(lease, XADD, mark) run by run_publisher, StreamConsumer (read, inbox, XACK) run by
run_consumer. QuLab runs those loops with hardened subclasses, one concern a module:

- relay.py    - GuardedPublisher and GuardedConsumer: paused while the broker is down (no event
                spends an attempt on an outage), a broker-wide refusal (OOM, READONLY, …) taken
                for an outage, at most 32 outbox calls to Redis at once per process
- circuit.py  - the broker circuit: open on an outage, probe with jittered backoff, close
- broker.py   - which refusals are outages, retention that trims only acknowledged entries,
                the broker's persistence settings
- audit.py    - republish what a broker lost before anyone consumed it; prune delivered history
- notify.py   - PostgreSQL LISTEN/NOTIFY: a commit in any process wakes the relay at once
- watch.py    - one look at Redis per interval for every idle consumer of the process
- service.py  - OutboxService: one sandbox's publisher and consumer tasks, behind a facade
- status.py   - what the status panel shows, read in few statements
"""
