"""A buyer's orders as receipts (``GET /v1/me/orders``, ``GET /v1/orders/{id}/receipt``)
on the real app with the fake gateway: the variant bought, amounts, the payment's
reference and dates follow the order through held, paid and refunded; pages by cursor
cover every order and tip exactly once; nobody reads another buyer's order (404, as
for an unknown one)."""

from __future__ import annotations

from datetime import datetime

import pytest

from checkout.receipts import Cursor, decode_cursor, encode_cursor
from dropserver.auth import Role
from tests.payments_fixtures import wait_for
from tests.test_reserve_api import bearer, post_buy, selling_drop
from tests.test_variants_api import selling, tee

CREATOR = "creator-1"


def _at(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


async def _mine(http, headers, **params) -> dict:
    resp = await http.get("/v1/me/orders", headers=headers, params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _until_state(http, headers, order_id: str, state: str) -> dict:
    async def check():
        r = await http.get(f"/v1/orders/{order_id}/receipt", headers=headers)
        return r.json() if r.status_code == 200 and r.json()["state"] == state else None
    return await wait_for(check, 10)


def test_a_cursor_round_trips_and_a_forged_one_is_refused() -> None:
    c = Cursor(datetime.fromisoformat("2026-12-02T16:30:00.123456+00:00"), "order", 42)
    assert decode_cursor(encode_cursor(c)) == c
    for bad in ("", "x" * 81, "!!!", encode_cursor(c)[:-3] + "%%%",
                "b3JkZXIuMS4x" + "A",  # "order.1.1" plus a stray character
                "c2hpcC4xLjE"):  # "ship.1.1": not a kind
        with pytest.raises(ValueError):
            decode_cursor(bad)


async def test_a_receipt_follows_the_order_from_held_to_paid_to_refunded(
        server, http, make_token) -> None:
    creator = bearer(make_token(CREATOR, Role.CREATOR, name="Cleo"))
    drop = await selling(http, creator, tee())
    product = drop["products"][0]
    m = product["variants"][1]["variant_id"]
    buyer = bearer(make_token("buyer-a", Role.VIEWER))
    resp = await http.post(f"/v1/drops/{drop['id']}/buy", headers={
        **buyer, "Idempotency-Key": "a"}, json={"product_id": product["product_id"],
                                                "variant_id": m, "quantity": 2})
    assert resp.status_code == 201, resp.text
    hold = resp.json()
    order_id = hold["hold_id"]

    pending = await _until_state(http, buyer, order_id, "payment_pending")
    assert pending["kind"] == "order" and pending["id"] == order_id
    assert (pending["drop_id"], pending["drop_title"]) == (drop["id"], "Drop")
    assert pending["seller"] == {"id": CREATOR, "name": "Cleo"}
    assert pending["items"] == [{
        "product_id": product["product_id"], "variant_id": m, "title": "Tee",
        "variant_title": "M / black", "options": {"size": "M", "colour": "black"},
        "image_url": "https://cdn.example/m.jpg", "quantity": 2, "unit_price": 2500,
        "amount": 5000}]
    assert (pending["total"], pending["currency"], pending["amount_paid"],
            pending["amount_refunded"]) == (5000, "usd", 0, 0)
    assert pending["payment"]["reference"].startswith("pi_")
    assert pending["payment"]["gateway"] == "fake"
    assert pending["buyer_number"] == hold["buyer_number"]
    assert _at(pending["hold_expires_at"]).timestamp() * 1000 == pytest.approx(
        hold["expires_at"], abs=1)
    assert pending["paid_at"] is None and pending["refunded_at"] is None
    listed = await _mine(http, buyer)
    assert listed == {"orders": [pending], "next_cursor": None}

    r = await http.post(f"/v1/dev/orders/{order_id}/confirm", headers=buyer, json={})
    assert r.status_code == 200 and r.json()["state"] == "paid", r.text
    paid = await _until_state(http, buyer, order_id, "paid")
    assert (paid["amount_paid"], paid["payment"]["status"]) == (5000, "succeeded")
    assert paid["hold_expires_at"] is None  # nothing to pay before any more
    assert _at(paid["created_at"]) <= _at(paid["paid_at"])
    assert paid["payment"]["reference"] == pending["payment"]["reference"]

    admin = bearer(make_token("ops", Role.ADMIN))
    r = await http.post(f"/v1/orders/{order_id}/refund", headers=admin)
    assert r.status_code == 200, r.text
    refunded = await _until_state(http, buyer, order_id, "refunded")
    assert (refunded["amount_paid"], refunded["amount_refunded"]) == (5000, 5000)
    assert refunded["paid_at"] == paid["paid_at"]  # a refund keeps the payment's date
    assert _at(refunded["paid_at"]) <= _at(refunded["refunded_at"])
    assert (await _mine(http, buyer, drop_id=drop["id"]))["orders"] == [refunded]


async def test_nobody_reads_another_buyers_order(server, http, make_token) -> None:
    creator = bearer(make_token(CREATOR, Role.CREATOR))
    drop_id, pid = await selling_drop(http, creator)
    buyer = bearer(make_token("buyer-a", Role.VIEWER))
    resp = await post_buy(http, drop_id, buyer, pid)
    assert resp.status_code == 201, resp.text
    order_id = resp.json()["hold_id"]
    mine = await _until_state(http, buyer, order_id, "payment_pending")

    url = f"/v1/orders/{order_id}/receipt"
    for who in (make_token("buyer-b", Role.VIEWER), make_token("creator-2", Role.CREATOR),
                make_token("investor-1", Role.INVESTOR)):
        r = await http.get(url, headers=bearer(who))
        assert r.status_code == 404 and r.json()["error"]["code"] == "order_not_found"
    unknown = await http.get(f"/v1/orders/{drop_id}-{pid}-0000000000000000/receipt",
                             headers=bearer(make_token("buyer-b", Role.VIEWER)))
    assert unknown.status_code == 404 and unknown.json() == r.json()  # the same answer
    bad = await http.get("/v1/orders/not-an-order/receipt", headers=buyer)
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "order_not_found"
    # the drop's creator and an admin read it (support); the buyer's list is theirs only
    for who in (make_token(CREATOR, Role.CREATOR), make_token("ops", Role.ADMIN)):
        r = await http.get(url, headers=bearer(who))
        assert r.status_code == 200 and r.json() == mine
    assert (await _mine(http, bearer(make_token("buyer-b", Role.VIEWER)))) == {
        "orders": [], "next_cursor": None}
    assert (await _mine(http, bearer(make_token(CREATOR, Role.CREATOR))))["orders"] == []
    for path in ("/v1/me/orders", url):
        r = await http.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_missing"


async def test_pages_cover_every_order_and_tip_once_newest_first(
        server, http, make_token) -> None:
    creator = bearer(make_token(CREATOR, Role.CREATOR))
    buyer_token = make_token("buyer-a", Role.VIEWER)
    buyer = bearer(buyer_token)
    first, p1 = await selling_drop(http, creator, units=5, limit=5)
    ids = []
    for i in range(3):  # held, cancelled, held, cancelled, held: three orders
        r = await post_buy(http, first, buyer, p1, key=f"k{i}")
        assert r.status_code == 201, r.text
        ids.append(r.json()["hold_id"])
        if i < 2:
            assert (await http.delete(f"/v1/holds/{ids[-1]}", headers=buyer)).status_code == 200
    second, p2 = await selling_drop(http, creator)
    r = await http.post(f"/v1/drops/{second}/tip-amounts", headers=creator,
                        json={"amounts": [300]})
    assert r.status_code == 200, r.text
    r = await post_buy(http, second, buyer, p2)
    assert r.status_code == 201, r.text
    ids.append(r.json()["hold_id"])
    r = await http.post(f"/v1/drops/{second}/tips", headers=buyer, json={
        "amount": 300, "message": "thanks!", "idempotency_key": "tip-1"})
    assert r.status_code == 201, r.text
    tip_id = r.json()["tip_id"]
    # someone else's orders never show
    other = await post_buy(http, second, bearer(make_token("buyer-b", Role.VIEWER)), p2)
    assert other.status_code == 201, other.text

    async def all_recorded():  # the rows and the cancels are written by the workers
        got = await _mine(http, buyer, limit=100)
        states = {o["id"]: o["state"] for o in got["orders"]}
        done = len(states) == 5 and states[ids[0]] == states[ids[1]] == "cancelled"
        return got if done else None
    whole = (await wait_for(all_recorded, 15))["orders"]
    assert [o["id"] for o in whole] == [tip_id, *reversed(ids)]
    assert {o["state"] for o in whole[1:3]} <= {"held", "payment_pending"}
    tip = whole[0]
    assert (tip["kind"], tip["total"], tip["message"], tip["buyer_number"]) == (
        "tip", 300, "thanks!", None)
    assert tip["items"][0]["title"] == "Tip" and tip["items"][0]["amount"] == 300
    assert tip["payment"]["reference"].startswith("pi_")

    seen, cursor, pages = [], None, 0
    while True:
        page = await _mine(http, buyer, limit=2, **({"cursor": cursor} if cursor else {}))
        pages += 1
        assert len(page["orders"]) <= 2
        seen += [o["id"] for o in page["orders"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [o["id"] for o in whole] and pages == 3
    assert [o["id"] for o in (await _mine(http, buyer, drop_id=first))["orders"]] == list(
        reversed(ids[:3]))
    assert [o["id"] for o in (await _mine(http, buyer, kind="tip"))["orders"]] == [tip_id]
    only_orders = await _mine(http, buyer, kind="order", limit=4)
    assert [o["id"] for o in only_orders["orders"]] == list(reversed(ids))
    assert only_orders["next_cursor"] is None  # exactly four: no empty last page

    for params, name in (({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"),
                         ({"drop_id": "x"}, "drop_id"), ({"kind": "refund"}, "kind"),
                         ({"cursor": "not-a-cursor"}, "cursor")):
        r = await http.get("/v1/me/orders", headers=buyer, params=params)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["error"]["details"]["field"] == name
