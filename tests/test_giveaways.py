"""Giveaways through the real app: open, enter (socket and HTTP), eligibility, the
window, the draw once under concurrent closers, the prize order, the audit."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from drops import giveaway, giveaway_store
from dropserver.auth import Role
from realtime import channels
from tests import invariants
from tests.conftest import only_single_redis
from tests.realtime_support import Client
from tests.test_reserve_api import CREATOR, bearer


@pytest.fixture
def creator(make_token):
    return bearer(make_token(CREATOR, Role.CREATOR))


async def live_drop(http, creator, *, units=10, limit=1, buy_now=False):
    body = {"title": "Giveaway night", "products": [
        {"title": "Cap", "price": 2500, "units": units, "per_buyer_limit": limit}]}
    resp = await http.post("/v1/drops", json=body, headers=creator)
    assert resp.status_code == 201, resp.text
    drop = resp.json()
    pid = drop["products"][0]["product_id"]
    starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
    steps = [("schedule", {"starts_at": starts}), ("live", {})]
    if buy_now:
        steps.append(("buy-now", {"product_id": pid}))
    for action, payload in steps:
        resp = await http.post(f"/v1/drops/{drop['id']}/{action}", json=payload,
                               headers=creator)
        assert resp.status_code == 200, resp.text
    return drop["id"], pid


async def open_gw(http, creator, drop_id, **body):
    resp = await http.post(f"/v1/drops/{drop_id}/giveaways", headers=creator,
                           json={"winners": 1, "duration_s": 60, **body})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def viewer(server, make_token, drop_id, sub, name=""):
    c = await Client.connect(server.ws_url, token=make_token(sub, Role.VIEWER, name=name))
    joined = await c.join(drop_id)
    assert joined["t"] == "joined", joined
    return c


async def enter_ws(c, giveaway_id):
    return await c.request({"t": "giveaway.enter", "giveaway_id": giveaway_id})


async def enter_all(clients, gw) -> None:
    """Every client enters at once, each entry accepted. The clients are connected and
    joined before the giveaway opens: connecting them one by one inside a 2 s window
    outlasted it on a loaded machine, and the late ones were (rightly) refused."""
    replies = await asyncio.gather(*[enter_ws(c, gw["id"]) for c in clients])
    assert all(r.get("t") == "reply" and r["data"]["new"] is True for r in replies), replies


async def past_window(r, gw) -> None:
    """Until Redis' clock is past the giveaway's window."""
    left = gw["closes_at"] - await giveaway_store.redis_now_ms(r)
    await asyncio.sleep(max(0, left) / 1000 + 0.01)
    assert await giveaway_store.redis_now_ms(r) >= gw["closes_at"]


async def wait_drawn(http, drop_id, giveaway_id, within=15.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        body = (await http.get(f"/v1/drops/{drop_id}/giveaways/{giveaway_id}")).json()
        if body["state"] == "drawn":
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"giveaway {giveaway_id} not drawn within {within} s: {body}")


async def test_open_publishes_the_commitment_and_entry_is_one_frame(server, http, creator,
                                                                     make_token):
    drop_id, pid = await live_drop(http, creator)
    watcher = await viewer(server, make_token, drop_id, "v-watch")
    body = await open_gw(http, creator, drop_id, product_id=pid, winners=2)
    assert body["state"] == "open" and body["prize"] == "Cap" and body["seed"] is None
    assert len(body["commitment"]) == 64 and body["entries"] == 0
    assert body["closes_at"] - body["opened_at"] == 60_000
    opened = await watcher.recv_until(lambda f: f.get("event") == "giveaway.opened")
    assert opened["t"] == "event" and "pos" in opened
    assert opened["data"]["commitment"] == body["commitment"]
    assert opened["data"]["giveaway_id"] == body["id"]
    assert opened["data"]["closes_at"] == body["closes_at"]
    # The seed stays secret until the draw, in the API and in the events.
    assert "seed" not in opened["data"]

    reply = await enter_ws(watcher, body["id"])
    assert reply["t"] == "reply", reply
    assert reply["data"] == {"giveaway_id": body["id"], "entered": True, "new": True,
                             "entries": 1}
    count = await watcher.recv_until(lambda f: f.get("event") == "giveaway.entries")
    assert count["t"] == "volatile"
    assert count["data"] == {"giveaway_id": body["id"], "entries": 1}
    again = await enter_ws(watcher, body["id"])
    assert again["data"]["new"] is False and again["data"]["entries"] == 1
    listed = (await http.get(f"/v1/drops/{drop_id}/giveaways")).json()["giveaways"]
    assert [g["id"] for g in listed] == [body["id"]] and listed[0]["entries"] == 1
    # One open giveaway per drop.
    resp = await http.post(f"/v1/drops/{drop_id}/giveaways", headers=creator,
                           json={"prize": "A signed poster"})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "giveaway_open"
    await watcher.close()


async def test_open_input_and_authority(server, http, creator, make_token):
    drop_id, pid = await live_drop(http, creator)
    url = f"/v1/drops/{drop_id}/giveaways"
    cases = [
        ({}, 422, "validation_failed"),
        ({"prize": "   "}, 422, "validation_failed"),
        ({"prize": "x", "winners": 0}, 422, "validation_failed"),
        ({"prize": "x", "duration_s": 1}, 422, "validation_failed"),
        ({"prize": "x", "surprise": 1}, 422, "validation_failed"),
        ({"product_id": pid + 1000}, 422, "validation_failed"),
    ]
    for payload, status, code in cases:
        resp = await http.post(url, headers=creator, json=payload)
        assert resp.status_code == status, (payload, resp.text)
        assert resp.json()["error"]["code"] == code
    other = bearer(make_token("creator-2", Role.CREATOR))
    resp = await http.post(url, headers=other, json={"prize": "x"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_drop_owner"
    resp = await http.post(url, headers=bearer(make_token("v1")), json={"prize": "x"})
    assert resp.status_code == 403
    resp = await http.post(url, json={"prize": "x"})
    assert resp.status_code == 401
    resp = await http.get(f"{url}/999")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "giveaway_not_found"


async def test_ineligible_entries_are_refused_with_their_codes(server, http, creator,
                                                               make_token):
    drop_id, _ = await live_drop(http, creator, buy_now=True)
    gw = await open_gw(http, creator, drop_id, prize="Backstage pass")
    url = f"/v1/drops/{drop_id}/giveaways/{gw['id']}/entries"
    # Not present: no socket joined to the drop.
    resp = await http.post(url, headers=bearer(make_token("v-away")), json={})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_present"
    # Present over HTTP: this process holds the viewer's socket in the drop.
    c = await viewer(server, make_token, drop_id, "v-here")
    resp = await http.post(url, headers=bearer(make_token("v-here")), json={})
    assert resp.status_code == 201 and resp.json()["entries"] == 1, resp.text
    resp = await http.post(url, headers=bearer(make_token("v-here")))  # no body: fine
    assert resp.status_code == 200 and resp.json()["new"] is False, resp.text
    # A guest, the creator (socket and HTTP), an admin.
    resp = await http.post(url, json={})
    assert resp.status_code == 401
    staff = await Client.connect(server.ws_url, token=make_token(CREATOR, Role.CREATOR))
    await staff.join(drop_id)
    reply = await enter_ws(staff, gw["id"])
    assert reply["t"] == "error" and reply["code"] == "not_eligible", reply
    admin = await Client.connect(server.ws_url, token=make_token("root", Role.ADMIN))
    await admin.join(drop_id)
    reply = await enter_ws(admin, gw["id"])
    assert reply["t"] == "error" and reply["code"] == "not_eligible", reply
    # A giveaway of another drop, a bad id, unknown fields.
    reply = await enter_ws(c, gw["id"] + 1)
    assert reply["t"] == "error" and reply["code"] == "giveaway_not_found"
    reply = await c.request({"t": "giveaway.enter", "giveaway_id": "x"})
    assert reply["t"] == "error" and reply["code"] == "validation_failed"
    reply = await c.request({"t": "giveaway.enter", "giveaway_id": gw["id"], "x": 1})
    assert reply["t"] == "error" and reply["code"] == "validation_failed"
    # The socket still works.
    assert (await enter_ws(c, gw["id"]))["data"]["new"] is False
    for client in (c, staff, admin):
        await client.close()


async def test_buyers_only_and_not_present_required(server, http, creator, make_token):
    drop_id, pid = await live_drop(http, creator, buy_now=True)
    gw = await open_gw(http, creator, drop_id, prize="Sticker pack",
                       must_have_bought=True, must_be_present=False)
    url = f"/v1/drops/{drop_id}/giveaways/{gw['id']}/entries"
    buyer = bearer(make_token("v-buyer"))
    resp = await http.post(url, headers=buyer, json={})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_a_buyer"
    resp = await http.post(f"/v1/drops/{drop_id}/buy", json={"product_id": pid},
                           headers={**buyer, "Idempotency-Key": "b1"})
    assert resp.status_code == 201, resp.text
    resp = await http.post(url, headers=buyer, json={})  # no socket: presence not asked
    assert resp.status_code == 201, resp.text


async def test_no_entry_after_the_window_and_the_draw_is_reproducible(
        server, http, creator, make_token):
    drop_id, pid = await live_drop(http, creator, units=5)
    clients = [await viewer(server, make_token, drop_id, f"v{i}", name=f"Viewer {i}")
               for i in range(6)]
    gw = await open_gw(http, creator, drop_id, product_id=pid, winners=2, duration_s=2)
    await enter_all(clients, gw)
    r = server.app.state.redis
    # Past closes_at by Redis' clock, before or after any closer ran: refused.
    await past_window(r, gw)
    late = await Client.connect(server.ws_url, token=make_token("v-late", Role.VIEWER))
    await late.join(drop_id)
    reply = await enter_ws(late, gw["id"])
    assert reply["t"] == "error" and reply["code"] == "giveaway_closed", reply
    assert reply["details"]["closes_at"] == gw["closes_at"]

    drawn_frame = await clients[0].recv_until(
        lambda f: f.get("event") == "giveaway.drawn", wait=15)
    body = await wait_drawn(http, drop_id, gw["id"])
    data = drawn_frame["data"]
    assert data["seed"] == body["seed"] and data["entrants"] == 6 == body["entries"]
    assert hashlib.sha256(bytes.fromhex(data["seed"])).hexdigest() == gw["commitment"]
    listed = (await http.get(f"/v1/drops/{drop_id}/giveaways/{gw['id']}/entrants")).json()
    assert listed["tickets"] == sorted(listed["tickets"]) and len(listed["tickets"]) == 6
    seed = bytes.fromhex(data["seed"])
    mine = {giveaway.ticket(seed, f"v{i}"): f"v{i}" for i in range(6)}
    assert set(listed["tickets"]) == set(mine)
    expected = giveaway.draw(seed, listed["tickets"], 2)
    assert [w["ticket"] for w in data["winners"]] == expected
    assert [w["ticket"] for w in body["results"]] == expected
    assert [w["name"] for w in data["winners"]] == [
        f"Viewer {mine[t][1:]}" for t in expected]

    # Each winner hears giveaway.won with a zero-price order, then order.paid.
    db = server.app.state.db
    for rank, t in enumerate(expected, 1):
        c = clients[int(mine[t][1:])]
        won = await c.recv_until(lambda f: f.get("event") == "giveaway.won", wait=10)
        assert won["t"] == "private" and won["data"]["rank"] == rank
        assert won["data"]["order_id"] and won["data"]["prize_error"] is None
        paid = await c.recv_until(lambda f: f.get("event") == "order.paid", wait=15)
        assert paid["data"]["order_id"] == won["data"]["order_id"]
        assert paid["data"]["amount"] == 0
        row = await db.fetchrow("SELECT state, amount, user_id FROM orders "
                                "WHERE public_id = $1", won["data"]["order_id"])
        assert dict(row) == {"state": "paid", "amount": 0, "user_id": mine[t]}
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    await invariants.quiesce(r, drop_id)
    assert await invariants.violations(db, r, drop_id) == []
    remaining = (await http.get(f"/v1/drops/{drop_id}")).json()["products"][0]["remaining"]
    assert remaining == 3
    for c in [*clients, late]:
        await c.close()


async def test_the_draw_happens_once_under_concurrent_closers(server, http, creator,
                                                              make_token, clean_backends):
    drop_id, _ = await live_drop(http, creator)
    # The server's own closer is stopped: only the contenders below may draw.
    gw_state = server.app.state.giveaways
    await gw_state.closer.stop()
    clients = [await viewer(server, make_token, drop_id, f"v{i}") for i in range(8)]
    gw = await open_gw(http, creator, drop_id, prize="Poster", winners=3, duration_s=2)
    await enter_all(clients, gw)
    r = server.app.state.redis
    await past_window(r, gw)
    pools = [await asyncpg.create_pool(clean_backends.database_url, min_size=1, max_size=2)
             for _ in range(6)]
    try:
        draws = await asyncio.gather(*[giveaway_store.close_and_draw(p, r, gw["id"])
                                       for p in pools])
        assert sum(d is not None for d in draws) == 1, draws
        published: list[tuple] = []

        async def publish(drop, event, data):
            published.append((drop, event, data))

        async def tell(user, event, data):
            published.append((user, event, data))

        announced = await asyncio.gather(*[giveaway_store.announce(
            p, r, gw["id"], publish=publish, tell=tell) for p in pools])
        assert sum(announced) == 1
        events = [e for _, e, _ in published]
        assert events.count("giveaway.drawn") == 1 and events.count("giveaway.won") == 3
        # Later rounds of the server's closer change nothing.
        await gw_state.close_due()
        drawn = await wait_drawn(http, drop_id, gw["id"])
        winner_rows = await server.app.state.db.fetch(
            "SELECT ticket FROM giveaway_winners WHERE giveaway_id = $1 ORDER BY rank",
            gw["id"])
        assert [w["ticket"] for w in drawn["results"]] == [w["ticket"] for w in winner_rows]
        assert len(winner_rows) == 3
    finally:
        for p in pools:
            await p.close()
        for c in clients:
            await c.close()


async def test_audit_recomputes_winners_from_postgresql(server, http, creator, make_token):
    drop_id, _ = await live_drop(http, creator)
    clients = [await viewer(server, make_token, drop_id, f"v{i}") for i in range(5)]
    gw = await open_gw(http, creator, drop_id, prize="Tote", winners=2, duration_s=2)
    await enter_all(clients, gw)
    body = await wait_drawn(http, drop_id, gw["id"])
    report = await giveaway_store.audit(server.app.state.db, gw["id"])
    assert report.ok, report
    assert report.winners == [w["ticket"] for w in body["results"]]
    for c in clients:
        await c.close()


def _docs_script() -> str:
    """The verification script of docs/topics/giveaways.md, exactly as published."""
    page = (Path(__file__).parents[1] / "docs" / "topics" / "giveaways.md").read_text()
    section = page.split("## Verify a draw yourself", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_documented_script_verifies_a_real_draw(server, http, creator,
                                                          make_token, tmp_path):
    drop_id, pid = await live_drop(http, creator)
    clients = [await viewer(server, make_token, drop_id, f"fan-{i}") for i in range(7)]
    gw = await open_gw(http, creator, drop_id, product_id=pid, winners=3, duration_s=2)
    await enter_all(clients, gw)
    body = await wait_drawn(http, drop_id, gw["id"])
    script = tmp_path / "verify_giveaway.py"
    script.write_text(_docs_script())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), server.base_url, str(drop_id), str(gw["id"]), "fan-3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    assert proc.returncode == 0, out
    winners = [w["ticket"] for w in body["results"]]
    assert f"OK: 7 entrants, winners {winners}" in out
    assert "is in the draw" in out
    # A result that does not follow from the seed is caught, by the script and the audit.
    db = server.app.state.db
    await db.execute("UPDATE giveaway_winners SET ticket = CASE rank WHEN 1 THEN $2 "
                     "WHEN 2 THEN $3 ELSE ticket END WHERE giveaway_id = $1",
                     gw["id"], winners[1], winners[0])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), server.base_url, str(drop_id), str(gw["id"]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    assert proc.returncode != 0 and "FAIL: the draw gives" in out, out
    assert not (await giveaway_store.audit(db, gw["id"])).ok
    for c in clients:
        await c.close()


async def wait_announced(db, giveaway_id, within=15.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await db.fetchval("SELECT announced_at IS NOT NULL FROM giveaways WHERE id = $1",
                             giveaway_id):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"giveaway {giveaway_id} not announced within {within} s")


async def test_prizes_out_of_stock_and_off_air_still_announce(server, http, creator,
                                                              make_token):
    """Two winners, one unit left: rank 1 gets it, rank 2 wins without a unit. A drop
    whose stock Redis lost after it went off air: the winner wins, not_on_sale."""
    drop_id, pid = await live_drop(http, creator, units=1)
    clients = [await viewer(server, make_token, drop_id, f"v{i}") for i in range(3)]
    gw = await open_gw(http, creator, drop_id, product_id=pid, winners=2, duration_s=2)
    await enter_all(clients, gw)
    body = await wait_drawn(http, drop_id, gw["id"])
    await wait_announced(server.app.state.db, gw["id"])
    won = await giveaway_store.winners(server.app.state.db, gw["id"])
    assert [(w["order_id"] is not None, w["prize_error"]) for w in won] == [
        (True, None), (False, "out_of_stock")]
    assert [w["ticket"] for w in won] == [w["ticket"] for w in body["results"]]
    await invariants.quiesce(server.app.state.redis, drop_id)  # the prize order row
    assert (await giveaway_store.audit(server.app.state.db, gw["id"])).ok

    # Off air, then Redis loses the drop's stock before the draw.
    gw2 = await open_gw(http, creator, drop_id, product_id=pid, winners=1, duration_s=2)
    assert (await enter_ws(clients[0], gw2["id"]))["data"]["new"] is True
    resp = await http.post(f"/v1/drops/{drop_id}/end", headers=creator, json={})
    assert resp.status_code == 200, resp.text
    r = server.app.state.redis
    await r.delete(f"{{drop:{drop_id}}}:sale")
    await wait_drawn(http, drop_id, gw2["id"])
    await wait_announced(server.app.state.db, gw2["id"])
    won = await giveaway_store.winners(server.app.state.db, gw2["id"])
    assert [(w["order_id"], w["prize_error"]) for w in won] == [(None, "not_on_sale")]
    for c in clients:
        await c.close()


async def test_the_replay_keeps_the_giveaway_moments(server, http, creator):
    """giveaway.opened and giveaway.drawn are replay moments, storable as such."""
    from streaming import replay

    assert replay.moment_from_event("giveaway.opened", {"product_id": 7}) == (
        "giveaway_opened", 7)
    assert replay.moment_from_event("giveaway.drawn", {"product_id": None}) == (
        "giveaway_drawn", None)
    drop_id, _ = await live_drop(http, creator)
    db = server.app.state.db
    await replay.record_moment(db, drop_id, "giveaway_opened", None, 1200)
    await replay.record_moment(db, drop_id, "giveaway_drawn", None, 61_200)
    kinds = [m["kind"] for m in await replay.moments(db, drop_id)]
    assert kinds == ["giveaway_opened", "giveaway_drawn"]


@only_single_redis
async def test_a_win_announced_while_the_subscription_was_lost_is_heard_once(
        server, http, creator, make_token):
    """giveaway.won goes out on the winner's channel, which keeps no history: published
    while this process's pub/sub connection is down, it reaches the winner's open
    socket once the subscriber is back (realtime.private, drops' RecentWins), once."""
    from tests.payments_fixtures import wait_for
    from tests.test_private_recovery import Gate

    hub = server.app.state.realtime
    drop_id, _ = await live_drop(http, creator)
    c = await viewer(server, make_token, drop_id, "v-lucky")
    user_channel = channels.user_channel("v-lucky").encode()
    await wait_for(lambda: _value(user_channel in hub.subscriber.channels), 5)
    await asyncio.sleep(0.2)  # the subscription is confirmed
    gw = await open_gw(http, creator, drop_id, prize="Poster", duration_s=2)
    assert (await enter_ws(c, gw["id"]))["data"]["new"] is True

    gate = Gate()
    gate.hold(hub.subscriber, "_connect")
    redis = server.app.state.redis
    assert await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    await wait_for(lambda: _value(hub.subscriber._conn is None), 5)
    await wait_announced(server.app.state.db, gw["id"])  # published to nobody here
    gate.open.set()
    won: list[dict] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4
    while (left := deadline - loop.time()) > 0:
        try:
            frame = await c.recv(left)
        except TimeoutError:
            break
        if frame.get("event") == "giveaway.won":
            won.append(frame)
    assert len(won) == 1, won
    assert won[0]["t"] == "private" and won[0]["data"]["giveaway_id"] == gw["id"]
    assert won[0]["data"]["rank"] == 1
    await c.close()


async def _value(value):
    return value


@only_single_redis
async def test_entries_survive_redis_restarting_empty(server, http, creator, make_token):
    """Entrants are journaled to PostgreSQL by the process that took them: after Redis
    comes back empty the next entry puts the giveaway back (repeats stay repeats) and
    the draw counts every acknowledged entrant."""
    from tests.payments_fixtures import wait_for

    drop_id, _ = await live_drop(http, creator)
    clients = [await viewer(server, make_token, drop_id, f"v{i}") for i in range(5)]
    gw = await open_gw(http, creator, drop_id, prize="Poster", winners=2, duration_s=6)
    for c in clients[:4]:
        assert (await enter_ws(c, gw["id"]))["data"]["new"] is True
    db = server.app.state.db
    await wait_for(lambda: db.fetchval(
        "SELECT count(*) = 4 FROM giveaway_entrants WHERE giveaway_id = $1", gw["id"]), 5)
    await server.app.state.redis.flushall()  # Redis restarted empty
    again = await enter_ws(clients[0], gw["id"])
    assert again["data"] == {"giveaway_id": gw["id"], "entered": True, "new": False,
                             "entries": 4}, again
    late = await enter_ws(clients[4], gw["id"])
    assert late["data"]["new"] is True and late["data"]["entries"] == 5
    body = await wait_drawn(http, drop_id, gw["id"])
    assert body["entries"] == 5
    report = await giveaway_store.audit(db, gw["id"])
    assert report.ok, report
    users = {r["user_id"] for r in await db.fetch(
        "SELECT user_id FROM giveaway_entrants WHERE giveaway_id = $1", gw["id"])}
    assert users == {f"v{i}" for i in range(5)}

    # Lost again, and no entry comes after: the draw takes the journal's entrants.
    gw2 = await open_gw(http, creator, drop_id, prize="Mug", winners=1, duration_s=3)
    for c in clients[:3]:
        assert (await enter_ws(c, gw2["id"]))["data"]["new"] is True
    await wait_for(lambda: db.fetchval(
        "SELECT count(*) = 3 FROM giveaway_entrants WHERE giveaway_id = $1", gw2["id"]), 5)
    await server.app.state.redis.flushall()
    body = await wait_drawn(http, drop_id, gw2["id"])
    assert body["entries"] == 3 and len(body["results"]) == 1
    assert (await giveaway_store.audit(db, gw2["id"])).ok
    for c in clients:
        await c.close()


async def test_concurrent_duplicates_count_once(server, http, creator, make_token):
    """One user on three sockets, each entering ten times at once, and ten other
    viewers: exactly one new entry per user, the count and the draw agree."""
    drop_id, _ = await live_drop(http, creator)
    # joined before the 3 s window opens: joining 13 sockets inside it outlasts it on
    # a loaded machine
    twins = [await viewer(server, make_token, drop_id, "v-twin") for _ in range(3)]
    others = [await viewer(server, make_token, drop_id, f"v{i}") for i in range(10)]
    gw = await open_gw(http, creator, drop_id, prize="Cap", winners=3, duration_s=3)

    async def burst(c, n):
        """``n`` entries sent at once on one socket, then their answers."""
        ids = [f"e{k}" for k in range(n)]
        for rid in ids:
            await c.send({"t": "giveaway.enter", "id": rid, "giveaway_id": gw["id"]})
        got = {}
        while len(got) < n:
            frame = await c.recv_until(lambda f: f.get("id") in ids)
            got[frame["id"]] = frame
        return [got[rid] for rid in ids]

    answers = await asyncio.gather(*[burst(c, 10) for c in twins],
                                   *[burst(c, 1) for c in others])
    replies = [r for batch in answers for r in batch]
    assert all(r["t"] == "reply" for r in replies), replies
    assert sum(r["data"]["new"] for r in replies[:30]) == 1
    assert all(r["data"]["new"] for r in replies[30:])
    assert max(r["data"]["entries"] for r in replies) == 11
    body = await wait_drawn(http, drop_id, gw["id"])
    assert body["entries"] == 11
    assert (await giveaway_store.audit(server.app.state.db, gw["id"])).ok
    for c in [*twins, *others]:
        await c.close()


async def test_the_documented_giveaway_examples_work_as_written(server, http, creator):
    """docs/http-api.md's giveaway body, sent as written, answers what the page shows."""
    import json

    from tests.test_docs_examples import HTTP_VALUES, block_after, mismatches, same_fields

    api = (Path(__file__).parents[1] / "docs" / "http-api.md").read_text()
    drop_id, _ = await live_drop(http, creator)
    resp = await http.post(f"/v1/drops/{drop_id}/giveaways", headers=creator,
                           json=json.loads(block_after(api, "**Giveaway body**")))
    assert resp.status_code == 201, resp.text
    shown = json.loads(block_after(api, "**Giveaway response**"))
    same_fields(resp.json(), shown, "giveaway")
    assert mismatches(resp.json(), shown, values=HTTP_VALUES) == []
    assert resp.json()["prize"] == "A signed poster" and resp.json()["winners"] == 3


async def test_the_entry_count_loop_stops_although_it_swallowed_a_cancellation():
    """Shutdown stops the giveaway entry count loop as every background task is stopped
    (dropserver.background.stop_task: cancelled again until it ends): one cancel and an
    await would wait forever on a loop that swallowed it, and would swallow the
    shutdown's own cancellation too."""
    from types import SimpleNamespace

    from drops.giveaway_api import Giveaways

    app = SimpleNamespace(state=SimpleNamespace(
        settings=SimpleNamespace(stock_coalesce_ms=100), redis=None, db=None))
    gw = Giveaways(app)  # type: ignore[arg-type]

    async def swallows_one_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # as a library's cleanup might
        await asyncio.Event().wait()  # and runs on, until cancelled again

    gw._counts = asyncio.create_task(swallows_one_cancel())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(gw.stop())
    done, _ = await asyncio.wait([stopper], timeout=5)
    if not done:
        gw._counts.cancel()
    assert done and stopper.exception() is None
    assert gw._counts.done()


async def test_a_drop_off_air_refuses_a_giveaway_and_an_auction_alike(http, creator):
    """Both ways a live room sells run only while the drop is on air, and a drop that
    is not says so with one code for both (409 drop_not_on_air, its state in details)."""
    resp = await http.post("/v1/drops", headers=creator, json={
        "title": "Not yet", "products": [{"title": "Lot", "price": 1000, "units": 1}]})
    assert resp.status_code == 201, resp.text
    drop_id, pid = resp.json()["id"], resp.json()["products"][0]["product_id"]
    gw = await http.post(f"/v1/drops/{drop_id}/giveaways", headers=creator,
                         json={"product_id": pid, "winners": 1, "duration_s": 60})
    auction = await http.post(f"/v1/drops/{drop_id}/auctions", headers=creator, json={
        "product_id": pid, "start_price": 1000, "increment": 100, "duration_s": 20,
        "snipe_window_s": 5})
    for resp in (gw, auction):
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"]["code"] == "drop_not_on_air", resp.text
        assert resp.json()["error"]["details"] == {"state": "draft"}


async def test_journal_writers_never_deadlock(server, http, creator):
    """The draw journals every entrant in its transaction while the processes that took
    entries journal theirs: both write rows of one giveaway, and in any order they
    deadlocked (PostgreSQL's 'deadlock detected' in the closer, seen in the giveaway
    benchmark). Rows go in one order, so the second writer waits, never cycles."""
    drop_id, _ = await live_drop(http, creator)
    gw = await open_gw(http, creator, drop_id, prize="Poster", winners=1, duration_s=60)
    first, second = ((gw["id"], "dl-a", "t-a", "A"), (gw["id"], "dl-b", "t-b", "B"))
    db = server.app.state.db
    async with db.acquire() as a, db.acquire() as b:
        ta, tb = a.transaction(), b.transaction()
        await ta.start()
        await tb.start()
        await giveaway_store.journal_entrants(a, [first])
        waiting = asyncio.create_task(giveaway_store.journal_entrants(b, [second, first]))
        await asyncio.sleep(0.5)  # b waits for a's row (b wrote nothing else before it)
        await giveaway_store.journal_entrants(a, [second])
        await ta.commit()
        await asyncio.wait_for(waiting, 10)
        await tb.commit()
    assert await db.fetchval("SELECT count(*) FROM giveaway_entrants "
                             "WHERE giveaway_id = $1", gw["id"]) == 2


async def test_entries_arriving_together_read_the_giveaway_from_postgresql_once(
        server, http, creator, make_token, monkeypatch):
    """The first second of a giveaway: thousands of entries reach a process that has not
    read it yet. They share one read (each made its own: in benchmarks.giveaway those
    reads were 12% of the workers' profile samples)."""
    drop_id, _ = await live_drop(http, creator)
    gw = await open_gw(http, creator, drop_id, prize="A signed cap")
    reads = []
    real = giveaway_store.load_giveaway

    async def counted(db, d, g):
        reads.append(g)
        await asyncio.sleep(0.05)  # a read that takes a while, as under load
        return await real(db, d, g)

    monkeypatch.setattr(giveaway_store, "load_giveaway", counted)
    clients = await asyncio.gather(*[viewer(server, make_token, drop_id, f"together-{i}")
                                     for i in range(12)])
    try:
        answers = await asyncio.gather(*[enter_ws(c, gw["id"]) for c in clients])
        assert all(a["t"] == "reply" and a["data"]["new"] for a in answers), answers
        assert reads == [gw["id"]]
        # An unknown giveaway is not remembered: asked again, it is read again.
        for _ in range(2):
            bad = await enter_ws(clients[0], gw["id"] + 1000)
            assert bad["t"] == "error" and bad["code"] == "giveaway_not_found", bad
        assert reads == [gw["id"], gw["id"] + 1000, gw["id"] + 1000]
    finally:
        for c in clients:
            await c.close()
