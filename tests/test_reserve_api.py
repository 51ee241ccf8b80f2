"""The buy path through the real app: POST /v1/drops/{id}/buy, holds, the WS command
handlers, sold-out and stock notifications, the verifier hook."""

from __future__ import annotations

import asyncio
import gc
import warnings
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import msgpack
import pytest

from checkout import inventory
from checkout.defense import RejectAll
from dropserver.auth import Principal, Role
from dropserver.errors import ApiError
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


async def selling_drop(http, creator, units=2, limit=1, **extra):
    body = {"title": "Friday drop", "products": [
        {"title": "Hoodie", "price": 4500, "units": units, "per_buyer_limit": limit}],
        **extra}
    resp = await http.post("/v1/drops", json=body, headers=creator)
    assert resp.status_code == 201, resp.text
    drop = resp.json()
    starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
    for action, payload in (("schedule", {"starts_at": starts}), ("live", {}),
                            ("buy-now", {"product_id": drop["products"][0]["product_id"]})):
        resp = await http.post(f"/v1/drops/{drop['id']}/{action}", json=payload,
                               headers=creator)
        assert resp.status_code == 200, resp.text
    return drop["id"], drop["products"][0]["product_id"]


async def post_buy(http, drop_id, headers, product_id, key="k1", **body):
    return await http.post(f"/v1/drops/{drop_id}/buy", headers={**headers,
                           "Idempotency-Key": key}, json={"product_id": product_id, **body})


async def test_http_buy_holds_and_retry_returns_the_first_result(server, http, creator, buyer):
    drop_id, pid = await selling_drop(http, creator)
    resp = await post_buy(http, drop_id, buyer(), pid)
    assert resp.status_code == 201, resp.text
    hold = resp.json()
    assert hold["buyer_number"] == 1 and hold["remaining"] == 1
    assert hold["amount"] == 4500 and hold["currency"] == "usd" and hold["state"] == "held"
    assert resp.headers["location"] == f"/v1/holds/{hold['hold_id']}"
    again = await post_buy(http, drop_id, buyer(), pid)
    assert again.status_code == 200
    assert again.json()["hold_id"] == hold["hold_id"] and again.json()["replay"] is True
    assert await inventory.remaining(server.app.state.redis, drop_id) == {pid: 1}
    # The key may also come in the body.
    resp = await http.post(f"/v1/drops/{drop_id}/buy", headers=buyer("buyer-2"),
                           json={"product_id": pid, "idempotency_key": "body-key"})
    assert resp.status_code == 201 and resp.json()["buyer_number"] == 2


async def test_http_buy_errors(server, http, creator, buyer):
    drop_id, pid = await selling_drop(http, creator, units=2, limit=2)
    resp = await http.post(f"/v1/drops/{drop_id}/buy", json={"product_id": pid,
                                                             "idempotency_key": "k"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "token_missing"
    resp = await http.post(f"/v1/drops/{drop_id}/buy", headers=buyer(), json={"product_id": pid})
    assert resp.status_code == 422 and resp.json()["error"]["details"]["field"] == \
        "idempotency_key"
    resp = await post_buy(http, drop_id, buyer(), "seven")
    assert resp.status_code == 422
    resp = await post_buy(http, drop_id, buyer(), pid, quantity=0)
    assert resp.status_code == 422
    assert (await post_buy(http, drop_id, buyer(), pid)).status_code == 201
    resp = await post_buy(http, drop_id, buyer(), pid, key="k2")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "hold_exists"
    assert (await post_buy(http, drop_id, buyer("buyer-2"), pid)).status_code == 201
    resp = await post_buy(http, drop_id, buyer("buyer-3"), pid)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "sold_out"
    resp = await post_buy(http, drop_id, buyer(), 999_999)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "not_selling"
    # A drop that does not exist (or is not live) is not selling.
    resp = await post_buy(http, 4242, buyer(), pid)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "not_selling"


async def test_sell_out_marks_the_drop_sold_out_and_publishes_stock(server, http, creator,
                                                                    buyer):
    redis = server.app.state.redis
    drop_id, pid = await selling_drop(http, creator, units=1)
    pubsub = await listen(redis, channels.drop_channel(drop_id),
                          channels.user_channel("buyer-1"))
    try:
        assert (await post_buy(http, drop_id, buyer(), pid)).status_code == 201
        state = None
        for _ in range(100):
            state = (await http.get(f"/v1/drops/{drop_id}", headers=creator)).json()["state"]
            if state == "sold_out":
                break
            await asyncio.sleep(0.05)
        assert state == "sold_out"
        seen = []
        for _ in range(50):
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if msg:
                seen.append(msg["data"])
            if any(b"order.held" in m for m in seen) and any(b"stock" in m for m in seen):
                break
        assert any(m.startswith(b"U") and b"order.held" in m for m in seen)
        assert any(m.startswith(b"V") and b"stock" in m for m in seen)
    finally:
        await pubsub.aclose()


def test_a_state_update_cancelled_before_it_starts_leaves_no_coroutine_unawaited() -> None:
    """A sold-out (or back-in-stock) report runs in a task of its own; the loop's end
    (a server shutting down) cancels one made in its last turn before it ran. Its
    transition is made inside that task: a coroutine made by the caller and handed to
    the task was left behind ("coroutine 'mark_sold_out' was never awaited")."""
    from checkout.reservations_api import Notifier

    async def report_in_the_last_turn() -> None:
        notifier = Notifier(SimpleNamespace(state=SimpleNamespace()), None, 10, pipe=None)
        loop = asyncio.get_running_loop()
        # run in the turn that also stops the loop (this coroutine's end): the tasks
        # they spawn get no step before asyncio.run cancels every task left
        loop.call_soon(notifier.sold_out, 1, 2)
        loop.call_soon(notifier.back_in_stock, 1, 2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(report_in_the_last_turn())
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


async def test_get_and_cancel_own_hold(server, http, creator, buyer):
    drop_id, pid = await selling_drop(http, creator, units=1)
    hold = (await post_buy(http, drop_id, buyer(), pid)).json()
    url = f"/v1/holds/{hold['hold_id']}"
    got = await http.get(url, headers=buyer())
    assert got.status_code == 200 and got.json()["state"] == "held"
    assert got.json()["buyer_number"] == 1
    assert (await http.get(url, headers=buyer("someone-else"))).status_code == 404
    assert (await http.get("/v1/holds/nope", headers=buyer())).status_code == 404
    assert (await http.delete(url, headers=buyer("someone-else"))).status_code == 404
    resp = await http.delete(url, headers=buyer())
    assert resp.status_code == 200 and resp.json() == {
        "hold_id": hold["hold_id"], "state": "cancelled", "remaining": 1}
    resp = await http.delete(url, headers=buyer())
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "hold_not_active"
    assert (await http.get(url, headers=buyer())).json()["state"] == "cancelled"
    # Back in stock: the drops package moves sold_out -> selling; someone else buys.
    resp = await post_buy(http, drop_id, buyer("buyer-2"), pid)
    assert resp.status_code == 201 and resp.json()["buyer_number"] == 2


async def test_ws_command_handlers(server, http, creator):
    app = server.app
    drop_id, pid = await selling_drop(http, creator, units=3, limit=2)
    assert set(app.state.commands) >= {"buy", "cancel_hold"}
    ctx = SimpleNamespace(principal=Principal("ws-buyer", Role.VIEWER), drop_id=drop_id,
                          ip="127.0.0.9", conn_id="c1")
    reply = await app.state.commands["buy"](app, ctx, {"product_id": pid,
                                                       "idempotency_key": "w1"})
    assert reply["buyer_number"] == 1 and reply["remaining"] == 2
    assert {"hold_id", "buyer_number", "expires_at", "amount", "currency",
            "remaining"} <= set(reply)
    guest = SimpleNamespace(principal=Principal(None, None), drop_id=drop_id, ip="",
                            conn_id="c2")
    with pytest.raises(ApiError) as err:
        await app.state.commands["buy"](app, guest, {"product_id": pid,
                                                     "idempotency_key": "g"})
    assert err.value.code == "token_missing"
    with pytest.raises(ApiError) as err:
        await app.state.commands["buy"](app, ctx, {"product_id": pid, "idempotency_key": "w2"})
    assert err.value.code == "hold_exists"
    out = await app.state.commands["cancel_hold"](app, ctx, {"hold_id": reply["hold_id"]})
    assert out["state"] == "cancelled" and out["remaining"] == 3


async def test_order_held_leaves_with_the_reply_and_reaches_the_other_sockets(
        server, http, creator, make_token):
    from benchmarks._buyers import buy as ws_buy
    from benchmarks._buyers import open_buyers

    drop_id, pid = await selling_drop(http, creator, units=2)
    token = make_token("two-tabs", Role.VIEWER)
    tab1, tab2 = await open_buyers(f"{server.ws_url}/ws", drop_id, [token, token])
    messages: list = []
    on_message = tab1.on_message

    def record(conn, data):
        messages.append(msgpack.unpackb(data, strict_map_key=False))
        on_message(conn, data)

    tab1.on_message = record
    try:
        frame = await ws_buy(tab1, pid, "k1")
        hold_id = frame["data"]["hold_id"]
        # One message: the reply, then the buyer's order.held (one write, one read).
        [batch] = [m for m in messages if isinstance(m, list)
                   and any(f.get("t") == "reply" for f in m)]
        assert [f["t"] for f in batch] == ["reply", "private"]
        assert batch[1]["event"] == "order.held"
        assert batch[1]["data"]["order_id"] == hold_id
        assert batch[1]["data"]["buyer_number"] == frame["data"]["buyer_number"] == 1
        # The other tab hears it through the user's channel...
        for _ in range(100):
            if tab2.private:
                break
            await asyncio.sleep(0.02)
        assert [(f["event"], f["data"]["order_id"]) for f in tab2.private] == [
            ("order.held", hold_id)]
        # ...and the buying tab does not get it a second time from there.
        await tab2.command("ping", {})  # the publication has been fanned out by now
        await asyncio.sleep(0.1)
        assert [f["data"]["order_id"] for f in tab1.private] == [hold_id]
        # A replay is answered without a second order.held.
        again = await ws_buy(tab1, pid, "k1")
        assert again["data"]["replay"] and len(tab1.private) == 1
    finally:
        tab1.close()
        tab2.close()


async def test_verifier_hook_refuses_with_captcha_required(server, http, creator, buyer):
    drop_id, pid = await selling_drop(http, creator)
    server.app.state.reservations.verifier = RejectAll()
    resp = await post_buy(http, drop_id, buyer(), pid)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "captcha_required"
    assert await inventory.remaining(server.app.state.redis, drop_id) == {pid: 2}


async def test_buy_and_cancel_over_the_real_socket(server, http, creator, make_token):
    from benchmarks._buyers import buy as ws_buy
    from benchmarks._buyers import open_buyers

    drop_id, pid = await selling_drop(http, creator, units=2)
    [b] = await open_buyers(f"{server.ws_url}/ws", drop_id,
                            [make_token("sock-buyer", Role.VIEWER)])
    try:
        bad = await b.command("buy", {"product_id": "x", "idempotency_key": "k"})
        assert bad["t"] == "error" and bad["code"] == "validation_failed"
        frame = await ws_buy(b, pid, "k1")
        assert frame["t"] == "reply" and frame["data"]["buyer_number"] == 1
        hold_id = frame["data"]["hold_id"]
        again = await ws_buy(b, pid, "k1")
        assert again["data"]["hold_id"] == hold_id and again["data"]["replay"]
        refused = await ws_buy(b, pid, "k2")
        assert refused["t"] == "error" and refused["code"] == "limit_reached"
        # The private order.held came with the reply (Buyer.command returns once the
        # message holding the reply has been read whole).
        held = [f for f in b.private if f.get("event") == "order.held"]
        assert held and held[0]["data"]["order_id"] == hold_id
        out = await b.command("cancel_hold", {"hold_id": hold_id})
        assert out["t"] == "reply" and out["data"]["state"] == "cancelled"
        gone = await b.command("cancel_hold", {"hold_id": hold_id})
        assert gone["t"] == "error" and gone["code"] == "hold_not_active"
    finally:
        b.close()


async def test_stock_ids_are_integers_except_in_json(server, http, creator, make_token):
    """docs/protocol.md: only JSON turns the product ids of ``stock`` into strings."""
    from tests.realtime_support import JSON, Client

    drop_id, pid = await selling_drop(http, creator, units=3)
    as_msgpack = await Client.connect(server.ws_url)
    as_json = await Client.connect(server.ws_url, fmt=JSON)
    buyer = await Client.connect(server.ws_url, token=make_token("stock-buyer", Role.VIEWER))
    try:
        for c in (as_msgpack, as_json, buyer):
            assert (await c.join(drop_id))["t"] == "joined"
        reply = await buyer.request({"t": "buy", "product_id": pid, "idempotency_key": "k"})
        assert reply["t"] == "reply", reply
        live = await as_msgpack.recv_until(lambda f: f.get("event") == "stock")
        assert live["data"] == {"products": {pid: 2}}
        text = await as_json.recv_until(lambda f: f.get("event") == "stock")
        assert text["data"] == {"products": {str(pid): 2}}
        # The latest stock a joiner gets with the snapshot, likewise.
        late = await Client.connect(server.ws_url)
        assert (await late.join(drop_id))["stock"] == {"products": {pid: 2}}
        await late.close()
    finally:
        for c in (as_msgpack, as_json, buyer):
            await c.close()
