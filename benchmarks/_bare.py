"""The bare servers: what a server does that has nothing but the socket and the one job.

Each benchmark that measures dropserver also measures, in the same run, on the same
machine and with the same client, a bare server built on the ``websockets`` library's
own asyncio server (no compression); the gap between the two figures is what
dropserver's code costs over the job itself.

* **buy** (:func:`serve_buy`; ``python -m benchmarks.reserve --bare``): the buy path's
  ceiling. The same number of processes as dropserver's workers and the same
  ``reserve.lua`` call on the same limits: no authentication, no gateway, no metrics,
  no ``order.held`` for other sockets, no ``stock`` for the viewers. Each connection
  is one user; ``join`` is answered at once, ``buy`` with one script call through the
  same :class:`~checkout.reserve.ReserveBatcher` and the same reply as dropserver's.
* **broadcast** (:func:`loadtest.floor.serve_broadcast`, which the rehearsal runs as
  its floor; the ``baseline`` of ``python -m benchmarks.fanout``): subscribes to the
  drop's Redis channel and hands each message to ``websockets.broadcast()`` for
  every socket. It sends no pings (``ping_interval=None``); with ``--ping-interval
  20`` it keeps ``websockets``' default keepalive (a ping to each socket every 20 s),
  as a team serving with ``websockets.serve``'s defaults gets (``baseline-ping`` in
  ``python -m benchmarks.fanout``).

Run as a process of its own: ``python -m benchmarks._bare buy --port P --redis-url URL
--limits window_ms,per_user,per_ip,velocity_window_ms,velocity_max`` or
``python -m benchmarks._bare broadcast --port P --redis-url URL --channel NAME
[--ping-interval S]``
(several on one port share it with SO_REUSEPORT). Only the buy server imports
dropserver's code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from checkout.defense import BuyLimits

__all__ = ["serve_buy"]


async def serve_buy(sock: socket.socket, redis_url: str, limits: BuyLimits,
                    hold_ttl_ms: int = 600_000) -> None:
    import msgpack
    from websockets.asyncio.server import serve as ws_serve

    from checkout.reserve import (
        BuyRefused,
        BuyRequest,
        ReserveBatcher,
        hot_path_client,
        reserve_batched,
    )

    redis = hot_path_client(redis_url)
    batcher = ReserveBatcher(redis)
    ids = iter(range(1, 1 << 62))
    pid = os.getpid()

    async def handler(ws: Any) -> None:
        user = f"bare-{pid}-{next(ids)}"
        drop_id = 0
        async for raw in ws:
            frame = msgpack.unpackb(raw)
            kind, rid = frame.get("t"), frame.get("id")
            if kind == "join":
                drop_id = int(frame["drop_id"])
                await ws.send(msgpack.packb({"t": "joined", "id": rid, "drop_id": drop_id}))
                continue
            req = BuyRequest(drop_id=drop_id, product_id=int(frame["product_id"]),
                             user_id=user, idempotency_key=frame["idempotency_key"])
            try:
                hold = await reserve_batched(batcher, req, hold_ttl_ms=hold_ttl_ms,
                                             limits=limits)
            except BuyRefused as exc:
                out = {"t": "error", "id": rid, "code": exc.code, "message": exc.message}
            else:
                out = {"t": "reply", "id": rid, "data": hold.reply()}
            await ws.send(msgpack.packb(out))

    try:
        async with ws_serve(handler, sock=sock, compression=None, ping_interval=None,
                            max_size=1 << 16):
            await asyncio.Future()
    finally:
        await batcher.aclose()
        await redis.aclose()


def _buy_main(ns: argparse.Namespace) -> None:
    from checkout.defense import BuyLimits

    window, per_user, per_ip, vwin, vmax = (int(x) for x in ns.limits.split(","))
    limits = BuyLimits(window_ms=window, per_user=per_user, per_ip=per_ip,
                       velocity_window_ms=vwin, velocity_max=vmax)
    # IPPROTO_TCP: asyncio then turns Nagle off, as for dropserver.serve.bind_socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", ns.port))
    sock.listen(4096)
    asyncio.run(serve_buy(sock, ns.redis_url, limits))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._bare",
                                     description=__doc__.split("\n\n")[0])
    servers = parser.add_subparsers(dest="server", required=True)
    buy = servers.add_parser("buy", help="join and buy with one reserve.lua call")
    buy.add_argument("--port", type=int, required=True)
    buy.add_argument("--redis-url", required=True)
    buy.add_argument("--limits", required=True,
                     help="window_ms,per_user,per_ip,velocity_window_ms,velocity_max")
    cast = servers.add_parser("broadcast", help="a Redis channel to every socket")
    cast.add_argument("--port", type=int, required=True)
    cast.add_argument("--redis-url", required=True)
    cast.add_argument("--channel", required=True)
    cast.add_argument("--ping-interval", type=float, default=None,
                      help="seconds between websockets' keepalive pings (default: none)")
    ns = parser.parse_args(argv)
    if ns.server == "buy":
        _buy_main(ns)
    else:
        from loadtest.floor import serve_broadcast

        asyncio.run(serve_broadcast(ns.port, ns.redis_url, ns.channel,
                                    ping_interval=ns.ping_interval))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
