"""The heartbeat schedule (realtime.heartbeat) on a synthetic clock: pings spread in
slices, silence measured from the ping, late ticks and busy sockets never misread."""

from __future__ import annotations

import asyncio
import itertools

import msgpack
import pytest

from realtime.connection import Connection
from realtime.heartbeat import Heartbeat
from realtime.protocol import CloseCode, Format
from realtime.wire import Broadcast


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


# -- pings riding with data (realtime.heartbeat, "A ping rides with data") -----------

def frames_of(wire: bytes) -> list[dict]:
    """The server frames (unmasked, RFC 6455 5.2) in one write, decoded."""
    out, pos = [], 0
    while pos < len(wire):
        n, pos = wire[pos + 1] & 0x7F, pos + 2
        if n == 126:
            n, pos = int.from_bytes(wire[pos:pos + 2]), pos + 2
        out.append(msgpack.unpackb(wire[pos:pos + n]))
        pos += n
    return out


class Wired:
    """A socket behind a transport that records every write (the lean protocol's
    ``write_frame``, realtime.asgi); ``paused`` makes it refuse, as a paused transport
    does. Answering peers pong ``pong_delay`` after a write that carried a ping."""

    def __init__(self, beat: Heartbeat, answers: bool = True, pong_delay: float = 0.5) -> None:
        self.answers = answers
        self.pong_delay = pong_delay
        self.paused = False
        self.writes: list[list[dict]] = []
        self.times: list[float] = []  # of each write
        self.pong_due: float | None = None
        self.now = 0.0
        self.conn = Connection(self.send, Format.MSGPACK, 1 << 20, "c", "127.0.0.1")
        assert self.conn.proto is self
        self.conn.last_seen = 0.0
        beat.assign(self.conn)

    async def send(self, message: dict) -> None:  # the ASGI way
        self.record([msgpack.unpackb(message["bytes"])])

    def write_frame(self, wire: bytes) -> bool:
        if self.paused:
            return False
        self.record(frames_of(wire))
        return True

    def record(self, frames: list[dict]) -> None:
        self.writes.append(frames)
        self.times.append(self.now)
        if self.answers and {"t": "ping"} in frames and self.pong_due is None:
            self.pong_due = self.now + self.pong_delay

    @property
    def pings(self) -> int:
        return sum(w.count({"t": "ping"}) for w in self.writes)

    def pinged(self, since: float = 0.0) -> list[tuple[float, list[dict]]]:
        """(when, the write) of each write that carried a ping, from ``since`` on."""
        return [(t, w) for t, w in zip(self.times, self.writes, strict=True)
                if t >= since and {"t": "ping"} in w]


EVENT = Broadcast({"t": "event", "event": "drop.buy_now", "data": {"k": 1}})


class Clock:
    """Ticks the heartbeat on time and delivers ``EVENT`` to ``fed`` sockets every
    ``every`` seconds; answering peers' pongs arrive when due."""

    def __init__(self, beat: Heartbeat, peers: list[Wired], now: float = 0.0) -> None:
        self.beat, self.peers, self.now = beat, peers, now
        self.next_tick = now

    def advance(self, until: float, fed: list[Wired] = (), every: float = 1.0,
                phase: float = 0.3) -> None:
        step = 0.05
        next_feed = self.now + phase
        while self.now < until:
            for p in self.peers:
                p.now = self.now
                if p.pong_due is not None and p.pong_due <= self.now:
                    p.conn.last_seen = self.now
                    p.pong_due = None
            if self.now >= self.next_tick - 1e-9:
                self.beat.tick(self.now)
                self.next_tick += self.beat.tick_s
            if fed and self.now >= next_feed - 1e-9:
                for p in fed:
                    EVENT.deliver(p.conn)
                next_feed += every
            self.now = round(self.now + step, 6)


async def test_a_socket_getting_data_in_its_window_takes_its_ping_in_that_write():
    beat = Heartbeat(interval=25.0, pong_timeout=10.0)
    assert beat.early == 5  # the last fifth of the interval: 5 s before its tick
    fed = Wired(beat)  # slice 0: pinged at t = 0, 25, 50, ...; its window opens at 20
    clock = Clock(beat, [fed])
    clock.advance(1.0)  # the first round: no window has opened yet, pinged alone
    assert fed.writes == [[{"t": "ping"}]]
    fed.writes.clear()
    clock.advance(19.9)
    EVENT.deliver(fed.conn)  # before its window: the event alone
    assert fed.writes == [[EVENT.frames[0]]]
    clock.advance(21.0)  # its window is open (since t = 20)
    EVENT.deliver(fed.conn)
    EVENT.deliver(fed.conn)
    assert fed.writes[1:] == [[EVENT.frames[0], {"t": "ping"}],  # one write, the ping in it
                              [EVENT.frames[0]]]  # at most one ping per window
    clock.advance(26.0)  # its tick (t = 25) pings it no more
    assert fed.pings == 1


async def test_a_socket_that_got_nothing_in_its_window_is_pinged_on_its_tick():
    beat = Heartbeat(interval=25.0, pong_timeout=10.0)
    peers = [Wired(beat) for _ in range(50)]  # two per slice
    fed = peers[::2]  # one socket of each slice gets an event every second
    clock = Clock(beat, peers)
    clock.advance(150.0, fed=fed)
    ping = {"t": "ping"}
    for i, p in enumerate(peers):
        slot = p.conn.hb_slot
        pinged = p.pinged()
        times = [t for t, _ in pinged]
        # One ping per round, 20-30 s apart: at least once per interval, at most once
        # per window; the last round's is at most an interval and a window old.
        assert times[0] <= slot and times[-1] >= 150.0 - 30.0, (i, times)
        assert all(20.0 - 1e-6 <= b - a <= 30.0 + 1e-6 for a, b in itertools.pairwise(times))
        ticks = [slot + 25.0 * k for k in range(6)]
        if p in fed:
            # In an event's write, within the 5 s before its slice's tick; alone on
            # the tick only in the first round of the slices pinged before any window
            # had opened (0-4).
            for t, w in pinged:
                tick = next(x for x in [*ticks, slot + 150.0] if x >= t - 1e-6)
                if w == [ping]:
                    assert slot < 5 and t == pytest.approx(tick) == slot, (i, times)
                else:
                    assert w == [EVENT.frames[0], ping] and tick - 5 <= t < tick, (i, t)
        else:  # alone, on its slice's tick
            assert all(w == [ping] for _, w in pinged)
            assert times == pytest.approx(ticks)
    assert not any(p.conn.closed for p in peers)


async def test_a_write_the_transport_refuses_carries_no_ping_and_the_tick_pings():
    beat = Heartbeat(interval=25.0, pong_timeout=10.0)
    busy = Wired(beat)
    clock = Clock(beat, [busy])
    clock.advance(21.0)
    busy.writes.clear()
    busy.paused = True  # writing paused: the event goes the ASGI way
    EVENT.deliver(busy.conn)
    busy.paused = False
    await asyncio.sleep(0)
    assert busy.writes == [[EVENT.frames[0]]]
    clock.advance(26.0)
    assert busy.writes[1:] == [[{"t": "ping"}]]


async def test_a_socket_that_never_answers_is_closed_though_its_pings_ride_with_data():
    beat = Heartbeat(interval=25.0, pong_timeout=10.0)
    silent = Wired(beat, answers=False)
    alive = Wired(beat)
    silent.conn.last_seen = alive.conn.last_seen = 30.0  # its last frame, at t = 30
    clock = Clock(beat, [silent, alive], now=25.0)
    clock.advance(30.0 + 25.0 + 10.0 + beat.tick_s, fed=[silent, alive], every=0.5)
    await asyncio.sleep(0)
    assert silent.conn.closed and silent.conn.close_code == CloseCode.HEARTBEAT_TIMEOUT
    # Its one ping since t = 30 rode with data, at its window's start (t = 45).
    assert silent.pinged(since=30.0) == [(pytest.approx(45.3), [EVENT.frames[0],
                                                                {"t": "ping"}])]
    assert clock.now <= 30.0 + 25.0 + 10.0 + 2 * beat.tick_s
    assert not alive.conn.closed


async def test_a_socket_that_answers_pings_that_rode_early_is_never_closed():
    """Its pings leave at the start of its window, 5 s before its slice's tick, and
    its pongs come back before that tick: measured from the tick it would look
    silent (nothing since the tick), measured from its ping it answered."""
    beat = Heartbeat(interval=25.0, pong_timeout=10.0)
    peers = [Wired(beat, pong_delay=0.5) for _ in range(25)]
    clock = Clock(beat, peers)
    clock.advance(200.0, fed=peers, every=1.0, phase=0.05)
    await asyncio.sleep(0)
    assert not any(p.conn.closed for p in peers)
    for p in peers:
        rode = [w for w in p.writes if w == [EVENT.frames[0], {"t": "ping"}]]
        assert len(rode) >= 7  # every round but the first carried its ping with data


async def test_no_window_when_the_timeout_is_as_long_as_the_interval():
    beat = Heartbeat(interval=2.5, pong_timeout=60.0)
    assert beat.early == 0  # its check comes just before its next ping: nothing early
    peer = Wired(beat)
    clock = Clock(beat, [peer])
    clock.advance(10.0, fed=[peer], every=0.1)
    pinged = [w for w in peer.writes if {"t": "ping"} in w]
    assert pinged == [[{"t": "ping"}]] * 4
