"""The WebSocket buyers: connect, join a drop, buy, and rush it until sold out.

:class:`Buyer` is one socket on ``loadtest.wsclient`` (no task per socket) that joins
a drop and matches replies to commands by id; :func:`open_buyers` opens many, spread
over 127.0.0.x source addresses; :func:`rush` makes every buyer buy back to back
until the product is sold out and checks that no unit was sold twice. The buy path
benchmark (:mod:`benchmarks.reserve`), the churn benchmark and the tests of the buy
path over real sockets (tests/test_buy_rush.py, tests/test_reserve_api.py) use them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from typing import Any

import msgpack

__all__ = ["Buyer", "buy", "open_buyers", "rush", "selling_drop", "source_addresses"]

_PONG = msgpack.packb({"t": "pong"})


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
        if kind == "ping":  # the heartbeat: a buyer silent past its timeout is closed
            self.conn.send(_PONG)
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



def split_units(units: int, variants: int) -> list[int]:
    """``units`` shared out over ``variants`` as evenly as whole units allow."""
    return [units // variants + (1 if i < units % variants else 0) for i in range(variants)]


async def selling_drop(base_url: str, creator_token: str, *, units: int,
                       per_buyer_limit: int = 1, max_holds_per_user: int = 1,
                       price: int = 2500, variants: int = 0,
                       ) -> tuple[int, int] | tuple[int, int, list[int]]:
    """Create a drop through the creator API, go live and open BUY NOW. With
    ``variants``, the product comes in that many variants sharing ``units`` (the
    last one at its own price) and their ids come third."""
    import httpx

    headers = {"Authorization": f"Bearer {creator_token}"}
    product: dict[str, Any] = {"title": "item", "price": price, "units": units,
                               "per_buyer_limit": per_buyer_limit}
    if variants:
        del product["units"]
        product["variants"] = [
            {"options": {"size": f"s{i}"}, "units": n,
             **({"price": price + 500} if i == variants - 1 else {})}
            for i, n in enumerate(split_units(units, variants))]
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
        resp = await http.post("/v1/drops", json={
            "title": "rush", "max_holds_per_user": max_holds_per_user,
            "products": [product]})
        resp.raise_for_status()
        drop = resp.json()
        drop_id, product_id = drop["id"], drop["products"][0]["product_id"]
        variant_ids = [v["variant_id"] for v in drop["products"][0].get("variants", ())]
        starts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
        for action, body in (("schedule", {"starts_at": starts}), ("live", {}),
                             ("buy-now", {"product_id": product_id})):
            resp = await http.post(f"/v1/drops/{drop_id}/{action}", json=body)
            resp.raise_for_status()
    if variants:
        return drop_id, product_id, variant_ids
    return drop_id, product_id


def source_addresses(n: int) -> list[str]:
    return [f"127.0.0.{i}" for i in range(1, n + 1)]



async def rush(buyers: list[Buyer], product_id: int, *, units: int, per_user: int,
               variant_ids: list[int] | None = None) -> dict[str, Any]:
    """Every buyer buys back to back until sold out; checks zero oversell. With
    ``variant_ids``, buyer n buys variant ``n % len(variant_ids)``, and the next one
    when that one is gone, so every unit sells however the buyers fall on them.

    Each buyer sends its next ``buy`` from the callback that read the previous answer
    (:class:`_Rush`): no task, future or coroutine per buy, so the client, which
    shares the machine with the server it measures, takes as little of it as it can.
    """
    state = _RushState(product_id, per_user, len(buyers), variant_ids or [])
    state.first_sent = state.last_hold = time.perf_counter()
    for n, b in enumerate(buyers):
        buying = _Rush(state, b, n)
        if b.closed.done():  # nothing sent on it would ever be answered
            buying.lost(b, "closed before the rush")
        else:
            buying.next()
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
                 "product_id", "refused", "variant_ids")

    def __init__(self, product_id: int, per_user: int, buyers: int,
                 variant_ids: list[int]) -> None:
        self.product_id, self.per_user, self.left = product_id, per_user, buyers
        self.variant_ids = variant_ids
        self.holds: list[dict] = []
        self.refused: dict[str, int] = {}
        self.first_sent = self.last_hold = 0.0
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        if buyers == 0:
            self.done.set_result(None)


class _Rush:
    """One buyer's ``per_user`` buys, one after another, driven by its answers."""

    __slots__ = ("buyer", "k", "n", "rid", "state", "switches", "variant")

    def __init__(self, state: _RushState, buyer: Buyer, n: int) -> None:
        self.state, self.buyer, self.n = state, buyer, n
        self.k = 0  # buys answered
        self.switches = 0  # variants found sold out and left for the next one
        self.rid: str | None = None  # the id of the buy waiting for its answer
        ids = state.variant_ids
        self.variant = {"variant_id": ids[n % len(ids)]} if ids else {}
        buyer.rush = self

    def next(self) -> None:
        b = self.buyer
        rid = self.rid = str(next(b._ids))
        b.conn.send(msgpack.packb({"t": "buy", "id": rid, "product_id": self.state.product_id,
                                   "idempotency_key": f"b{self.n}-{self.k}",
                                   **self.variant}))

    def answered(self, b: Buyer, frame: dict[str, Any]) -> None:
        state = self.state
        self.k += 1
        stop = self.k - self.switches >= state.per_user
        if frame["t"] == "reply":
            state.holds.append(frame["data"])
            state.last_hold = time.perf_counter()
        else:
            code = frame.get("code", "?")
            state.refused[code] = state.refused.get(code, 0) + 1
            gone = code in ("sold_out", "not_enough_stock")
            ids = state.variant_ids
            if gone and self.switches < len(ids) - 1:
                # This variant is gone: the next one, as a shopper would (the
                # attempt does not count against the buyer's buys).
                self.switches += 1
                self.variant = {"variant_id": ids[(self.n + self.switches) % len(ids)]}
                stop = self.k - self.switches >= state.per_user
            else:
                stop = stop or gone
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

