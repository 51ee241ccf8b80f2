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
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from typing import TYPE_CHECKING

from realtime import protocol
from realtime.connection import Connection
from realtime.protocol import CloseCode
from realtime.wire import Broadcast

if TYPE_CHECKING:
    from realtime.hub import Hub

__all__ = ["SLICES", "Heartbeat", "heartbeat_loop"]

SLICES = 25


class Heartbeat:
    """The schedule: which slice to ping and which to check at each tick."""

    def __init__(self, interval: float, pong_timeout: float, slices: int = SLICES) -> None:
        self.slices = slices
        self.tick_s = interval / slices
        # A slice is checked this many ticks after its ping (at most one round: a
        # timeout longer than the interval is checked just before the next ping).
        self.lag = min(slices, max(1, math.ceil(pong_timeout / self.tick_s)))
        self.timeout = min(pong_timeout, interval)
        self._pinged_at: list[float | None] = [None] * slices
        self._tick = 0
        self._next_slot = itertools.cycle(range(slices))
        self._members: list[set[Connection]] = [set() for _ in range(slices)]
        self._ping = Broadcast({"t": protocol.ServerType.PING.value})

    def assign(self, conn: Connection) -> None:
        conn.hb_slot = next(self._next_slot)
        self._members[conn.hb_slot].add(conn)

    def forget(self, conn: Connection) -> None:
        self._members[conn.hb_slot].discard(conn)

    def tick(self, now: float) -> None:
        """Ping one slice and check another."""
        ping_slot = self._tick % self.slices
        check_slot = (self._tick - self.lag) % self.slices
        self._tick += 1
        sent = self._pinged_at[check_slot]
        if sent is not None and now - sent >= self.timeout:
            for conn in list(self._members[check_slot]):
                if conn.closed:
                    self._members[check_slot].discard(conn)
                elif conn.last_seen < sent and not conn.handling:
                    conn.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        ping = self._ping
        for conn in self._members[ping_slot]:
            ping.deliver(conn)  # a closed socket takes nothing
        self._pinged_at[ping_slot] = now


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
