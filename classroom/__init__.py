"""QuLab's classroom: everything that runs the lesson (source.py) for a whole class at once.

No page teaches what is here; the pages use it, and source.py never imports it. It reaches the
lesson from outside: a session class whose commits invalidate the cache and wake the publisher,
subclasses that harden the cache and the outbox around the lesson's own read() and loops, and a
runtime that runs each learner's operations in their own sandbox. Modules, bottom up:

- config, errors, budget, statements   settings and secrets; errors a page may show; the
                                       connection budget; the statement log
- sqlite/, engines                     SQLite for a class; engines and the tracked session
- cache/                               the cache's fault handling: breaker, epochs and fences,
                                       single flight, tracing, the cache QuLab runs
- sandboxes/                           one sandbox per learner: stores, admission, holds,
                                       sleep and wake, deletion, reset
- outbox/                              the outbox's loops under faults, its audit and status
- progress/                            the journal, the steps and what each operation proved
- worker/, experiments                 the experiment process and paced heavy work
- demos/                               what each section's buttons run, as typed results
- export, runtime, status, browser     Download my sandbox; the event loop and Lab; the
                                       sidebar's status; a browser session's sandbox

docs/architecture.md maps every public name to its module.
"""
