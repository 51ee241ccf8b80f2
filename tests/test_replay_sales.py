"""Selling on the replay (drops.actions.sell_replay): after the live ended the creator
puts what is left of the products dropped during the live back on sale for the replay
page (``ended -> replay``), through the same buy path, holds and payments as the
live; ``end`` closes them again and only then can the drop be settled. Real
PostgreSQL and Redis; the invariants are checked after the buys."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from checkout import keys
from tests import invariants
from tests.test_drops_api import act, bearer, create, history, later

CREATOR = "creator-1"
PRODUCTS = [
    {"title": "Hoodie", "price": 4500, "units": 3, "per_buyer_limit": 1},
    {"title": "Cap", "price": 2000, "units": 2, "per_buyer_limit": 2},
    {"title": "Mug", "price": 900, "units": 4},  # never dropped on the live
]


@pytest.fixture
def creator(make_token):
    return bearer(make_token(CREATOR, "creator"))


@pytest.fixture
async def db(settings):
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def buy(http, make_token, drop_id, product_id, user, key=None):
    return await http.post(f"/v1/drops/{drop_id}/buy", json={"product_id": product_id},
                           headers={**bearer(make_token(user)),
                                    "idempotency-key": key or f"{user}-{product_id}"})


async def pay(http, make_token, user, hold_id):
    """The fake gateway's confirm, once the order worker made the order's payment
    (404 ``order_not_found`` until then)."""
    deadline = time.monotonic() + 15
    while True:
        resp = await http.post(f"/v1/dev/orders/{hold_id}/confirm",
                               json={"payment_method": "pm_card_visa"},
                               headers=bearer(make_token(user)))
        if resp.status_code != 404 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def ended_after_a_live(http, creator, make_token):
    """A drop whose hoodie sold one unit live and whose cap went on sale and sold none;
    the mug was never dropped. Returns (drop, hoodie, cap, mug)."""
    drop = await create(http, creator, products=PRODUCTS)
    hoodie, cap, mug = (p["product_id"] for p in drop["products"])
    await act(http, creator, drop["id"], "schedule", {"starts_at": later()})
    await act(http, creator, drop["id"], "live")
    await act(http, creator, drop["id"], "buy-now", {"product_id": hoodie})
    resp = await buy(http, make_token, drop["id"], hoodie, "live-buyer")
    assert resp.status_code == 201, resp.text
    await pay(http, make_token, "live-buyer", resp.json()["hold_id"])
    await act(http, creator, drop["id"], "close")
    await act(http, creator, drop["id"], "buy-now", {"product_id": cap})
    ended = await act(http, creator, drop["id"], "end")
    assert ended["state"] == "ended" and "sell_replay" in ended["allowed_actions"]
    return ended, hoodie, cap, mug


async def test_the_replay_sells_what_the_live_left_and_closes_at_the_end(
        server, http, creator, make_token, r, db) -> None:
    drop, hoodie, cap, mug = await ended_after_a_live(http, creator, make_token)
    drop_id = drop["id"]
    resp = await buy(http, make_token, drop_id, hoodie, "late")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "not_selling"

    opened = await act(http, creator, drop_id, "replay-sales")
    assert opened["state"] == "replay"
    assert opened["allowed_actions"] == ["end"]
    assert opened["ended_at"] == drop["ended_at"]
    assert {p["product_id"]: p["state"] for p in opened["products"]} == {
        hoodie: "selling", cap: "selling", mug: "pending"}
    events = await history(r, drop_id)
    assert events[-2][0] == "drop.state" and events[-2][1]["state"] == "replay"
    assert events[-2][1]["previous"] == "ended"
    assert events[-1][0] == "drop.replay_sales"
    assert [(p["product_id"], p["price"], p["remaining"]) for p in events[-1][1]["products"]
            ] == [(hoodie, 4500, 2), (cap, 2000, 2)]
    # Anyone sees what is left (the replay page's product list).
    public = (await http.get(f"/v1/drops/{drop_id}")).json()
    assert {p["product_id"]: (p["state"], p.get("remaining")) for p in public["products"]
            } == {hoodie: ("selling", 2), cap: ("selling", 2), mug: ("pending", 4)}

    # The same buy path: a hold with the next buyer number, paid like on the live.
    resp = await buy(http, make_token, drop_id, hoodie, "late")
    assert resp.status_code == 201, resp.text
    hold = resp.json()
    assert hold["buyer_number"] == 2 and hold["amount"] == 4500
    assert (await pay(http, make_token, "late", hold["hold_id"]))["state"] == "paid"
    # The per-buyer limit still counts what the live sold.
    resp = await buy(http, make_token, drop_id, hoodie, "live-buyer", key="again")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "limit_reached"
    resp = await buy(http, make_token, drop_id, mug, "late")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "not_selling"
    # Nothing is settled while the replay sells.
    resp = await http.post(f"/v1/drops/{drop_id}/settle", json={}, headers=creator)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "illegal_transition"

    closed = await act(http, creator, drop_id, "end")
    assert closed["state"] == "ended" and closed["ended_at"] == drop["ended_at"]
    assert {p["product_id"]: p["state"] for p in closed["products"]} == {
        hoodie: "closed", cap: "closed", mug: "pending"}
    resp = await buy(http, make_token, drop_id, cap, "later")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "not_selling"
    transitions = (await http.get(f"/v1/drops/{drop_id}/transitions",
                                  headers=creator)).json()["transitions"]
    assert [(t["from"], t["to"]) for t in transitions][-2:] == [
        ("ended", "replay"), ("replay", "ended")]

    await invariants.quiesce(r, drop_id)
    await invariants.check(db, r, drop_id, acknowledged=[hold["hold_id"]],
                           payments=await invariants.fake_gateway_payments(r))


async def test_nothing_left_to_sell_is_refused_and_the_drop_stays_ended(
        server, http, creator, make_token) -> None:
    drop = await create(http, creator, products=[{"title": "One", "price": 100, "units": 1}])
    (pid,) = (p["product_id"] for p in drop["products"])
    await act(http, creator, drop["id"], "schedule", {"starts_at": later()})
    await act(http, creator, drop["id"], "live")
    await act(http, creator, drop["id"], "buy-now", {"product_id": pid})
    assert (await buy(http, make_token, drop["id"], pid, "b1")).status_code == 201
    await act(http, creator, drop["id"], "end")
    refused = await act(http, creator, drop["id"], "replay-sales", status=409)
    assert refused["error"]["code"] == "nothing_to_sell"
    assert (await http.get(f"/v1/drops/{drop['id']}")).json()["state"] == "ended"
    # Only the drop's creator, and only after the end.
    other = bearer(make_token("creator-2", "creator"))
    resp = await http.post(f"/v1/drops/{drop['id']}/replay-sales", json={}, headers=other)
    assert resp.status_code == 403
    live = await create(http, creator, products=PRODUCTS)
    resp = await http.post(f"/v1/drops/{live['id']}/replay-sales", json={}, headers=creator)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "illegal_transition"
    resp = await http.post(f"/v1/drops/{drop['id']}/replay-sales", json={"x": 1},
                           headers=creator)
    assert resp.status_code == 422


async def test_a_drop_whose_stock_redis_lost_after_the_live_sells_from_postgres(
        server, http, creator, make_token, r, db) -> None:
    """Redis restarted empty after the live: the replay's sales open from what
    PostgreSQL's orders say is left, and the first buy rebuilds the drop in Redis
    (never a prewarm from the units: the live's sales stay sold)."""
    drop, hoodie, cap, _mug = await ended_after_a_live(http, creator, make_token)
    drop_id = drop["id"]
    await invariants.quiesce(r, drop_id)
    await r.flushdb()
    assert not await r.hexists(keys.meta(drop_id), "loaded")
    opened = await act(http, creator, drop_id, "replay-sales")
    assert opened["state"] == "replay"
    resp = await buy(http, make_token, drop_id, hoodie, "after-loss")
    assert resp.status_code == 201, resp.text
    assert resp.json()["buyer_number"] == 2 and resp.json()["remaining"] == 1
    resp = await buy(http, make_token, drop_id, cap, "after-loss")
    assert resp.status_code == 201, resp.text
    await invariants.quiesce(r, drop_id)
    await invariants.check(db, r, drop_id)
