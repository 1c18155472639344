"""One sandbox per learner: a database of its own, a Redis namespace, and a life cycle.

- sandbox.py   - the Sandbox (what the lesson calls a Sandbox), its ids and listeners
- stores.py    - where its data lives: a SQLite file, or a PostgreSQL schema with a lease
- claims.py    - SQLite files claimed by a lock that dies with its process; reaping the unheld
- replicas.py  - PostgreSQL's count of the replicas and of their connections (the budget's share)
- admission.py - capacity, and who gets in when the class is full
- lifecycle.py - holds, sleep and wake, deletion
- registry.py  - every sandbox of the process, behind one facade
- reset.py     - initialize and Reset my sandbox
"""
