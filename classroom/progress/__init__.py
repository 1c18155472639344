"""Where each learner is: a journal of what their demos measured, and steps checked against it.

- journal.py     - the journal table, and writing one entry
- evidence.py    - what each operation a page runs proved (recorded by Lab.run)
- publication.py - the background publisher's own entry ("published, with no click")
- steps.py       - the guide's steps, their checks, and a learner's progress
"""
