"""Heartbeats: every socket is pinged once per interval, a slice at a time.

A socket joins one of ``SLICES`` slices when it connects (round robin, so they are
even; each slice is a set, so a tick touches only the sockets of its two slices, not
every socket of the process). Every ``interval / SLICES`` seconds one slice is pinged,
and the slice pinged ``pong_timeout`` earlier is checked: a socket that has sent
nothing since that ping is closed with 4001. Pinging everyone at once cost a
50,000-viewer fan-out its tail: each worker wrote 12,500 pings and read 12,500 pongs
in one burst, and a BUY NOW published into the burst waited for it
(docs/benchmarks.md).

Silence is measured from the ping the server sent, never from the loop's own
schedule: on an overloaded process the ticks run late, and a round of 25 late ticks
lasts longer than interval + timeout, so "silent since now - interval - timeout"
would close sockets whose pongs came back at once (the likely reason two
50,000-viewer runs of an earlier version lost 21k and 32k sockets). A socket whose
command the server is still answering (``conn.handling``: a join queued behind a
connect storm) is not read meanwhile, so its silence is not counted either.

**A ping rides with data when it can.** A ping alone is a ``send()`` of its own (at
20,000 sockets, 800 a second: ~29 us each, nearly all of it the system call and the
loopback's receive work; about half of the gateway's idle CPU, docs/benchmarks.md).
So ``early`` ticks before a slice's ping tick (the last ``WINDOW`` of the interval,
5 s of 25), its sockets are marked ``ping_due``; the first message written straight
to such a socket in that window carries the ping's frame after its own, in the same
write (realtime.connection), and clears the mark. The slice's tick pings only the
sockets still marked: those that got nothing in the window (or only queued
messages). Each socket is still pinged once a round, at most once a window; the
pongs (reads) stay one per socket per interval; two pings of a socket are 20-30 s
apart instead of 25 (so the longest a link can go without a frame is the interval
plus the window: one message at the window's start, then nothing until the next
round's tick). Why a fifth: a room that gets anything at all
every few seconds (viewer counts, chat batches every 250-500 ms, a drop's events)
has something to carry nearly every ping, and the window stays small against the
interval and leaves the check of the previous round (``lag`` ticks after its ping)
before it opens (``early <= slices - lag``; 0, no riding, when the timeout is as long
as the interval).

The silence rule keeps its reference per socket: a slice in which any ping rode is
checked against the moment its window opened, which is no later than any ping sent
in the slice, so a socket is closed only if nothing arrived since *its* ping, and
its ping is at least ``pong_timeout`` old. A slice in which none rode is checked
against its tick, as before. A socket that never answers is closed at its slice's
check, as before: within interval + timeout (+ a tick) of its silence starting.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from typing import TYPE_CHECKING

from realtime.connection import Connection
from realtime.metrics import HEARTBEAT_PINGS
from realtime.protocol import CloseCode
from realtime.wire import PING

if TYPE_CHECKING:
    from realtime.hub import Hub

__all__ = ["SLICES", "WINDOW", "Heartbeat", "heartbeat_loop"]

SLICES = 25
WINDOW = 0.2  # of the interval before a slice's tick in which its pings ride with data


class Heartbeat:
    """The schedule: which slice to ping and which to check at each tick."""

    def __init__(self, interval: float, pong_timeout: float, slices: int = SLICES,
                 window: float = WINDOW) -> None:
        self.slices = slices
        self.tick_s = interval / slices
        # A slice is checked this many ticks after its ping (at most one round: a
        # timeout longer than the interval is checked just before the next ping).
        self.lag = min(slices, max(1, math.ceil(pong_timeout / self.tick_s)))
        self.timeout = min(pong_timeout, interval)
        # A slice's pings may ride with data this many ticks before its own tick; its
        # window opens after the previous round's check.
        self.early = max(0, min(round(slices * window), slices - self.lag))
        self._pinged_at: list[float | None] = [None] * slices
        self._opened_at: list[float | None] = [None] * slices  # open windows, since
        self._tick = 0
        self._next_slot = itertools.cycle(range(slices))
        self._members: list[set[Connection]] = [set() for _ in range(slices)]
        self._ping = PING
        self._alone = HEARTBEAT_PINGS.labels("alone")
        self._rode = HEARTBEAT_PINGS.labels("with_data")

    def assign(self, conn: Connection) -> None:
        conn.hb_slot = slot = next(self._next_slot)
        conn.ping_due = self._opened_at[slot] is not None  # joins an open window
        self._members[slot].add(conn)

    def forget(self, conn: Connection) -> None:
        self._members[conn.hb_slot].discard(conn)

    def tick(self, now: float) -> None:
        """Check one slice, ping another (the sockets whose ping did not ride with
        data), and open the window of a third."""
        ping_slot = self._tick % self.slices
        check_slot = (self._tick - self.lag) % self.slices
        open_slot = (self._tick + self.early) % self.slices
        self._tick += 1
        sent = self._pinged_at[check_slot]
        if sent is not None and now - sent >= self.timeout:
            for conn in list(self._members[check_slot]):
                if conn.closed:
                    self._members[check_slot].discard(conn)
                elif conn.last_seen < sent and not conn.handling:
                    conn.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        ping = self._ping
        opened = self._opened_at[ping_slot]
        self._opened_at[ping_slot] = None
        alone = rode = 0
        for conn in self._members[ping_slot]:
            if conn.closed:
                continue  # takes nothing; dropped at its check
            if opened is None or conn.ping_due:
                conn.ping_due = False
                ping.deliver(conn)
                alone += 1
            else:
                rode += 1  # its ping left with data in the window
        # Silence is measured from the earliest ping this slice's sockets were sent.
        self._pinged_at[ping_slot] = opened if rode and opened is not None else now
        if alone:
            self._alone.inc(alone)
        if rode:
            self._rode.inc(rode)
        if self.early:
            self._opened_at[open_slot] = now
            for conn in self._members[open_slot]:
                conn.ping_due = True


async def heartbeat_loop(hub: Hub) -> None:
    settings = hub.settings
    if settings.ws_ping_interval <= 0:
        return
    beat = hub.heartbeat
    loop = asyncio.get_running_loop()
    due = loop.time()
    while True:
        due += beat.tick_s
        now = loop.time()
        if due < now:  # this process fell behind: carry on from now, no catch-up burst
            due = now
        await asyncio.sleep(due - now)
        beat.tick(time.monotonic())
