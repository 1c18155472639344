"""`python -m classroom.worker`: the experiment process.

ExperimentWorker starts it and talks to it on stdin/stdout.
"""

import os
import sys

from classroom.worker import NICENESS, serve

if __name__ == "__main__":
    # Below the app in the CPU scheduler's eyes: on a busy machine, learners' clicks go first.
    os.nice(NICENESS)
    # The answers get stdout's pipe to themselves; anything the experiment prints goes to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, answers)
