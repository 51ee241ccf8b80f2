"""The process's fan-out queue: drop events first, every fan-out in short slices.

A fan-out is a :class:`Job`: messages (:class:`realtime.wire.Broadcast`) for lists of
sockets, delivered in order. The :class:`Dispatcher` keeps jobs in two lanes
(:class:`realtime.wire.Lane`) and runs them a slice at a time (``SLICE_S`` of CPU),
the urgent lane first, then gives the event loop back (``call_soon``): whatever
became ready meanwhile (a publication read by the subscriber, the creator's HTTP
request, a Redis reply) runs before the next slice. So:

* a drop event that arrives while chat is being fanned out starts within one slice,
  and goes to every socket before the chat job resumes;
* a worker writing to 12,500 sockets never holds its loop for the ~150 ms that takes,
  and the creator's ``POST /buy-now`` on that worker answers between slices.

A slice is ``SLICE_S`` while the loop has little else to do. When it has more (a chat
storm: hundreds of viewers' frames read, posts answered, replies from Redis between
two slices), a fixed 4 ms slice gave a fan-out a few percent of the worker: BUY NOW
to 10,000 sockets, ~250 ms of writes, took 3-4 s to reach them all. So a slice also
grows with the time the rest of the loop took since the previous one: an urgent job
gets at least ``URGENT_SHARE`` of the worker while it runs, a bulk one
``BULK_SHARE``, each slice at most ``URGENT_SLICE_MAX_S`` / ``BULK_SLICE_MAX_S``, so
a creator's request still starts within tens of milliseconds. An urgent job's share
is four fifths: while it runs the rest of the loop is mostly viewers' buys and chat
posts read and then held until it ends (below), so what it leaves to them only makes
BUY NOW later. At a half, BUY NOW's fan-out to 10,000 sockets in a chat storm ran
4 ms slices between 4 ms of such reading and took ~235 ms for ~130 ms of writes
(traced slice by slice).

A bulk slice is at least ``SLICE_S`` so that a chat batch is not cut into more
turns of the loop than it needs, except while someone waits on an HTTP write request
of this process (:meth:`Dispatcher.expedite`: the creator's ``POST /buy-now``, a
go-live, a payment): each of the request's ~15 awaits (PostgreSQL, Redis, the
publication) costs a turn of the loop, and a turn that holds a 4 ms chat slice made
BUY NOW wait ~150 ms for its own request in a 200 messages/s storm at 10,000 viewers
(~5 ms without chat). While one is in flight bulk slices are ``EXPEDITED_SLICE_S``
at least (the share above still applies when the loop is busy), so each await costs
about a millisecond and chat slows for as long as the request takes.

Viewers' own commands (a ``buy``, a chat message) are the exception:
:meth:`Dispatcher.urgent_idle` lets the gateway hold them while a drop event is
still being fanned out, so every viewer sees BUY NOW before anyone's buy is taken.
When the fan-out ends, the held commands are released ``RELEASE_PER_TURN`` per turn
of the loop, in the order they came, not all at once: BUY NOW's rush held up to
~2,000 buys and chat posts on a worker at 10,000 viewers, and resumed together each
ran to its first Redis call in one turn of the loop, which a creator's next request
(another drop's BUY NOW or close) and the next drop event's publication waited
behind (traced, docs/benchmarks.md). Commands that arrive while held ones are still
being released queue behind them, and a drop event that starts meanwhile holds the
rest again.

**The node's workers hold together** (realtime.board): a worker also holds its viewers'
commands while another worker of its node is fanning a drop event out, and releases
them once none is. Workers share the node's cores, and a worker that released its
part of BUY NOW's rush first took the cores the others' writes of BUY NOW needed.

Rooms keep the order of stream positions themselves (realtime.room): a job is never
reordered against another of the same lane.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from realtime import metrics
from realtime.board import FanoutBoard
from realtime.wire import Broadcast, Lane

__all__ = ["BULK_SHARE", "EXPEDITED_SLICE_S", "RELEASE_PER_TURN", "SLICE_S", "URGENT_SHARE",
           "Dispatcher", "Job"]

SLICE_S = 0.004  # seconds of fan-out before the loop runs whatever else is ready
URGENT_SHARE = 0.8  # of the worker's time a drop event's fan-out takes at least
URGENT_SLICE_MAX_S = 0.040
BULK_SHARE = 1 / 3  # chat batches and coalesced events: viewers' buys come first
BULK_SLICE_MAX_S = 0.012
EXPEDITED_SLICE_S = 0.0005  # bulk slices while an HTTP write request is in flight
RELEASE_PER_TURN = 32  # commands held behind a drop event resumed per turn of the loop
_STEP = 16  # sockets between clock reads (~0.2-0.4 ms of writes)
BOARD_POLL_S = 0.002  # held commands look at the node's board this often


class Job:
    """Deliver ``segments`` -- (message, sockets) pairs -- in order, resumably."""

    __slots__ = ("_i", "_seg", "cancelled", "done", "lane", "on_done", "segments", "started")

    def __init__(self, segments: Sequence[tuple[Broadcast, Sequence[Any]]],
                 lane: Lane = Lane.URGENT,
                 on_done: Callable[[Job], None] | None = None) -> None:
        self.segments = list(segments)
        self.lane = lane
        self.on_done = on_done
        self._seg = 0
        self._i = 0
        self.cancelled = False
        self.done = False
        self.started: float | None = None

    def remaining(self) -> list[tuple[Broadcast, Sequence[Any]]]:
        """What is left to deliver: (message, sockets) from the cursor on."""
        if self.done or self.cancelled:
            return []
        out = []
        for k in range(self._seg, len(self.segments)):
            b, conns = self.segments[k]
            start = self._i if k == self._seg else 0
            if start < len(conns):
                out.append((b, conns[start:]))
        return out

    def cancel(self) -> None:
        self.cancelled = True

    def run(self, deadline: float) -> bool:
        """Deliver until ``deadline`` (``time.perf_counter``); True once finished."""
        if self.started is None:
            self.started = time.perf_counter()
        segments = self.segments
        while self._seg < len(segments):
            b, conns = segments[self._seg]
            i, n = self._i, len(conns)
            while i < n:
                end = min(n, i + _STEP)
                for k in range(i, end):
                    conns[k].deliver(b)
                i = end
                if i < n and time.perf_counter() >= deadline:
                    self._i = i
                    return False
            self._seg += 1
            self._i = 0
            if self._seg < len(segments) and time.perf_counter() >= deadline:
                return False
        self._finish()
        return True

    def _finish(self) -> None:
        self.done = True
        if self.started is not None:
            metrics.FANOUT_SECONDS.observe(time.perf_counter() - self.started)
        for b, conns in self.segments:
            for frame in b.frames:
                metrics.FANOUT_MESSAGES.labels(frame["t"]).inc(len(conns))
        if self.on_done is not None:
            self.on_done(self)


class Dispatcher:
    """Jobs by lane, run in slices; see the module docstring."""

    def __init__(self, slice_s: float = SLICE_S, board: FanoutBoard | None = None) -> None:
        self.slice_s = slice_s
        self.board = board  # the node's other workers' fan-outs (realtime.board)
        self._lanes: tuple[collections.deque[Job], ...] = (collections.deque(),
                                                            collections.deque())
        self._scheduled: asyncio.Handle | None = None
        self._running = False
        # Viewers' commands held behind a drop event, in the order they came; released
        # RELEASE_PER_TURN per turn of the loop once the urgent lane is empty.
        self._held: collections.deque[asyncio.Future] = collections.deque()
        self._release: asyncio.Handle | None = None
        self._yielded_at: float | None = None  # a slice ended with work left, at
        self.urgent_max_s = max(slice_s, URGENT_SLICE_MAX_S)
        self.bulk_max_s = max(slice_s, BULK_SLICE_MAX_S)
        self.expedited_slice_s = min(slice_s, EXPEDITED_SLICE_S)
        self._expedited = 0  # HTTP write requests in flight (expedite)

    @contextlib.contextmanager
    def expedite(self) -> Iterator[None]:
        """While inside, bulk slices are short: someone waits on a request whose every
        await is a turn of this loop (see the module docstring)."""
        self._expedited += 1
        try:
            yield
        finally:
            self._expedited -= 1

    @property
    def expedited(self) -> bool:
        return self._expedited > 0

    def submit(self, job: Job) -> Job:
        """Queue ``job``. With nothing ahead of it in its lane or above, its first slice
        runs now: a lone drop event leaves without waiting for a turn of the loop."""
        lanes = self._lanes
        ahead = any(lanes[k] for k in range(job.lane + 1))
        lanes[job.lane].append(job)
        if not ahead and not self._running:
            if self._scheduled is not None:
                self._scheduled.cancel()
                self._scheduled = None
            self._run()
        else:
            self._schedule()
        return job

    @property
    def urgent_busy(self) -> bool:
        """A drop event (or another urgent message) is still being fanned out."""
        # Asked before every viewer's command: a loop, not any() over a generator.
        for job in self._lanes[0]:  # Lane.URGENT
            if not job.cancelled:
                return True
        return False

    def pending(self, lane: Lane) -> int:
        return sum(1 for job in self._lanes[lane] if not job.cancelled)

    @property
    def holding(self) -> bool:
        """Viewers' commands wait (:meth:`urgent_idle`): a drop event is being fanned
        out, or the commands held behind one are not all released yet."""
        if self._held or self.urgent_busy:
            return True
        board = self.board
        return board is not None and board.others_busy(time.monotonic())

    async def urgent_idle(self) -> None:
        """Return once the urgent lane is empty and the commands held before this one
        were released (at once if nothing is held)."""
        if not self.holding:
            return
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        self._held.append(turn)
        if not self.urgent_busy:
            self._schedule_release()
        await turn  # cancelled with its task (the socket closed): skipped when released

    def _schedule_release(self) -> None:
        if self._release is None and self._held:
            self._release = asyncio.get_running_loop().call_soon(self._release_held)

    def _release_held(self) -> None:
        """Resume the next ``RELEASE_PER_TURN`` held commands; the rest next turn."""
        self._release = None
        if self.urgent_busy:
            return  # another drop event: they wait for it too (released when it ends)
        board = self.board
        if board is not None and self._held and board.others_busy(time.monotonic()):
            # another worker of the node is still writing a drop event: look again soon
            self._release = asyncio.get_running_loop().call_later(BOARD_POLL_S,
                                                                 self._release_held)
            return
        held = self._held
        released = 0
        while held and released < RELEASE_PER_TURN:
            turn = held.popleft()
            if not turn.done():
                turn.set_result(None)
                released += 1
        self._schedule_release()

    def _schedule(self) -> None:
        if self._scheduled is None and not self._running:
            self._scheduled = asyncio.get_running_loop().call_soon(self._run)

    def slice_for(self, lane: Lane, others_s: float) -> float:
        """This slice's length, after the rest of the loop took ``others_s`` since the
        previous slice (see the module docstring)."""
        least = self.slice_s
        if lane is Lane.URGENT:
            share, most = URGENT_SHARE, self.urgent_max_s
        else:
            share, most = BULK_SHARE, self.bulk_max_s
            if self._expedited:
                least = self.expedited_slice_s
        return max(least, min(most, others_s * share / (1 - share)))

    def _run(self) -> None:
        self._scheduled = None
        self._running = True
        urgent, bulk = self._lanes
        try:
            if urgent and self.board is not None:
                self.board.busy(time.monotonic())
            now = time.perf_counter()
            slice_s = self.slice_for(Lane.URGENT if urgent else Lane.BULK,
                                     0.0 if self._yielded_at is None
                                     else now - self._yielded_at)
            deadline = now + slice_s
            while True:
                lane = urgent if urgent else bulk
                if not lane:
                    break
                job = lane[0]
                if job.cancelled:
                    lane.popleft()
                    continue
                finished = job.run(deadline)
                if finished:
                    lane.popleft()
                if time.perf_counter() >= deadline:
                    break
        finally:
            self._running = False
            while urgent and urgent[0].cancelled:
                urgent.popleft()
            if not urgent:
                if self.board is not None:
                    self.board.idle()
                if self._held:
                    self._schedule_release()
            if urgent or bulk:
                self._yielded_at = time.perf_counter()
                self._schedule()
            else:
                self._yielded_at = None

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if self._release is not None:
            self._release.cancel()
            self._release = None
        for lane in self._lanes:
            lane.clear()
        if self.board is not None:
            self.board.idle()
        held, self._held = self._held, collections.deque()
        for turn in held:
            if not turn.done():
                turn.set_result(None)
