"""The creator HTTP API (drops/api.py, drops/actions.py) against real PostgreSQL/Redis."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from checkout import inventory, keys
from drops import actions, store
from drops.lifecycle import IllegalTransition
from dropserver.auth import Principal, Role
from realtime import channels
from tests.pubsub_support import listen

CREATOR = "creator-1"
PRODUCTS = [
    {"title": "Hoodie", "price": 4500, "units": 3, "per_buyer_limit": 1, "cogs": 1200},
    {"title": "Cap", "price": 2000, "units": 5, "per_buyer_limit": 2},
]


def later(minutes: int = 10) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def creator(make_token):
    return bearer(make_token(CREATOR, Role.CREATOR, name="Creator One"))


async def create(http, headers, **overrides):
    body = {"title": "Friday drop", "products": PRODUCTS, **overrides}
    resp = await http.post("/v1/drops", json=body, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def act(http, headers, drop_id, action, body=None, status=200):
    resp = await http.post(f"/v1/drops/{drop_id}/{action}", json=body or {}, headers=headers)
    assert resp.status_code == status, resp.text
    return resp.json()


async def to_live(http, headers, **overrides):
    drop = await create(http, headers, **overrides)
    await act(http, headers, drop["id"], "schedule", {"starts_at": later()})
    return await act(http, headers, drop["id"], "live")


async def history(redis, drop_id):
    """Every durable event of the drop, in order: [(event, data), ...]."""
    entries = await redis.xrange(channels.history_key(drop_id))
    return [(p.event, p.data) for p in
            (channels.parse_history_entry(eid, f, "") for eid, f in entries)]


async def sell_out(redis, drop_id, product_id):
    """Stock of the product to 0, as checkout's reserve script leaves it (keys.py layout)."""
    await redis.hset(keys.product(drop_id, product_id), "remaining", 0)


# --- create and read ---------------------------------------------------------------------

async def test_create_returns_a_draft_with_products(server, http, creator):
    resp = await http.post("/v1/drops", json={
        "title": "Friday drop", "description": "two pieces", "currency": "EUR",
        "max_holds_per_user": 2, "products": PRODUCTS}, headers=creator)
    assert resp.status_code == 201
    drop = resp.json()
    assert resp.headers["location"] == f"/v1/drops/{drop['id']}"
    assert drop["state"] == "draft"
    assert drop["creator_id"] == CREATOR
    assert drop["currency"] == "eur"
    assert drop["kind"] == "standard" and drop["campaign"] is None
    assert drop["allowed_actions"] == ["schedule"]
    assert [(p["title"], p["price"], p["units"], p["per_buyer_limit"], p["cogs"], p["state"])
            for p in drop["products"]] == [("Hoodie", 4500, 3, 1, 1200, "pending"),
                                           ("Cap", 2000, 5, 2, 0, "pending")]
    db = server.app.state.db
    user = await db.fetchrow("SELECT display_name, role FROM users WHERE id = $1", CREATOR)
    assert dict(user) == {"display_name": "Creator One", "role": "creator"}
    assert await db.fetchval("SELECT count(*) FROM creators WHERE user_id = $1", CREATOR) == 1


async def test_campaign_drop_is_creatable(http, creator):
    deadline = later(60 * 24)
    drop = await create(http, creator, kind="campaign",
                        campaign={"goal_orders": 50, "deadline": deadline})
    assert drop["kind"] == "campaign"
    assert drop["campaign"] == {"goal_orders": 50, "deadline": deadline, "outcome": "pending"}


async def test_public_read_hides_drafts_and_cogs(http, creator, make_token):
    drop = await create(http, creator)
    url = f"/v1/drops/{drop['id']}"
    assert (await http.get(url)).status_code == 404                       # guest, draft
    other = bearer(make_token("creator-2", Role.CREATOR))
    assert (await http.get(url, headers=other)).json()["error"]["code"] == "drop_not_found"
    assert (await http.get(url, headers=creator)).json()["products"][0]["cogs"] == 1200
    await act(http, creator, drop["id"], "schedule", {"starts_at": later()})
    public = (await http.get(url)).json()
    assert public["state"] == "scheduled"
    assert "cogs" not in public["products"][0] and "allowed_actions" not in public
    assert (await http.get("/v1/drops/999999")).status_code == 404
    assert (await http.get("/v1/drops/99999999999999999999")).status_code == 404


async def test_get_shows_remaining_stock_on_air(http, creator):
    drop = await to_live(http, creator)
    body = (await http.get(f"/v1/drops/{drop['id']}")).json()
    assert [p["remaining"] for p in body["products"]] == [3, 5]


async def test_list_filters_by_creator_and_state(http, creator, make_token):
    other = bearer(make_token("creator-2", Role.CREATOR))
    mine_draft = await create(http, creator, title="mine draft")
    mine_live = await to_live(http, creator, title="mine live")
    theirs = await create(http, other, title="theirs")
    await act(http, other, theirs["id"], "schedule", {"starts_at": later()})
    their_draft = await create(http, other, title="their draft")

    guest = (await http.get("/v1/drops")).json()["drops"]
    assert [d["id"] for d in guest] == [theirs["id"], mine_live["id"]]   # newest first
    own = (await http.get("/v1/drops", params={"creator": CREATOR}, headers=creator)).json()
    assert [d["id"] for d in own["drops"]] == [mine_live["id"], mine_draft["id"]]
    live = (await http.get("/v1/drops", params={"state": "live,selling"})).json()["drops"]
    assert [d["id"] for d in live] == [mine_live["id"]]
    admin = bearer(make_token("admin-1", Role.ADMIN))
    everything = (await http.get("/v1/drops", headers=admin)).json()["drops"]
    assert their_draft["id"] in [d["id"] for d in everything]
    page = (await http.get("/v1/drops", params={"limit": 1}, headers=admin)).json()
    assert len(page["drops"]) == 1 and page["next_before"] == page["drops"][0]["id"]
    rest = (await http.get("/v1/drops", params={"before": page["next_before"]},
                           headers=admin)).json()
    assert len(rest["drops"]) == 3
    for params, name in [({"state": "bogus"}, "state"), ({"limit": "0"}, "limit"),
                         ({"before": "x"}, "before"), ({"sort": "id"}, "sort")]:
        resp = await http.get("/v1/drops", params=params)
        assert resp.status_code == 422
        assert resp.json()["error"]["details"]["field"] == name


# --- the whole lifecycle -----------------------------------------------------------------

async def test_happy_path_two_products_broadcast_in_order(server, http, creator):
    redis = server.app.state.redis
    drop = await create(http, creator)
    drop_id = drop["id"]
    hoodie, cap = (p["product_id"] for p in drop["products"])
    starts = later(5)

    scheduled = await act(http, creator, drop_id, "schedule", {"starts_at": starts})
    assert scheduled["state"] == "scheduled" and scheduled["starts_at"] == starts
    live = await act(http, creator, drop_id, "live")
    assert live["state"] == "live" and live["live_at"]
    # Go live pre-warmed stock and product data into Redis (contract 2).
    assert await inventory.remaining(redis, drop_id) == {hoodie: 3, cap: 5}
    assert (await inventory.product_state(redis, drop_id, hoodie))["price"] == "4500"

    pinned = await act(http, creator, drop_id, "pin", {"product_id": hoodie})
    assert pinned["pinned_product_id"] == hoodie and pinned["state"] == "live"
    selling = await act(http, creator, drop_id, "buy-now", {"product_id": hoodie})
    assert selling["state"] == "selling" and selling["selling_product_id"] == hoodie
    assert selling["products"][0]["state"] == "selling"
    assert (await inventory.product_state(redis, drop_id, hoodie))["state"] == "selling"

    await sell_out(redis, drop_id, hoodie)
    assert await actions.mark_sold_out(server.app, redis, drop_id, hoodie) is True
    sold = (await http.get(f"/v1/drops/{drop_id}", headers=creator)).json()
    assert sold["state"] == "sold_out" and sold["products"][0]["state"] == "sold_out"

    second = await act(http, creator, drop_id, "buy-now", {"product_id": cap})
    assert second["state"] == "selling" and second["selling_product_id"] == cap
    # The sold-out product was closed for good when the next one dropped.
    assert [p["state"] for p in second["products"]] == ["closed", "selling"]
    assert (await inventory.product_state(redis, drop_id, hoodie))["state"] == "closed"

    closed = await act(http, creator, drop_id, "close", {"product_id": cap})
    assert closed["state"] == "closed" and closed["products"][1]["state"] == "closed"
    assert (await inventory.product_state(redis, drop_id, cap))["state"] == "closed"
    ended = await act(http, creator, drop_id, "end")
    assert ended["state"] == "ended" and ended["ended_at"]
    assert ended["allowed_actions"] == ["sell_replay"]

    events = await history(redis, drop_id)
    assert [e for e, _ in events] == [
        "drop.state", "drop.countdown", "drop.state", "drop.pinned",
        "drop.state", "drop.buy_now", "drop.state", "drop.sold_out",
        "drop.state", "drop.buy_now", "drop.state", "drop.closed",
        "drop.state", "drop.ended"]
    states = [(d["previous"], d["state"], d.get("product_id"))
              for e, d in events if e == "drop.state"]
    assert states == [("draft", "scheduled", None), ("scheduled", "live", None),
                      ("live", "selling", hoodie), ("selling", "sold_out", hoodie),
                      ("sold_out", "selling", cap), ("selling", "closed", cap),
                      ("closed", "ended", None)]
    data = dict((e, d) for e, d in events if e != "drop.state" and e != "drop.buy_now")
    assert data["drop.countdown"] == {"starts_at": starts}
    assert data["drop.pinned"] == {"product_id": hoodie}
    assert data["drop.sold_out"] == {"product_id": hoodie}
    assert data["drop.closed"] == {"product_id": cap}
    assert data["drop.ended"] == {}
    buy_nows = [d for e, d in events if e == "drop.buy_now"]
    assert buy_nows == [
        {"product_id": hoodie, "price": 4500, "currency": "usd", "remaining": 3},
        {"product_id": cap, "price": 2000, "currency": "usd", "remaining": 5}]

    trail = (await http.get(f"/v1/drops/{drop_id}/transitions", headers=creator)).json()
    assert [(t["from"], t["to"]) for t in trail["transitions"]] == [
        ("draft", "scheduled"), ("scheduled", "live"), ("live", "selling"),
        ("selling", "sold_out"), ("sold_out", "selling"), ("selling", "closed"),
        ("closed", "ended")]
    assert [t["actor_id"] for t in trail["transitions"]] == [
        CREATOR, CREATOR, CREATOR, None, CREATOR, CREATOR, CREATOR]
    assert ended["version"] == 8    # 7 transitions + 1 pin


async def test_snapshot_for_the_gateway(server, http, creator):
    from drops.api import snapshot

    drop = await create(http, creator)
    assert await snapshot(server.app, drop["id"]) is None                 # a guest, a draft
    owner = Principal(user_id=CREATOR, role=Role.CREATOR)
    assert (await snapshot(server.app, drop["id"], owner))["state"] == "draft"
    await act(http, creator, drop["id"], "schedule", {"starts_at": later()})
    await act(http, creator, drop["id"], "live")
    public = await snapshot(server.app, drop["id"])
    assert public == (await http.get(f"/v1/drops/{drop['id']}")).json()
    assert public["products"][0]["remaining"] == 3 and "cogs" not in public["products"][0]
    assert await snapshot(server.app, 424242) is None


async def test_transitions_are_counted(http, creator):
    await to_live(http, creator)
    metrics = (await http.get("/metrics")).text
    assert 'dropserver_drop_transitions_total{action="go_live"}' in metrics


async def test_token_role_is_kept_current_in_users(server, http, make_token):
    db = server.app.state.db
    await db.execute("INSERT INTO users (id, role) VALUES ('promoted', 'viewer')")
    await create(http, bearer(make_token("promoted", Role.CREATOR)))
    assert await db.fetchval("SELECT role FROM users WHERE id = 'promoted'") == "creator"


async def test_go_live_alias(http, creator):
    drop = await create(http, creator)
    await act(http, creator, drop["id"], "schedule", {"starts_at": later()})
    assert (await act(http, creator, drop["id"], "go-live"))["state"] == "live"


async def test_end_while_selling_closes_sales(server, http, creator):
    redis = server.app.state.redis
    drop = await to_live(http, creator)
    hoodie, cap = (p["product_id"] for p in drop["products"])
    await act(http, creator, drop["id"], "buy-now", {"product_id": hoodie})
    ended = await act(http, creator, drop["id"], "end")
    assert [p["state"] for p in ended["products"]] == ["closed", "pending"]
    assert (await inventory.product_state(redis, drop["id"], hoodie))["state"] == "closed"
    assert (await inventory.product_state(redis, drop["id"], cap))["state"] == "closed"


async def test_buy_now_reaches_a_subscriber(server, http, creator):
    """One creator action, one publication: the state change and BUY NOW itself have
    consecutive positions and arrive together (each viewer gets one message)."""
    redis = server.app.state.redis
    drop = await to_live(http, creator)
    hoodie = drop["products"][0]["product_id"]
    pubsub = await listen(redis, channels.drop_channel(drop["id"]))
    try:
        await act(http, creator, drop["id"], "buy-now", {"product_id": hoodie})
        async with asyncio.timeout(5):
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if msg is not None:
                    break
        with contextlib.suppress(TimeoutError):  # nothing else follows
            extra = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3)
            assert extra is None
    finally:
        await pubsub.aclose()
    got = channels.parse_publications(msg["data"])
    assert [(p.kind, p.event) for p in got] == [(channels.Kind.DURABLE, "drop.state"),
                                                (channels.Kind.DURABLE, "drop.buy_now")]
    assert got[1].data == {"product_id": hoodie, "price": 4500, "currency": "usd",
                           "remaining": 3}
    assert got[1].offset == got[0].offset + 1


async def test_buy_now_is_not_broadcast_when_sales_cannot_open(server, http, creator):
    """Order: sales open in Redis first; if they cannot, nobody hears BUY NOW."""
    redis = server.app.state.redis
    drop = await to_live(http, creator)
    hoodie = drop["products"][0]["product_id"]
    await redis.delete(keys.product(drop["id"], hoodie))       # e.g. Redis lost the key
    before = await history(redis, drop["id"])
    resp = await http.post(f"/v1/drops/{drop['id']}/buy-now", json={"product_id": hoodie},
                           headers=creator)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "sales_unavailable"
    assert resp.json()["error"]["details"] == {"reason": "not_prewarmed"}
    assert await history(redis, drop["id"]) == before
    after = (await http.get(f"/v1/drops/{drop['id']}", headers=creator)).json()
    assert after["state"] == "live" and after["products"][0]["state"] == "pending"


async def test_failed_broadcast_rolls_back_and_closes_sales(server, http, creator,
                                                            monkeypatch):
    redis = server.app.state.redis
    drop = await to_live(http, creator)
    hoodie = drop["products"][0]["product_id"]

    async def broken(*args, **kwargs):
        raise RedisConnectionError("redis went away")

    monkeypatch.setattr(actions, "publish_many", broken)
    resp = await http.post(f"/v1/drops/{drop['id']}/buy-now", json={"product_id": hoodie},
                           headers=creator)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "unavailable"
    assert resp.headers["retry-after"] == "1"
    monkeypatch.undo()
    after = (await http.get(f"/v1/drops/{drop['id']}", headers=creator)).json()
    assert after["state"] == "live" and after["version"] == drop["version"]
    assert (await inventory.product_state(redis, drop["id"], hoodie))["state"] == "closed"


# --- illegal transitions -----------------------------------------------------------------

ENDPOINTS = ["schedule", "live", "buy-now", "close", "end", "replay-sales"]
LEGAL = {
    "draft": {"schedule"},
    "scheduled": {"live"},
    "live": {"buy-now", "end"},
    "selling": {"close", "end"},
    "sold_out": {"buy-now", "close", "end"},
    "closed": {"buy-now", "end"},
    "ended": {"replay-sales"},
    "replay": {"end"},
}
TARGET = {"schedule": "scheduled", "live": "live", "buy-now": "selling", "close": "closed",
          "end": "ended", "replay-sales": "replay"}
ACTION = {"schedule": "schedule", "live": "go_live", "buy-now": "buy_now", "close": "close",
          "end": "end", "replay-sales": "sell_replay"}


async def _walk_to(server, http, headers, state):
    """A drop of two products in ``state``; returns (drop id, a pending product id)."""
    drop = await create(http, headers)
    drop_id = drop["id"]
    hoodie, cap = (p["product_id"] for p in drop["products"])
    path = {"draft": [], "scheduled": ["schedule"], "live": ["schedule", "live"],
            "selling": ["schedule", "live", "buy"], "sold_out": ["schedule", "live", "buy",
                                                                 "sell_out"],
            "closed": ["schedule", "live", "buy", "close"],
            "ended": ["schedule", "live", "end"],
            "replay": ["schedule", "live", "buy", "end", "replay-sales"]}[state]
    for step in path:
        if step == "schedule":
            await act(http, headers, drop_id, "schedule", {"starts_at": later()})
        elif step == "buy":
            await act(http, headers, drop_id, "buy-now", {"product_id": hoodie})
        elif step == "sell_out":
            redis = server.app.state.redis
            await sell_out(redis, drop_id, hoodie)
            assert await actions.mark_sold_out(server.app, redis, drop_id, hoodie)
        else:
            await act(http, headers, drop_id, step)
    return drop_id, cap


@pytest.mark.parametrize("state", list(LEGAL))
async def test_illegal_transitions_are_409(server, http, creator, state):
    drop_id, cap = await _walk_to(server, http, creator, state)
    bodies = {"schedule": {"starts_at": later()}, "buy-now": {"product_id": cap}}
    for endpoint in ENDPOINTS:
        if endpoint in LEGAL[state]:
            continue
        resp = await http.post(f"/v1/drops/{drop_id}/{endpoint}",
                               json=bodies.get(endpoint, {}), headers=creator)
        assert resp.status_code == 409, (state, endpoint, resp.text)
        err = resp.json()["error"]
        assert err["code"] == "illegal_transition"
        assert err["details"]["from"] == state
        assert err["details"]["to"] == TARGET[endpoint]
        assert err["details"]["action"] == ACTION[endpoint]
        assert f"{state} -> {TARGET[endpoint]}" in err["message"]
    body = (await http.get(f"/v1/drops/{drop_id}", headers=creator)).json()
    assert body["state"] == state                 # nothing moved
    allowed = {"schedule": "schedule", "go_live": "live", "buy_now": "buy-now",
               "close": "close", "end": "end", "sell_replay": "replay-sales"}
    assert {allowed[a] for a in body["allowed_actions"]} == LEGAL[state]


async def test_a_product_drops_only_once(server, http, creator):
    drop_id, _cap = await _walk_to(server, http, creator, "closed")
    drop = (await http.get(f"/v1/drops/{drop_id}", headers=creator)).json()
    hoodie = drop["products"][0]["product_id"]
    resp = await http.post(f"/v1/drops/{drop_id}/buy-now", json={"product_id": hoodie},
                           headers=creator)
    assert resp.status_code == 409
    err = resp.json()["error"]
    assert err["code"] == "illegal_transition"
    assert err["details"]["product_id"] == hoodie
    assert "is closed" in err["message"]


async def test_close_names_the_product_on_sale(server, http, creator):
    drop_id, cap = await _walk_to(server, http, creator, "selling")
    resp = await http.post(f"/v1/drops/{drop_id}/close", json={"product_id": cap},
                           headers=creator)
    assert resp.status_code == 409
    assert "is not on sale" in resp.json()["error"]["message"]


async def test_pin_and_edit_are_state_checked(server, http, creator):
    drop = await create(http, creator)
    hoodie = drop["products"][0]["product_id"]
    resp = await http.post(f"/v1/drops/{drop['id']}/pin", json={"product_id": hoodie},
                           headers=creator)
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "wrong_state"
    live = await to_live(http, creator)
    resp = await http.patch(f"/v1/drops/{live['id']}", json={"title": "x"}, headers=creator)
    assert resp.status_code == 409
    assert resp.json()["error"]["details"] == {
        "state": "live", "operation": "edit", "allowed_states": ["draft", "scheduled"]}
    unpinned = await act(http, creator, live["id"], "pin", {"product_id": None})
    assert unpinned["pinned_product_id"] is None


# --- edit ------------------------------------------------------------------------------

async def test_patch_updates_fields_and_replaces_products(server, http, creator):
    drop = await create(http, creator)
    hoodie = drop["products"][0]["product_id"]
    resp = await http.patch(f"/v1/drops/{drop['id']}", headers=creator, json={
        "title": "Saturday drop", "max_holds_per_user": 3,
        "products": [{"title": "Tote", "price": 1500, "units": 10},
                     {"product_id": hoodie, "title": "Hoodie v2", "price": 5000, "units": 4}]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["title"] == "Saturday drop" and body["max_holds_per_user"] == 3
    assert [(p["title"], p["price"], p["units"]) for p in body["products"]] == [
        ("Tote", 1500, 10), ("Hoodie v2", 5000, 4)]
    assert body["products"][1]["product_id"] == hoodie
    assert body["version"] == drop["version"] + 1
    resp = await http.patch(f"/v1/drops/{drop['id']}", headers=creator, json={
        "products": [{"product_id": 424242, "title": "x", "price": 1, "units": 1}]})
    assert resp.status_code == 422
    assert resp.json()["error"]["details"]["field"] == "products[0].product_id"


async def test_patch_with_if_match_refuses_a_stale_copy(http, creator):
    drop = await create(http, creator)
    url = f"/v1/drops/{drop['id']}"
    etag = (await http.get(url, headers=creator)).headers["etag"]
    assert etag == f'"{drop["version"]}"'
    first = await http.patch(url, json={"title": "one"}, headers={**creator, "If-Match": etag})
    assert first.status_code == 200 and first.headers["etag"] != etag
    stale = await http.patch(url, json={"title": "two"}, headers={**creator, "If-Match": etag})
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "version_mismatch"
    assert stale.json()["error"]["details"] == {"expected": drop["version"],
                                                "current": drop["version"] + 1}
    assert (await http.get(url, headers=creator)).json()["title"] == "one"
    bad = await http.patch(url, json={"title": "x"}, headers={**creator, "If-Match": "*x"})
    assert bad.status_code == 422


async def test_new_start_time_of_a_scheduled_drop_is_broadcast(server, http, creator):
    drop = await create(http, creator)
    await act(http, creator, drop["id"], "schedule", {"starts_at": later(5)})
    new = later(30)
    resp = await http.patch(f"/v1/drops/{drop['id']}", json={"starts_at": new},
                            headers=creator)
    assert resp.status_code == 200 and resp.json()["starts_at"] == new
    events = await history(server.app.state.redis, drop["id"])
    assert events[-1] == ("drop.countdown", {"starts_at": new})
    resp = await http.patch(f"/v1/drops/{drop['id']}", json={"starts_at": None},
                            headers=creator)
    assert resp.status_code == 422


async def test_schedule_uses_the_stored_start_time(http, creator):
    starts = later(15)
    drop = await create(http, creator, starts_at=starts)
    scheduled = await act(http, creator, drop["id"], "schedule")
    assert scheduled["starts_at"] == starts
    other = await create(http, creator)
    resp = await http.post(f"/v1/drops/{other['id']}/schedule", json={}, headers=creator)
    assert resp.status_code == 422
    assert resp.json()["error"]["details"] == {"field": "starts_at"}


# --- who may act -----------------------------------------------------------------------

WRITES = [("post", "/v1/drops", {"title": "t", "products": PRODUCTS}),
          ("patch", "/v1/drops/{id}", {"title": "t"}),
          ("post", "/v1/drops/{id}/schedule", {"starts_at": "2999-01-01T00:00:00Z"}),
          ("post", "/v1/drops/{id}/live", {}),
          ("post", "/v1/drops/{id}/pin", {"product_id": 1}),
          ("post", "/v1/drops/{id}/buy-now", {"product_id": 1}),
          ("post", "/v1/drops/{id}/close", {}),
          ("post", "/v1/drops/{id}/end", {}),
          ("get", "/v1/drops/{id}/transitions", None)]


async def _call(http, method, path, body, headers):
    kwargs = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    return await getattr(http, method)(path, **kwargs)


async def test_writes_need_a_token(http, creator):
    drop = await create(http, creator)
    for method, path, body in WRITES:
        resp = await _call(http, method, path.format(id=drop["id"]), body, {})
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["code"] == "token_missing"
        bad = await _call(http, method, path.format(id=drop["id"]), body,
                          bearer("not.a.token"))
        assert bad.status_code == 401
        assert bad.json()["error"]["code"] == "token_invalid"


@pytest.mark.parametrize("role", [Role.VIEWER, Role.INVESTOR])
async def test_viewer_and_investor_tokens_get_403(http, creator, make_token, role):
    drop = await create(http, creator)
    token = bearer(make_token("someone", role))
    for method, path, body in WRITES:
        resp = await _call(http, method, path.format(id=drop["id"]), body, token)
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json()["error"]["code"] == "forbidden_role"


async def test_creators_act_only_on_their_own_drops(server, http, creator, make_token):
    drop = await to_live(http, creator)
    other = bearer(make_token("creator-2", Role.CREATOR))
    for method, path, body in WRITES[1:]:
        resp = await _call(http, method, path.format(id=drop["id"]), body, other)
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json()["error"]["code"] == "not_drop_owner"
    assert (await http.get(f"/v1/drops/{drop['id']}")).json()["version"] == drop["version"]
    # An admin may act on anyone's drop; the transition names the admin.
    admin = bearer(make_token("admin-1", Role.ADMIN))
    ended = await act(http, admin, drop["id"], "end")
    assert ended["state"] == "ended"
    rows = await store.transitions(server.app.state.db, drop["id"])
    assert rows[-1]["actor_id"] == "admin-1"


async def test_unknown_drop_is_404(http, creator):
    resp = await http.post("/v1/drops/4242/live", json={}, headers=creator)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "drop_not_found"


# --- validation --------------------------------------------------------------------------

def _product(**kw):
    return {"title": "P", "price": 100, "units": 1, **kw}


INVALID = [
    ({"products": [_product()]}, "title"),
    ({"title": "  ", "products": [_product()]}, "title"),
    ({"title": "x" * 201, "products": [_product()]}, "title"),
    ({"title": "t"}, "products"),
    ({"title": "t", "products": []}, "products"),
    ({"title": "t", "products": "many"}, "products"),
    ({"title": "t", "products": ["p"]}, "products[0]"),
    ({"title": "t", "products": [_product(price=0)]}, "products[0].price"),
    ({"title": "t", "products": [_product(), _product(price=12.5)]}, "products[1].price"),
    ({"title": "t", "products": [_product(price="100")]}, "products[0].price"),
    ({"title": "t", "products": [_product(units=0)]}, "products[0].units"),
    ({"title": "t", "products": [_product(units=True)]}, "products[0].units"),
    ({"title": "t", "products": [_product(units=2, per_buyer_limit=3)]},
     "products[0].per_buyer_limit"),
    ({"title": "t", "products": [_product(cogs=-1)]}, "products[0].cogs"),
    ({"title": "t", "products": [_product(image_url="javascript:x")]}, "products[0].image_url"),
    ({"title": "t", "products": [_product(colour="red")]}, "products[0].colour"),
    ({"title": "t", "products": [_product(product_id=3)]}, "products[0].product_id"),
    ({"title": "t", "products": [_product()] * 51}, "products"),
    ({"title": "t", "currency": "dollars", "products": [_product()]}, "currency"),
    ({"title": "t", "kind": "auction", "products": [_product()]}, "kind"),
    ({"title": "t", "kind": "campaign", "products": [_product()]}, "campaign"),
    ({"title": "t", "kind": "campaign", "campaign": {"goal_orders": 0, "deadline": later()},
      "products": [_product()]}, "campaign.goal_orders"),
    ({"title": "t", "kind": "campaign", "campaign": {"goal_orders": 5},
      "products": [_product()]}, "campaign.deadline"),
    ({"title": "t", "kind": "campaign",
      "campaign": {"goal_orders": 5, "deadline": "2001-01-01T00:00:00Z"},
      "products": [_product()]}, "campaign.deadline"),
    ({"title": "t", "campaign": {"goal_orders": 5, "deadline": later()},
      "products": [_product()]}, "campaign"),
    ({"title": "t", "starts_at": "tomorrow", "products": [_product()]}, "starts_at"),
    ({"title": "t", "starts_at": "2999-01-01T00:00:00", "products": [_product()]},
     "starts_at"),
    ({"title": "t", "max_holds_per_user": 0, "products": [_product()]}, "max_holds_per_user"),
    ({"title": "t", "state": "live", "products": [_product()]}, "state"),
]


@pytest.mark.parametrize(("body", "name"), INVALID)
async def test_create_validation_names_the_field(http, creator, body, name):
    resp = await http.post("/v1/drops", json=body, headers=creator)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "validation_failed"
    assert err["details"]["field"] == name
    assert name.split(".")[-1].split("[")[0] in err["message"]


async def test_action_bodies_are_validated(http, creator):
    drop = await to_live(http, creator)
    url = f"/v1/drops/{drop['id']}"
    cases = [("buy-now", {}, "product_id"), ("buy-now", {"product_id": "1"}, "product_id"),
             ("buy-now", {"product_id": 999999}, "product_id"),
             ("pin", {}, "product_id"), ("pin", {"product_id": 999999}, "product_id"),
             ("end", {"now": True}, "now"), ("close", {"product_id": 0}, "product_id")]
    for action, body, name in cases:
        resp = await http.post(f"{url}/{action}", json=body, headers=creator)
        assert resp.status_code == 422, (action, body, resp.text)
        assert resp.json()["error"]["details"]["field"] == name
    draft = await create(http, creator)
    resp = await http.post(f"/v1/drops/{draft['id']}/schedule",
                           json={"starts_at": "2001-01-01T00:00:00Z"}, headers=creator)
    assert resp.status_code == 422
    assert resp.json()["error"]["message"] == "starts_at must be in the future"
    resp = await http.post(f"{url}/end", content=b"{nope", headers={
        **creator, "content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "malformed_json"
    resp = await http.patch(f"/v1/drops/{draft['id']}", json={"kind": "campaign"},
                            headers=creator)
    assert resp.status_code == 422 and resp.json()["error"]["details"]["field"] == "kind"


# --- concurrency -------------------------------------------------------------------------

async def test_concurrent_buy_now_transitions_once(server, http, creator):
    drop = await to_live(http, creator)
    hoodie, cap = (p["product_id"] for p in drop["products"])
    url = f"/v1/drops/{drop['id']}/buy-now"
    replies = await asyncio.gather(
        http.post(url, json={"product_id": hoodie}, headers=creator),
        http.post(url, json={"product_id": hoodie}, headers=creator),
        http.post(url, json={"product_id": cap}, headers=creator),
        http.post(url, json={"product_id": cap}, headers=creator))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 409, 409, 409]
    for r in replies:
        if r.status_code == 409:
            assert r.json()["error"]["details"]["from"] == "selling"
    rows = await store.transitions(server.app.state.db, drop["id"])
    assert [(r["from_state"], r["to_state"]) for r in rows].count(("live", "selling")) == 1
    events = await history(server.app.state.redis, drop["id"])
    assert [e for e, _ in events].count("drop.buy_now") == 1
    winner = next(r for r in replies if r.status_code == 200).json()["selling_product_id"]
    states = {p["product_id"]: p["state"] for p in
              (await http.get(f"/v1/drops/{drop['id']}")).json()["products"]}
    assert states[winner] == "selling"
    assert list(states.values()).count("pending") == 1


async def test_mark_sold_out_is_idempotent_under_concurrency(server, http, creator):
    redis = server.app.state.redis
    drop = await to_live(http, creator)
    hoodie, cap = (p["product_id"] for p in drop["products"])
    await act(http, creator, drop["id"], "buy-now", {"product_id": hoodie})
    # Units left: a stale report changes nothing.
    assert await actions.mark_sold_out(server.app, redis, drop["id"], hoodie) is False
    # Not the product under BUY NOW: ignored.
    assert await actions.mark_sold_out(server.app.state.db, redis, drop["id"], cap) is False
    await sell_out(redis, drop["id"], hoodie)
    results = await asyncio.gather(*[
        actions.mark_sold_out(server.app, redis, drop["id"], hoodie) for _ in range(10)])
    assert results.count(True) == 1
    events = await history(redis, drop["id"])
    assert [e for e, _ in events].count("drop.sold_out") == 1
    assert (await http.get(f"/v1/drops/{drop['id']}")).json()["state"] == "sold_out"


async def test_back_in_stock_reopens_the_same_product(server, http, creator):
    redis = server.app.state.redis
    drop = await to_live(http, creator)
    hoodie = drop["products"][0]["product_id"]
    await act(http, creator, drop["id"], "buy-now", {"product_id": hoodie})
    assert await actions.mark_back_in_stock(server.app, redis, drop["id"], hoodie) is False
    await sell_out(redis, drop["id"], hoodie)
    assert await actions.mark_sold_out(server.app, redis, drop["id"], hoodie) is True
    assert await actions.mark_back_in_stock(server.app, redis, drop["id"], hoodie) is False
    await redis.hset(keys.product(drop["id"], hoodie), "remaining", 1)   # a hold expired
    results = await asyncio.gather(*[
        actions.mark_back_in_stock(server.app, redis, drop["id"], hoodie) for _ in range(5)])
    assert results.count(True) == 1
    body = (await http.get(f"/v1/drops/{drop['id']}")).json()
    assert body["state"] == "selling" and body["products"][0]["state"] == "selling"
    events = await history(redis, drop["id"])
    assert events[-2:] == [
        ("drop.state", {"state": "selling", "previous": "sold_out", "product_id": hoodie,
                        "version": body["version"]}),
        ("drop.buy_now", {"product_id": hoodie, "price": 4500, "currency": "usd",
                          "remaining": 1})]


async def test_mark_settled_after_the_end_only(server, http, creator):
    redis = server.app.state.redis
    drop = await to_live(http, creator)
    with pytest.raises(IllegalTransition) as info:
        await actions.mark_settled(server.app, redis, drop["id"])
    assert info.value.details["from"] == "live"
    await act(http, creator, drop["id"], "end")
    results = await asyncio.gather(*[actions.mark_settled(server.app, redis, drop["id"])
                                     for _ in range(3)])
    assert sorted(results) == [False, False, True]
    assert (await http.get(f"/v1/drops/{drop['id']}")).json()["state"] == "settled"
    events = await history(redis, drop["id"])
    assert [d["state"] for e, d in events if e == "drop.state"].count("settled") == 1
    assert events[-1][0] == "drop.state" and events[-1][1]["previous"] == "ended"
