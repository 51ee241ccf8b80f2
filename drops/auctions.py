"""The creator's auctions: start one, watch it, offer a second chance; read them.

* ``POST /v1/drops/{id}/auctions`` (creator): sell one unit of a product of an
  on-air drop by auction (:func:`checkout.auction_rules.parse_spec` for the body).
* ``GET /v1/drops/{id}/auctions`` and ``GET /v1/drops/{id}/auctions/{auction_id}``:
  the drop's auctions, live from Redis while running, with ``server_time``.
* ``GET /v1/drops/{id}/auctions/{auction_id}/bids``: every accepted bid as
  PostgreSQL recorded it (the audit's input).
* ``POST /v1/drops/{id}/auctions/{auction_id}/second-chance`` (creator): the winner
  did not pay within the hold; the runner-up gets a hold at their highest bid.

The start runs under the drop's row lock (as every lifecycle action,
:mod:`drops.actions`): the ``auctions`` row and the Redis start commit together or
not at all. Bidding and the close are checkout's (:mod:`checkout.auctions_api`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from checkout import auction, auction_store
from checkout.auction import AuctionError, History
from checkout.auction_rules import parse_spec
from drops import store
from drops.lifecycle import ON_AIR, DropState
from dropserver.auth import Principal, Role, principal, require, require_drop_owner
from dropserver.component import Component
from dropserver.errors import ApiError, Conflict, NotFound
from dropserver.http import read_json
from dropserver.observability import bind
from realtime import channels
from realtime.moderators import guard_sales

__all__ = ["auction_json", "part", "start"]

_START_REFUSALS = {
    "not_ready": (503, "the drop is not loaded yet; retry in a moment"),
    "product_not_loaded": (409, "the product is not loaded; is the drop live?"),
    "product_selling": (409, "the product is on sale at its fixed price; close its sale "
                             "first"),
    "no_stock": (409, "no unit of this product is left"),
    "auction_exists": (409, "this auction already exists"),
}
_OFFER_REFUSALS = {
    "auction_not_found": (404, "no such auction"),
    "not_sold": (409, "the auction did not end in a sale"),
    "winner_holds": (409, "the winner's hold is still open or paid"),
    "no_runner_up": (409, "nobody else bid"),
    "no_stock": (409, "no unit of this product is left"),
}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _unavailable() -> ApiError:
    return ApiError("Redis is unavailable; nothing changed, retry", code="unavailable",
                    status=503, headers={"Retry-After": "1"})


def auction_json(row: dict[str, Any], live: dict[str, Any] | None, *, private: bool,
                 ) -> dict[str, Any]:
    """An auction as the API shows it: the PostgreSQL row, with Redis' live state
    (leading bid, end time) while it runs. ``private`` (its creator, admins) adds the
    reserve price and the holds."""
    from checkout.auction_rules import min_next

    bands = tuple((int(lo), int(step)) for lo, step in row["increments"])
    state = (live or {}).get("state", row["state"])
    seq = int((live or {}).get("seq", row["bids"]) or 0)
    if live is not None and seq:
        leading: dict[str, Any] | None = {
            "amount": live["amount"], "bidder": live.get("leader_name", ""),
            "bidder_id": live["leader"], "seq": seq}
    elif row["winning_amount"] is not None:
        leading = {"amount": row["winning_amount"], "bidder": None,
                   "bidder_id": row["winner_id"], "seq": row["winning_seq"]}
    else:
        leading = None
    out: dict[str, Any] = {
        "id": row["id"], "drop_id": row["drop_id"], "product_id": row["product_id"],
        "state": state, "currency": row["currency"], "start_price": row["start_price"],
        "increments": [{"from": lo, "step": step} for lo, step in bands],
        "has_reserve": row["reserve_price"] is not None,
        "duration_ms": row["duration_ms"], "snipe_window_ms": row["snipe_window_ms"],
        "started_at": (live or {}).get("started_at", row["started_at_ms"]),
        "ends_at": (live or {}).get("ends_at", row["final_ends_at_ms"] or row["ends_at_ms"]),
        "bids": seq, "leading": leading,
        "next_min": min_next(bands, row["start_price"], leading["amount"] if leading else None),
        "outcome": (live or {}).get("outcome") or row["outcome"],
        "closed_at": (live or {}).get("closed_at") or row["closed_at_ms"],
        "server_time": _now_ms(),
    }
    if private:
        out["reserve_price"] = row["reserve_price"]
        out["hold_id"] = (live or {}).get("hold_id") or row["hold_id"]
        out["offer"] = None if not row["offer_hold_id"] else {
            "user_id": row["offer_user_id"], "amount": row["offer_amount"],
            "hold_id": row["offer_hold_id"]}
    return out


async def start(app: Any, who: Principal, drop_id: int, data: dict[str, Any],
                ) -> dict[str, Any]:
    """Start an auction under the drop's row lock; the answer as :func:`auction_json`."""
    spec = parse_spec(data)
    history = History.from_settings(app.state.settings)
    redis = app.state.redis
    async with app.state.db.acquire() as conn, conn.transaction():
        drop = await store.lock_drop(conn, drop_id)
        if drop is None:
            raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
        require_drop_owner(who, drop["creator_id"])
        if DropState(drop["state"]) not in ON_AIR:
            raise Conflict(f"the drop is {drop['state']}: auctions run while it is on air",
                           code="drop_not_on_air", details={"state": drop["state"]})
        products = (await store.load_products(conn, [drop_id]))[drop_id]
        if spec.product_id not in {p["product_id"] for p in products}:
            raise ApiError(f"product_id {spec.product_id} is not a product of this drop",
                           code="validation_failed", status=422,
                           details={"field": "product_id"})
        currency = drop["currency"].strip()
        try:
            auction_id = await auction_store.insert_auction(
                conn, drop_id, drop["creator_id"], spec, currency, _now_ms())
        except asyncpg.UniqueViolationError:
            raise Conflict("this product already has a running auction",
                           code="auction_running") from None
        try:
            started_at, ends_at = await auction.start(
                redis, drop_id, auction_id, spec, currency=currency,
                creator_id=drop["creator_id"], history=history)
        except AuctionError as exc:
            status, message = _START_REFUSALS.get(exc.code, (409, exc.code))
            raise ApiError(message, code=exc.code, status=status) from None
        except (RedisConnectionError, RedisTimeoutError):
            raise _unavailable() from None
        await auction_store.set_clock(conn, auction_id, started_at, ends_at)
        # Bans are in the drop's moderation hash once the chat needed them, or when
        # a ban was made while this drop was open; a creator-wide ban from before
        # the drop was made is not: put the drop's active bans there for bid.lua.
        bans = await auction_store.active_bans(conn, drop_id, drop["creator_id"])
        if bans:
            await redis.hset(channels.chat_key(drop_id, "blocked"), mapping=bans)
        row = await auction_store.load_auction(conn, auction_id)
    assert row is not None
    auctions = getattr(app.state, "auctions", None)
    if auctions is not None:  # this process's keeper (if it runs here) sleeps to its end
        auctions.keeper.wake()
    return auction_json(row, await auction.read(redis, drop_id, auction_id), private=True)


async def _one(request: Request) -> tuple[dict[str, Any], dict[str, Any] | None]:
    drop_id = request.path_params["drop_id"]
    auction_id = request.path_params["auction_id"]
    bind(drop_id=drop_id)
    row = await auction_store.load_auction(request.app.state.db, auction_id)
    if row is None or row["drop_id"] != drop_id:
        raise NotFound("no such auction in this drop", code="auction_not_found")
    live = await auction.read(request.app.state.redis, drop_id, auction_id)
    return row, live


async def _may_see_private(request: Request, creator_id: str) -> bool:
    who = await principal(request)
    return not who.is_guest and who.can_manage(creator_id)


async def http_start(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    drop_id = request.path_params["drop_id"]
    bind(drop_id=drop_id, user_id=who.user_id)
    data = await read_json(request)
    body = await start(request.app, who, drop_id, data)
    _forget_listing(request.app, drop_id)
    return JSONResponse(body, status_code=201,
                        headers={"Location": f"/v1/drops/{drop_id}/auctions/{body['id']}"})


# Every viewer page reads the list after joining; after a node restart tens of
# thousands join within seconds. Their PostgreSQL part (the drop's owner and state,
# the auctions' rows: they change only at a start or a close) is kept this long per
# process; what changes with every bid is read from Redis per request.
LIST_CACHE_S = 1.0


async def _listing(app: Any, drop_id: int) -> tuple[dict[str, Any] | None, list[dict]]:
    """The drop and its auctions' rows, one read per drop and second in this process
    however many ask at once (they wait on the one read under way)."""
    cache: dict[int, tuple[float, asyncio.Task]] | None = getattr(
        app.state, "auction_listings", None)
    if cache is None:
        cache = app.state.auction_listings = {}
    hit = cache.get(drop_id)
    if hit is None or time.monotonic() - hit[0] >= LIST_CACHE_S or (
            hit[1].done() and hit[1].exception() is not None):
        if len(cache) > 10_000:
            cache.clear()

        async def read() -> tuple[dict[str, Any] | None, list[dict]]:
            drop = await store.load_drop(app.state.db, drop_id)
            rows = await auction_store.load_auctions(app.state.db, drop_id) if drop else []
            return drop, rows

        hit = (time.monotonic(), asyncio.ensure_future(read()))
        cache[drop_id] = hit
    return await asyncio.shield(hit[1])


def _forget_listing(app: Any, drop_id: int) -> None:
    cache = getattr(app.state, "auction_listings", None)
    if cache is not None:
        cache.pop(drop_id, None)


async def http_list(request: Request) -> JSONResponse:
    drop_id = request.path_params["drop_id"]
    drop, rows = await _listing(request.app, drop_id)
    if drop is None:
        raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
    private = await _may_see_private(request, drop["creator_id"])
    if drop["state"] == DropState.DRAFT and not private:
        # A draft in the cache may have been scheduled since (the console reads the
        # list of the draft it just made): a 404 is never answered from the cache.
        _forget_listing(request.app, drop_id)
        drop, rows = await _listing(request.app, drop_id)
        if drop is None or drop["state"] == DropState.DRAFT:
            raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
    out = []
    for row in rows:
        # Running when last read from PostgreSQL: Redis says what it is now.
        live = (await auction.read(request.app.state.redis, drop_id, row["id"])
                if row["state"] == "running" else None)
        out.append(auction_json(row, live, private=private))
    return JSONResponse({"auctions": out, "server_time": _now_ms()})


async def http_get(request: Request) -> JSONResponse:
    row, live = await _one(request)
    private = await _may_see_private(request, row["creator_id"])
    return JSONResponse(auction_json(row, live, private=private))


async def http_bids(request: Request) -> JSONResponse:
    row, _live = await _one(request)
    bids = await auction_store.load_bids(request.app.state.db, row["id"])
    return JSONResponse({"auction_id": row["id"], "bids": [
        {"seq": b["seq"], "amount": b["amount"], "bidder": b["display_name"],
         "bidder_id": b["user_id"], "at": b["at_ms"], "ends_at": b["ends_at_ms"],
         "extended": b["extended"]} for b in bids]})


async def http_second_chance(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    row, _live = await _one(request)
    require_drop_owner(who, row["creator_id"])
    auctions = request.app.state.auctions
    try:
        offer = await auction.offer(request.app.state.redis, row["drop_id"], row["id"],
                                    hold_ttl_ms=auctions.hold_ttl_ms,
                                    flow_for=auctions.flow_for)
    except AuctionError as exc:
        status, message = _OFFER_REFUSALS.get(exc.code, (409, exc.code))
        raise ApiError(message, code=exc.code, status=status,
                       details={"detail": exc.detail} if exc.detail else None) from None
    # Like a close (checkout.auctions_api.AuctionKeeper._won): the offer's hold reaches
    # PostgreSQL and the bidder only once a replica has it, else 503; the creator's
    # retry is a replay, which tells and records it if the first answer did not.
    if not await auctions.keeper.has(row["drop_id"], row["id"], "offer_hold_id",
                                     offer.hold_id):
        raise ApiError("the offer was lost in a Redis failover; try again",
                       code="unavailable", status=503)
    if not offer.replay or row["offer_hold_id"] != offer.hold_id:
        auctions.offered(row, offer)
    await auction_store.record_offer(request.app.state.db, row["id"], offer.user_id,
                                     offer.amount, offer.hold_id)
    return JSONResponse({"auction_id": row["id"], "user_id": offer.user_id,
                         "bidder": offer.name, "amount": offer.amount,
                         "hold_id": offer.hold_id, "expires_at": offer.expires_at,
                         "flow": offer.flow, "replay": offer.replay},
                        status_code=200 if offer.replay else 201)


_A = "/v1/drops/{drop_id:id}/auctions"
routes = [
    Route(_A, guard_sales(http_start), methods=["POST"]),
    Route(_A, http_list, methods=["GET"]),
    Route(_A + "/{auction_id:id}", http_get, methods=["GET"]),
    Route(_A + "/{auction_id:id}/bids", http_bids, methods=["GET"]),
    Route(_A + "/{auction_id:id}/second-chance", guard_sales(http_second_chance), methods=["POST"]),
]

part = Component(name="drops.auctions", routes=routes)
