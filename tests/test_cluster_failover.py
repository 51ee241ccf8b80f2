"""A Redis Cluster primary SIGKILLed in the middle of a rush (tests/fault_rig.py with
``redis_cluster=True``): its replica is promoted, sales resume on it, and every
invariant of tests/invariants.py holds afterwards -- no unit sold twice, no buyer
over the limit, every acknowledged hold with one order row, Redis and PostgreSQL
agreeing. Holds are acknowledged only once a replica has them (WAIT after each batch
of buys, ``DROPSERVER_HOLD_REPLICAS``), so the promoted replica has every hold a buyer
was told about. ``python -m benchmarks.failover --repeat 20`` runs it in a loop."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from checkout.auction import auction_key
from drops import giveaway_store
from dropserver import local_cluster
from dropserver.auth import Role
from tests import invariants
from tests.fault_rig import Rig, _Socket, run_fault

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster_rig() -> Iterator[Rig]:
    with Rig(workers=2, hold_ttl=120, redis_cluster=True) as r:
        yield r


async def test_a_killed_primary_mid_rush_loses_no_hold_and_oversells_nothing(cluster_rig):
    report = await run_fault(cluster_rig, "primary_kill", seed=11)
    assert report.holds >= 30, report.summary()  # the rush did sell, before and after
    assert report.ok, report.summary()
    assert report.dead_letters == 0, report.summary()
    assert report.timings["sales_resumed_s"] < 20.0, report.summary()


@pytest.mark.timeout(90)
async def test_a_lagging_replica_promoted_has_every_acknowledged_hold(cluster_rig):
    """The replica is frozen (SIGSTOP) 2 s while buyers buy, then the primary is
    killed: what the replica never got is lost with the primary. With WAIT no buyer
    was told about a hold of that window (they got 503 and retried with the same key
    on the promoted replica), so nothing acknowledged is missing.

    The private events published on the primary in that window die with it too: the
    node listens to the shard on that replica, and a user's channel has no history.
    The promoted replica ends the node's shard subscriptions as it takes the slots
    over; the subscriber subscribes them again and the hub sends every socket the
    current state of its user's orders that it has not heard (realtime.private), so
    every buyer hears their order's outcome, once."""
    # Bounded: a buyer waiting for an order.payment that never comes must not hold
    # the test for the default 150 s payment window.
    report = await run_fault(cluster_rig, "primary_kill_lagging", outage=2.0, seed=12,
                             quiet_within=30, pay_within=20)
    assert report.timings["holds_acknowledged_while_replica_frozen"] == 0, report.summary()
    assert report.holds >= 30, report.summary()
    assert report.violations == [], report.summary()
    assert not (report.duplicates or report.double_confirms or report.orphans), \
        report.summary()
    assert report.dead_letters == 0, report.summary()
    assert report.unheard == [], report.summary()


@pytest.mark.timeout(120)
async def _retried_past_a_frozen_replica(rig: Rig, replica, sock: _Socket, buy: dict,
                                         while_frozen=None) -> dict:
    """``buy`` sent while the shard's replica is frozen (SIGSTOP): answered 503, not
    replicated, not told (then ``while_frozen()``); sent again with the same key once
    it is thawed, until answered: the reply, the same hold's replay."""
    os.kill(rig.services.pids[replica.name], signal.SIGSTOP)
    try:
        answer = await sock.request(buy)
        assert answer.get("code") == "unavailable", answer  # not replicated: not told
        if while_frozen is not None:
            await while_frozen()
    finally:
        os.kill(rig.services.pids[replica.name], signal.SIGCONT)
    for _ in range(50):  # the replica catches up; the retry replays the same hold
        answer = await sock.request(buy)
        if answer.get("t") == "reply":
            return answer
        await asyncio.sleep(0.2)
    raise AssertionError(f"no reply after the replica thawed: {answer}")


async def test_a_hold_the_replica_lacks_reaches_postgresql_only_once_replicated(cluster_rig):
    """The reservation script writes a hold and its order entry on the primary; the
    buyer hears of it only once a replica has it (WAIT). The payments workers must not
    record it in PostgreSQL before that either: a failover would lose it from Redis and
    keep it in PostgreSQL, and the promoted replica, its buyer counter behind, would
    give the same buyer numbers again to acknowledged holds, whose rows then conflict
    (dead letters, acknowledged holds without a row: seen under load in the lagging
    failover above). With the replica frozen, the hold stays out of PostgreSQL; thawed,
    it is recorded, and the buyer's retry with the same key is answered with it."""
    rig = cluster_rig
    drop_id, pid = await rig.selling_drop(units=3)
    replica = local_cluster.replica_of(
        rig.services, local_cluster.primary_for(rig.services, f"{{drop:{drop_id}}}:sale"))
    sock = await _Socket.open(rig.ws_url, rig.token("fence-buyer"), drop_id,
                              lambda e, d: None)
    db = await rig.db()
    r = rig.redis()
    buy = {"t": "buy", "product_id": pid, "idempotency_key": "fence-k1",
           "flow": "client_confirm"}
    async def none_recorded() -> None:
        await asyncio.sleep(2.0)  # a worker records an entry within milliseconds
        rows = await db.fetchval("SELECT count(*) FROM orders WHERE drop_id = $1", drop_id)
        assert rows == 0, "a hold no replica has was recorded in PostgreSQL"

    try:
        answer = await _retried_past_a_frozen_replica(rig, replica, sock, buy,
                                                      while_frozen=none_recorded)
        hold_id = answer["data"]["hold_id"]
        await invariants.quiesce(r, drop_id, within=30)
        state = await db.fetchval("SELECT state FROM orders WHERE public_id = $1", hold_id)
        assert state == "payment_pending", state
        assert await invariants.violations(
            db, r, drop_id, acknowledged={hold_id: {
                "user_id": "fence-buyer", "buyer_number": answer["data"]["buyer_number"]}},
            payments=invariants.stub_payments(rig.stub)) == []
    finally:
        await sock.close()
        await r.aclose()
        await db.close()


async def test_a_buy_first_answered_by_its_replay_is_told_and_sells_out(cluster_rig):
    """A buy whose WAIT failed was answered 503 and nothing else: not journaled, no
    ``order.held``, no stock or sold out. Its retry with the same key is a replay, and
    the replay is then the first answer the buyer gets: it must do what the first
    answer would have. Here the hold is the drop's last unit, so the drop sells out,
    and the buyer's other socket hears ``order.held`` once."""
    rig = cluster_rig
    drop_id, pid = await rig.selling_drop(units=1)  # the hold takes the last unit
    replica = local_cluster.replica_of(
        rig.services, local_cluster.primary_for(rig.services, f"{{drop:{drop_id}}}:sale"))
    heard: list[tuple[str, dict]] = []
    sock = await _Socket.open(rig.ws_url, rig.token("replay-buyer"), drop_id,
                              lambda e, d: None)
    other = await _Socket.open(rig.ws_url, rig.token("replay-buyer"), drop_id,
                               lambda e, d: heard.append((e, d)))
    db = await rig.db()
    r = rig.redis()
    buy = {"t": "buy", "product_id": pid, "idempotency_key": "replay-k1",
           "flow": "client_confirm"}
    try:
        answer = await _retried_past_a_frozen_replica(rig, replica, sock, buy)
        assert answer["data"]["replay"], answer
        hold_id = answer["data"]["hold_id"]

        async def sold_out() -> bool:
            return await db.fetchval("SELECT state FROM drops WHERE id = $1",
                                     drop_id) == "sold_out"

        assert await _until(sold_out, 10), "the replay took the last unit: sold out"
        assert await _until(lambda: _true(heard), 10), "the other socket heard nothing"
        await invariants.quiesce(r, drop_id, within=30)
        assert [d["order_id"] for e, d in heard if e == "order.held"] == [hold_id]
        assert await invariants.violations(
            db, r, drop_id, acknowledged={hold_id: {
                "user_id": "replay-buyer", "buyer_number": answer["data"]["buyer_number"]}},
            payments=invariants.stub_payments(rig.stub)) == []
    finally:
        await sock.close()
        await other.close()
        await r.aclose()
        await db.close()


async def _auction(rig: Rig, **spec: object) -> tuple[int, int]:
    """A live drop of one unit with an auction of it: (drop id, auction id)."""
    import httpx

    creator = {"Authorization": f"Bearer {rig.token('rig-creator', Role.CREATOR)}"}
    async with httpx.AsyncClient(base_url=rig.base_url, timeout=30) as http:
        resp = await http.post("/v1/drops", headers=creator, json={
            "title": "Fence auction", "products": [{"title": "Lot", "price": 1000,
                                                    "units": 1}]})
        assert resp.status_code == 201, resp.text
        drop = resp.json()
        drop_id, pid = drop["id"], drop["products"][0]["product_id"]
        for action, body in (("schedule", {"starts_at": "2030-01-01T20:00:00Z"}),
                             ("live", {})):
            resp = await http.post(f"/v1/drops/{drop_id}/{action}", json=body,
                                   headers=creator)
            assert resp.status_code == 200, resp.text
        resp = await http.post(f"/v1/drops/{drop_id}/auctions", headers=creator, json={
            "product_id": pid, "start_price": 1000, "increment": 100, **spec})
        assert resp.status_code == 201, resp.text
        return drop_id, resp.json()["id"]


@pytest.mark.timeout(120)
async def test_an_auction_won_while_the_replica_lags_reaches_postgresql_once_replicated(
        cluster_rig):
    """The keeper closes an auction on its primary (auction_close.lua makes the
    winner's hold and buyer number); the process then journals that hold to
    PostgreSQL's orders and tells the winner ``auction.won``. Before a replica has the
    close that is the order workers' defect again: a failover loses the hold while
    PostgreSQL keeps it, and the promoted replica, the auction still running there,
    closes it again with the same buyer number. Frozen replica over the end: no order
    row, nothing told; thawed: one order, the one the winner is told of."""
    rig = cluster_rig  # before the other auction tests: no auction of theirs is running
    drop_id, aid = await _auction(rig, duration_s=8, snipe_window_s=0)
    replica = local_cluster.replica_of(
        rig.services, local_cluster.primary_for(rig.services, f"{{drop:{drop_id}}}:sale"))
    won: list[dict] = []
    sock = await _Socket.open(rig.ws_url, rig.token("fence-winner-a"), drop_id,
                              lambda e, d: won.append(d) if e == "auction.won" else None)
    db = await rig.db()
    r = rig.redis()
    try:
        answer = await sock.request({"t": "bid", "auction_id": aid, "amount": 1000,
                                     "idempotency_key": "fence-a1"})
        assert answer.get("t") == "reply", answer
        ends_at = answer["data"]["ends_at"] / 1000
        assert ends_at - time.time() > 1.0, "the auction ends too soon to freeze before"
        await asyncio.sleep(ends_at - time.time() - 1.0)
        os.kill(rig.services.pids[replica.name], signal.SIGSTOP)
        try:
            await asyncio.sleep(ends_at - time.time() + 2.5)  # closed within 0.1 s of it
            state = await r.hget(auction_key(drop_id, aid), "state")
            assert state in ("closed", b"closed"), state  # the keeper closed it
            rows = await db.fetch("SELECT public_id FROM orders WHERE drop_id = $1", drop_id)
            assert rows == [], "a winner's hold no replica has was recorded in PostgreSQL"
            assert won == [], "the winner was told of a hold no replica has"
        finally:
            os.kill(rig.services.pids[replica.name], signal.SIGCONT)
        assert await _until(lambda: _true(won), 20), "the winner was not told after the thaw"
        await invariants.quiesce(r, drop_id, within=30)
        orders = await db.fetch("SELECT public_id, user_id, buyer_number, amount FROM orders "
                                "WHERE drop_id = $1", drop_id)
        assert len(won) == 1, won
        assert [tuple(o) for o in orders] == [
            (won[0]["hold_id"], "fence-winner-a", won[0]["buyer_number"], 1000)]
        assert await invariants.violations(
            db, r, drop_id, acknowledged={won[0]["hold_id"]: {
                "user_id": "fence-winner-a", "buyer_number": won[0]["buyer_number"]}},
            payments=invariants.stub_payments(rig.stub)) == []
    finally:
        await sock.close()
        await r.aclose()
        await db.close()


@pytest.mark.timeout(120)
async def test_a_second_chance_offer_the_replica_lacks_is_not_recorded_nor_told(cluster_rig):
    """A second-chance offer makes the runner-up's hold and buyer number on the primary
    (auction_offer.lua); journaled to PostgreSQL and told to the runner-up before a
    replica has it, a failover loses the hold that PostgreSQL keeps (the promoted
    replica can give its buyer number again). Frozen replica: the creator is answered
    503, nothing recorded or told; thawed: the retry is a replay, recorded and told
    once."""
    import httpx

    rig = cluster_rig
    drop_id, aid = await _auction(rig, duration_s=5, snipe_window_s=0)
    replica = local_cluster.replica_of(
        rig.services, local_cluster.primary_for(rig.services, f"{{drop:{drop_id}}}:sale"))
    offers: list[dict] = []
    sock = await _Socket.open(rig.ws_url, rig.token("fence-bob"), drop_id,
                              lambda e, d: offers.append(d) if e == "auction.offer" else None)
    db = await rig.db()
    r = rig.redis()
    creator = {"Authorization": f"Bearer {rig.token('rig-creator', Role.CREATOR)}"}
    url = f"/v1/drops/{drop_id}/auctions/{aid}"
    try:
        async with httpx.AsyncClient(base_url=rig.base_url, timeout=30) as http:
            for user, amount in (("fence-bob", 1000), ("fence-alice", 1500)):
                resp = await http.post(url + "/bids", json={
                    "amount": amount, "idempotency_key": f"{user}-1"},
                    headers={"Authorization": f"Bearer {rig.token(user)}"})
                assert resp.status_code == 201, resp.text

            async def closed() -> bool:
                return await db.fetchval("SELECT hold_id FROM auctions WHERE id = $1 "
                                         "AND state = 'closed'", aid) is not None

            assert await _until(closed, 20), "the auction was not closed and recorded"
            won = await db.fetchval("SELECT hold_id FROM auctions WHERE id = $1", aid)
            resp = await http.delete(f"/v1/holds/{won}", headers={
                "Authorization": f"Bearer {rig.token('fence-alice')}"})
            assert resp.status_code == 200, resp.text
            os.kill(rig.services.pids[replica.name], signal.SIGSTOP)
            try:
                resp = await http.post(url + "/second-chance", headers=creator)
                assert resp.status_code == 503, resp.text  # not replicated: not told
                await asyncio.sleep(1.0)
                rows = await db.fetch("SELECT public_id FROM orders WHERE drop_id = $1 "
                                      "AND user_id = 'fence-bob'", drop_id)
                assert rows == [], "an offer no replica has was recorded in PostgreSQL"
                assert offers == [], "the runner-up was told of an offer no replica has"
            finally:
                os.kill(rig.services.pids[replica.name], signal.SIGCONT)
            for _ in range(50):
                resp = await http.post(url + "/second-chance", headers=creator)
                if resp.status_code != 503:
                    break
                await asyncio.sleep(0.2)
            assert resp.status_code == 200 and resp.json()["replay"] is True, resp.text
            offer = resp.json()
        assert offer["user_id"] == "fence-bob" and offer["amount"] == 1000, offer
        assert await _until(lambda: _true(offers), 10), "the runner-up was not told"
        await invariants.quiesce(r, drop_id, within=30)
        assert [d["hold_id"] for d in offers] == [offer["hold_id"]]
        rows = await db.fetch("SELECT public_id FROM orders WHERE drop_id = $1 "
                              "AND user_id = 'fence-bob'", drop_id)
        assert [row["public_id"] for row in rows] == [offer["hold_id"]]
        assert await db.fetchval("SELECT offer_hold_id FROM auctions WHERE id = $1",
                                 aid) == offer["hold_id"]
        assert await invariants.violations(
            db, r, drop_id, acknowledged=[won, offer["hold_id"]],
            payments=invariants.stub_payments(rig.stub)) == []
    finally:
        await sock.close()
        await r.aclose()
        await db.close()


@pytest.mark.timeout(120)
async def test_a_bid_the_replica_lacks_reaches_postgresql_only_once_replicated(cluster_rig):
    """The auction keeper copies bids from the primary to PostgreSQL; a bid whose WAIT
    failed (its bidder was answered 503) must not be copied before a replica has it,
    or PostgreSQL gets ahead of the replica a failover would promote, which could give
    its seq again. Frozen replica: no bid row; thawed: the retry (same key) is the
    same bid, and it is recorded once."""
    rig = cluster_rig
    drop_id, aid = await _auction(rig, duration_s=60)
    replica = local_cluster.replica_of(
        rig.services, local_cluster.primary_for(rig.services, f"{{drop:{drop_id}}}:sale"))
    sock = await _Socket.open(rig.ws_url, rig.token("fence-bidder"), drop_id,
                              lambda e, d: None)
    db = await rig.db()
    bid = {"t": "bid", "auction_id": aid, "amount": 1000, "idempotency_key": "fence-b1"}
    try:
        os.kill(rig.services.pids[replica.name], signal.SIGSTOP)
        try:
            answer = await sock.request(bid)
            assert answer.get("code") == "unavailable", answer  # not replicated: not told
            await asyncio.sleep(2.5)  # the keeper's rounds are at most 1 s apart
            rows = await db.fetchval("SELECT count(*) FROM auction_bids WHERE auction_id = $1",
                                     aid)
            assert rows == 0, "a bid no replica has was recorded in PostgreSQL"
        finally:
            os.kill(rig.services.pids[replica.name], signal.SIGCONT)
        for _ in range(50):
            answer = await sock.request(bid)
            if answer.get("t") == "reply":
                break
            await asyncio.sleep(0.2)
        assert answer.get("t") == "reply" and answer["data"]["seq"] == 1, answer
        for _ in range(100):
            rows = await db.fetch("SELECT seq, user_id, amount FROM auction_bids "
                                  "WHERE auction_id = $1", aid)
            if rows:
                break
            await asyncio.sleep(0.1)
        assert [tuple(r) for r in rows] == [(1, "fence-bidder", 1000)]
    finally:
        await sock.close()
        await db.close()


async def _giveaway(rig: Rig, drop_id: int, **body: object) -> dict:
    import httpx

    creator = {"Authorization": f"Bearer {rig.token('rig-creator', Role.CREATOR)}"}
    async with httpx.AsyncClient(base_url=rig.base_url, timeout=30) as http:
        resp = await http.post(f"/v1/drops/{drop_id}/giveaways", headers=creator,
                               json={"winners": 1, **body})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def _until(check, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.timeout(120)
async def test_a_giveaway_entry_the_replica_lacks_is_drawn_only_once_replicated(cluster_rig):
    """An entry is answered only once a replica has it (WAIT, the buy path's pipeline);
    one whose WAIT failed (its entrant was answered 503) must not be drawn, recorded
    in PostgreSQL and announced while no replica has it: a failover would lose it and
    the close from Redis while PostgreSQL keeps a draw its entrant was told they are
    not in. Frozen replica past the close: nothing drawn; thawed: drawn with the
    entry, and the entrant's retry says they are in (not ``giveaway_closed``)."""
    rig = cluster_rig
    drop_id, _pid = await rig.selling_drop(units=3)
    replica = local_cluster.replica_of(
        rig.services, local_cluster.primary_for(rig.services, f"{{drop:{drop_id}}}:sale"))
    sock = await _Socket.open(rig.ws_url, rig.token("fence-entrant"), drop_id,
                              lambda e, d: None)
    db = await rig.db()
    gw = await _giveaway(rig, drop_id, prize="A signed cap", duration_s=3)
    gid = gw["id"]
    enter = {"t": "giveaway.enter", "giveaway_id": gid}
    try:
        os.kill(rig.services.pids[replica.name], signal.SIGSTOP)
        try:
            answer = await sock.request(enter)
            assert answer.get("code") == "unavailable", answer  # not replicated: not told
            # Past the close (Redis' clock is this machine's) and the closer's rounds.
            await asyncio.sleep(max(0.0, gw["closes_at"] / 1000 - time.time()) + 2.0)
            row = await db.fetchrow("SELECT state, entrants FROM giveaways WHERE id = $1",
                                    gid)
            assert row["state"] == "open", f"drawn while no replica had it: {dict(row)}"
            assert await db.fetchval("SELECT count(*) FROM giveaway_entrants "
                                     "WHERE giveaway_id = $1", gid) == 0
        finally:
            os.kill(rig.services.pids[replica.name], signal.SIGCONT)

        async def announced() -> bool:
            return await db.fetchval("SELECT announced_at IS NOT NULL FROM giveaways "
                                     "WHERE id = $1", gid)

        assert await _until(announced, 20), "not drawn and announced after the thaw"
        answer = await sock.request(enter)  # the entrant's retry: in the draw, so in
        assert answer.get("t") == "reply", answer
        assert answer["data"]["entered"] is True and answer["data"]["new"] is False, answer
        entrants = await db.fetch("SELECT user_id FROM giveaway_entrants "
                                  "WHERE giveaway_id = $1", gid)
        assert [r["user_id"] for r in entrants] == ["fence-entrant"]
        winners = await db.fetch("SELECT user_id FROM giveaway_winners "
                                 "WHERE giveaway_id = $1", gid)
        assert [r["user_id"] for r in winners] == ["fence-entrant"]
        audit = await giveaway_store.audit(db, gid)
        assert audit.ok, audit.problems
    finally:
        await sock.close()
        await db.close()


async def _waiting_on_lock(db, query_start: str) -> bool:
    return bool(await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE $1", query_start + "%"))


@pytest.mark.timeout(120)
async def test_a_prize_the_replica_lacks_is_announced_only_once_replicated(cluster_rig):
    """A product prize is a hold the announcement makes on the primary (award.lua);
    it must not be recorded as the winner's order nor announced (``giveaway.won``
    with its order id) while no replica has it: a failover would lose the hold, and
    the winner was told of an order that never comes. The test holds the
    announcement between the draw and the award (table locks on giveaway_winners),
    freezes the replica, and lets the announcement go: nothing announced while
    frozen; thawed, announced once with the order."""
    from checkout.prizes import prize_hold_id

    rig = cluster_rig
    drop_id, pid = await rig.selling_drop(units=1)  # the prize is the last unit
    replica = local_cluster.replica_of(
        rig.services, local_cluster.primary_for(rig.services, f"{{drop:{drop_id}}}:sale"))
    heard: list[dict] = []
    sock = await _Socket.open(rig.ws_url, rig.token("fence-winner"), drop_id,
                              lambda e, d: heard.append(d) if e == "giveaway.won" else None)
    db, draw_blocker, table_holder = await rig.db(), await rig.db(), await rig.db()
    r = rig.redis()
    gw = await _giveaway(rig, drop_id, product_id=pid, duration_s=2)
    gid = gw["id"]
    try:
        answer = await sock.request({"t": "giveaway.enter", "giveaway_id": gid})
        assert answer.get("t") == "reply" and answer["data"]["new"] is True, answer
        blocked = draw_blocker.transaction()
        await blocked.start()
        await draw_blocker.execute("LOCK TABLE giveaway_winners IN SHARE MODE")
        assert await _until(lambda: _waiting_on_lock(db, "INSERT INTO giveaway_winners"),
                            15), "the closer did not draw"
        # Queued behind the draw's insert: granted once the draw commits, it holds the
        # announcement at its first read of the winners (before any award).
        held = table_holder.transaction()
        await held.start()
        taking = asyncio.ensure_future(table_holder.execute(
            "LOCK TABLE giveaway_winners IN ACCESS EXCLUSIVE MODE"))
        assert await _until(lambda: _waiting_on_lock(db, "LOCK TABLE giveaway_winners"), 5)
        await blocked.rollback()  # the draw inserts its winners and commits
        await asyncio.wait_for(taking, 10)
        assert await _until(lambda: _waiting_on_lock(db, "SELECT rank, user_id"), 10), \
            "the announcement did not start"
        row = await db.fetchrow("SELECT state, announced_at FROM giveaways WHERE id = $1",
                                gid)
        assert row["state"] == "drawn" and row["announced_at"] is None, dict(row)
        os.kill(rig.services.pids[replica.name], signal.SIGSTOP)
        try:
            await held.rollback()  # the announcement goes on, the replica frozen
            await asyncio.sleep(2.0)
            row = await db.fetchrow("SELECT announced_at FROM giveaways WHERE id = $1", gid)
            order_id = await db.fetchval("SELECT order_id FROM giveaway_winners "
                                         "WHERE giveaway_id = $1", gid)
            assert row["announced_at"] is None and order_id is None, \
                f"a prize no replica has was announced: order {order_id}"
            assert heard == []
        finally:
            os.kill(rig.services.pids[replica.name], signal.SIGCONT)

        async def announced() -> bool:
            return await db.fetchval("SELECT announced_at IS NOT NULL FROM giveaways "
                                     "WHERE id = $1", gid)

        assert await _until(announced, 20), "not announced after the thaw"
        hold_id = prize_hold_id(drop_id, pid, gid, 1)
        assert await db.fetchval("SELECT order_id FROM giveaway_winners "
                                 "WHERE giveaway_id = $1", gid) == hold_id
        await invariants.quiesce(r, drop_id, within=30)
        orders = await db.fetch("SELECT public_id, user_id, amount, state FROM orders "
                                "WHERE drop_id = $1", drop_id)
        assert [tuple(o) for o in orders] == [(hold_id, "fence-winner", 0, "paid")]
        assert await _until(lambda: _true(heard), 10)
        assert [d["order_id"] for d in heard] == [hold_id]

        async def sold_out() -> bool:  # the award retried as a replay still says so
            return await db.fetchval("SELECT state FROM drops WHERE id = $1",
                                     drop_id) == "sold_out"

        assert await _until(sold_out, 10), "the prize took the last unit: sold out"
        audit = await giveaway_store.audit(db, gid)
        assert audit.ok, audit.problems
    finally:
        await sock.close()
        await r.aclose()
        for conn in (db, draw_blocker, table_holder):
            await conn.close()


async def _true(items: list) -> bool:
    return bool(items)
