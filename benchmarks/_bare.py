"""A bare WebSocket buy server: the ceiling the buy benchmark's machine allows.

``python -m benchmarks.reserve --bare`` runs it beside ``dropserver serve`` on the
same machine, with the same client, the same number of processes and the same
``reserve.lua`` call on the same limits, so its holds per second are what a server
does that has nothing but a socket and the script: no authentication, no gateway,
no metrics, no ``order.held`` for other sockets, no ``stock`` for the viewers. The
gap between the two figures is what dropserver's buy path costs over that.

The server is the ``websockets`` library's own asyncio server; each connection is
one user; ``join`` is answered at once, ``buy`` with one script call through the
same :class:`~checkout.reserve.ReserveBatcher` and the same reply as dropserver's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
from typing import Any

import msgpack

from checkout.defense import BuyLimits
from checkout.reserve import (
    BuyRefused,
    BuyRequest,
    ReserveBatcher,
    hot_path_client,
    reserve_batched,
)

__all__ = ["serve"]


async def serve(sock: socket.socket, redis_url: str, limits: BuyLimits,
                hold_ttl_ms: int = 600_000) -> None:
    from websockets.asyncio.server import serve as ws_serve

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._bare")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--limits", required=True,
                        help="window_ms,per_user,per_ip,velocity_window_ms,velocity_max")
    ns = parser.parse_args(argv)
    window, per_user, per_ip, vwin, vmax = (int(x) for x in ns.limits.split(","))
    limits = BuyLimits(window_ms=window, per_user=per_user, per_ip=per_ip,
                       velocity_window_ms=vwin, velocity_max=vmax)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", ns.port))
    sock.listen(4096)
    asyncio.run(serve(sock, ns.redis_url, limits))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
