"""Which worker of a node runs the node's chores.

A chore is a background loop whose work is the node's or the cluster's, not its own
process's: sweeping expired holds, recovery, reconciling, campaign deadlines, closing
due auctions and giveaways, reminders, the tips sweep, the outbound webhook
dispatcher. Each is already safe with several processes at once (a lock, a lease,
``SKIP LOCKED`` or an idempotent script: several nodes run them), so running it in one
worker per node changes no outcome; what it saves is their polling. With every worker
running every loop, a 2-worker node idled at ~14 ms of CPU per second per worker and
~48 PostgreSQL transactions a second with no viewer at all (``python -m
benchmarks.idle``, docs/benchmarks.md), half of issue 16's gap to the bare
``websockets`` floor at 20,000 viewers.

Loops that flush their own process's state stay in every worker: the hold, bid and
giveaway entrant journals, the notifier, presence counts, metrics tallies, and the
order workers (consumers of the order streams: every worker takes a share of a
sell-out).

The chore worker is worker 0 of ``dropserver serve`` (``DROPSERVER_WORKER_INDEX``, set
by :func:`dropserver.serve.run_supervisor`); a process without an index (``--workers
1``, ``dropserver dev``, plain uvicorn, the tests' in-process apps) runs them all.

Worker 0 killed: its chores stop until the supervisor respawns it, with the same index,
at its next poll (0.2 s) plus a worker's start (~1-2 s on the 2-core VM; measured by
``tests/test_chores.py``, which SIGKILLs worker 0 of a ``serve --workers 2`` and sees
an expired hold swept within :data:`RESPAWN_BOUND_S`). Chosen over a lease that another
worker takes over: a lease costs every worker a wake-up and a check forever (what this
module removes) and adds a second way for chores to start and stop in a live process,
for a gap no longer than a respawn, in chores that already tolerate seconds of delay
(the hold sweep is every second, recovery every 2 s, reconciling every 10 s). What the
respawn does not cover: worker 0 alive but stuck (its event loop blocked) stops the
node's chores as long as it is stuck, as it stops its viewers; another node's chore
worker still runs them (docs/operations.md, "Background work").
"""

from __future__ import annotations

import os

from realtime.board import INDEX_ENV

__all__ = ["CHORE_WORKER", "RESPAWN_BOUND_S", "chores", "runs_chores"]

CHORE_WORKER = 0  # the index of the worker that runs the node's chores
# Worker 0 SIGKILLed -> its chores run again within this (tests/test_chores.py): the
# supervisor's poll (0.2 s), a worker's start, with room for a loaded 2-core machine.
RESPAWN_BOUND_S = 15.0


def runs_chores(environ: dict[str, str] | os._Environ | None = None) -> bool:
    """Whether this process runs the node's chores: worker 0 of a ``dropserver serve``,
    or a process that is no numbered worker (it is the whole node)."""
    index = (os.environ if environ is None else environ).get(INDEX_ENV)
    return index is None or index.strip() == str(CHORE_WORKER)


def chores(app: object) -> bool:
    """Whether ``app``'s process runs the node's chores (``app.state.chores``, set at
    start-up from :func:`runs_chores`; an app started some other way runs them)."""
    return bool(getattr(getattr(app, "state", None), "chores", True))
