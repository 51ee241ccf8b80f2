"""Moderators a creator appoints: what they may do in the chat (and not in sales),
pinned messages, the audit, and the cache that keeps PostgreSQL off the chat path."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from realtime.moderators import ModeratorCache
from tests.realtime_support import Client, create_drop


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def _viewer(srv, drop_id, token=None):
    c = await Client.connect(srv.ws_url, token=token)
    joined = await c.join(drop_id)
    assert joined["t"] == "joined", joined
    return c


async def test_a_creator_appoints_and_dismisses_moderators(http, settings, make_token):
    await create_drop(settings.database_url)
    creator = _auth(make_token("creator-1", "creator"))
    url = "/v1/creators/creator-1/moderators"
    first = await http.put(f"{url}/mod-1", headers=creator)
    assert first.status_code == 201, first.text
    assert first.json()["user_id"] == "mod-1" and first.json()["appointed_by"] == "creator-1"
    assert (await http.put(f"{url}/mod-1", headers=creator)).status_code == 200  # idempotent
    listed = (await http.get(url, headers=creator)).json()["moderators"]
    assert [m["user_id"] for m in listed] == ["mod-1"]
    # Another creator, a viewer and the moderator may not appoint for creator-1.
    for who in (make_token("creator-2", "creator"), make_token("alice"),
                make_token("mod-1")):
        resp = await http.put(f"{url}/mod-2", headers=_auth(who))
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_drop_owner"
    assert (await http.put(f"{url}/mod-2")).status_code == 401
    assert (await http.put(f"{url}/creator-1", headers=creator)).status_code == 422
    # An admin may, for them.
    assert (await http.put(f"{url}/mod-2",
                           headers=_auth(make_token("root", "admin")))).status_code == 201
    assert (await http.delete(f"{url}/mod-2", headers=creator)).status_code == 204
    gone = await http.delete(f"{url}/mod-2", headers=creator)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "moderator_not_found"
    assert [m["user_id"] for m in (await http.get(url, headers=creator)).json()[
        "moderators"]] == ["mod-1"]


async def test_a_moderator_moderates_but_a_viewer_cannot(server, http, settings, make_token):
    drop_id, _ = await create_drop(settings.database_url)
    creator = _auth(make_token("creator-1", "creator"))
    assert (await http.put("/v1/creators/creator-1/moderators/mod-1",
                           headers=creator)).status_code == 201
    mod = await _viewer(server, drop_id, make_token("mod-1", name="Mo"))
    fan = await _viewer(server, drop_id, make_token("alice"))
    troll = await _viewer(server, drop_id, make_token("troll"))
    spam = (await troll.request({"t": "chat.send", "text": "spam"}))["data"]["message_id"]
    nice = (await fan.request({"t": "chat.send", "text": "love it"}))["data"]["message_id"]
    # A viewer may do none of it.
    for frame in ({"t": "chat.delete", "message_id": spam}, {"t": "chat.pin", "message_id": nice},
                  {"t": "chat.unpin"}, {"t": "chat.mute", "user_id": "troll"},
                  {"t": "chat.ban", "user_id": "troll"}, {"t": "chat.unban", "user_id": "troll"},
                  {"t": "chat.slow", "seconds": 5}):
        err = await fan.request(frame)
        assert err["t"] == "error" and err["code"] == "forbidden", (frame, err)
    # The moderator may: delete...
    assert (await mod.request({"t": "chat.delete", "message_id": spam}))["t"] == "reply"
    assert (await fan.recv_until(lambda f: f.get("event") == "chat.deleted"))["data"] == {
        "id": spam}
    # ... pin (everyone sees it, and so does a late joiner) ...
    pinned = await mod.request({"t": "chat.pin", "message_id": nice})
    assert pinned["data"]["pinned"] == nice
    event = await fan.recv_until(lambda f: f.get("event") == "chat.pinned")
    assert event["data"]["id"] == nice and event["data"]["text"] == "love it"
    assert event["data"]["pinned_by"] == "mod-1"
    late = await Client.connect(server.ws_url)
    snap = (await late.join(drop_id))["snapshot"]
    assert snap["chat_pinned"]["id"] == nice
    # ... mute and ban (not the creator, nor another moderator) ...
    assert (await mod.request({"t": "chat.mute", "user_id": "troll",
                               "seconds": 60}))["t"] == "reply"
    assert (await troll.request({"t": "chat.send", "text": "x"}))["code"] == "muted"
    assert (await mod.request({"t": "chat.ban", "user_id": "troll"}))["t"] == "reply"
    assert (await troll.request({"t": "chat.send", "text": "x"}))["code"] == "banned"
    for target in ("creator-1", "mod-1"):
        err = await mod.request({"t": "chat.ban", "user_id": target})
        assert err["code"] == "target_is_staff", err
    assert (await mod.request({"t": "chat.unban", "user_id": "troll"}))["data"]["lifted"] == 2
    # ... set slow mode, which a moderator's own messages skip; and the moderator's
    # messages say so (a big room's sampling always delivers them).
    assert (await mod.request({"t": "chat.slow", "seconds": 30}))["t"] == "reply"
    for text in ("rules: be nice", "second"):
        assert (await mod.request({"t": "chat.send", "text": text}))["t"] == "reply"
    said = await fan.recv_until(lambda f: f.get("event") == "chat.message"
                                and f["data"]["text"] == "second")
    assert said["data"]["role"] == "moderator" and said["data"]["name"] == "Mo"
    # Deleting the pinned message unpins it.
    assert (await mod.request({"t": "chat.delete", "message_id": nice}))["t"] == "reply"
    unpinned = await fan.recv_until(lambda f: f.get("event") == "chat.unpinned")
    assert unpinned["data"] == {"id": nice}
    assert (await late.request({"t": "ping"}))["t"] == "pong"
    again = await Client.connect(server.ws_url)
    assert (await again.join(drop_id))["snapshot"]["chat_pinned"] is None
    # The audit says who did what, when; the creator, the moderators and admins read it.
    audit = await http.get(f"/v1/drops/{drop_id}/moderation", headers=creator)
    assert audit.status_code == 200, audit.text
    actions = audit.json()["actions"]
    assert [a["action"] for a in actions] == [
        "unpin", "delete", "slow", "unban", "ban", "mute", "pin", "delete", "appoint"]
    assert {a["moderator_id"] for a in actions[:-1]} == {"mod-1"}
    assert actions[-1]["moderator_id"] == "creator-1" and actions[-1]["user_id"] == "mod-1"
    assert actions[2]["seconds"] == 30 and actions[5]["expires_at"] is not None
    assert all(a["at"] for a in actions)
    as_mod = await http.get(f"/v1/drops/{drop_id}/moderation",
                            headers=_auth(make_token("mod-1")))
    assert as_mod.status_code == 200
    page = (await http.get(f"/v1/drops/{drop_id}/moderation?limit=3",
                           headers=creator)).json()
    assert len(page["actions"]) == 3 and page["next_before"] == page["actions"][-1]["id"]
    refused = await http.get(f"/v1/drops/{drop_id}/moderation",
                             headers=_auth(make_token("alice")))
    assert refused.status_code == 403
    for c in (mod, fan, troll, late, again):
        await c.close()


async def test_a_moderator_may_not_touch_sales(http, settings, make_token):
    drop_id, pids = await create_drop(settings.database_url)
    creator = _auth(make_token("creator-1", "creator"))
    await http.put("/v1/creators/creator-1/moderators/mod-1", headers=creator)
    await http.put("/v1/creators/creator-1/moderators/mod-2", headers=creator)
    viewer_mod = _auth(make_token("mod-1"))
    creator_mod = _auth(make_token("mod-2", "creator"))  # a creator of other drops
    for method, path, body in (
            ("POST", "buy-now", {"product_id": pids[0]}), ("POST", "close", {}),
            ("POST", "end", {}), ("POST", "pin", {"product_id": pids[0]}),
            ("PATCH", "", {"title": "mine now"}), ("GET", "transitions", None),
            ("POST", "settle", {}), ("GET", "settlement", None),
            ("POST", "tip-amounts", {"amounts": [500]})):
        for headers in (viewer_mod, creator_mod):
            resp = await http.request(method, f"/v1/drops/{drop_id}/{path}".rstrip("/"),
                                      json=body, headers=headers)
            assert resp.status_code == 403, (path, resp.text)
            assert resp.json()["error"]["code"] == "moderator_not_allowed", (path, resp.text)
    # Someone who is no moderator still gets the plain refusal.
    plain = await http.post(f"/v1/drops/{drop_id}/end", json={},
                            headers=_auth(make_token("alice")))
    assert plain.json()["error"]["code"] == "forbidden_role"
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=1) as db:
        assert await db.fetchval("SELECT title FROM drops WHERE id = $1",
                                 drop_id) == "Sneaker drop"


async def test_every_sales_route_answers_a_moderator_moderator_not_allowed(
        http, settings, make_token):
    """Not only the routes under /v1/drops/{id}: a refund of an order or a tip (named by
    its own id), the console's stats, a giveaway, the broadcast (WHIP) and the
    reminder list answer the creator's moderators 403 moderator_not_allowed, and
    change nothing; someone who is not a moderator still gets the plain refusal."""
    from datetime import UTC, datetime, timedelta

    creator = _auth(make_token("creator-1", "creator"))
    resp = await http.post("/v1/drops", headers=creator, json={
        "title": "Sales", "products": [{"title": "Vinyl", "price": 4900, "units": 5}],
        "starts_at": (datetime.now(UTC) + timedelta(minutes=5)).isoformat()})
    assert resp.status_code == 201, resp.text
    drop_id, pid = resp.json()["id"], resp.json()["products"][0]["product_id"]
    for step, body in (("schedule", {}), ("live", {}), ("buy-now", {"product_id": pid}),
                       ("tip-amounts", {"amounts": [500]})):
        r = await http.post(f"/v1/drops/{drop_id}/{step}", headers=creator, json=body)
        assert r.status_code == 200, (step, r.text)
    buyer = _auth(make_token("fan-1"))
    bought = await http.post(f"/v1/drops/{drop_id}/buy", json={"product_id": pid},
                             headers={**buyer, "Idempotency-Key": "b1"})
    assert bought.status_code == 201, bought.text
    order_id = bought.json()["hold_id"]
    tipped = await http.post(f"/v1/drops/{drop_id}/tips", headers=buyer,
                             json={"amount": 500})
    assert tipped.status_code in (200, 201), tipped.text
    tip_id = tipped.json()["tip_id"]
    for mod in ("mod-1", "mod-2"):
        assert (await http.put(f"/v1/creators/creator-1/moderators/{mod}",
                               headers=creator)).status_code == 201
    sdp = {"content": "v=0\r\n", "headers": {"content-type": "application/sdp"}}
    routes = (
        ("POST", f"/v1/orders/{order_id}/refund", {"json": {}}),
        ("POST", f"/v1/tips/{tip_id}/refund", {"json": {}}),
        ("GET", f"/v1/drops/{drop_id}/stats", {}),
        ("POST", f"/v1/drops/{drop_id}/giveaways", {"json": {"prize": "Poster"}}),
        ("POST", f"/v1/drops/{drop_id}/auctions", {"json": {
            "product_id": pid, "start_price": 100, "increment": 100, "duration_s": 30}}),
        ("POST", f"/v1/drops/{drop_id}/stakes", {"json": {
            "investor_id": "inv-1", "amount": 1000}}),
        ("POST", f"/v1/drops/{drop_id}/whip", sdp),
        ("DELETE", f"/v1/drops/{drop_id}/whip/abc", {}),
        ("GET", f"/v1/drops/{drop_id}/reminders", {}),
    )
    viewer_mod = make_token("mod-1")
    creator_mod = make_token("mod-2", "creator")  # a creator of other drops
    for method, path, kw in routes:
        for token in (viewer_mod, creator_mod):
            headers = {**kw.get("headers", {}), **_auth(token)}
            resp = await http.request(method, path, **{**kw, "headers": headers})
            assert resp.status_code == 403, (path, resp.text)
            assert resp.json()["error"]["code"] == "moderator_not_allowed", (path, resp.text)
        plain = await http.request(method, path, **{
            **kw, "headers": {**kw.get("headers", {}), **_auth(make_token("alice"))}})
        assert plain.status_code in (403, 404), (path, plain.text)
        assert plain.json()["error"]["code"] != "moderator_not_allowed", path
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=1) as db:
        assert await db.fetchval("SELECT state FROM orders WHERE public_id = $1",
                                 order_id) in ("held", "payment_pending")  # not refunded
        assert await db.fetchval("SELECT amount_refunded FROM tips WHERE public_id = $1",
                                 tip_id) == 0
        assert await db.fetchval("SELECT count(*) FROM giveaways WHERE drop_id = $1",
                                 drop_id) == 0
        assert await db.fetchval("SELECT count(*) FROM auctions WHERE drop_id = $1",
                                 drop_id) == 0


async def test_dismissed_moderator_loses_the_chat_tools(server, http, settings, make_token):
    drop_id, _ = await create_drop(settings.database_url)
    creator = _auth(make_token("creator-1", "creator"))
    await http.put("/v1/creators/creator-1/moderators/mod-1", headers=creator)
    mod = await _viewer(server, drop_id, make_token("mod-1"))
    assert (await mod.request({"t": "chat.slow", "seconds": 2}))["t"] == "reply"
    assert (await http.delete("/v1/creators/creator-1/moderators/mod-1",
                              headers=creator)).status_code == 204
    # The same socket, at once on this process (the cache was told).
    assert (await mod.request({"t": "chat.slow", "seconds": 0}))["code"] == "forbidden"
    await mod.close()


async def test_the_chat_path_reads_moderators_from_memory(server, http, settings, make_token):
    """A chat message does not read creator_moderators: one read per creator per
    cache period, however many messages."""
    drop_id, _ = await create_drop(settings.database_url)
    await http.put("/v1/creators/creator-1/moderators/mod-1",
                   headers=_auth(make_token("creator-1", "creator")))
    cache: ModeratorCache = server.app.state.moderators
    cache.ttl = 60.0  # the whole test inside one period
    fans = [await _viewer(server, drop_id, make_token(f"fan-{i}")) for i in range(5)]
    await asyncio.gather(*(f.request({"t": "chat.send", "text": "warm"}) for f in fans))
    before = cache.loads
    for _ in range(4):
        replies = await asyncio.gather(*(f.request({"t": "chat.send", "text": "hi"})
                                         for f in fans))
        assert all(r["t"] == "reply" for r in replies), replies
    assert cache.loads == before  # 20 messages, no read
    for f in fans:
        await f.close()


async def test_cache_sees_another_process_appointment_within_its_period(settings):
    """An appointment made elsewhere (another node) reaches this cache when its
    period ends, not before; one read serves concurrent askers."""
    await create_drop(settings.database_url)
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=4) as db:
        cache = ModeratorCache(db, ttl=0.3)
        asked = await asyncio.gather(*(cache.is_moderator("creator-1", "mod-9")
                                       for _ in range(10)))
        assert asked == [False] * 10 and cache.loads == 1
        await db.execute("INSERT INTO creator_moderators (creator_id, user_id, appointed_by) "
                         "VALUES ('creator-1', 'mod-9', 'creator-1')")
        assert await cache.is_moderator("creator-1", "mod-9") is False  # still cached
        await asyncio.sleep(0.35)
        assert await cache.is_moderator("creator-1", "mod-9") is True
        assert await cache.is_moderator(None, "mod-9") is False
        assert await cache.is_moderator("creator-1", None) is False


@pytest.mark.parametrize("frame", [{"t": "chat.pin"}, {"t": "chat.pin", "message_id": 5},
                                   {"t": "chat.unpin", "message_id": "x"}])
async def test_pin_frames_are_validated(server, settings, make_token, frame):
    drop_id, _ = await create_drop(settings.database_url)
    c = await _viewer(server, drop_id, make_token("creator-1", "creator"))
    err = await c.request(frame)
    assert err["code"] == "invalid_field", err
    missing = await c.request({"t": "chat.pin", "message_id": "nope"})
    assert missing["code"] == "message_not_found"
    assert (await c.request({"t": "chat.unpin"}))["data"] == {"unpinned": None}
    await c.close()
