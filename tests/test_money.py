"""Money state is exact, on the real app with the fake gateway (as `dropserver dev`):
a payment that lands as its hold expires, two confirms of one order, refunds by every
path, and the events each of them sends. Every test ends with the invariants of
tests/invariants.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from dropserver.auth import Role
from realtime import channels
from tests.conftest import running
from tests.invariants import check, fake_gateway_payments, quiesce
from tests.payments_fixtures import wait_for
from tests.test_reserve_api import bearer, post_buy, selling_drop


class Heard:
    """Every private event of some users, straight from their Redis channels."""

    def __init__(self, redis) -> None:
        self.pubsub = redis.pubsub()
        self.events: list[tuple[str, str, dict]] = []
        self._task: asyncio.Task | None = None

    async def listen(self, *users: str) -> Heard:
        await self.pubsub.subscribe(*(channels.user_channel(u) for u in users))
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for msg in self.pubsub.listen():
            if msg["type"] != "message":
                continue
            pub = channels.parse_message(msg["data"])
            user = msg["channel"].decode()[len("{user:"):-len("}:events")]
            self.events.append((user, pub.event, pub.data))

    def count(self, order_id: str) -> Counter[str]:
        return Counter(e for _, e, d in self.events if d.get("order_id") == order_id)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.pubsub.aclose()


@pytest.fixture
def settings(settings):  # short holds, fast sweeps, fast re-claims
    return settings.replace(hold_ttl=6, hold_sweep_interval=0.2, order_claim_idle_ms=1000)


@pytest.fixture
async def db(clean_backends) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(clean_backends.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


async def _until(pred, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _hold(server, http, make_token, units: int = 1, user: str = "buyer-a"):
    creator = bearer(make_token("creator-1", Role.CREATOR))
    drop_id, pid = await selling_drop(http, creator, units=units)
    resp = await post_buy(http, drop_id, bearer(make_token(user, Role.VIEWER)), pid)
    assert resp.status_code == 201, resp.text
    return drop_id, pid, resp.json()


async def _payment_pending(db, hold_id: str) -> asyncpg.Record:
    async def ready():
        return await db.fetchrow(
            "SELECT o.state, p.intent_id FROM orders o JOIN payments p ON p.order_id = o.id "
            "WHERE o.public_id = $1 AND o.state = 'payment_pending'", hold_id)
    return await wait_for(ready, 10)


async def _invariants(server, db, drop_id: int, told: dict) -> None:
    redis = server.app.state.redis
    await quiesce(redis, drop_id, within=20)
    await check(db, redis, drop_id, acknowledged=told,
                payments=await fake_gateway_payments(redis))


async def test_payment_as_the_hold_expires_is_refunded_and_recorded_or_refused(
        server, http, db, make_token) -> None:
    """A holds the only unit (6 s holds) and confirms with the slow card 1 s before it
    lapses. Either the confirm lands first -- then the payment is refunded and the
    refund recorded (amount_refunded, order refunded, order.refunded, once) -- or the
    expiry's cancel lands first and the confirm is refused 409 like Stripe refuses to
    confirm a cancelled intent. Never: money kept for an expired order, a refund
    unrecorded, order.expired twice. Either way the unit sells again."""
    heard = await Heard(server.app.state.redis).listen("buyer-a")
    try:
        drop_id, pid, hold = await _hold(server, http, make_token)
        hold_id = hold["hold_id"]
        await _payment_pending(db, hold_id)
        await asyncio.sleep(max(0.0, hold["expires_at"] / 1000 - time.time() - 1.0))
        # a fresh connection: the pooled one may hit the server's keep-alive timeout
        async with httpx.AsyncClient(base_url=server.base_url, timeout=15) as fresh:
            resp = await fresh.post(f"/v1/dev/orders/{hold_id}/confirm",
                                    headers=bearer(make_token("buyer-a", Role.VIEWER)),
                                    json={"payment_method": "pm_card_slow"})
        row = await wait_for(lambda: db.fetchrow(
            "SELECT o.state, o.released, p.status, p.amount_received, p.amount_refunded "
            "FROM orders o JOIN payments p ON p.order_id = o.id WHERE o.public_id = $1 "
            "AND o.state IN ('refunded', 'expired', 'paid')", hold_id), 15)
        if resp.status_code == 200:
            body = resp.json()
            assert body["status"] == "succeeded"
            # the hold had lapsed in Redis: refunded, recorded, the unit back on sale
            if row["state"] != "paid":
                row = await wait_for(lambda: db.fetchrow(
                    "SELECT o.state, o.released, p.status, p.amount_received, "
                    "p.amount_refunded FROM orders o JOIN payments p ON p.order_id = o.id "
                    "WHERE o.public_id = $1 AND o.state = 'refunded'", hold_id), 15)
                assert body["state"] == "refunded"
                assert (row["released"], row["amount_received"], row["amount_refunded"]) \
                    == ("expired", 4500, 4500)
                await _until(lambda: heard.count(hold_id)["order.refunded"])
        else:
            assert resp.status_code == 409, resp.text
            assert resp.json()["error"]["code"] == "payment_intent_unexpected_state"
            assert (row["state"], row["status"], row["amount_received"]) == (
                "expired", "canceled", 0)
        again = await post_buy(http, drop_id, bearer(make_token("buyer-b", Role.VIEWER)),
                               pid)
        if row["state"] != "paid":
            assert again.status_code == 201, again.text  # the unit sells again
        await _invariants(server, db, drop_id, {hold_id: {"user_id": "buyer-a"}})
        await asyncio.sleep(0.5)
        outcomes = heard.count(hold_id)
        assert all(n == 1 for e, n in outcomes.items() if e != "order.held"), outcomes
    finally:
        await heard.close()


async def test_a_payment_for_a_released_hold_is_refunded_and_recorded(
        server, http, db, make_token) -> None:
    """Deterministic: the buyer's card is charged (fake gateway, as Stripe.js would) and
    the hold is cancelled before the order worker hears of either. The worker refunds,
    and records it: amount_refunded, order refunded (released: cancelled), one
    order.refunded; the fake gateway's refund events (charge.refunded, refund.created)
    reach the webhook handler and change nothing more."""
    from checkout import holds

    heard = await Heard(server.app.state.redis).listen("buyer-a")
    try:
        drop_id, _pid, hold = await _hold(server, http, make_token, units=2)
        hold_id = hold["hold_id"]
        pending = await _payment_pending(db, hold_id)
        # a buyer pays once told how (order.payment carries the client secret); a
        # worker stopped between the row and that event would leave nothing to pay with
        async def told_how_to_pay() -> bool:
            return heard.count(hold_id)["order.payment"] == 1

        await wait_for(told_how_to_pay, 10)
        gateway = server.app.state.payments_gateway
        for worker in server.app.state.order_workers:
            await worker.stop()
        await gateway.confirm_as_buyer(pending["intent_id"], "pm_card_visa")
        released = await holds.release(server.app.state.redis, hold_id, "cancelled",
                                       owner="buyer-a")
        assert released.released
        for worker in server.app.state.order_workers:
            worker.start()
        row = await wait_for(lambda: db.fetchrow(
            "SELECT o.state, o.released, p.amount_received, p.amount_refunded FROM orders o "
            "JOIN payments p ON p.order_id = o.id WHERE o.public_id = $1 "
            "AND o.state = 'refunded'", hold_id), 15)
        assert (row["released"], row["amount_received"], row["amount_refunded"]) == (
            "cancelled", 4500, 4500)
        assert gateway.calls.get("refund") == 1
        # Each event travels on its own, so refund.created may be handled first.
        await wait_for(lambda: db.fetchval(
            "SELECT 1 FROM webhook_events WHERE type = 'charge.refunded' "
            "AND processed_at IS NOT NULL"), 10)
        types = await db.fetch(
            "SELECT type FROM webhook_events WHERE type IN ('charge.refunded', "
            "'refund.created') AND processed_at IS NOT NULL")
        assert sorted(r["type"] for r in types) in (["charge.refunded"],
                                                    ["charge.refunded", "refund.created"])
        await _invariants(server, db, drop_id, {hold_id: {"user_id": "buyer-a"}})
        await asyncio.sleep(0.3)
        assert heard.count(hold_id) == Counter({"order.held": 1, "order.payment": 1,
                                                "order.refunded": 1})
    finally:
        await heard.close()


async def test_two_confirms_of_one_order_one_wins_the_other_409(
        server, http, db, make_token) -> None:
    """pm_card_slow, then pm_card_visa 0.5 s later: one confirm succeeds, the other
    answers 409 payment_intent_unexpected_state (docs/http-api.md); one charge, the
    order paid, order.paid heard once."""
    heard = await Heard(server.app.state.redis).listen("buyer-a")
    try:
        drop_id, _pid, hold = await _hold(server, http, make_token)
        hold_id = hold["hold_id"]
        await _payment_pending(db, hold_id)
        url = f"/v1/dev/orders/{hold_id}/confirm"
        headers = bearer(make_token("buyer-a", Role.VIEWER))

        async def confirm(pm: str, after: float):
            await asyncio.sleep(after)
            return await http.post(url, headers=headers, json={"payment_method": pm})

        slow, fast = await asyncio.gather(confirm("pm_card_slow", 0),
                                          confirm("pm_card_visa", 0.5))
        codes = sorted([slow.status_code, fast.status_code])
        assert codes == [200, 409], (slow.text, fast.text)
        winner = slow if slow.status_code == 200 else fast
        loser = fast if winner is slow else slow
        assert winner.json()["state"] == "paid" and winner.json()["status"] == "succeeded"
        assert loser.json()["error"]["code"] == "payment_intent_unexpected_state"
        assert (await db.fetchval("SELECT state FROM orders WHERE public_id = $1",
                                  hold_id)) == "paid"
        await _invariants(server, db, drop_id, {hold_id: {"user_id": "buyer-a"}})
        await asyncio.sleep(0.3)
        assert heard.count(hold_id)["order.paid"] == 1
    finally:
        await heard.close()


async def test_admin_refund_is_recorded_and_reverses_a_settled_ledger(
        server, http, db, make_token) -> None:
    """An admin refunds a paid order after the drop was settled: the refund is recorded
    like every other (amount_refunded, refunded, order.refunded once) and the ledger
    gets its reversal entries. A second call answers the same; a viewer gets 403; an
    order that is not paid 409."""
    from checkout import holds

    heard = await Heard(server.app.state.redis).listen("buyer-a")
    try:
        drop_id, _pid, hold = await _hold(server, http, make_token, units=2)
        hold_id = hold["hold_id"]
        await _payment_pending(db, hold_id)
        buyer = bearer(make_token("buyer-a", Role.VIEWER))
        resp = await http.post(f"/v1/dev/orders/{hold_id}/confirm", headers=buyer, json={})
        assert resp.status_code == 200 and resp.json()["state"] == "paid"
        admin = bearer(make_token("ops", Role.ADMIN))
        creator = bearer(make_token("creator-1", Role.CREATOR))
        for action in ("close", "end"):
            r = await http.post(f"/v1/drops/{drop_id}/{action}", headers=creator)
            assert r.status_code == 200, r.text
        r = await http.post(f"/v1/drops/{drop_id}/settle", headers=creator)
        assert r.status_code == 200, r.text
        before = await db.fetchval("SELECT count(*) FROM ledger_entries WHERE drop_id = $1",
                                   drop_id)

        assert (await http.post(f"/v1/orders/{hold_id}/refund",
                                headers=buyer)).status_code == 403
        r = await http.post(f"/v1/orders/{hold_id}/refund", headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {"order_id": hold_id, "state": "refunded",
                            "amount_refunded": 4500, "currency": "usd"}
        again = await http.post(f"/v1/orders/{hold_id}/refund", headers=admin)
        assert again.status_code == 200 and again.json() == r.json()
        assert server.app.state.payments_gateway.calls.get("refund") == 1
        refund_entries = await db.fetchval(
            "SELECT sum(amount) FROM ledger_entries WHERE drop_id = $1 AND account = "
            "'refund'", drop_id)
        assert refund_entries == -4500
        assert await db.fetchval("SELECT count(*) FROM ledger_entries WHERE drop_id = $1",
                                 drop_id) > before
        row = await db.fetchrow("SELECT o.released, p.amount_refunded FROM orders o "
                                "JOIN payments p ON p.order_id = o.id "
                                "WHERE o.public_id = $1", hold_id)
        assert (row["released"], row["amount_refunded"]) == (None, 4500)
        # a refunded paid order keeps its unit sold (no re-sale after a refund)
        assert (await holds.get_hold(server.app.state.redis, hold_id))["state"] == "paid"
        missing = await http.post("/v1/orders/1-1-0000000000000000/refund", headers=admin)
        assert missing.status_code == 404
        await asyncio.sleep(0.3)
        assert heard.count(hold_id)["order.refunded"] == 1
    finally:
        await heard.close()


async def test_refunding_an_unpaid_order_is_409(server, http, db, make_token) -> None:
    _drop_id, _pid, hold = await _hold(server, http, make_token)
    await _payment_pending(db, hold["hold_id"])
    r = await http.post(f"/v1/orders/{hold['hold_id']}/refund",
                        headers=bearer(make_token("ops", Role.ADMIN)))
    assert r.status_code == 409 and r.json()["error"]["code"] == "charge_not_refundable"


async def test_an_order_can_be_read_over_http(server, http, db, make_token) -> None:
    """What a buyer reads after a reconnect (private events are best effort): the
    order as PostgreSQL has it, the client secret while the payment is pending; the
    drop's creator sees it without the secret; anyone else gets 404."""
    drop_id, pid, hold = await _hold(server, http, make_token)
    hold_id = hold["hold_id"]
    pending = await _payment_pending(db, hold_id)
    buyer = bearer(make_token("buyer-a", Role.VIEWER))
    r = await http.get(f"/v1/orders/{hold_id}", headers=buyer)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["state"], body["drop_id"], body["product_id"], body["buyer_number"]) == (
        "payment_pending", drop_id, pid, hold["buyer_number"])
    assert body["hold_expires_at"] == hold["expires_at"]
    assert body["payment"]["intent_id"] == pending["intent_id"]
    assert body["payment"]["client_secret"].startswith(pending["intent_id"])
    creator = await http.get(f"/v1/orders/{hold_id}",
                             headers=bearer(make_token("creator-1", Role.CREATOR)))
    assert creator.status_code == 200 and "client_secret" not in creator.json()["payment"]
    other = await http.get(f"/v1/orders/{hold_id}",
                           headers=bearer(make_token("buyer-z", Role.VIEWER)))
    assert other.status_code == 404 and other.json()["error"]["code"] == "order_not_found"
    r = await http.post(f"/v1/dev/orders/{hold_id}/confirm", headers=buyer, json={})
    assert r.status_code == 200
    body = (await http.get(f"/v1/orders/{hold_id}", headers=buyer)).json()
    assert body["state"] == "paid" and body["payment"]["amount_received"] == 4500
    assert "client_secret" not in body["payment"]


async def test_an_order_reads_as_held_before_its_row_is_written(
        server, http, db, make_token) -> None:
    """The buy is answered before the hold journal writes the order's row (no await on
    the buy path): a buyer reading ``GET /v1/orders/{hold_id}`` in between got
    ``404 order_not_found`` for the order they had just been told they hold (an outside
    client did, right after its ``buy`` reply). It reads the order from the hold:
    ``held``, no payment yet. The row is held back for real: a transaction keeps
    ``orders`` locked against writes (reads still pass) until the checks are done."""
    creator = bearer(make_token("creator-1", Role.CREATOR))
    drop_id, pid = await selling_drop(http, creator)
    buyer = bearer(make_token("buyer-a", Role.VIEWER))
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
        resp = await post_buy(http, drop_id, buyer, pid)
        assert resp.status_code == 201, resp.text
        hold = resp.json()
        hold_id = hold["hold_id"]
        r = await http.get(f"/v1/orders/{hold_id}", headers=buyer)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "order_id": hold_id, "drop_id": drop_id, "product_id": pid, "state": "held",
            "released": None, "quantity": 1, "buyer_number": hold["buyer_number"],
            "amount": 4500, "currency": "usd", "flow": "client_confirm",
            "hold_expires_at": hold["expires_at"], "payment": None}
        as_creator = await http.get(f"/v1/orders/{hold_id}", headers=creator)
        assert as_creator.status_code == 200 and as_creator.json() == r.json()
        for who in (make_token("buyer-z", Role.VIEWER), make_token("creator-2", Role.CREATOR)):
            other = await http.get(f"/v1/orders/{hold_id}", headers=bearer(who))
            assert other.status_code == 404, other.text
            assert other.json()["error"]["code"] == "order_not_found"
        assert await conn.fetchval(
            "SELECT count(*) FROM orders WHERE public_id = $1", hold_id) == 0
    await _payment_pending(db, hold_id)  # the lock gone, the row and payment follow
    body = (await http.get(f"/v1/orders/{hold_id}", headers=buyer)).json()
    assert body["state"] == "payment_pending" and body["payment"] is not None


@pytest.fixture(scope="module")
def own_postgres():
    """A PostgreSQL of this module's own, to stop and start for real (the session's is
    shared). Started from a thread that lives as long as it (``start_service``)."""
    from concurrent.futures import ThreadPoolExecutor

    from dropserver.services import LocalServices
    from tests.conftest import _prepare_db, run_sync

    executor = ThreadPoolExecutor(1, "own-postgres")
    services = executor.submit(
        lambda: LocalServices(want_redis=False, want_postgres=True).start()).result()
    try:
        run_sync(_prepare_db(services.database_url))
        yield services, executor
    finally:
        executor.submit(services.stop).result()
        executor.shutdown()


async def test_a_charge_made_before_an_outage_for_a_hold_cancelled_during_it_is_refunded(
        own_postgres, settings, make_token) -> None:
    """The fault loop's unrecorded money, deterministic: the order worker charges a saved
    card (off_session: the intent succeeds as it is created), and before the payments
    row is written the buyer cancels the hold and PostgreSQL stops for 2 s (for real).
    The worker's retry must not take the order for one that was never charged: the
    payment is refunded and recorded (order refunded, released cancelled,
    amount_refunded 4500), and money kept = paid orders."""
    from checkout.payment_types import IntentStatus
    from tests.payments_fixtures import save_card

    services, executor = own_postgres
    loop = asyncio.get_running_loop()
    restarted: list[asyncio.Future] = []
    async with running(settings.replace(database_url=services.database_url)) as srv, \
            httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
        db = await asyncpg.create_pool(services.database_url, min_size=1, max_size=4)
        try:
            creator = bearer(make_token("creator-1", Role.CREATOR))
            drop_id, pid = await selling_drop(http, creator, units=2)
            await save_card(db, "buyer-c")
            buyer = bearer(make_token("buyer-c", Role.VIEWER))
            cancelled: list[int] = []

            async def between_charge_and_row(intent) -> None:
                if cancelled:
                    return
                assert intent.status is IntentStatus.SUCCEEDED  # the card was charged
                resp = await http.delete(f"/v1/holds/{intent.metadata['order_id']}",
                                         headers=buyer)
                cancelled.append(resp.status_code)
                await loop.run_in_executor(executor, services.stop_service, "postgres")
                loop.call_later(2.0, lambda: restarted.append(loop.run_in_executor(
                    executor, services.start_service, "postgres")))

            srv.app.state.order_processor.after_intent = between_charge_and_row
            resp = await post_buy(http, drop_id, buyer, pid, flow="off_session")
            assert resp.status_code == 201, resp.text
            hold_id = resp.json()["hold_id"]
            await _until(lambda: bool(restarted), 20)
            await restarted[0]
            assert cancelled == [200]

            async def settled():
                row = await db.fetchrow(
                    "SELECT o.state, o.released, p.amount_received, p.amount_refunded "
                    "FROM orders o LEFT JOIN payments p ON p.order_id = o.id "
                    "WHERE o.public_id = $1", hold_id)
                return row if row is not None and row["state"] == "refunded" else None
            with contextlib.suppress(AssertionError):
                await wait_for(settled, 20)
            row = await db.fetchrow(
                "SELECT o.state, o.released, p.amount_received, p.amount_refunded "
                "FROM orders o LEFT JOIN payments p ON p.order_id = o.id "
                "WHERE o.public_id = $1", hold_id)
            kept = [p for p in await fake_gateway_payments(srv.app.state.redis)
                    if p.order_id == hold_id]
            assert dict(row) == {"state": "refunded", "released": "cancelled",
                                 "amount_received": 4500, "amount_refunded": 4500}, (
                dict(row), kept)
            assert srv.app.state.payments_gateway.calls.get("refund") == 1
            redis = srv.app.state.redis
            await quiesce(redis, drop_id, within=20)
            await check(db, redis, drop_id, acknowledged={hold_id: {"user_id": "buyer-c"}},
                        payments=await fake_gateway_payments(redis))
        finally:
            if restarted:
                await restarted[0]
            await db.close()
