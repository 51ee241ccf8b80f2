"""BUY NOW fan-out benchmark: the gateway beside a bare ``websockets.broadcast()`` server.

    python -m benchmarks.fanout --viewers 10000 --events 20

Starts local Redis and PostgreSQL (``dropserver.services``), creates a drop, then for
each server in turn:

* ``gateway``: the real app, one process (``run_single``) or ``dropserver serve
  --workers N``; viewers connect and ``join`` the drop.
* ``gateway-cluster``: the same gateway on a local Redis Cluster (3 primaries, 3
  replicas; ``dropserver.local_cluster``) instead of one Redis, in the same run:
  publications go out with SPUBLISH and reach the gateway on the drop's shard.
* ``gateway-bids``: the same gateway, each event an accepted **bid**: ``bid.lua``
  called by the benchmark (a running auction of the drop, bidders taking turns), the
  script that appends ``auction.bid`` to the drop's history and publishes it in the
  bid's own atomic step; latency is arrival minus the moment before the bid was sent.
  ``bid_p99_ratio`` is its p99 over the baseline's (the auctions' goal: 1.5).
* ``baseline``: a bare server (:mod:`benchmarks._bare`: websockets' asyncio server, no
  compression) whose only job is to subscribe to the drop's Redis channel and
  ``websockets.broadcast()`` each message to every socket (``--workers N``: N such
  processes with SO_REUSEPORT). It sends no pings (``ping_interval=None``): the floor
  the goals are judged against.
* ``baseline-ping``: the same bare server with ``websockets``' default keepalive (a
  ping to each socket every ``BASELINE_PING_INTERVAL_S`` = 20 s, as ``websockets.serve``
  does unless told otherwise), beside a gateway that pings every socket too
  (``DROPSERVER_WS_PING_INTERVAL``): the floor of a team on ``websockets``' defaults.

Server CPU: the server processes' user + system time over the events' window (the
fan-outs, and whatever the server does per second meanwhile: pings, background
loops), / deliveries (``server_cpu_us_per_delivery``); then, viewers still connected
and nothing published, over ``--idle`` seconds (``server_cpu_ms_per_s_idle``); and the
window's CPU less that idle rate over its length, / deliveries
(``server_cpu_us_per_delivery_net``: the fan-outs' own cost). Ratios gateway /
baseline (``p99_ratio``, ``cpu_ratio``, ``cpu_net_ratio``, ``connect_ratio``) and
gateway / baseline-ping (the same names with ``_ping``) for each baseline measured
in the run.

Viewers are lean sans-I/O clients (``loadtest.wsclient``; no task per socket) split
over ``--clients`` processes (one process holds at most ``ulimit -n`` sockets; 50,000
viewers need several, and several server workers too). The benchmark publishes
``drop.buy_now`` with ``realtime.publish.publish`` (history + PUBLISH, as in
production) ``--events`` times, one per ``--interval``, and every viewer records when
each event arrived. Latency is arrival minus the moment before ``publish`` was called
(CLOCK_MONOTONIC, one clock for all processes); the run fails unless every viewer got
every event. Memory per idle connection is the server's RSS growth from before the
first connection to all viewers joined (summed over server processes), divided by the
viewers.

Prints one JSON object; docs/benchmarks.md has the figures and the exact commands.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any

import msgpack

from benchmarks._support import cpu_seconds, create_live_drop, raise_nofile, rss_kib
from dropserver.services import LocalServices, free_port, wait_port
from dropserver.settings import unsafe_rig_env
from loadtest import wsclient
from realtime import channels
from realtime.publish import publish

_PONG = msgpack.packb({"t": "pong"})

class Viewer:
    """Records arrival times of event ``k``; joins first when ``join`` is set."""

    def __init__(self, bench: Bench, drop_id: int, join: bool) -> None:
        self.bench = bench
        self.drop_id = drop_id
        self.join = join

    def on_open(self, conn: Any) -> None:
        if self.join:
            conn.send(msgpack.packb({"t": "join", "drop_id": self.drop_id, "id": 1}))
        else:
            self.bench.joined += 1

    def on_message(self, conn: Any, data: bytes | str) -> None:
        now = time.perf_counter()
        if self.join:
            message = msgpack.unpackb(data, strict_map_key=False)
            for frame in message if isinstance(message, list) else [message]:  # a batch
                t = frame.get("t")
                if t == "joined":
                    self.bench.joined += 1
                elif t == "ping":  # a 50,000-viewer run outlasts the heartbeat
                    conn.send(_PONG)
                elif t == "event":
                    data = frame["data"]  # drop.buy_now carries k; auction.bid its seq
                    k = data["k"] if "k" in data else data["seq"] - 1
                    self.bench.arrivals[k].append(now)
            return
        self.bench.arrivals[channels.parse_message(data).data["k"]].append(now)

    def on_close(self, conn: Any, code: int | None, reason: str) -> None:
        self.bench.closed += 1
        self.bench.close_codes[f"{code} {reason}"] += 1


class Bench:
    def __init__(self, events: int) -> None:
        self.close_codes: collections.Counter[str] = collections.Counter()
        self.joined = 0
        self.closed = 0
        self.arrivals: list[list[float]] = [[] for _ in range(events)]


def _source(i: int) -> str:
    # ~28k ephemeral ports per (source, destination) pair: spread over 127.0.0.x.
    return f"127.0.0.{2 + i // 20000}"


async def _client_main_async(pipe: Any, url: str, first: int, count: int, drop_id: int,
                             join: bool, events: int, subprotocols: list[str] | None) -> None:
    loop = asyncio.get_running_loop()
    bench = Bench(events)
    conns = []
    batch = 500
    for i in range(first, first + count, batch):
        chunk = await asyncio.gather(*[
            wsclient.connect(url, Viewer(bench, drop_id, join), source=_source(j),
                             subprotocols=subprotocols)
            for j in range(i, min(first + count, i + batch))])
        conns.extend(chunk)
        while bench.joined < len(conns) - 50:  # noqa: ASYNC110 (polls counters)
            await asyncio.sleep(0.01)
    deadline = time.monotonic() + 60
    while bench.joined < count and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    pipe.send(("joined", bench.joined))
    wait_s = await loop.run_in_executor(None, pipe.recv)
    deadline = time.monotonic() + wait_s
    while any(len(a) < bench.joined for a in bench.arrivals) and \
            time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    pipe.send(("done", bench.joined, (bench.closed, dict(bench.close_codes)), bench.arrivals))
    for c in conns:
        with contextlib.suppress(Exception):
            c.abort()


def _client_main(*args: Any) -> None:
    """One viewer process (the swarm is split over ``--clients`` of them)."""
    raise_nofile()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_client_main_async(*args))


async def _run_viewers(url: str, n: int, drop_id: int, join: bool, events: int,
                       interval: float, redis: Any, server_pids: list[int], clients: int,
                       subprotocols: list[str] | None, emit: Any = None,
                       idle_s: float = 0.0) -> dict[str, Any]:
    import multiprocessing

    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("spawn")
    await asyncio.sleep(1.0)
    rss_before = sum(rss_kib(pid) for pid in server_pids)
    started = time.perf_counter()
    pipes, procs = [], []
    share = -(-n // clients)
    for c in range(clients):
        first, count = c * share, min(share, n - c * share)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_client_main, args=(child, url, first, count, drop_id,
                                                      join, events, subprotocols), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    joined = 0
    for pipe in pipes:
        _, count = await loop.run_in_executor(None, pipe.recv)
        joined += count
    connect_s = time.perf_counter() - started
    await asyncio.sleep(3.0)  # settle: presence ticks, allocator
    rss_after = sum(rss_kib(pid) for pid in server_pids)
    sent: list[float] = []
    cpu_before = sum(cpu_seconds(pid) for pid in server_pids)
    window_started = time.perf_counter()
    for k in range(events):
        sent.append(time.perf_counter())  # CLOCK_MONOTONIC: same clock in every process
        if emit is not None:
            await emit(k)
        else:
            await publish(redis, drop_id, "drop.buy_now",
                          {"product_id": 1, "price": 2500, "currency": "usd",
                           "remaining": 300, "k": k})
        await asyncio.sleep(interval)
    # Everything the server processes did meanwhile: the fan-outs, and idle work
    # (pings, presence) that is the same from run to run of one server.
    cpu_events = sum(cpu_seconds(pid) for pid in server_pids) - cpu_before
    window_s = time.perf_counter() - window_started
    # Then the same servers with every viewer still connected and no event: what they
    # spend per second whatever is published (pings and pongs, background loops).
    cpu_idle = None
    if idle_s > 0:
        cpu_before = sum(cpu_seconds(pid) for pid in server_pids)
        await asyncio.sleep(idle_s)
        cpu_idle = sum(cpu_seconds(pid) for pid in server_pids) - cpu_before
    arrivals: list[list[float]] = [[] for _ in range(events)]
    closed = 0
    close_codes: collections.Counter[str] = collections.Counter()
    for pipe in pipes:
        pipe.send(10.0)
    for pipe in pipes:
        _, _, (c_closed, c_codes), c_arrivals = await loop.run_in_executor(None, pipe.recv)
        closed += c_closed
        close_codes.update(c_codes)
        for k in range(events):
            arrivals[k].extend(c_arrivals[k])
    for proc in procs:
        proc.join(10)
    lat_ms: list[float] = []
    complete = 0
    for k, got in enumerate(arrivals):
        complete += len(got) == joined == n
        lat_ms.extend((a - sent[k]) * 1000 for a in got)
    lat_ms.sort()

    def pct(p: float) -> float | None:
        if not lat_ms:
            return None
        return round(lat_ms[min(len(lat_ms) - 1, int(p / 100 * len(lat_ms)))], 2)

    return {
        "viewers_joined": joined, "viewers_wanted": n,
        "events_complete": complete, "events": events,
        "deliveries": len(lat_ms), "deliveries_expected": n * events,
        "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": round(lat_ms[-1], 2) if lat_ms else None,
        "connect_s": round(connect_s, 2), "server_processes": len(server_pids),
        "server_rss_before_kib": rss_before, "server_rss_after_kib": rss_after,
        "kib_per_idle_connection": round((rss_after - rss_before) / max(1, joined), 2),
        "closed_during_run": closed,
        "close_codes": dict(close_codes),
        "server_cpu_s_events": round(cpu_events, 2),
        "server_cpu_us_per_delivery": round(cpu_events / max(1, len(lat_ms)) * 1e6, 2),
        **idle_figures(cpu_events, window_s, cpu_idle, idle_s, len(lat_ms)),
    }


def idle_figures(cpu_events: float, window_s: float, cpu_idle: float | None,
                 idle_s: float, deliveries: int) -> dict[str, float]:
    """The idle window's CPU per second, and the events window's CPU less that rate
    over its length, per delivery: what the fan-outs themselves cost."""
    if cpu_idle is None or idle_s <= 0:
        return {}
    rate = cpu_idle / idle_s
    return {"idle_s": round(idle_s, 2), "server_cpu_s_idle": round(cpu_idle, 2),
            "server_cpu_ms_per_s_idle": round(rate * 1000, 1),
            "server_cpu_us_per_delivery_net": round(
                (cpu_events - rate * window_s) / max(1, deliveries) * 1e6, 2)}


def _start_gateway(port: int, redis_url: str, database_url: str, n: int,
                   workers: int) -> list[subprocess.Popen]:
    """One process running the app (``run_single``), or ``dropserver serve --workers``."""
    env = dict(os.environ)
    per_worker = -(-n // workers) + 1000
    env.update({"REDIS_URL": redis_url, "DATABASE_URL": database_url, **unsafe_rig_env(),
                "DROPSERVER_PORT": str(port), "DROPSERVER_LOG_LEVEL": "warning",
                "DROPSERVER_LOG_FORMAT": "text", "DROPSERVER_NODE_ID": "bench",
                "DROPSERVER_MAX_CONNECTIONS": str(per_worker)})
    if workers == 1:
        code = ("from dropserver.settings import load_settings\n"
                "from dropserver.serve import run_single\n"
                "from dropserver.observability import configure_logging\n"
                "s = load_settings(); configure_logging('warning', 'text'); run_single(s)\n")
        return [subprocess.Popen([sys.executable, "-c", code], env=env)]
    return [subprocess.Popen([sys.executable, "-m", "dropserver.cli", "serve", "--workers",
                              str(workers)], env=env)]


async def _bidding(redis: Any, drop_id: int) -> Any:
    """A running auction of the drop straight in Redis, and ``emit(k)``: bid ``k``
    (accepted: bidders take turns, each bid one increment over the last)."""
    from checkout import auction, inventory
    from checkout.auction_rules import AuctionSpec

    auction_id = 1
    await inventory.prewarm(redis, {"id": drop_id}, [
        {"product_id": 1, "price": 2500, "units": 1}])
    spec = AuctionSpec(product_id=1, start_price=100, increments=((0, 10),),
                       duration_ms=3_600_000, snipe_window_ms=0)
    await auction.start(redis, drop_id, auction_id, spec, currency="usd",
                        creator_id="bench-creator", history=auction.History())
    # No PostgreSQL row: the gateway's auction keeper must leave it alone.
    await redis.srem(auction.ACTIVE_AUCTIONS, auction.member(drop_id, auction_id))
    limits = auction.BidLimits(per_user=0, per_ip=0)

    async def emit(k: int) -> None:
        req = auction.BidRequest(drop_id, auction_id, f"bidder-{k % 2}", 100 + 10 * k,
                                 f"bench-{k}", name=f"Bidder {k % 2}")
        await auction.bid(redis, req, limits, auction.History())

    return emit


BASELINE_PING_INTERVAL_S = 20.0  # websockets.serve's default ping_interval


def _start_baseline(port: int, redis_url: str, channel: str, workers: int,
                    ping_interval: float | None = None) -> list[subprocess.Popen]:
    """``workers`` bare broadcast servers (:mod:`benchmarks._bare`) on one port; with
    ``ping_interval``, websockets' keepalive on (``baseline-ping``)."""
    pings = [] if ping_interval is None else ["--ping-interval", str(ping_interval)]
    return [subprocess.Popen([sys.executable, "-m", "benchmarks._bare", "broadcast",
                              "--port", str(port), "--redis-url", redis_url,
                              "--channel", channel, *pings])
            for _ in range(workers)]


# Gateway figure / baseline figure: name in the results, figure of each server.
_RATIOS = (("p99_ratio", "p99_ms"), ("cpu_ratio", "server_cpu_us_per_delivery"),
           ("connect_ratio", "connect_s"), ("cpu_net_ratio", "server_cpu_us_per_delivery_net"))


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """The gateway's p99, CPU per delivery and connect time over each baseline's in
    ``results``: ``p99_ratio`` ... against ``baseline`` (no pings: the goals' floor),
    ``p99_ratio_ping`` ... against ``baseline-ping``; ``bid_p99_ratio`` for
    ``gateway-bids`` against ``baseline``; ``cluster_p99_ratio`` cluster / one Redis."""
    out: dict[str, float] = {}

    def put(name: str, a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> None:
        if a is not None and b is not None and a.get(key) and b.get(key):
            out[name] = round(a[key] / b[key], 2)

    gateway = results.get("gateway")
    put("cluster_p99_ratio", results.get("gateway-cluster"), gateway, "p99_ms")
    for base, suffix in (("baseline", ""), ("baseline-ping", "_ping")):
        for name, key in _RATIOS:
            put(name + suffix, gateway, results.get(base), key)
    put("bid_p99_ratio", results.get("gateway-bids"), results.get("baseline"), "p99_ms")
    return out


def _server_pids(procs: list[subprocess.Popen]) -> list[int]:
    """The processes holding sockets: the workers under a supervisor, else the procs."""
    from loadtest.procstat import server_processes

    return [p.pid for proc in procs for p in server_processes(proc.pid)]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import redis.asyncio as aioredis

    raise_nofile()
    results: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.fanout", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {platform.python_version()}",
        "viewers": args.viewers, "events": args.events, "workers": args.workers,
        "client_processes": args.clients,
    }
    with contextlib.ExitStack() as stack:
        services = stack.enter_context(LocalServices())
        cluster = (stack.enter_context(LocalServices(want_postgres=False, redis_cluster=True))
                   if "gateway-cluster" in args.servers else None)
        drop_id = await create_live_drop(services.database_url)
        redis = aioredis.Redis.from_url(services.redis_url)
        cluster_redis = None
        if cluster is not None:
            from dropserver.redis_client import connect, ready

            cluster_redis = connect(cluster.redis_url)
            await ready(cluster_redis)
        try:
            for name in args.servers:
                port = free_port()
                emit = None
                if name in ("gateway", "gateway-bids"):
                    procs = _start_gateway(port, services.redis_url, services.database_url,
                                           args.viewers, args.workers)
                    if name == "gateway-bids":
                        emit = await _bidding(redis, drop_id)
                elif name == "gateway-cluster":
                    assert cluster is not None
                    procs = _start_gateway(port, cluster.redis_url, services.database_url,
                                           args.viewers, args.workers)
                else:
                    procs = _start_baseline(
                        port, services.redis_url, channels.drop_channel(drop_id),
                        args.workers,
                        BASELINE_PING_INTERVAL_S if name == "baseline-ping" else None)
                try:
                    for proc in procs:
                        wait_port(port, [proc])
                    await asyncio.sleep(1.0 + args.workers)  # every worker listening
                    results[name] = await _run_viewers(
                        f"ws://127.0.0.1:{port}/ws", args.viewers, drop_id,
                        join=name.startswith("gateway"), events=args.events,
                        interval=args.interval,
                        redis=cluster_redis if name == "gateway-cluster" else redis,
                        server_pids=_server_pids(procs), clients=args.clients,
                        subprotocols=(["dropserver.msgpack.v1"] if name.startswith("gateway")
                                      else None), emit=emit, idle_s=args.idle)
                finally:
                    for proc in procs:
                        proc.send_signal(signal.SIGTERM)
                    for proc in procs:
                        try:
                            proc.wait(20)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
                print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
        finally:
            await redis.aclose()
            if cluster_redis is not None:
                await cluster_redis.aclose()
    results.update(ratios(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=10000)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between events")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes on the port (both servers)")
    parser.add_argument("--clients", type=int, default=1, help="viewer processes")
    # One whole keepalive period of baseline-ping: websockets pings each socket 20 s
    # after it connected, so its pings come in bunches as the viewers connected.
    parser.add_argument("--idle", type=float, default=BASELINE_PING_INTERVAL_S,
                        help="seconds of CPU measured after the events, viewers connected "
                             "and nothing published (0: none)")
    parser.add_argument("--servers", nargs="+", default=["gateway", "baseline", "baseline-ping"],
                        choices=["gateway", "gateway-cluster", "gateway-bids", "baseline",
                                 "baseline-ping"])
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=2))
    ok = all(results[s]["events_complete"] == args.events and
             results[s]["viewers_joined"] == args.viewers for s in args.servers)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
