"""The bare-broadcast floor: how fast this machine can put one message on N sockets.

A rehearsal's BUY NOW latency means little alone on a machine that also runs the load
generator: part of it is the machine. So the rehearsal measures, in the same run,
with the same swarm and the same number of viewers, a server that does nothing but
the broadcast: ``websockets``' own asyncio server (no compression, no pings), the
same number of processes as dropserver's workers sharing one port (SO_REUSEPORT),
each subscribed to one Redis channel and handing every message to
``websockets.broadcast()`` for all its sockets. The ratio of the two p99s is what
dropserver's code costs over the job itself (docs/benchmarks.md).

    python -m loadtest.floor --port 9000 --redis-url redis://127.0.0.1:6379 --channel c

prints ``ready`` once it listens. :class:`FloorServers` starts and stops a set of them;
:func:`floor_message` is the message a rehearsal publishes (shaped like BUY NOW: one
message of two event frames), numbered ``k`` so viewers time each one.

The rush floor (``--rush``, a rehearsal's ``--floor rush``): the same broadcast, and
each server also answers its viewers' buys with the least a team building on bare
``websockets`` + Redis would write: decode the frame, one Lua call
(``floor_take.lua``: take one unit if any is left and record the buyer) and one reply
frame to the buyer. On one machine the buy rush that follows BUY NOW runs on the
cores the swarms need to read it; the bare floor's viewers never buy, so the bare
floor carries none of it (docs/loadtest.md, "The floor"). Message ``k`` sells product
``k + 1``, whose stock the rehearsal sets (:func:`rush_keys`) before publishing it.

The chat floor (``--chat``, a rehearsal's ``--chat-floor-intervals``): the same servers
carrying a chat storm instead, with the least a team on bare ``websockets`` + Redis
would write to deliver every message to every viewer. A viewer's ``chat.send`` is
decoded and checked (text, 1-500 characters), made a ``chat.message`` event shaped like
dropserver's (id, user, name, text, ``at``, a position), published on the channel and
acknowledged to its sender with a ``reply``; every process relays the channel to its
sockets, every message, as one batch (a msgpack list) per interval, or each message as
its own frame when the interval is 0. The interval is set at start and changed with a
``{"t": "ctl", "batch_ms": N}`` on the channel (the rehearsal tries several on the same
sockets), and each relayed message carries the interval it was batched under
(``data.batch_ms``), so a viewer files it under that interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

__all__ = ["FloorServers", "chat_control", "floor_message", "rush_keys",
           "serve_broadcast"]

TAKE_LUA = (Path(__file__).parent / "floor_take.lua").read_text()
RUSH_CONNECTIONS = 64  # Redis connections of one rush floor process, as the buy path's
CHAT_MAX_TEXT = 500  # characters of one chat message (dropserver's chat_max_length)
CHAT_IDLE_TICK_S = 0.05  # unbatched: how often the flusher looks for a switch's leftovers


def rush_keys(channel: str, product_id: int) -> list[str]:
    """The rush floor's ``[stock, buyers]`` keys of one product (one hash slot)."""
    tag = f"{{{channel}:{product_id}}}"
    return [f"{tag}:stock", f"{tag}:buyers"]


async def serve_broadcast(port: int, redis_url: str, channel: str, rush: bool = False,
                          ping_interval: float | None = None,
                          chat_batch_ms: int | None = None) -> None:
    """Relay every message of ``channel`` to every socket, nothing else; with ``rush``
    also answer each socket's buys (:func:`_answer`); with ``chat_batch_ms`` (the chat
    floor) take each socket's chat, publish it on ``channel`` and deliver what the
    channel carries in one batch per that many ms (0: each message at once).

    ``ping_interval``: None (the floor) sends no pings; a number of seconds keeps
    ``websockets``' own keepalive (a ping to each socket every that many seconds, its
    default timeout), as a server on ``websockets.serve``'s defaults (20 s) does
    (``python -m benchmarks.fanout``'s ``baseline-ping``)."""
    from websockets.asyncio.server import broadcast, serve
    from websockets.exceptions import ConnectionClosed

    from dropserver.redis_client import connect as connect_redis

    conns: set[Any] = set()
    r = connect_redis(redis_url)  # one Redis or a cluster (classic pub/sub works on both)
    take = _buy_client(redis_url).register_script(TAKE_LUA) if rush else None
    chat = _ChatRelay(chat_batch_ms) if chat_batch_ms is not None else None
    # Chat is published through a bounded pool that waits for a free connection: the
    # messages read while the loop was writing a batch all publish at once after it.
    publisher = _buy_client(redis_url) if chat is not None else None

    async def handler(ws: Any) -> None:
        conns.add(ws)
        try:
            if take is None and chat is None:
                await ws.wait_closed()
                return
            with contextlib.suppress(ConnectionClosed):
                async for data in ws:
                    if chat is not None:
                        taken = chat.take(data, ws.remote_address)
                        if taken is not None:  # published first, then acknowledged
                            if taken[0] is not None and publisher is not None:
                                await publisher.publish(channel, taken[0])
                            await ws.send(taken[1])
                        continue
                    reply = await _answer(take, channel, data)
                    if reply is not None:
                        await ws.send(reply)
        finally:
            conns.discard(ws)

    pubsub = r.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)

    async def relay() -> None:
        async for msg in pubsub.listen():
            if chat is None:
                broadcast(conns, msg["data"])
                continue
            frame = chat.relayed(msg["data"])
            if frame is not None:  # unbatched: this message alone, now
                broadcast(conns, frame)

    async def flush() -> None:
        assert chat is not None
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            wait = chat.batch_ms / 1000.0
            due = max(due + wait, loop.time()) if wait > 0 else loop.time() + CHAT_IDLE_TICK_S
            await asyncio.sleep(max(0.0, due - loop.time()))
            frame = chat.batch()
            if frame is not None:
                broadcast(conns, frame)

    async with serve(handler, "127.0.0.1", port, compression=None, ping_interval=ping_interval,
                     backlog=4096, reuse_port=True):
        print("ready", flush=True)
        if chat is None:
            await relay()
            return
        flusher = asyncio.ensure_future(flush())
        try:
            await relay()
        finally:
            flusher.cancel()


class _ChatRelay:
    """The chat floor's work in one process: a viewer's ``chat.send`` in, the event to
    publish and the sender's acknowledgement out (:meth:`take`); the channel's messages
    in (:meth:`relayed`), a batch per interval out (:meth:`batch`)."""

    def __init__(self, batch_ms: int) -> None:
        self.batch_ms = batch_ms
        self.pending: list[dict[str, Any]] = []
        self.offset = 0  # this process's own positions (a bare server keeps no history)

    def take(self, data: bytes | str, peer: Any) -> tuple[bytes | None, bytes | str] | None:
        """``(event to publish, answer to the sender)`` for a ``chat.send`` (no event
        for a refused one), None for anything else."""
        text_frame = isinstance(data, str)
        try:
            frame = json.loads(data) if text_frame else msgpack.unpackb(data)
        except (ValueError, msgpack.UnpackException):
            return None
        if not isinstance(frame, dict) or frame.get("t") != "chat.send":
            return None
        text = frame.get("text")
        if not isinstance(text, str) or not 0 < len(text.strip()) <= CHAT_MAX_TEXT:
            reply: dict[str, Any] = {"t": "error", "id": str(frame.get("id")),
                                     "code": "bad_request"}
            return None, _encode(reply, text_frame)  # refused: nothing to publish
        self.offset += 1
        user = f"u{peer[1]}" if isinstance(peer, tuple) and len(peer) > 1 else "u"
        message = {"id": secrets.token_hex(8), "user_id": user, "name": user,
                   "text": text.strip(), "at": int(time.time() * 1000)}
        event = {"t": "event", "event": "chat.message", "data": message,
                 "pos": {"epoch": f"floor-{os.getpid()}", "offset": self.offset}}
        reply = {"t": "reply", "id": str(frame.get("id")), "data": {"id": message["id"]}}
        return msgpack.packb(event), _encode(reply, text_frame)

    def relayed(self, data: bytes) -> bytes | None:
        """One message of the channel: a control (the interval from now on), or chat
        to deliver: alone now when unbatched (returned), else in the next batch."""
        try:
            item = msgpack.unpackb(data)
        except (ValueError, msgpack.UnpackException):
            return None
        if not isinstance(item, dict):
            return None
        if item.get("t") == "ctl":
            self.batch_ms = int(item["batch_ms"])
            return None
        item["data"]["batch_ms"] = self.batch_ms
        if self.batch_ms <= 0:
            return msgpack.packb(item)
        self.pending.append(item)
        return None

    def batch(self) -> bytes | None:
        """What came since the last batch, as one frame (None: nothing came)."""
        if not self.pending:
            return None
        items, self.pending = self.pending, []
        return msgpack.packb(items)


def _encode(message: dict[str, Any], text: bool) -> bytes | str:
    return json.dumps(message) if text else msgpack.packb(message)


def chat_control(batch_ms: int) -> bytes:
    """The message that sets every chat floor process's interval to ``batch_ms``."""
    return msgpack.packb({"t": "ctl", "batch_ms": batch_ms})


def _buy_client(redis_url: str) -> Any:
    """The rush floor's Redis client, and the chat floor's publisher: redis-py's own
    (hiredis parses when installed), its pool bounded, buys (chat) waiting for a free
    connection: an unbounded pool opens a
    connection per buy in flight (thousands in a rush). A cluster's client has its own
    pools per node."""
    from redis.asyncio import BlockingConnectionPool, Redis

    from dropserver.redis_client import connect as connect_redis
    from dropserver.redis_client import is_cluster_url

    if is_cluster_url(redis_url):
        return connect_redis(redis_url, max_connections=RUSH_CONNECTIONS)
    return Redis(connection_pool=BlockingConnectionPool.from_url(
        redis_url, max_connections=RUSH_CONNECTIONS, timeout=None))


async def _answer(take: Any, channel: str, data: bytes | str) -> bytes | str | None:
    """One buy: ``{"t": "buy", "id", "product_id", "idempotency_key", ...}`` (msgpack, or
    JSON text) -> one unit taken for its key if any is left -> a ``reply`` with the
    buyer number, or an ``error`` ``sold_out``, in the frame's own encoding. Anything
    else gets no answer."""
    text = isinstance(data, str)
    try:
        frame = json.loads(data) if text else msgpack.unpackb(data)
    except (ValueError, msgpack.UnpackException):
        return None
    if not isinstance(frame, dict) or frame.get("t") != "buy":
        return None
    product, key = frame.get("product_id"), frame.get("idempotency_key")
    if not isinstance(product, int) or not isinstance(key, str):
        reply: dict[str, Any] = {"t": "error", "id": str(frame.get("id")),
                                 "code": "bad_request"}
    else:
        number, left = await take(keys=rush_keys(channel, product), args=[key])
        reply = ({"t": "reply", "id": str(frame.get("id")),
                  "data": {"hold_id": f"{product}:{number}", "buyer_number": number,
                           "remaining": left}} if number
                 else {"t": "error", "id": str(frame.get("id")), "code": "sold_out"})
    return json.dumps(reply) if text else msgpack.packb(reply)


def floor_message(k: int) -> bytes:
    """Message ``k``: a batch of two event frames, the size of a BUY NOW (msgpack); it
    puts product ``k + 1`` on sale (the rush floor's viewers buy it)."""
    return msgpack.packb([
        {"t": "event", "event": "drop.state",
         "data": {"state": "selling", "previous": "live", "version": 4,
                  "product_id": k + 1},
         "pos": {"epoch": "floor", "offset": 2 * k + 1}},
        {"t": "event", "event": "drop.buy_now",
         "data": {"product_id": k + 1, "price": 2500, "currency": "usd", "remaining": 500,
                  "k": k},
         "pos": {"epoch": "floor", "offset": 2 * k + 2}},
    ], use_bin_type=True)


class FloorServers:
    """``processes`` floor servers on one loopback port, started and stopped together."""

    def __init__(self, processes: int, port: int, redis_url: str, channel: str,
                 rush: bool = False, chat_batch_ms: int | None = None) -> None:
        self.processes = processes
        self.rush = rush
        self.chat_batch_ms = chat_batch_ms
        self.port = port
        self.redis_url = redis_url
        self.channel = channel
        self.procs: list[subprocess.Popen] = []

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, timeout: float = 30.0) -> FloorServers:
        from loadtest.target import die_with_parent

        for _ in range(self.processes):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "loadtest.floor", "--port", str(self.port),
                 "--redis-url", self.redis_url, "--channel", self.channel,
                 *(["--rush"] if self.rush else []),
                 *(["--chat", str(self.chat_batch_ms)] if self.chat_batch_ms is not None
                   else [])],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                preexec_fn=die_with_parent()))
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "ready", or "" if it died
            if line.strip() != "ready" or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"a floor server did not start (exit {proc.poll()})")
        return self

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.floor",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--rush", action="store_true",
                        help="also answer buys (the rush floor: floor_take.lua)")
    parser.add_argument("--chat", type=int, default=None, metavar="BATCH_MS",
                        help="the chat floor: take chat and deliver it in one batch per "
                        "BATCH_MS (0: each message at once)")
    ns = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # a process holds up to ulimit -n sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_broadcast(ns.port, ns.redis_url, ns.channel, ns.rush,
                                    chat_batch_ms=ns.chat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
