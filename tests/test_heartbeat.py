"""The heartbeat schedule (realtime.heartbeat) on a synthetic clock: pings spread in
slices, silence measured from the ping, late ticks and busy sockets never misread."""

from __future__ import annotations

import asyncio

import msgpack

from realtime.connection import Connection
from realtime.heartbeat import Heartbeat
from realtime.protocol import CloseCode, Format


class Peer:
    """A socket whose pings are recorded; ``answers`` decides whether it pongs."""

    def __init__(self, beat: Heartbeat, answers: bool = True) -> None:
        self.answers = answers
        self.pings = 0
        self.conn = Connection(self._send, Format.MSGPACK, 1 << 20, "c", "127.0.0.1")
        self.conn.last_seen = 0.0
        beat.assign(self.conn)

    async def _send(self, message: dict) -> None:
        if message["type"] == "websocket.send" and \
                msgpack.unpackb(message["bytes"]) == {"t": "ping"}:
            self.pings += 1


def run(beat: Heartbeat, peers: list[Peer], start: float, ticks: int,
        tick_s: float | None = None, pong_delay: float = 0.0) -> float:
    """Run ``ticks`` ticks ``tick_s`` apart (late ticks: more than beat.tick_s);
    answering peers pong ``pong_delay`` after each ping. Returns the time reached."""
    step = beat.tick_s if tick_s is None else tick_s
    now = start
    pending: list[tuple[float, Peer]] = []
    for _ in range(ticks):
        for due, peer in [p for p in pending if p[0] <= now]:
            peer.conn.last_seen = due
            pending.remove((due, peer))
        before = {id(p): p.pings for p in peers}
        beat.tick(now)
        for p in peers:
            if p.answers and p.pings > before[id(p)]:
                pending.append((now + pong_delay, p))
        now += step
    return now


async def test_pings_go_out_in_slices_not_one_burst():
    beat = Heartbeat(interval=25.0, pong_timeout=10.0)
    peers = [Peer(beat) for _ in range(2500)]
    counts = []
    for _ in range(25):
        before = sum(p.pings for p in peers)
        run(beat, peers, 0.0, 1)
        counts.append(sum(p.pings for p in peers) - before)
    assert counts == [100] * 25  # each tick pings 1/25 of the sockets
    assert all(p.pings == 1 for p in peers)  # and each socket once per interval


async def test_a_silent_socket_is_closed_pong_timeout_after_its_ping():
    beat = Heartbeat(interval=25.0, pong_timeout=10.0)
    silent = Peer(beat, answers=False)
    alive = Peer(beat)
    run(beat, [silent, alive], 100.0, 25 + 10)  # one round, then the checks
    await asyncio.sleep(0)
    assert silent.conn.closed and silent.conn.close_code == CloseCode.HEARTBEAT_TIMEOUT
    assert not alive.conn.closed


async def test_late_ticks_do_not_close_sockets_that_answered():
    """An overloaded process runs its ticks late (here 5 s instead of 1 s: a slice is
    checked 50 s after its ping, far over interval + timeout); a socket that pongs
    within a second of every ping has answered every ping and must stay."""
    beat = Heartbeat(interval=25.0, pong_timeout=10.0)
    peers = [Peer(beat) for _ in range(50)]
    silent = Peer(beat, answers=False)
    run(beat, [*peers, silent], 0.0, 200, tick_s=5.0, pong_delay=1.0)
    await asyncio.sleep(0)
    assert not any(p.conn.closed for p in peers)
    assert silent.conn.closed


async def test_a_socket_the_server_is_not_reading_is_not_silent():
    beat = Heartbeat(interval=25.0, pong_timeout=10.0)
    busy = Peer(beat, answers=False)
    busy.conn.handling = True  # its join is queued: the server is not reading it
    run(beat, [busy], 0.0, 100)
    assert not busy.conn.closed and busy.pings == 4


async def test_a_socket_that_connected_after_the_ping_is_not_checked_against_it():
    beat = Heartbeat(interval=25.0, pong_timeout=10.0)
    early = Peer(beat)
    now = run(beat, [early], 0.0, 1)  # slice 0 pinged at t=0
    late = Peer(beat, answers=False)  # connects now, in slice 1 (not yet pinged)
    late.conn.hb_slot = 0  # put it in the slice that was pinged before it came
    late.conn.last_seen = now
    run(beat, [early, late], now, 11)  # slice 0 is checked at t=10
    await asyncio.sleep(0)
    assert not late.conn.closed


async def test_a_timeout_longer_than_the_interval_checks_before_the_next_ping():
    beat = Heartbeat(interval=2.5, pong_timeout=60.0)
    silent = Peer(beat, answers=False)
    run(beat, [silent], 1.0, 25)
    assert not silent.conn.closed
    run(beat, [silent], 3.5, 1)  # the next round's ping of its slice
    await asyncio.sleep(0)
    assert silent.conn.closed
