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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import subprocess
import sys
import time
from typing import Any

import msgpack

__all__ = ["FloorServers", "floor_message", "serve_broadcast"]


async def serve_broadcast(port: int, redis_url: str, channel: str,
                          ping_interval: float | None = None) -> None:
    """Relay every message of ``channel`` to every socket, nothing else.

    ``ping_interval``: None (the floor) sends no pings; a number of seconds keeps
    ``websockets``' own keepalive (a ping to each socket every that many seconds, its
    default timeout), as a server on ``websockets.serve``'s defaults (20 s) does
    (``python -m benchmarks.fanout``'s ``baseline-ping``)."""
    from websockets.asyncio.server import broadcast, serve

    from dropserver.redis_client import connect as connect_redis

    conns: set[Any] = set()

    async def handler(ws: Any) -> None:
        conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    r = connect_redis(redis_url)  # one Redis or a cluster (classic pub/sub works on both)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)

    async def relay() -> None:
        async for msg in pubsub.listen():
            broadcast(conns, msg["data"])

    async with serve(handler, "127.0.0.1", port, compression=None, ping_interval=ping_interval,
                     backlog=4096, reuse_port=True):
        print("ready", flush=True)
        await relay()


def floor_message(k: int) -> bytes:
    """Message ``k``: a batch of two event frames, the size of a BUY NOW (msgpack)."""
    return msgpack.packb([
        {"t": "event", "event": "drop.state",
         "data": {"state": "selling", "previous": "live", "version": 4, "product_id": 1},
         "pos": {"epoch": "floor", "offset": 2 * k + 1}},
        {"t": "event", "event": "drop.buy_now",
         "data": {"product_id": 1, "price": 2500, "currency": "usd", "remaining": 500,
                  "k": k},
         "pos": {"epoch": "floor", "offset": 2 * k + 2}},
    ], use_bin_type=True)


class FloorServers:
    """``processes`` floor servers on one loopback port, started and stopped together."""

    def __init__(self, processes: int, port: int, redis_url: str, channel: str) -> None:
        self.processes = processes
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
                 "--redis-url", self.redis_url, "--channel", self.channel],
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
    ns = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # a process holds up to ulimit -n sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_broadcast(ns.port, ns.redis_url, ns.channel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
