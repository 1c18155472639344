"""The instructor's view of the class: who is where in the guide, who is stuck, a word to all.

- `store`: where the class is kept, seen by every replica: three tables on PostgreSQL (the
  public schema), a SQLite file of this process's own on the embedded default.
- `roster`: one row per sandbox (display name, state, next step and since when, the steps
  completed and when each was first seen done), written only when something changed, and a
  heartbeat while this process holds sandboxes; display names.
- `broadcast`: the instructor's message to the class, read through a 2-second cache.
- `overview`: the class at a glance from one SELECT (`class_overview`), its CSV, and what the
  instructor sees about one learner (`learner_view`), shown to that learner too.
- `access`: the key, compared in constant time, five tries a minute.
- `service`: `InstructorService`, the one object the runtime starts and closes.

Nothing here shows a learner's rows, users, scores or events: only names, steps, times, states.
"""
