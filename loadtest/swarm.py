"""One swarm process: thousands of viewers of one drop on one asyncio loop.

Started by the rehearsal (``python -m loadtest swarm``) with its config as one JSON
line on stdin; after that stdin carries commands and stdout carries JSON lines back:

    -> {"cmd": "chat", "count": 5, "spread_s": 2.0}   some joined viewers send chat
    -> {"cmd": "chat_rate", "rate": 25.0}               random joined viewers send chat at
                                                         this rate until the next chat_rate
                                                         (0 stops); with "label", what they
                                                         send is also counted under it
                                                     <- {"type": "chat_rate", "sent": N}
                                                         every chat message sent so far:
                                                         none leaves after this answer
                                                         until the next chat_rate
    -> {"cmd": "report"}                                 <- {"type": "report", ...}
    -> {"cmd": "stop"}                                   close every socket and exit
    <- {"type": "progress", ...} every ``progress_interval`` seconds

The process stops by itself at its deadline, and when stdin closes (the rehearsal
died): a swarm never outlives its run. Viewers are :class:`loadtest.viewer.Viewer`
cores; this module only connects them (rate-limited, spread over source addresses),
feeds them frames and sends what they answer. With ``mode: "floor"`` the viewers are
:class:`loadtest.floor_viewer.FloorViewer` s of a bare broadcast server (loadtest.floor):
connected, they only time what it broadcasts; with ``mode: "floor_rush"`` they also
buy each message's product as the drop's viewers buy BUY NOW's; with
``mode: "floor_chat"`` they send the chat storm and time its delivery (the chat floor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.floor_viewer import FloorViewer, summarize_floor
from loadtest.viewer import Viewer, ViewerConfig, chat_text
from loadtest.viewer_summary import summarize_viewers
from loadtest.wsclient import WsConnection, connect

__all__ = ["SwarmConfig", "main", "run"]


@dataclass
class SwarmConfig:
    ws_url: str
    drop_id: int
    first: int  # index of this process's first viewer (user ids are global)
    count: int
    sources: list[str] = field(default_factory=list)  # source addresses, round-robin
    rate: float = 1000.0  # new connections per second (this process)
    max_inflight: int = 512  # handshakes under way at once
    buy_probability: float = 0.5
    buy_delay_ms: tuple[float, float] = (0.0, 200.0)
    encoding: str = "msgpack"  # or "json" (the text subprotocol)
    jwt_secret: str = ""
    jwt_audience: str = "dropserver"
    jwt_issuer: str = ""
    user_prefix: str = "lt"
    seed: int = 1
    deadline_s: float = 600.0  # the process exits after this many seconds, whatever happens
    progress_interval: float = 0.5
    reconnect: bool = True  # rejoin with the last position after an unexpected close
    max_reconnects: int = 5
    chat_sample: int = 0  # every Nth viewer times the chat it gets (0: none)
    enter_probability: float = 0.0  # the giveaway scenario (loadtest.viewer.ViewerConfig)
    enter_delay_ms: tuple[float, float] = (0.0, 8000.0)
    # "floor": viewers of the bare broadcast server (loadtest.floor); "floor_rush": of
    # the rush floor, buying as the drop's viewers do; "floor_chat": of the chat floor
    mode: str = "drop"

    @classmethod
    def from_json(cls, raw: str) -> SwarmConfig:
        data = json.loads(raw)
        for name in ("buy_delay_ms", "enter_delay_ms"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Swarm:
    """The viewers of one process and their sockets."""

    def __init__(self, config: SwarmConfig) -> None:
        from dropserver.auth import Role, issue_token
        from dropserver.settings import load_settings

        self.config = config
        self.started = time.monotonic()
        self._rng = random.Random(config.seed)
        # Signs tokens only (no server): the given secret, else the dev one.
        settings = load_settings({}, dev=True, jwt_secret=config.jwt_secret,
                                 jwt_audience=config.jwt_audience, jwt_issuer=config.jwt_issuer)
        self._token = lambda sub: issue_token(settings, sub, Role.VIEWER, ttl=6 * 3600,
                                              name=sub)
        vcfg = ViewerConfig(drop_id=config.drop_id, encoding=config.encoding,
                            buy_probability=config.buy_probability,
                            buy_delay_ms=config.buy_delay_ms,
                            chat_sample=config.chat_sample,
                            enter_probability=config.enter_probability,
                            enter_delay_ms=config.enter_delay_ms)
        self.floor = config.mode in ("floor", "floor_rush", "floor_chat")
        chat_every = config.chat_sample if config.mode == "floor_chat" else 0
        # The rush floor's viewers buy as the drop's do (the same draw per viewer).
        floor_buys = config.buy_probability if config.mode == "floor_rush" else 0.0
        self.viewers: list[Any] = [
            FloorViewer(config.first + i, f"{config.user_prefix}-{config.first + i}",
                        self._rng.random(), floor_buys, config.buy_delay_ms,
                        config.encoding, chat_timed=bool(chat_every)
                        and (config.first + i) % chat_every == 0) if self.floor else
            Viewer(config.first + i, f"{config.user_prefix}-{config.first + i}", vcfg,
                   self._rng.random())
            for i in range(config.count)
        ]
        self._conns: dict[int, WsConnection] = {}
        self._inflight = asyncio.Semaphore(config.max_inflight)
        self._pending: dict[int, asyncio.Future] = {}
        self.connect_errors: Counter[str] = Counter()
        self.close_reasons: Counter[str] = Counter()
        self.stopping = False
        self.ramp_started_at: float | None = None  # the first socket's turn
        self.ramp_done_at: float | None = None
        self._chat_seq = 0
        self.chat_sent = 0
        self.chat_label: str | None = None  # what the chat sent now is counted under
        self.chat_sent_by: Counter[str] = Counter()
        self._chat_task: asyncio.Task | None = None

    # -- the Handler interface of loadtest.wsclient ----------------------------------
    def on_open(self, conn: WsConnection) -> None:
        viewer: Viewer = conn.user  # type: ignore[assignment]
        self._handshake_done(viewer.index)
        for message in viewer.opened(time.monotonic()):
            conn.send(viewer.encode(message))

    def on_message(self, conn: WsConnection, data: bytes | str) -> None:
        viewer: Viewer = conn.user  # type: ignore[assignment]
        now = time.monotonic()
        for delay, message in viewer.received(data, now):
            payload = viewer.encode(message)
            if delay <= 0:
                if message.get("t") == "giveaway.enter":
                    viewer.sent_delayed(now, message)
                conn.send(payload)
            else:
                asyncio.get_running_loop().call_later(delay, self._send_later, conn, viewer,
                                                      payload, message)

    def on_close(self, conn: WsConnection, code: int | None, reason: str) -> None:
        viewer: Viewer = conn.user  # type: ignore[assignment]
        self._handshake_done(viewer.index)
        was_open = viewer.is_open
        viewer.closed(code, reason, time.monotonic())
        self._conns.pop(viewer.index, None)
        key = f"{code}" if code is not None else "no-code"
        if was_open:
            self.close_reasons[f"{key} {reason[:60]}".strip()] += 1
        else:
            self.connect_errors[f"{key} {reason[:60]}".strip()] += 1
        if not self.floor and (was_open or viewer.joins):
            self._retry(viewer, reason)

    def _retry(self, viewer: Viewer, reason: str) -> None:
        """Come back after a lost socket, or after a failed attempt to come back (a
        balancer with no node up yet), with the viewer's jittered backoff."""
        if (not self.stopping and self.config.reconnect and not self.floor
                and viewer.reconnects < self.config.max_reconnects):
            delay = viewer.reconnect_delay(reason, self._rng)
            asyncio.get_running_loop().call_later(delay, self._reconnect, viewer)

    # -- connecting ----------------------------------------------------------------------
    def _send_later(self, conn: WsConnection, viewer: Viewer, payload: bytes | str,
                    message: dict[str, Any] | None = None) -> None:
        if conn.open:
            viewer.sent_delayed(time.monotonic(), message)
            conn.send(payload)

    def _handshake_done(self, index: int) -> None:
        fut = self._pending.pop(index, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _source(self, index: int) -> str | None:
        if not self.config.sources:
            return None
        return self.config.sources[index % len(self.config.sources)]

    async def _open(self, viewer: Viewer) -> None:
        async with self._inflight:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._pending[viewer.index] = fut
            viewer.connecting(time.monotonic())
            try:
                await connect(
                    self.config.ws_url, self, source=self._source(viewer.index),
                    headers=None if self.floor else
                    {"Authorization": f"Bearer {self._token(viewer.user_id)}"},
                    subprotocols=None if self.floor else viewer.subprotocols(),
                    factory=lambda *a, **kw: self._bind(WsConnection(*a, **kw), viewer),
                )
            except (OSError, TimeoutError) as exc:
                self._pending.pop(viewer.index, None)
                self._conns.pop(viewer.index, None)
                viewer.closed(None, type(exc).__name__, time.monotonic())
                self.connect_errors[f"{type(exc).__name__}: {exc}"[:80]] += 1
                if not self.floor and viewer.joins:
                    self._retry(viewer, type(exc).__name__)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await fut

    def _bind(self, conn: WsConnection, viewer: Viewer) -> WsConnection:
        conn.user = viewer
        self._conns[viewer.index] = conn  # every socket, open or still handshaking
        return conn

    def _reconnect(self, viewer: Viewer) -> None:
        if self.stopping:
            return
        viewer.reconnects += 1
        asyncio.get_running_loop().create_task(self._open(viewer))

    async def ramp(self) -> None:
        """Connect every viewer at ``rate`` per second."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.ramp_started_at = time.monotonic()
        tasks = []
        for i, viewer in enumerate(self.viewers):
            if self.stopping:
                break
            due = start + i / self.config.rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(self._open(viewer)))
        await asyncio.gather(*tasks, return_exceptions=True)
        self.ramp_done_at = time.monotonic()

    # -- commands --------------------------------------------------------------------------
    def chat(self, count: int, spread_s: float) -> int:
        joined = [v for v in self.viewers if v.is_joined and v.index in self._conns]
        chosen = self._rng.sample(joined, min(count, len(joined)))
        loop = asyncio.get_running_loop()
        for viewer in chosen:
            self._chat_seq += 1
            message = viewer.chat_message(f"rehearsal chat {viewer.index}/{self._chat_seq}")
            conn = self._conns[viewer.index]
            loop.call_later(self._rng.uniform(0, spread_s), self._send_later, conn, viewer,
                            viewer.encode(message))
        return len(chosen)

    def chat_rate(self, rate: float, label: str | None = None) -> None:
        """Random joined viewers send chat at ``rate`` per second from now on (0 stops);
        each message carries its send time (:func:`loadtest.viewer.chat_text`), and is
        counted under ``label`` if one is given (the chat floor's intervals)."""
        self.chat_label = label
        if self._chat_task is not None:
            self._chat_task.cancel()
            self._chat_task = None
        if rate > 0:
            self._chat_task = asyncio.get_running_loop().create_task(self._chat_loop(rate))

    async def _chat_loop(self, rate: float) -> None:
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        while not self.stopping:
            n += 1
            for _ in range(20):  # a random viewer that is joined right now
                viewer = self.viewers[self._rng.randrange(len(self.viewers))]
                conn = self._conns.get(viewer.index)
                if viewer.is_joined and conn is not None and conn.open:
                    self._chat_seq += 1
                    text = chat_text(time.monotonic(), f"{self.config.first}/{self._chat_seq}")
                    conn.send(viewer.encode(viewer.chat_message(text)))
                    self.chat_sent += 1
                    if self.chat_label is not None:
                        self.chat_sent_by[self.chat_label] += 1
                    break
            await asyncio.sleep(max(0.0, start + n / rate - loop.time()))

    def progress(self) -> dict[str, Any]:
        counts: Counter[str] = Counter()
        for viewer in self.viewers:
            viewer.count_into(counts)
        return {"type": "progress", "t": time.monotonic(), "pid": os.getpid(),
                "first": self.config.first, "count": self.config.count,
                "sockets": len(self._conns), "ramp_done": self.ramp_done_at is not None,
                "chat_sent": self.chat_sent, **counts}

    def report(self) -> dict[str, Any]:
        return {"type": "report", "pid": os.getpid(), "first": self.config.first,
                "count": self.config.count, "ramp_started_at": self.ramp_started_at,
                "ramp_done_at": self.ramp_done_at,
                "started": self.started,
                "connect_errors": dict(self.connect_errors.most_common(20)),
                "close_reasons": dict(self.close_reasons.most_common(20)),
                "chat_sent": self.chat_sent, "chat_sent_by": dict(self.chat_sent_by),
                **(summarize_floor(self.viewers) if self.floor
                   else summarize_viewers(self.viewers))}

    async def stop(self) -> None:
        self.stopping = True
        self.chat_rate(0)
        for conn in list(self._conns.values()):
            conn.close(1000, "rehearsal over")
        for _ in range(40):
            if not self._conns:
                break
            await asyncio.sleep(0.05)
        for conn in list(self._conns.values()):
            conn.abort()


async def _control(swarm: Swarm, reader: asyncio.StreamReader, done: asyncio.Event) -> None:
    while not done.is_set():
        line = await reader.readline()
        if not line:  # the rehearsal is gone
            done.set()
            return
        try:
            cmd = json.loads(line)
        except ValueError:
            continue
        name = cmd.get("cmd")
        if name == "report":
            _emit(swarm.report())
        elif name == "chat":
            sent = swarm.chat(int(cmd.get("count", 1)), float(cmd.get("spread_s", 1.0)))
            _emit({"type": "chat", "sent": sent})
        elif name == "chat_rate":
            label = cmd.get("label")
            swarm.chat_rate(float(cmd.get("rate", 0.0)),
                            None if label is None else str(label))
            _emit({"type": "chat_rate", "sent": swarm.chat_sent})
        elif name == "stop":
            done.set()
            return


async def _progress(swarm: Swarm, done: asyncio.Event) -> None:
    while not done.is_set():
        _emit(swarm.progress())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(swarm.config.progress_interval):
                await done.wait()


async def run(config: SwarmConfig, reader: asyncio.StreamReader) -> None:
    swarm = Swarm(config)
    done = asyncio.Event()
    tasks = [
        asyncio.create_task(_control(swarm, reader, done)),
        asyncio.create_task(_progress(swarm, done)),
        asyncio.create_task(swarm.ramp()),
    ]
    try:
        async with asyncio.timeout(config.deadline_s):
            await done.wait()
    except TimeoutError:
        _emit({"type": "deadline", "after_s": config.deadline_s})
    await swarm.stop()
    _emit(swarm.progress())
    _emit({"type": "stopped"})
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _main_async() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return
    await run(SwarmConfig.from_json(first.decode()), reader)


def main() -> int:
    # The stdlib loop, not uvloop: with uvloop the 20,000-viewer rehearsal ramped at
    # 604-803 joins/s against 657-1,008 (the server on uvloop in all six; the
    # difference is within noise, the stdlib loop needs nothing; docs/benchmarks.md).
    asyncio.run(_main_async())
    return 0
