"""Outbound webhooks: the outbox (dropserver/outbound.py), delivery with retries and
replay (outbound_delivery.py) and the HTTP API (outbound_api.py), against a real HTTP
receiver on loopback (tests/webhook_receiver.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from dropserver.auth import Role
from dropserver.outbound import (
    EVENT_TYPES,
    UrlRefused,
    check_url,
    enqueue,
    new_secret,
    signature_headers,
)
from tests.conftest import running
from tests.webhook_receiver import Receiver

FAST = dict(webhook_retry_schedule=("0.05", "0.05"), webhook_poll_interval=0.05,
            webhook_timeout=1.0)


async def _wait(predicate, within: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _auth(make_token, user: str, role: Role = Role.CREATOR) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user, role)}"}


async def _register(http: httpx.AsyncClient, headers, url: str,
                    events=("drop.scheduled", "drop.live")) -> dict:
    r = await http.post("/v1/webhooks/endpoints", headers=headers,
                        json={"url": url, "events": list(events), "description": "crm"})
    assert r.status_code == 201, r.text
    return r.json()


# -- the outbox ------------------------------------------------------------------------

async def test_an_event_commits_or_rolls_back_with_the_change_that_caused_it(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await enqueue(conn, "order.paid", {"order_id": "h1"}, creator_id="c1",
                              key="order.paid:h1")
                raise RuntimeError("the state change failed")
        assert await conn.fetchval("SELECT count(*) FROM outbound_events") == 0
        async with conn.transaction():
            first = await enqueue(conn, "order.paid", {"order_id": "h1"}, creator_id="c1",
                                  key="order.paid:h1")
        again = await enqueue(conn, "order.paid", {"order_id": "h1"}, creator_id="c1",
                              key="order.paid:h1")
        assert first.startswith("msg_") and again is None  # the same fact once
        body = json.loads(await conn.fetchval("SELECT body FROM outbound_events"))
        assert body["id"] == first and body["type"] == "order.paid"
        assert body["data"] == {"order_id": "h1"}
        with pytest.raises(ValueError):
            await enqueue(conn, "order.shipped", {}, creator_id="c1")
    finally:
        await conn.close()


def test_endpoint_urls_are_https_but_for_a_loopback_receiver_in_dev():
    assert check_url("https://hooks.example.com/x", allow_http_loopback=False)
    for url in ("http://hooks.example.com/x", "http://127.0.0.1:9/x",
                "https://10.0.0.5/x", "https://[::1]/x", "https://169.254.169.254/",
                "ftp://example.com/", "https://user:pw@example.com/", "/relative",
                "https://example.com:0/", "https://example.com/#frag"):
        with pytest.raises(UrlRefused):
            check_url(url, allow_http_loopback=False)
    assert check_url("http://127.0.0.1:9/x", allow_http_loopback=True)
    assert check_url("http://localhost:9/x", allow_http_loopback=True)
    with pytest.raises(UrlRefused):  # dev still refuses plain http off the machine
        check_url("http://example.com/x", allow_http_loopback=True)


def test_signatures_verify_with_the_library_and_by_hand():
    secret, old = new_secret(), new_secret()
    body = '{"id":"msg_1","type":"drop.live","timestamp":"2026-12-02T13:00:00Z","data":{}}'
    headers = signature_headers("msg_1", body, [secret, old])
    for s in (secret, old):  # during a rotation both secrets verify
        assert Webhook(s).verify(body, headers)["type"] == "drop.live"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("live", "dead"), headers)
    # the same by hand (docs/topics/webhooks.md): HMAC-SHA256 of "id.timestamp.body"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body}".encode()
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert f"v1,{expected}" in headers["webhook-signature"].split(" ")
    stale = signature_headers("msg_1", body, [secret],
                              at=datetime.now(UTC) - timedelta(minutes=10))
    with pytest.raises(WebhookVerificationError):  # replayed too late
        Webhook(secret).verify(body, stale)


# -- delivery ----------------------------------------------------------------------------

async def _drop(http, headers) -> int:
    r = await http.post("/v1/drops", headers=headers, json={
        "title": "Hooked", "products": [{"title": "Tee", "price": 2500, "units": 5}]})
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def _schedule_and_go_live(http, headers, drop_id: int) -> None:
    starts = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = await http.post(f"/v1/drops/{drop_id}/schedule", headers=headers,
                        json={"starts_at": starts})
    assert r.status_code == 200, r.text
    r = await http.post(f"/v1/drops/{drop_id}/live", headers=headers, json={})
    assert r.status_code == 200, r.text


async def test_drop_events_reach_the_creator_and_the_platform_signed(settings, make_token):
    creator = _auth(make_token, "creator-a")
    async with Receiver() as rx, running(settings, **FAST) as srv, \
            httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
        mine = await _register(http, creator, rx.url + "/mine")
        other = await _register(http, _auth(make_token, "creator-b"), rx.url + "/other")
        platform = await _register(http, _auth(make_token, "admin-1", Role.ADMIN),
                                   rx.url + "/platform", events=["drop.live"])
        assert platform["scope"] == "platform" and mine["scope"] == "creator"
        assert mine["secret"].startswith("whsec_")
        drop_id = await _drop(http, creator)
        await _schedule_and_go_live(http, creator, drop_id)

        async def arrived():
            return len(rx.delivered()) >= 3 or None
        await _wait(arrived, what="three deliveries")
        await asyncio.sleep(0.3)  # nothing more should come
        by_path = {p: [json.loads(r.body) for r in rx.delivered(p)]
                   for p in ("/mine", "/other", "/platform")}
        assert [e["type"] for e in by_path["/mine"]] == ["drop.scheduled", "drop.live"] or \
            sorted(e["type"] for e in by_path["/mine"]) == ["drop.live", "drop.scheduled"]
        assert by_path["/other"] == []  # another creator's drop
        assert [e["type"] for e in by_path["/platform"]] == ["drop.live"]
        live = next(e for e in by_path["/mine"] if e["type"] == "drop.live")
        assert live["data"]["drop_id"] == drop_id and live["data"]["state"] == "live"
        for req in rx.delivered("/mine"):
            assert Webhook(mine["secret"]).verify(req.body, req.headers)
        for req in rx.delivered("/platform"):
            assert Webhook(platform["secret"]).verify(req.body, req.headers)
        assert other["id"] != mine["id"]
        # the delivery log
        r = await http.get(f"/v1/webhooks/endpoints/{mine['id']}/deliveries",
                           headers=creator)
        log = r.json()["deliveries"]
        assert r.status_code == 200 and len(log) == 2
        assert {d["state"] for d in log} == {"delivered"}
        assert all(d["last_status"] == 200 and d["attempts"] == 1 for d in log)


async def test_a_failing_receiver_is_retried_then_failed_then_replayed(settings,
                                                                       make_token):
    creator = _auth(make_token, "creator-a")
    async with Receiver(fail_rate=1.0, modes=("500", "drop")) as rx, \
            running(settings, **FAST) as srv, \
            httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
        ep = await _register(http, creator, rx.url + "/hook", events=["drop.scheduled"])
        drop_id = await _drop(http, creator)
        starts = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        r = await http.post(f"/v1/drops/{drop_id}/schedule", headers=creator,
                            json={"starts_at": starts})
        assert r.status_code == 200
        logs = f"/v1/webhooks/endpoints/{ep['id']}/deliveries"

        async def failed():
            rows = (await http.get(logs + "?state=failed", headers=creator)).json()
            return rows["deliveries"] or None
        [delivery] = await _wait(failed, what="the delivery to fail")
        assert delivery["attempts"] == 3 and delivery["next_attempt_at"] is None
        assert len(rx.requests) == 3  # the first try and the schedule's two retries
        assert len({r.headers["webhook-id"] for r in rx.requests}) == 1  # the same event
        one = (await http.get(f"/v1/webhooks/deliveries/{delivery['id']}",
                              headers=creator)).json()
        assert [a["attempt"] for a in one["attempt_log"]] == [1, 2, 3]
        assert all(a["status"] in (500, None) for a in one["attempt_log"])
        assert one["payload"]["type"] == "drop.scheduled"
        # the receiver is fixed; the creator replays the failed delivery
        rx.fail_rate = 0.0
        r = await http.post(f"/v1/webhooks/deliveries/{delivery['id']}/replay",
                            headers=creator, json={})
        assert r.status_code == 202 and r.json()["replayed"] is True

        async def delivered():
            row = (await http.get(f"/v1/webhooks/deliveries/{delivery['id']}",
                                  headers=creator)).json()
            return row if row["state"] == "delivered" else None
        row = await _wait(delivered, what="the replay")
        assert row["attempts"] == 4 and row["last_status"] == 200
        [ok] = rx.delivered()
        assert Webhook(ep["secret"]).verify(ok.body, ok.headers)["id"] == one["event_id"]


# The poll this long: only a wake-up (NOTIFY, a retry's due time) can send in time.
NO_POLL = dict(webhook_retry_schedule=("1",), webhook_poll_interval=30.0,
               webhook_fallback_poll=30.0, webhook_timeout=1.0)


async def _sent_within(rx: Receiver, count: int, within: float, what: str) -> float:
    started = time.monotonic()

    async def arrived():
        return len(rx.requests) >= count or None
    await _wait(arrived, within=within, what=what)
    return time.monotonic() - started


async def test_deliveries_go_out_when_due_not_at_the_next_poll(settings, make_token):
    """A new event, a retry, a replay and an endpoint enabled each send at once (or at
    the retry's due time) with the poll 30 s apart. Polling every 0.5 s (the dispatcher
    before LISTEN/NOTIFY) they waited for the next poll, here 30 s."""
    creator = _auth(make_token, "creator-a")
    async with Receiver(fail_rate=1.0) as rx, running(settings, **NO_POLL) as srv, \
            httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
        ep = await _register(http, creator, rx.url + "/hook", events=["drop.scheduled"])
        drop_id = await _drop(http, creator)
        await asyncio.sleep(0.5)  # the dispatcher's first round is over: it sleeps
        starts = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        r = await http.post(f"/v1/drops/{drop_id}/schedule", headers=creator,
                            json={"starts_at": starts})
        assert r.status_code == 200
        # a new event: at its commit
        assert await _sent_within(rx, 1, 5, "the first attempt") < 3
        # its retry, 1-1.1 s later (the schedule, with its jitter)
        waited = await _sent_within(rx, 2, 10, "the retry")
        assert 0.5 < waited < 3.5, waited
        logs = f"/v1/webhooks/endpoints/{ep['id']}/deliveries"

        async def failed():
            rows = (await http.get(logs + "?state=failed", headers=creator)).json()
            return rows["deliveries"] or None
        [delivery] = await _wait(failed, within=5, what="the delivery to fail")
        # a replay
        rx.fail_rate = 0.0
        r = await http.post(f"/v1/webhooks/deliveries/{delivery['id']}/replay",
                            headers=creator, json={})
        assert r.status_code == 202
        assert await _sent_within(rx, 3, 5, "the replay") < 3
        # a retry held while its endpoint is disabled goes at once when it is enabled
        rx.fail_rate = 1.0
        drop2 = await _drop(http, creator)
        r = await http.post(f"/v1/drops/{drop2}/schedule", headers=creator,
                            json={"starts_at": starts})
        assert r.status_code == 200
        await _sent_within(rx, 4, 5, "the second event")
        r = await http.patch(f"/v1/webhooks/endpoints/{ep['id']}", headers=creator,
                             json={"enabled": False})
        assert r.status_code == 200
        await asyncio.sleep(2.0)  # its retry fell due meanwhile
        assert len(rx.requests) == 4
        rx.fail_rate = 0.0
        r = await http.patch(f"/v1/webhooks/endpoints/{ep['id']}", headers=creator,
                             json={"enabled": True})
        assert r.status_code == 200
        assert await _sent_within(rx, 5, 5, "the retry held for the endpoint") < 3
        assert [q.answer for q in rx.requests] == ["500", "500", "200", "500", "200"]


async def _listeners(conn: asyncpg.Connection) -> list[int]:
    return [r["pid"] for r in await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND query LIKE 'LISTEN%outbound_webhooks%'")]


async def test_the_dispatcher_listens_again_after_its_connection_is_killed(settings,
                                                                          make_token):
    """The listening connection terminated by PostgreSQL (as in a restart or a
    failover): the dispatcher connects again and a new event goes out at once, still
    with the poll 30 s apart."""
    creator = _auth(make_token, "creator-a")
    admin = await asyncpg.connect(settings.database_url)
    try:
        async with Receiver() as rx, running(settings, **NO_POLL) as srv, \
                httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
            await _register(http, creator, rx.url + "/hook", events=["drop.scheduled"])
            [first] = await _wait(lambda: _listeners(admin), within=5,
                                  what="the dispatcher's LISTEN")
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", first)

            async def again():
                return [p for p in await _listeners(admin) if p != first] or None
            await _wait(again, within=10, what="a new LISTEN connection")
            drop_id = await _drop(http, creator)
            starts = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            r = await http.post(f"/v1/drops/{drop_id}/schedule", headers=creator,
                                json={"starts_at": starts})
            assert r.status_code == 200
            assert await _sent_within(rx, 1, 5, "the event after the reconnect") < 3

        async def closed():  # the server's stop closed it (its backend ends a moment later)
            return await _listeners(admin) == []
        await _wait(closed, within=5, what="the LISTEN connection closed")
    finally:
        await admin.close()


async def test_a_rotated_secret_signs_beside_the_new_one(settings, make_token):
    creator = _auth(make_token, "creator-a")
    async with Receiver() as rx, running(settings, **FAST) as srv, \
            httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
        ep = await _register(http, creator, rx.url + "/hook", events=["drop.scheduled"])
        r = await http.post(f"/v1/webhooks/endpoints/{ep['id']}/rotate-secret",
                            headers=creator, json={"previous_valid_for_s": 3600})
        assert r.status_code == 200
        rotated = r.json()
        assert rotated["secret"] != ep["secret"] and rotated["previous_secret_expires_at"]
        drop_id = await _drop(http, creator)
        starts = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        await http.post(f"/v1/drops/{drop_id}/schedule", headers=creator,
                        json={"starts_at": starts})

        async def arrived():
            return rx.delivered() or None
        [req] = await _wait(arrived)
        for secret in (ep["secret"], rotated["secret"]):
            assert Webhook(secret).verify(req.body, req.headers)
        # rotated again with no overlap: only the newest verifies
        r = await http.post(f"/v1/webhooks/endpoints/{ep['id']}/rotate-secret",
                            headers=creator, json={"previous_valid_for_s": 0})
        newest = r.json()["secret"]
        await http.post(f"/v1/drops/{drop_id}/live", headers=creator, json={})
        await http.patch(f"/v1/webhooks/endpoints/{ep['id']}", headers=creator,
                         json={"events": ["drop.live"]})
        drop2 = await _drop(http, creator)
        await _schedule_and_go_live(http, creator, drop2)

        async def second():
            return len(rx.delivered()) >= 2 or None
        await _wait(second)
        last = rx.delivered()[-1]
        assert Webhook(newest).verify(last.body, last.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(rotated["secret"]).verify(last.body, last.headers)


async def test_endpoints_are_their_owners_and_bad_input_is_refused(settings, make_token,
                                                                   server, http):
    a, b = _auth(make_token, "creator-a"), _auth(make_token, "creator-b")
    viewer = _auth(make_token, "viewer-1", Role.VIEWER)
    ep = await _register(http, a, "http://127.0.0.1:9/hook")
    assert "secret" not in (await http.get(f"/v1/webhooks/endpoints/{ep['id']}",
                                           headers=a)).json()
    for method, path in (("GET", ""), ("PATCH", ""), ("DELETE", ""),
                         ("GET", "/deliveries"), ("POST", "/rotate-secret")):
        r = await http.request(method, f"/v1/webhooks/endpoints/{ep['id']}{path}",
                               headers=b, json={})
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "webhook_endpoint_not_found"
    assert (await http.get("/v1/webhooks/endpoints", headers=b)).json()["endpoints"] == []
    r = await http.post("/v1/webhooks/endpoints", headers=viewer,
                        json={"url": "https://x.example/", "events": ["drop.live"]})
    assert r.status_code == 403
    r = await http.get("/v1/webhooks/endpoints")
    assert r.status_code == 401
    for body, fld in ((
            {"url": "http://example.com/", "events": ["drop.live"]}, "url"),
            ({"url": "https://x.example/", "events": []}, "events"),
            ({"url": "https://x.example/", "events": ["order.shipped"]}, "events[0]"),
            ({"url": "https://x.example/", "events": "drop.live"}, "events"),
            ({"url": "https://x.example/", "events": ["drop.live"], "secret": "x"},
             "secret")):
        r = await http.post("/v1/webhooks/endpoints", headers=a, json=body)
        assert r.status_code == 422, body
        assert r.json()["error"]["details"]["field"] == fld
    r = await http.patch(f"/v1/webhooks/endpoints/{ep['id']}", headers=a,
                         json={"enabled": False, "events": ["order.paid", "order.paid"]})
    assert r.status_code == 200
    assert r.json()["enabled"] is False and r.json()["events"] == ["order.paid"]
    r = await http.get(f"/v1/webhooks/endpoints/{ep['id']}/deliveries?state=lost",
                       headers=a)
    assert r.status_code == 422
    assert (await http.get("/v1/webhooks/deliveries/1", headers=a)).status_code == 404
    assert (await http.delete(f"/v1/webhooks/endpoints/{ep['id']}",
                              headers=a)).status_code == 204
    assert (await http.get(f"/v1/webhooks/endpoints/{ep['id']}",
                           headers=a)).status_code == 404
    assert set(EVENT_TYPES) == {"drop.scheduled", "drop.live", "drop.reminder",
                                "order.paid", "order.refunded", "tip.paid", "payout.sent"}


async def test_order_paid_and_refunded_come_from_the_payments_pipeline(settings,
                                                                       make_token):
    from checkout import inventory
    from checkout.defense import BuyLimits
    from checkout.reserve import BuyRequest, reserve
    from tests.payments_fixtures import make_drop, wait_state

    async with Receiver() as rx, running(settings, **FAST) as srv, \
            httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
        creator = _auth(make_token, "creator-1")
        ep = await _register(http, creator, rx.url + "/orders",
                             events=["order.paid", "order.refunded"])
        db = await asyncpg.connect(settings.database_url)
        try:
            drop_id, product_id = await make_drop(db, creator="creator-1")
            redis = srv.app.state.redis
            await inventory.prewarm(redis, {"id": drop_id, "currency": "usd"},
                                    [{"product_id": product_id, "price": 2500, "units": 3}])
            await inventory.open_sales(redis, drop_id, product_id)
            hold = await reserve(redis, BuyRequest(drop_id, product_id, "buyer-1", "k1",
                                                   flow="client_confirm"),
                                 hold_ttl_ms=60_000, limits=BuyLimits())
            await wait_state(db, hold.hold_id, "payment_pending")
            buyer = _auth(make_token, "buyer-1", Role.VIEWER)
            r = await http.post(f"/v1/dev/orders/{hold.hold_id}/confirm", json={},
                                headers=buyer)
            assert r.status_code == 200 and r.json()["state"] == "paid"
            r = await http.post(f"/v1/orders/{hold.hold_id}/refund", json={},
                                headers=creator)
            assert r.status_code == 200, r.text

            async def both():
                return len(rx.delivered()) >= 2 or None
            await _wait(both)
            await asyncio.sleep(0.3)
            events = [Webhook(ep["secret"]).verify(q.body, q.headers)
                      for q in rx.delivered()]
            assert sorted(e["type"] for e in events) == ["order.paid", "order.refunded"]
            paid = next(e for e in events if e["type"] == "order.paid")["data"]
            assert paid == {"order_id": hold.hold_id, "drop_id": drop_id,
                            "product_id": product_id, "buyer_id": "buyer-1",
                            "quantity": 1, "amount": 2500, "currency": "usd"}
            refunded = next(e for e in events if e["type"] == "order.refunded")["data"]
            assert refunded["amount_refunded"] == 2500
            # one event per fact, however many paths saw it
            assert await db.fetchval("SELECT count(*) FROM outbound_events") == 2
        finally:
            await db.close()


def _python_blocks(page: str, after: str) -> str:
    text = page[page.index(after):]
    start = text.index("```python\n") + len("```python\n")
    return text[start:text.index("```", start)]


async def test_the_documented_verification_recipes_run_as_written(settings, make_token):
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "topics" / "webhooks.md").read_text()
    library = _python_blocks(page, "With the Standard Webhooks library")
    by_hand = _python_blocks(page, "By hand, with nothing but the standard library")
    creator = _auth(make_token, "creator-a")
    async with Receiver() as rx, running(settings, **FAST) as srv, \
            httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
        ep = await _register(http, creator, rx.url + "/hook", events=["drop.scheduled"])
        drop_id = await _drop(http, creator)
        starts = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        await http.post(f"/v1/drops/{drop_id}/schedule", headers=creator,
                        json={"starts_at": starts})

        async def arrived():
            return rx.delivered() or None
        [req] = await _wait(arrived)
    for recipe in (library, by_hand):
        scope = {"secret": ep["secret"], "headers": dict(req.headers), "body": req.body}
        exec(compile(recipe, "docs/topics/webhooks.md", "exec"), scope)
        assert scope["event"]["type"] == "drop.scheduled"
        assert scope["event"]["data"]["drop_id"] == drop_id
        tampered = {**scope, "body": req.body.replace(b"scheduled", b"cancelled")}
        with pytest.raises((ValueError, WebhookVerificationError)):
            exec(compile(recipe, "docs/topics/webhooks.md", "exec"), tampered)


async def test_the_log_forgets_ended_deliveries_after_the_retention(settings):
    from dropserver.db import create_pool
    from dropserver.outbound_delivery import Dispatcher

    db = await create_pool(settings.database_url)
    try:
        endpoint = await db.fetchval(
            "INSERT INTO webhook_endpoints (owner_id, scope, url, events, secret) "
            "VALUES ('c1', 'creator', 'https://x.example/', '{order.paid}', 's') "
            "RETURNING id")
        ids = []
        for n in range(3):
            ids.append(await enqueue(db, "order.paid", {"n": n}, creator_id="c1"))
        d = Dispatcher(db, schedule=[1], timeout=1, concurrency=1, poll_interval=1,
                       retention_days=30)
        assert await d.fan_out() == 3
        await db.execute("UPDATE outbound_events SET created_at = now() - interval '31 days'"
                         " WHERE id = ANY($1::text[])", ids[:2])
        await db.execute("UPDATE webhook_deliveries SET state = 'delivered' "
                         "WHERE event_id = $1", ids[0])
        # old and ended: gone; old but pending: kept; recent: kept
        assert await d.prune() == 1
        left = {r["id"] for r in await db.fetch("SELECT id FROM outbound_events")}
        assert left == {ids[1], ids[2]}
        assert await db.fetchval("SELECT count(*) FROM webhook_deliveries "
                                 "WHERE endpoint_id = $1", endpoint) == 2
    finally:
        await db.close()
