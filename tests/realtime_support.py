"""Helpers for the gateway tests: a drop in PostgreSQL and a real WebSocket client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import msgpack
import websockets

MSGPACK = "dropserver.msgpack.v1"
JSON = "dropserver.json.v1"


async def create_drop(database_url: str, *, state: str = "live", creator: str = "creator-1",
                      products: tuple[tuple[int, int], ...] = ((2500, 100),),
                      title: str = "Sneaker drop") -> tuple[int, list[int]]:
    """A drop with products ``(price, units)``; returns (drop_id, product_ids)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO users (id, role) VALUES ($1, 'creator') "
                           "ON CONFLICT DO NOTHING", creator)
        drop_id = await conn.fetchval(
            "INSERT INTO drops (creator_id, title, state, starts_at, currency) "
            "VALUES ($1, $2, $3, now() + interval '1 hour', 'usd') RETURNING id",
            creator, title, state)
        pids = []
        for i, (price, units) in enumerate(products):
            pid = await conn.fetchval(
                "INSERT INTO products (creator_id, title) VALUES ($1, $2) RETURNING id",
                creator, f"Product {i + 1}")
            await conn.execute(
                "INSERT INTO drop_products (drop_id, product_id, position, price, units) "
                "VALUES ($1, $2, $3, $4, $5)", drop_id, pid, i, price, units)
            pids.append(pid)
        return drop_id, pids
    finally:
        await conn.close()


class Client:
    """A viewer over a real socket (websockets library)."""

    def __init__(self, ws: Any, fmt: str) -> None:
        self.ws = ws
        self.fmt = fmt
        self._next = 0
        self.batched: list[dict[str, Any]] = []  # the rest of a batch being read
        self.batches = 0

    @classmethod
    async def connect(cls, ws_url: str, *, fmt: str = MSGPACK, token: str | None = None,
                      **kw: Any) -> Client:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await websockets.connect(f"{ws_url}/ws", subprotocols=[fmt],
                                      additional_headers=headers, compression=None,
                                      **{"ping_interval": None, "max_size": 4 << 20, **kw})
        return cls(ws, fmt)

    async def send(self, frame: dict[str, Any]) -> None:
        if self.fmt == JSON:
            await self.ws.send(json.dumps(frame))
        else:
            await self.ws.send(msgpack.packb(frame))

    async def request(self, frame: dict[str, Any], wait: float = 5.0) -> dict[str, Any]:
        """Send with a fresh id; return the reply/error/joined frame with that id."""
        self._next += 1
        rid = f"r{self._next}"
        await self.send({**frame, "id": rid})
        return await self.recv_until(lambda f: f.get("id") == rid, wait)

    async def recv(self, wait: float = 5.0) -> dict[str, Any]:
        """The next frame; a batch (a list of frames in one message) is unpacked."""
        if self.batched:
            return self.batched.pop(0)
        message = await self.recv_message(wait)
        if isinstance(message, list):
            self.batches += 1
            self.batched = message[1:]
            return message[0]
        return message

    async def recv_message(self, wait: float = 5.0) -> Any:
        """The next WebSocket message as sent: one frame, or a batch (list)."""
        raw = await asyncio.wait_for(self.ws.recv(), wait)
        if isinstance(raw, str):
            return json.loads(raw)
        return msgpack.unpackb(raw, strict_map_key=False)

    async def recv_until(self, pred, wait: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(wait):
            while True:
                frame = await self.recv(wait)
                if pred(frame):
                    return frame

    async def events(self, count: int, wait: float = 5.0,
                     kind: str = "event") -> list[dict[str, Any]]:
        out = []
        async with asyncio.timeout(wait):
            while len(out) < count:
                frame = await self.recv(wait)
                if frame.get("t") == kind:
                    out.append(frame)
                elif frame.get("t") == "joined" and kind == "event":
                    out.extend(frame.get("events", []))
        return out

    async def join(self, drop_id: int, **kw: Any) -> dict[str, Any]:
        return await self.request({"t": "join", "drop_id": drop_id, **kw})

    async def close(self) -> None:
        await self.ws.close()
