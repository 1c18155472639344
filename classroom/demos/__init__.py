"""What each codelab section's buttons run, around the lesson, returning typed results to draw.

- pooling.py    - section 2: the engine's pool, live; the pooling experiment
- n_plus_one.py - section 3: each loading path measured; the comparison at scale
- caching.py    - section 4: reads through the cache, the demo user, the experiment
- eventing.py   - section 5: an event's delivery, the publisher's switches, the burst
"""
