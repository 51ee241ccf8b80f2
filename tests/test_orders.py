"""checkout/orders.py: the order worker against real Redis Streams and PostgreSQL, with
the real stripe SDK talking to the loopback stub."""

from __future__ import annotations

import asyncio
import gc
import json
import linecache
import signal
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from checkout import keys
from checkout.dead_letters import DEAD_LETTER_STREAM
from checkout.order_entries import BadEntry, ReleaseEntry, ReserveEntry, parse_entry
from checkout.order_states import OrderState, can_transition, state_for_intent
from checkout.order_worker import GROUP, OrderWorker
from checkout.orders import OrderProcessor
from checkout.payments import Flow, Intent, IntentStatus, StripeGateway
from checkout.retry import backoff
from dropserver.db import create_pool
from dropserver.redis_client import connect as connect_redis
from dropserver.redis_client import connect_sync as connect_redis_sync
from tests.payments_fixtures import (
    Recorder,
    add_release,
    add_reserve,
    make_drop,
    order_row,
    save_card,
)
from tests.pubsub_support import listen_sync
from tests.stripe_stub import StripeStub

ROOT = Path(__file__).resolve().parent.parent


# -- pure core ----------------------------------------------------------------
def _fields(**over):
    base = {"type": "reserve", "hold_id": "1-2-00000000000000ab", "drop_id": "1",
            "product_id": "2", "user_id": "u1", "quantity": "2", "buyer_number": "7",
            "unit_price": "500", "amount": "1000", "currency": "USD",
            "idempotency_key": "k", "expires_at": "1700000000000", "flow": "off_session"}
    base.update(over)
    return {k.encode(): str(v).encode() for k, v in base.items()}


def test_parse_reserve_and_release() -> None:
    e = parse_entry(_fields())
    assert isinstance(e, ReserveEntry)
    assert (e.quantity, e.amount, e.currency, e.flow) == (2, 1000, "usd", Flow.OFF_SESSION)
    r = parse_entry({b"type": b"release", b"hold_id": b"h", b"drop_id": b"3",
                     b"reason": b"cancelled"})
    assert r == ReleaseEntry(hold_id="h", drop_id=3, reason="cancelled")


@pytest.mark.parametrize("over", [
    {"type": "nope"}, {"amount": "999"}, {"quantity": "0"}, {"flow": "magic"},
    {"currency": "dollars"}, {"drop_id": "x"}, {"hold_id": ""},
])
def test_parse_rejects_bad_entries(over) -> None:
    with pytest.raises(BadEntry):
        parse_entry(_fields(**over))


def test_state_for_intent() -> None:
    def pi(status, code=None):
        return Intent(id="pi_1", status=IntentStatus(status), amount=1, currency="usd",
                      error_code=code)
    assert state_for_intent(pi("succeeded"), Flow.OFF_SESSION) is OrderState.PAID
    assert state_for_intent(pi("requires_capture"), Flow.MANUAL_CAPTURE) \
        is OrderState.AUTHORIZED
    assert state_for_intent(pi("requires_payment_method", "card_declined"),
                            Flow.OFF_SESSION) is OrderState.FAILED
    # a buyer confirming in Stripe.js may try another card
    assert state_for_intent(pi("requires_payment_method", "card_declined"),
                            Flow.CLIENT_CONFIRM) is OrderState.PAYMENT_PENDING
    assert state_for_intent(pi("canceled"), Flow.CLIENT_CONFIRM) is OrderState.CANCELLED


def test_transitions_and_backoff() -> None:
    assert can_transition(OrderState.HELD, OrderState.PAID)
    assert can_transition(OrderState.PAID, OrderState.REFUNDED)
    assert not can_transition(OrderState.PAID, OrderState.FAILED)
    assert not can_transition(OrderState.EXPIRED, OrderState.PAID)
    for attempt in range(10):
        assert 0 <= backoff(attempt) <= 5.0


# -- against Redis, PostgreSQL and the stub -----------------------------------
@pytest.fixture(scope="module")
def stub() -> Iterator[StripeStub]:
    with StripeStub() as s:
        yield s


@pytest.fixture
async def env(clean_backends, stub) -> AsyncIterator[dict]:
    db = await create_pool(clean_backends.database_url, min_size=1, max_size=5)
    redis = connect_redis(clean_backends.redis_url)
    gateway = StripeGateway("sk_test_x", api_base=stub.url, max_network_retries=0)
    rec = Recorder()
    proc = OrderProcessor(db, redis, gateway, notify=rec)
    worker = OrderWorker(redis, proc, consumer="test-a", claim_idle_ms=200, block_ms=100)
    try:
        yield {"db": db, "redis": redis, "gw": gateway, "rec": rec, "proc": proc,
               "worker": worker, "stub": stub, "backends": clean_backends}
    finally:
        await worker.stop()
        await gateway.close()
        await redis.aclose()
        await db.close()


async def drain(worker: OrderWorker, rounds: int = 5) -> None:
    for _ in range(rounds):
        await worker.run_once()


async def test_client_confirm_sends_client_secret_then_webhookless_pay(env) -> None:
    db, redis, rec, stub = env["db"], env["redis"], env["rec"], env["stub"]
    drop_id, product_id = await make_drop(db)
    hold = await add_reserve(redis, drop_id, product_id, "buyer-1")
    await drain(env["worker"])
    row = await order_row(db, hold)
    assert row["state"] == "payment_pending"
    assert row["payment_status"] == "requires_payment_method"
    (msg,) = rec.of("order.payment")
    assert msg["order_id"] == hold and msg["client_secret"].startswith(row["intent_id"])
    pi = stub.intents[row["intent_id"]]
    assert pi["metadata"]["order_id"] == hold
    assert pi["transfer_group"] == f"drop_{drop_id}"
    assert await redis.xpending(keys.orders(drop_id), GROUP) == {
        "pending": 0, "min": None, "max": None, "consumers": []}


async def test_off_session_charge_is_paid_and_recorded(env) -> None:
    db, redis, rec, stub = env["db"], env["redis"], env["rec"], env["stub"]
    drop_id, product_id = await make_drop(db, price=4200)
    await save_card(db, "buyer-2")
    hold = await add_reserve(redis, drop_id, product_id, "buyer-2", price=4200,
                             flow="off_session")
    await drain(env["worker"])
    row = await order_row(db, hold)
    assert row["state"] == "paid" and row["payment_status"] == "succeeded"
    assert row["amount_received"] == 4200 and row["fee"] == (4200 * 29 + 500) // 1000 + 30
    assert rec.of("order.paid") == [{"order_id": hold, "drop_id": drop_id,
                                     "product_id": product_id, "amount": 4200,
                                     "currency": "usd"}]
    assert stub.intents[row["intent_id"]]["customer"] == "cus_buyer-2"


async def test_off_session_decline_fails_the_order(env) -> None:
    db, redis, rec = env["db"], env["redis"], env["rec"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "buyer-3", "pm_card_chargeDeclined")
    hold = await add_reserve(redis, drop_id, product_id, "buyer-3", flow="off_session")
    await drain(env["worker"])
    row = await order_row(db, hold)
    assert row["state"] == "failed"
    assert rec.of("order.failed")[0]["reason"] == "card_declined"


async def test_release_cancels_the_intent(env) -> None:
    db, redis, rec, stub = env["db"], env["redis"], env["rec"], env["stub"]
    drop_id, product_id = await make_drop(db)
    hold = await add_reserve(redis, drop_id, product_id, "buyer-4")
    await add_release(redis, drop_id, hold, "expired")
    await drain(env["worker"])
    row = await order_row(db, hold)
    assert row["state"] == "expired"
    assert stub.intents[row["intent_id"]]["status"] == "canceled"
    assert rec.of("order.expired")[0]["order_id"] == hold


async def test_lapsed_hold_is_never_charged(env) -> None:
    db, redis, stub = env["db"], env["redis"], env["stub"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "buyer-5")
    before = stub.count("POST /v1/payment_intents")
    hold = await add_reserve(redis, drop_id, product_id, "buyer-5", flow="off_session",
                             ttl_s=-1)
    await drain(env["worker"])
    assert (await order_row(db, hold))["state"] == "expired"
    assert stub.count("POST /v1/payment_intents") == before


async def test_malformed_and_unknown_entries_go_to_dead_letter(env) -> None:
    db, redis, rec = env["db"], env["redis"], env["rec"]
    drop_id, product_id = await make_drop(db)
    await redis.sadd(keys.ACTIVE_DROPS, drop_id)
    await redis.xadd(keys.orders(drop_id), {"type": "reserve", "hold_id": "x-1",
                                            "user_id": "buyer-6"})
    # off-session without a saved card is refused, the buyer is told
    hold = await add_reserve(redis, drop_id, product_id, "buyer-7", flow="off_session")
    await drain(env["worker"])
    # The two entries belong to different holds, which the worker handles
    # concurrently: they reach the dead-letter stream, and their buyers are told, in
    # either order. Each must be there exactly once, under its own reason.
    dead = await redis.xrange(DEAD_LETTER_STREAM)
    parked = sorted((f[b"reason"].decode(), json.loads(f[b"fields"])["hold_id"])
                    for _, f in dead)
    assert parked == [("malformed", "x-1"), ("rejected", hold)]
    assert (await order_row(db, hold))["state"] == "failed"
    assert sorted(d["order_id"] for d in rec.of("order.failed")) == sorted(["x-1", hold])
    assert (await redis.xpending(keys.orders(drop_id), GROUP))["pending"] == 0


async def test_transient_gateway_errors_are_retried(env) -> None:
    db, redis, stub = env["db"], env["redis"], env["stub"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "buyer-8")
    stub.fail_next.extend([500, 503])
    hold = await add_reserve(redis, drop_id, product_id, "buyer-8", flow="off_session")
    await drain(env["worker"])
    assert (await order_row(db, hold))["state"] == "paid"
    assert await redis.xlen(DEAD_LETTER_STREAM) == 0


async def test_an_outage_is_waited_out_never_dead_lettered(env) -> None:
    """The gateway answers 5xx twelve times in a row: the entry waits (more tries than
    DROPSERVER_ORDER_MAX_ATTEMPTS) and the order is paid; nothing is dead-lettered."""
    db, redis, stub = env["db"], env["redis"], env["stub"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "buyer-9")
    worker = OrderWorker(redis, env["proc"], consumer="test-r", max_attempts=2,
                         block_ms=100)
    stub.fail_next.extend([500, 503] * 6)
    hold = await add_reserve(redis, drop_id, product_id, "buyer-9", flow="off_session")
    await drain(worker)
    assert not stub.fail_next
    assert (await order_row(db, hold))["state"] == "paid"
    assert await redis.xlen(DEAD_LETTER_STREAM) == 0


async def test_a_refused_request_is_dead_lettered_after_max_attempts(env) -> None:
    """A 400 from the gateway is not an outage: after DROPSERVER_ORDER_MAX_ATTEMPTS
    tries the entry is parked (metric), the order failed, the buyer told once."""
    from prometheus_client import REGISTRY

    db, redis, stub, rec = env["db"], env["redis"], env["stub"], env["rec"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "buyer-9b")
    worker = OrderWorker(redis, env["proc"], consumer="test-p", max_attempts=2,
                         block_ms=100)
    before = REGISTRY.get_sample_value("dropserver_order_dead_letters_total",
                                       {"reason": "permanent_error"}) or 0
    stub.fail_next.extend([400, 400])
    hold = await add_reserve(redis, drop_id, product_id, "buyer-9b", flow="off_session")
    await drain(worker)
    after = REGISTRY.get_sample_value("dropserver_order_dead_letters_total",
                                      {"reason": "permanent_error"})
    assert after == before + 1
    assert (await order_row(db, hold))["state"] == "failed"
    assert [d["order_id"] for d in rec.of("order.failed")] == [hold]
    assert rec.of("order.failed")[0]["reason"] == "processing_error"


async def test_replayed_entry_does_not_charge_twice(env) -> None:
    """The same reserve entry processed again (e.g. re-added after a Redis failover)
    finds its order and intent: one PaymentIntent, one orders row, one payments row."""
    db, redis, stub = env["db"], env["redis"], env["stub"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "buyer-10")
    hold = await add_reserve(redis, drop_id, product_id, "buyer-10", flow="off_session")
    await drain(env["worker"])
    entry = (await redis.xrange(keys.orders(drop_id)))[-1][1]
    await redis.xadd(keys.orders(drop_id), entry)
    await drain(env["worker"])
    made = [p for p in stub.intents.values() if p["metadata"].get("order_id") == hold]
    assert len(made) == 1
    assert await db.fetchval("SELECT count(*) FROM orders WHERE public_id = $1", hold) == 1
    assert await db.fetchval("SELECT count(*) FROM payments p JOIN orders o "
                             "ON o.id = p.order_id WHERE o.public_id = $1", hold) == 1


async def _doomed_worker(backends, stripe_url: str, mode: str) -> None:
    """Run tests/order_worker_proc.py in ``mode`` until it SIGKILLs itself."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.order_worker_proc", backends.redis_url,
        backends.database_url, stripe_url, mode,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, out.decode()


async def test_worker_killed_after_intent_before_db_charges_once(env) -> None:
    """A worker process is SIGKILLed between creating the PaymentIntent and recording
    it. Another consumer XAUTOCLAIMs the entry: exactly one charge, one order row, one
    payments row (the re-run sends the same idempotency key and gets the same intent)."""
    db, redis, stub = env["db"], env["redis"], env["stub"]
    backends = env["backends"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "buyer-11")
    hold = await add_reserve(redis, drop_id, product_id, "buyer-11", flow="off_session")
    await _doomed_worker(backends, stub.url, "crash-after-intent")
    made = [p for p in stub.intents.values() if p["metadata"].get("order_id") == hold]
    assert len(made) == 1 and made[0]["status"] == "succeeded"  # charged, not recorded
    row = await order_row(db, hold)
    assert row["state"] == "held" and row["intent_id"] is None
    pending = await redis.xpending(keys.orders(drop_id), GROUP)
    assert pending["pending"] == 1 and pending["consumers"][0]["name"] == b"doomed"

    await asyncio.sleep(0.3)  # idle longer than claim_idle_ms
    await drain(env["worker"])
    made = [p for p in stub.intents.values() if p["metadata"].get("order_id") == hold]
    assert len(made) == 1
    assert f"pi:{hold}" in stub.idempotency_keys
    assert stub.idempotency_keys.count(f"pi:{hold}") == 2  # asked twice, charged once
    row = await order_row(db, hold)
    assert row["state"] == "paid" and row["intent_id"] == made[0]["id"]
    assert await db.fetchval("SELECT count(*) FROM orders") == 1
    assert await db.fetchval("SELECT count(*) FROM payments") == 1
    assert (await redis.xpending(keys.orders(drop_id), GROUP))["pending"] == 0


async def test_two_workers_share_a_drop_without_double_charges(env) -> None:
    db, redis, stub = env["db"], env["redis"], env["stub"]
    drop_id, product_id = await make_drop(db)
    holds = []
    for i in range(40):
        await save_card(db, f"b{i}")
        holds.append(await add_reserve(redis, drop_id, product_id, f"b{i}",
                                       flow="off_session"))
    second = OrderWorker(redis, env["proc"], consumer="test-b", block_ms=100)
    await asyncio.gather(drain(env["worker"], 4), drain(second, 4))
    states = [r["state"] for r in await db.fetch(
        "SELECT state FROM orders WHERE public_id = ANY($1::text[])", holds)]
    assert states == ["paid"] * 40
    made = [p for p in stub.intents.values() if p["metadata"].get("order_id") in holds]
    assert len(made) == 40


async def test_worker_task_starts_and_stops(env) -> None:
    db, redis = env["db"], env["redis"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "buyer-12")
    worker = env["worker"]
    worker.start()
    hold = await add_reserve(redis, drop_id, product_id, "buyer-12", flow="off_session")
    deadline = time.monotonic() + 10
    while (await order_row(db, hold) or {}).get("state") != "paid":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await worker.stop()


async def test_a_worker_cancelled_before_its_read_starts_leaves_no_command_unawaited(
        env) -> None:
    """Stopping a worker cancels its round wherever it is, also in the loop turn after
    it handed its XREADGROUPs to gather and before their tasks first ran. redis-py's
    async ``xreadgroup`` is no coroutine function: it makes the command's coroutine at
    once and returns a wrapper that awaits it, so a wrapper cancelled before it starts
    left that coroutine behind ("coroutine 'Redis.execute_command' was never awaited",
    printed at teardown by tests/test_reconcile.py and test_variant_orders.py)."""
    redis = env["redis"]
    worker = OrderWorker(redis, env["proc"], consumer="test-cancel", claim_idle_ms=60_000,
                         block_ms=50)
    await redis.sadd(keys.ACTIVE_DROPS, 424242)
    await worker.run_once()  # creates the group, claims, reads; the next round only reads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = asyncio.create_task(worker.run_once())
        await asyncio.sleep(0)  # its first step: straight into gather, which made tasks
        # (the round waits in gather itself, not in something awaited before it)
        frame = task.get_coro().cr_frame
        assert "asyncio.gather(" in linecache.getline(frame.f_code.co_filename,
                                                      frame.f_lineno)
        task.cancel()  # ... that have not run yet
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        await asyncio.sleep(0)  # the step that got the cancellation let go of it
        gc.collect()
    unawaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert unawaited == []
    assert await worker.run_once() == 0  # and the worker goes on reading


def test_publish_user_reaches_the_user_channel(clean_backends) -> None:
    """The default notifier is realtime's publish_user (contract 1)."""

    from checkout.orders import publish_user
    from realtime import channels
    from tests.conftest import run_sync

    client = connect_redis_sync(clean_backends.redis_url)
    sub = listen_sync(client, channels.user_channel("buyer-x"))

    async def send() -> None:
        r = connect_redis(clean_backends.redis_url)
        await publish_user(r, "buyer-x", "order.paid", {"order_id": "h"})
        await r.aclose()

    run_sync(send())
    msg = sub.get_message(timeout=2)
    assert msg is not None and b"order.paid" in msg["data"]
    sub.close()
    client.close()


# -- with the reservations engineer's real scripts (reserve.lua, release.lua) ---------
async def _real_hold(redis, drop_id: int, product_id: int, user: str, flow: str,
                     units: int = 5):
    from checkout import inventory
    from checkout.defense import BuyLimits
    from checkout.reserve import BuyRequest, reserve

    await inventory.prewarm(redis, {"id": drop_id, "currency": "usd"},
                            [{"product_id": product_id, "price": 2500, "units": units}])
    await inventory.open_sales(redis, drop_id, product_id)
    return await reserve(redis, BuyRequest(drop_id, product_id, user, f"k-{user}",
                                           flow=flow), hold_ttl_ms=60_000,
                         limits=BuyLimits())


async def test_real_reserve_paid_marks_the_hold_paid(env) -> None:
    from checkout import holds, inventory

    db, redis, rec = env["db"], env["redis"], env["rec"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "rb-1")
    hold = await _real_hold(redis, drop_id, product_id, "rb-1", "off_session")
    await drain(env["worker"])
    row = await order_row(db, hold.hold_id)
    assert row["state"] == "paid" and row["buyer_number"] == hold.buyer_number
    assert (await holds.get_hold(redis, hold.hold_id))["state"] == "paid"
    assert (await inventory.remaining(redis, drop_id))[product_id] == 4
    assert rec.of("order.paid")[0]["order_id"] == hold.hold_id


async def test_real_reserve_decline_returns_the_units(env) -> None:
    from checkout import holds, inventory

    db, redis = env["db"], env["redis"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "rb-2", "pm_card_chargeDeclined")
    hold = await _real_hold(redis, drop_id, product_id, "rb-2", "off_session")
    assert (await inventory.remaining(redis, drop_id))[product_id] == 4
    await drain(env["worker"])
    assert (await order_row(db, hold.hold_id))["state"] == "failed"
    assert (await holds.get_hold(redis, hold.hold_id))["state"] == "failed"
    assert (await inventory.remaining(redis, drop_id))[product_id] == 5


async def test_real_cancel_then_late_payment_is_undone(env) -> None:
    """The buyer cancels (release.lua) while their payment goes through. The payment is
    refunded, never kept for released units, and the refund is recorded: the order is
    ``refunded`` (its hold stays ``released``: the unit is back on sale),
    ``amount_refunded`` is the charge, the buyer hears ``order.refunded`` once. The late
    succeeded webhook changes nothing and refunds nothing twice."""
    from checkout import holds

    db, redis, stub, proc = env["db"], env["redis"], env["stub"], env["proc"]
    drop_id, product_id = await make_drop(db)
    hold = await _real_hold(redis, drop_id, product_id, "rb-3", "client_confirm")
    await drain(env["worker"])
    row = await order_row(db, hold.hold_id)
    assert row["state"] == "payment_pending"
    # the buyer pays in Stripe.js at the very moment the hold is cancelled
    stub.confirm_as_buyer(row["intent_id"])
    await holds.release(redis, hold.hold_id, "cancelled", owner="rb-3")
    await drain(env["worker"])
    row = await order_row(db, hold.hold_id)
    assert (row["state"], row["released"]) == ("refunded", "cancelled")
    assert row["amount_received"] == 2500
    assert await db.fetchval("SELECT amount_refunded FROM payments WHERE order_id = $1",
                             row["id"]) == 2500
    intent = await env["gw"].retrieve_intent(row["intent_id"])
    await proc.apply_intent(row, intent)  # the late succeeded webhook
    charge = stub.charges[stub.intents[row["intent_id"]]["latest_charge"]]
    assert charge["amount_refunded"] == 2500
    assert (await order_row(db, hold.hold_id))["state"] == "refunded"
    assert [d["amount"] for d in env["rec"].of("order.refunded")] == [2500]
    assert env["rec"].of("order.cancelled") == []  # it ended refunded: one outcome


async def test_a_stale_intent_applied_after_the_payment_changes_nothing(env) -> None:
    """Two appliers of one order race: a worker re-reading its entry (redelivered after a
    Redis failover) retrieved the intent while it still awaited the buyer; the buyer's
    payment is applied first; the worker's older snapshot is applied last. The payment
    row keeps ``succeeded`` and the amount received (it said ``requires_payment_method``
    and 0 before: a paid order whose money PostgreSQL did not keep, seen in the cluster
    failover test), and the order stays paid, told once."""
    from tests.invariants import check, stub_payments

    db, redis, stub, proc = env["db"], env["redis"], env["stub"], env["proc"]
    drop_id, product_id = await make_drop(db)
    hold = await _real_hold(redis, drop_id, product_id, "rb-st", "client_confirm")
    await drain(env["worker"])
    row = await order_row(db, hold.hold_id)
    stale = await env["gw"].retrieve_intent(row["intent_id"])
    assert stale.status is IntentStatus.REQUIRES_PAYMENT_METHOD
    stub.confirm_as_buyer(row["intent_id"])
    fresh = await env["gw"].retrieve_intent(row["intent_id"])
    assert await proc.apply_intent(row, fresh) is OrderState.PAID
    assert await proc.apply_intent(row, stale) is OrderState.PAID
    row = await order_row(db, hold.hold_id)
    payment = await db.fetchrow("SELECT status, amount_received FROM payments "
                                "WHERE order_id = $1", row["id"])
    assert (row["state"], payment["status"], payment["amount_received"]) == (
        "paid", "succeeded", 2500)
    assert [d["order_id"] for d in env["rec"].of("order.paid")] == [hold.hold_id]
    # (Redis was loaded with 5 units by _real_hold, PostgreSQL's drop has 100)
    await check(db, redis, drop_id, acknowledged=[hold.hold_id],
                payments=stub_payments(stub), redis_checks=False)


async def test_payment_for_a_hold_released_in_redis_is_refunded(env) -> None:
    """The succeeded webhook arrives before the worker saw the release entry: Redis
    says the hold is cancelled (mark_paid refuses), so the payment is refunded."""
    from checkout import holds

    db, redis, stub, proc = env["db"], env["redis"], env["stub"], env["proc"]
    drop_id, product_id = await make_drop(db)
    hold = await _real_hold(redis, drop_id, product_id, "rb-4", "client_confirm")
    await drain(env["worker"])
    row = await order_row(db, hold.hold_id)
    stub.confirm_as_buyer(row["intent_id"])
    await holds.release(redis, hold.hold_id, "cancelled", owner="rb-4")
    intent = await env["gw"].retrieve_intent(row["intent_id"])
    assert await proc.apply_intent(row, intent) is OrderState.REFUNDED
    charge = stub.charges[stub.intents[row["intent_id"]]["latest_charge"]]
    assert charge["amount_refunded"] == 2500
    await drain(env["worker"])  # the release entry now finds nothing open
    row = await order_row(db, hold.hold_id)
    assert (row["state"], row["released"]) == ("refunded", "cancelled")
    assert [d["order_id"] for d in env["rec"].of("order.refunded")] == [hold.hold_id]


async def test_a_failing_compensation_step_skips_none_of_the_others(env) -> None:
    """Dead-lettering an order runs each compensating step on its own: the gateway
    refusing the cancel (not an outage: it is counted and logged) still leaves the
    order failed, its hold released with the units back, and the buyer told once."""
    from prometheus_client import REGISTRY

    from checkout import holds, inventory
    from checkout.compensations import fail_order

    db, redis, rec, stub = env["db"], env["redis"], env["rec"], env["stub"]
    drop_id, product_id = await make_drop(db)
    hold = await _real_hold(redis, drop_id, product_id, "cb-1", "client_confirm")
    await drain(env["worker"])  # the order row and its PaymentIntent, payment_pending
    assert (await order_row(db, hold.hold_id))["state"] == "payment_pending"
    assert (await inventory.remaining(redis, drop_id))[product_id] == 4
    fields = {k.decode(): v.decode() for _id, f in await redis.xrange(keys.orders(drop_id))
              for k, v in f.items()}
    before = REGISTRY.get_sample_value("dropserver_order_compensation_failures_total",
                                       {"step": "cancel or refund the payment"}) or 0
    stub.fail_next.extend([400] * 5)  # every cancel (and its re-read) refused
    await fail_order(env["proc"], fields)
    stub.fail_next.clear()
    assert REGISTRY.get_sample_value("dropserver_order_compensation_failures_total",
                                     {"step": "cancel or refund the payment"}) == before + 1
    assert (await order_row(db, hold.hold_id))["state"] == "failed"
    assert (await holds.get_hold(redis, hold.hold_id))["state"] == "failed"
    assert (await inventory.remaining(redis, drop_id))[product_id] == 5
    assert [d["order_id"] for d in rec.of("order.failed")] == [hold.hold_id]


async def test_a_release_undoes_a_charge_whose_row_was_never_written(env) -> None:
    """The worker charged a saved card (the intent succeeds as it is created) and lost
    PostgreSQL before the payments row; its reserve entry is not retried here (as
    after a Redis loss). The buyer's cancel alone -- a release entry -- finds the charge
    (``orders.payment_requested``, the same idempotency key) and refunds and records
    it; no second charge is made."""
    from checkout import holds

    db, redis, stub, proc = env["db"], env["redis"], env["stub"], env["proc"]
    drop_id, product_id = await make_drop(db)
    await save_card(db, "rb-9")
    hold = await _real_hold(redis, drop_id, product_id, "rb-9", "off_session")
    charged: list[Intent] = []

    async def outage(intent: Intent) -> None:
        charged.append(intent)
        raise ConnectionResetError(104, "PostgreSQL went away before the payments row")

    proc.after_intent = outage
    (_, fields), = await redis.xrange(keys.orders(drop_id))
    with pytest.raises(ConnectionResetError):
        await proc.handle(parse_entry(fields))
    proc.after_intent = None
    assert charged[0].status is IntentStatus.SUCCEEDED
    await holds.release(redis, hold.hold_id, "cancelled", owner="rb-9")
    await proc.handle(ReleaseEntry(hold.hold_id, drop_id, "cancelled"))
    row = await order_row(db, hold.hold_id)
    assert (row["state"], row["released"], row["intent_id"]) == (
        "refunded", "cancelled", charged[0].id)
    assert await db.fetchval("SELECT amount_refunded FROM payments WHERE order_id = $1",
                             row["id"]) == 2500
    charge = stub.charges[stub.intents[charged[0].id]["latest_charge"]]
    assert charge["amount_refunded"] == 2500
    mine = [pi for pi in stub.intents.values()
            if (pi.get("metadata") or {}).get("order_id") == hold.hold_id]
    assert len(mine) == 1  # asked again with the same key: no second charge
    assert [d["amount"] for d in env["rec"].of("order.refunded")] == [2500]


async def test_worker_killed_inside_the_fake_gateways_request_is_taken_over(env) -> None:
    """The fake gateway runs in the worker's process: a worker SIGKILLed inside its
    PaymentIntent request leaves the idempotency key in flight, unanswered. The entry
    is re-claimed by another consumer, which takes the key over after the lease: the
    order is recorded with its one intent and nothing stays pending."""
    from checkout.fake_gateway import FakeGateway, RedisStore

    db, redis, rec = env["db"], env["redis"], env["rec"]
    drop_id, product_id = await make_drop(db)
    hold = await add_reserve(redis, drop_id, product_id, "buyer-12")
    await _doomed_worker(env["backends"], "-", "crash-in-fake-gateway")
    assert await redis.hexists("fakepay:idem", f"pi:{hold}")  # in flight, unanswered
    pending = await redis.xpending(keys.orders(drop_id), GROUP)
    assert pending["pending"] == 1 and pending["consumers"][0]["name"] == b"doomed"

    heir_gateway = FakeGateway(store=RedisStore(redis), in_flight_lease_s=1.0)
    heir = OrderWorker(redis, OrderProcessor(db, redis, heir_gateway, notify=rec),
                       consumer="heir", claim_idle_ms=200, block_ms=100)
    await asyncio.sleep(0.3)  # idle longer than claim_idle_ms
    deadline = time.monotonic() + 15
    while (await redis.xpending(keys.orders(drop_id), GROUP))["pending"]:
        assert time.monotonic() < deadline, "the entry stayed pending"
        await heir.run_once()
    row = await order_row(db, hold)
    assert row["state"] == "payment_pending" and row["intent_id"] is not None
    assert await heir_gateway.retrieve_intent(row["intent_id"])
    assert await db.fetchval("SELECT count(*) FROM payments") == 1
