"""Variants through the real app: creating and editing a drop whose products have
variants (and every refusal of bad ones), buying a variant over HTTP, the stock event,
the drop as viewers see it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dropserver.auth import Role
from realtime import channels
from tests.pubsub_support import listen

CREATOR = "creator-1"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def creator(make_token):
    return bearer(make_token(CREATOR, Role.CREATOR))


@pytest.fixture
def buyer(make_token):
    def make(sub: str = "buyer-1") -> dict[str, str]:
        return bearer(make_token(sub, Role.VIEWER))

    return make


def tee(**overrides):
    return {"title": "Tee", "price": 2000, "per_buyer_limit": 2,
            "image_url": "/static/img/tee.svg", "description": "Heavy cotton",
            "variants": [
                {"options": {"size": "S", "colour": "black"}, "units": 2},
                {"options": {"size": "M", "colour": "black"}, "units": 3, "price": 2500,
                 "image_url": "https://cdn.example/m.jpg"},
                {"title": "Large", "options": {"size": "L", "colour": "black"}, "units": 1,
                 "per_buyer_limit": 1},
            ], **overrides}


async def create(http, creator, *products):
    resp = await http.post("/v1/drops", json={"title": "Drop", "products": list(products)},
                           headers=creator)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def selling(http, creator, *products):
    drop = await create(http, creator, *products)
    starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
    pid = drop["products"][0]["product_id"]
    for action, payload in (("schedule", {"starts_at": starts}), ("live", {}),
                            ("buy-now", {"product_id": pid})):
        resp = await http.post(f"/v1/drops/{drop['id']}/{action}", json=payload,
                               headers=creator)
        assert resp.status_code == 200, resp.text
    return resp.json()


async def test_a_drop_with_variants_is_created_and_read_back(http, creator):
    drop = await create(http, creator, tee(), {"title": "Mug", "price": 900, "units": 4})
    t, mug = drop["products"]
    assert t["units"] == 6 and mug["variants"] == []
    assert [(v["title"], v["options"], v["price"], v["units"], v["per_buyer_limit"],
             v["image_url"]) for v in t["variants"]] == [
        ("S / black", {"size": "S", "colour": "black"}, None, 2, None, ""),
        ("M / black", {"size": "M", "colour": "black"}, 2500, 3, None,
         "https://cdn.example/m.jpg"),
        ("Large", {"size": "L", "colour": "black"}, None, 1, 1, "")]
    assert all(isinstance(v["variant_id"], int) for v in t["variants"])


async def test_patch_keeps_updates_adds_and_removes_variants(http, creator):
    drop = await create(http, creator, tee())
    product = drop["products"][0]
    s, m, _l = product["variants"]
    body = {"products": [dict(tee(), product_id=product["product_id"], variants=[
        {"variant_id": m["variant_id"], "options": {"size": "S", "colour": "black"},
         "units": 5},
        {"variant_id": s["variant_id"], "options": {"size": "M", "colour": "black"},
         "units": 1},
        {"options": {"size": "XL", "colour": "black"}, "units": 2}])]}
    resp = await http.patch(f"/v1/drops/{drop['id']}", json=body, headers=creator)
    assert resp.status_code == 200, resp.text
    variants = resp.json()["products"][0]["variants"]
    assert [(v["variant_id"], v["options"]["size"], v["units"]) for v in variants] == [
        (m["variant_id"], "S", 5), (s["variant_id"], "M", 1), (variants[2]["variant_id"],
                                                               "XL", 2)]
    assert resp.json()["products"][0]["units"] == 8
    other = await create(http, creator, tee())
    body["products"][0]["variants"][2]["variant_id"] = other["products"][0]["variants"][0][
        "variant_id"]
    resp = await http.patch(f"/v1/drops/{drop['id']}", json=body, headers=creator)
    assert resp.status_code == 422
    assert resp.json()["error"]["details"]["field"] == "products[0].variants[2].variant_id"


def _variants(*variants, **product):
    return {"title": "t", "products": [dict(tee(), variants=list(variants), **product)]}


_S = {"options": {"size": "S"}, "units": 1}
INVALID = [
    (_variants(), "products[0].variants"),
    ({"title": "t", "products": [dict(tee(), variants="S,M")]}, "products[0].variants"),
    (_variants(_S, {"options": {"size": "s"}, "units": 1}), "products[0].variants[1].options"),
    (_variants(_S, {"options": {"colour": "red"}, "units": 1}),
     "products[0].variants[1].options"),
    (_variants({"units": 1}), "products[0].variants[0].options"),
    (_variants({"options": {}, "units": 1}), "products[0].variants[0].options"),
    (_variants({"options": {"size": 3}, "units": 1}), "products[0].variants[0].options.size"),
    (_variants({"options": {"size": "S"}, "units": 0}), "products[0].variants[0].units"),
    (_variants({"options": {"size": "S"}, "units": -2}), "products[0].variants[0].units"),
    (_variants({"options": {"size": "S"}}), "products[0].variants[0].units"),
    (_variants({"options": {"size": "S"}, "units": 1, "price": 0}),
     "products[0].variants[0].price"),
    (_variants({"options": {"size": "S"}, "units": 1, "price": 9.5}),
     "products[0].variants[0].price"),
    (_variants({"options": {"size": "S"}, "units": 1, "per_buyer_limit": 3}),
     "products[0].variants[0].per_buyer_limit"),
    (_variants({"options": {"size": "S"}, "units": 1, "sku": "x"}),
     "products[0].variants[0].sku"),
    (_variants({"options": {"size": "S"}, "units": 1, "variant_id": 4}),
     "products[0].variants[0].variant_id"),
    (_variants({"options": {"size": "S"}, "units": 1, "image_url": "javascript:x"}),
     "products[0].variants[0].image_url"),
    (_variants(_S, {"options": {"size": "M"}, "units": 1}, units=5), "products[0].units"),
    (_variants(*[{"options": {"size": str(i)}, "units": 1} for i in range(51)]),
     "products[0].variants"),
]


@pytest.mark.parametrize(("body", "name"), INVALID)
async def test_bad_variants_are_422_naming_the_field(http, creator, body, name):
    resp = await http.post("/v1/drops", json=body, headers=creator)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "validation_failed" and err["details"]["field"] == name


async def test_buy_a_variant_over_http_and_hear_the_stock(server, http, creator, buyer):
    drop = await selling(http, creator, tee())
    drop_id, product = drop["id"], drop["products"][0]
    pid = product["product_id"]
    s, m, large = (v["variant_id"] for v in product["variants"])
    url = f"/v1/drops/{drop_id}/buy"
    pubsub = await listen(server.app.state.redis, channels.drop_channel(drop_id))
    try:
        resp = await http.post(url, json={"product_id": pid, "variant_id": m, "quantity": 2},
                               headers={**buyer(), "Idempotency-Key": "a"})
        assert resp.status_code == 201, resp.text
        hold = resp.json()
        assert (hold["variant_id"], hold["variant_remaining"], hold["remaining"],
                hold["unit_price"], hold["amount"]) == (m, 1, 4, 2500, 5000)
        stock = None
        for _ in range(100):
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            pubs = channels.parse_publications(msg["data"]) if msg else []
            stock = next((p.data for p in pubs if p.event == "stock"), None)
            if stock is not None:
                break
    finally:
        await pubsub.aclose()
    assert stock is not None and stock["products"] == {pid: 4}
    variants = {int(k): {int(v): n for v, n in vs.items()}
                for k, vs in stock["variants"].items()}
    assert variants == {pid: {s: 2, m: 1, large: 1}}
    got = await http.get(f"/v1/holds/{hold['hold_id']}", headers=buyer())
    assert got.json()["variant_id"] == m
    # No variant named, an unknown one, one of another product: 422, nothing taken.
    for body, code in (({"product_id": pid}, "variant_required"),
                       ({"product_id": pid, "variant_id": 10**9}, "unknown_variant"),
                       ({"product_id": pid, "variant_id": "M"}, "validation_failed"),
                       ({"product_id": pid, "variant_id": 0}, "validation_failed")):
        resp = await http.post(url, json=body, headers={**buyer("b2"), "Idempotency-Key": "b"})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == code, resp.text
    # The product's limit counts every variant: buyer-1 has 2 tees already.
    resp = await http.post(url, json={"product_id": pid, "variant_id": s},
                           headers={**buyer(), "Idempotency-Key": "c"})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "limit_reached"
    # What viewers read: remaining and sold per product, remaining per variant.
    seen = (await http.get(f"/v1/drops/{drop_id}")).json()["products"][0]
    assert (seen["remaining"], seen["sold"]) == (4, 2)
    assert [v["remaining"] for v in seen["variants"]] == [2, 1, 1]
