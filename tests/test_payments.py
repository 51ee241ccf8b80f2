"""checkout/payments.py: the Stripe gateway through the real SDK against the loopback
stub, and the fake gateway, held to the same behaviour."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator

import pytest

from checkout.payments import (
    FakeGateway,
    Flow,
    GatewayError,
    IntentStatus,
    RedisStore,
    StripeGateway,
    create_gateway,
)
from dropserver.redis_client import connect as connect_redis
from dropserver.settings import load_settings
from tests.stripe_stub import StripeStub


@pytest.fixture(scope="module")
def stub() -> Iterator[StripeStub]:
    with StripeStub() as s:
        yield s


@pytest.fixture(params=["stripe", "fake", "fake-redis"])
async def gateway(request, stub: StripeStub) -> AsyncIterator:
    redis = None
    if request.param == "stripe":
        gw = StripeGateway("sk_test_x", api_base=stub.url, max_network_retries=0)
    elif request.param == "fake":
        gw = FakeGateway(slow_seconds=0.05)
    else:  # what the server runs: objects in Redis, shared by its workers
        redis = connect_redis(request.getfixturevalue("clean_backends").redis_url)
        gw = FakeGateway(slow_seconds=0.05, store=RedisStore(redis))
    try:
        yield gw
    finally:
        await gw.close()
        if redis is not None:
            await redis.aclose()


async def test_fake_gateway_workers_share_intents_through_redis(clean_backends) -> None:
    """An order re-claimed by another worker finds the PaymentIntent the first made
    (the 50,000-viewer rehearsal dead-lettered 11 paid orders when each worker had
    its own in-memory fake)."""
    redis = connect_redis(clean_backends.redis_url)
    try:
        first = FakeGateway(store=RedisStore(redis))
        second = FakeGateway(store=RedisStore(redis))
        made = await first.create_intent(amount=4900, currency="usd", idempotency_key="o:1",
                                         flow=Flow.MANUAL_CAPTURE, capture_manual=True,
                                         payment_method="pm_card_visa")
        assert (await second.retrieve_intent(made.id)).status is IntentStatus.REQUIRES_CAPTURE
        again = await second.create_intent(amount=4900, currency="usd",
                                           idempotency_key="o:1", flow=Flow.MANUAL_CAPTURE,
                                           capture_manual=True, payment_method="pm_card_visa")
        assert again.id == made.id and second.calls.get("create_intent") is None
        captured = await second.capture_intent(made.id, idempotency_key="cap:1")
        assert captured.status is IntentStatus.SUCCEEDED and captured.fee > 0
        assert (await first.retrieve_intent(made.id)).status is IntentStatus.SUCCEEDED
        charge = await first.retrieve_charge(captured.latest_charge)
        assert charge.amount_captured == 4900
    finally:
        await redis.aclose()


async def test_off_session_charge_succeeds_with_fee(gateway) -> None:
    pi = await gateway.create_intent(amount=2500, currency="usd", idempotency_key="pi:h-ok",
                                     flow=Flow.OFF_SESSION, payment_method="pm_card_visa",
                                     transfer_group="drop_1", metadata={"order_id": "h-ok"})
    assert pi.status is IntentStatus.SUCCEEDED
    assert pi.amount_received == 2500
    assert pi.fee == (2500 * 29 + 500) // 1000 + 30 == 103
    assert pi.transfer_group == "drop_1"
    assert pi.metadata == {"order_id": "h-ok"}
    again = await gateway.retrieve_intent(pi.id)
    assert again.status is IntentStatus.SUCCEEDED and again.fee == 103


async def test_decline_returns_intent_with_error(gateway) -> None:
    pi = await gateway.create_intent(amount=900, currency="usd", idempotency_key="pi:h-dec",
                                     flow=Flow.OFF_SESSION,
                                     payment_method="pm_card_chargeDeclined")
    assert pi.status is IntentStatus.REQUIRES_PAYMENT_METHOD
    assert pi.declined and pi.error_code == "card_declined"


async def test_same_key_same_params_is_the_same_intent(gateway, stub: StripeStub) -> None:
    before = stub.count("POST /v1/payment_intents")
    kw = dict(amount=700, currency="usd", idempotency_key="pi:h-idem",
              flow=Flow.OFF_SESSION, payment_method="pm_card_visa")
    first = await gateway.create_intent(**kw)
    second = await gateway.create_intent(**kw)
    assert first.id == second.id
    if isinstance(gateway, StripeGateway):
        # both requests reached the server; the server made one PaymentIntent
        assert stub.count("POST /v1/payment_intents") - before == 2
        made = [p for p in stub.intents.values() if p["amount"] == 700]
        assert len(made) == 1
    with pytest.raises(GatewayError) as info:
        await gateway.create_intent(**{**kw, "amount": 701})
    assert info.value.code == "idempotency_error"


async def test_client_confirm_returns_client_secret(gateway) -> None:
    pi = await gateway.create_intent(amount=1500, currency="eur", idempotency_key="pi:h-cc",
                                     flow=Flow.CLIENT_CONFIRM)
    assert pi.status is IntentStatus.REQUIRES_PAYMENT_METHOD
    assert not pi.declined
    assert pi.client_secret and pi.client_secret.startswith(pi.id + "_secret_")


async def test_manual_capture_then_capture_and_cancel_rules(gateway) -> None:
    pi = await gateway.create_intent(amount=4000, currency="usd", idempotency_key="pi:h-man",
                                     flow=Flow.MANUAL_CAPTURE, capture_manual=True,
                                     payment_method="pm_card_visa")
    assert pi.status is IntentStatus.REQUIRES_CAPTURE
    assert pi.capture_method == "manual"
    captured = await gateway.capture_intent(pi.id, idempotency_key="capture:h-man")
    assert captured.status is IntentStatus.SUCCEEDED and captured.amount_received == 4000
    # capturing again with the same key replays; cancelling a succeeded one is an error
    again = await gateway.capture_intent(pi.id, idempotency_key="capture:h-man")
    assert again.status is IntentStatus.SUCCEEDED
    with pytest.raises(GatewayError) as info:
        await gateway.cancel_intent(pi.id, idempotency_key="cancel:h-man")
    assert info.value.code == "payment_intent_unexpected_state"

    other = await gateway.create_intent(amount=4000, currency="usd",
                                        idempotency_key="pi:h-man2", flow=Flow.MANUAL_CAPTURE,
                                        capture_manual=True, payment_method="pm_card_visa")
    cancelled = await gateway.cancel_intent(other.id, idempotency_key="cancel:h-man2")
    assert cancelled.status is IntentStatus.CANCELED
    with pytest.raises(GatewayError):
        await gateway.cancel_intent(other.id, idempotency_key="cancel:h-man2-again")


async def test_refund_and_transfer(gateway) -> None:
    pi = await gateway.create_intent(amount=3000, currency="usd", idempotency_key="pi:h-ref",
                                     flow=Flow.OFF_SESSION, payment_method="pm_card_visa")
    ref = await gateway.refund(pi.id, idempotency_key="refund:h-ref", amount=1000)
    assert ref.amount == 1000
    assert (await gateway.refund(pi.id, idempotency_key="refund:h-ref", amount=1000)).id \
        == ref.id
    charge = await gateway.retrieve_charge(pi.latest_charge)
    assert charge.amount_refunded == 1000 and not charge.refunded
    with pytest.raises(GatewayError):
        await gateway.refund(pi.id, idempotency_key="refund:h-ref-2", amount=5000)
    tr = await gateway.transfer(amount=1234, currency="usd", destination="acct_creator",
                                transfer_group="drop_9", idempotency_key="tr:9:creator")
    assert tr.amount == 1234 and tr.transfer_group == "drop_9"
    same = await gateway.transfer(amount=1234, currency="usd", destination="acct_creator",
                                  transfer_group="drop_9", idempotency_key="tr:9:creator")
    assert same.id == tr.id


async def _confirm_as_buyer(gateway, stub: StripeStub, intent_id: str, pm: str) -> str:
    """Confirm as Stripe.js would; returns the error code, or "" when it went through."""
    from tests.stripe_stub import StubError

    try:
        if isinstance(gateway, StripeGateway):
            stub.confirm_as_buyer(intent_id, pm)
        else:
            await gateway.confirm_as_buyer(intent_id, pm)
    except StubError as exc:
        return exc.body["error"]["code"]
    except GatewayError as exc:
        return exc.code
    return ""


async def test_no_confirm_of_a_cancelled_intent(gateway, stub: StripeStub) -> None:
    """Stripe refuses to confirm a cancelled PaymentIntent; so does the fake."""
    pi = await gateway.create_intent(amount=900, currency="usd", idempotency_key="pi:h-cx",
                                     flow=Flow.CLIENT_CONFIRM)
    await gateway.cancel_intent(pi.id, idempotency_key="cancel:h-cx")
    code = await _confirm_as_buyer(gateway, stub, pi.id, "pm_card_visa")
    assert code == "payment_intent_unexpected_state"
    assert (await gateway.retrieve_intent(pi.id)).status is IntentStatus.CANCELED


async def test_a_second_full_refund_is_refused(gateway) -> None:
    pi = await gateway.create_intent(amount=800, currency="usd", idempotency_key="pi:h-rr",
                                     flow=Flow.OFF_SESSION, payment_method="pm_card_visa")
    first = await gateway.refund(pi.id, idempotency_key="refund:h-rr")
    assert first.amount == 800
    with pytest.raises(GatewayError) as info:
        await gateway.refund(pi.id, idempotency_key="refund:h-rr:admin")
    assert info.value.code == "charge_already_refunded"
    charge = await gateway.retrieve_charge(pi.latest_charge)
    assert charge.refunded and charge.amount_refunded == 800


async def test_refund_in_full_answers_the_charge_however_often_it_is_asked(gateway) -> None:
    """Orders and tips refund through checkout.refunds: a refund made already (another
    path, another key) answers the refunded charge instead of failing; a charge that
    cannot be refunded (the intent never succeeded) is still an error."""
    from checkout.refunds import refund_in_full

    pi = await gateway.create_intent(amount=700, currency="usd", idempotency_key="pi:h-rf",
                                     flow=Flow.OFF_SESSION, payment_method="pm_card_visa")
    await gateway.refund(pi.id, idempotency_key="refund:h-rf:creator")
    for key in ("refund:h-rf", "refund:h-rf"):
        charge = await refund_in_full(gateway, pi, key=key)
        assert charge.refunded and charge.amount_refunded == 700
    unpaid = await gateway.create_intent(amount=700, currency="usd",
                                         idempotency_key="pi:h-rf2", flow=Flow.CLIENT_CONFIRM)
    with pytest.raises(GatewayError) as info:
        await refund_in_full(gateway, unpaid, key="refund:h-rf2")
    assert info.value.code != "charge_already_refunded"


async def test_refund_events_as_stripe_sends_them(gateway, stub: StripeStub) -> None:
    """A refund sends charge.refunded, then refund.created
    (https://docs.stripe.com/changelog/acacia/2024-10-28/refund-webhook-update)."""
    seen: list[dict] = []
    if isinstance(gateway, FakeGateway):
        async def listen(event: dict) -> None:
            seen.append(event)
        gateway.listeners.append(listen)
    start = len(stub.events)
    pi = await gateway.create_intent(amount=700, currency="usd", idempotency_key="pi:h-ev",
                                     flow=Flow.OFF_SESSION, payment_method="pm_card_visa")
    ref = await gateway.refund(pi.id, idempotency_key="refund:h-ev")
    await asyncio.sleep(0.05)  # the fake delivers from a task
    events = seen if isinstance(gateway, FakeGateway) else stub.events[start:]
    types = [e["type"] for e in events]
    assert types == ["payment_intent.succeeded", "charge.refunded", "refund.created"]
    charge, refund = events[1]["data"]["object"], events[2]["data"]["object"]
    assert charge["id"] == pi.latest_charge and charge["refunded"] is True
    assert charge["amount_refunded"] == 700
    assert refund["id"] == ref.id and refund["charge"] == pi.latest_charge
    assert refund["payment_intent"] == pi.id


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_fake_confirm_and_cancel_race_one_wins(store, request) -> None:
    """The slow card spends its time before the confirm takes effect: a cancel landing
    meanwhile wins and the confirm is refused; a cancel after the confirm is refused.
    Both on the in-process store and on Redis (the server's), where the two requests
    may come from two worker processes."""
    redis = None
    kw = {}
    if store == "redis":
        redis = connect_redis(request.getfixturevalue("clean_backends").redis_url)
        kw["store"] = RedisStore(redis)
    try:
        gw = FakeGateway(slow_seconds=0.3, **kw)
        pi = await gw.create_intent(amount=500, currency="usd", idempotency_key="pi:race",
                                    flow=Flow.CLIENT_CONFIRM)
        confirm = asyncio.create_task(gw.confirm_as_buyer(pi.id, "pm_card_slow"))
        await asyncio.sleep(0.05)
        cancelled = await gw.cancel_intent(pi.id, idempotency_key="cancel:race")
        assert cancelled.status is IntentStatus.CANCELED
        with pytest.raises(GatewayError) as info:
            await confirm
        assert info.value.code == "payment_intent_unexpected_state"
        assert (await gw.retrieve_intent(pi.id)).status is IntentStatus.CANCELED

        pi2 = await gw.create_intent(amount=500, currency="usd", idempotency_key="pi:race2",
                                     flow=Flow.CLIENT_CONFIRM)
        assert (await gw.confirm_as_buyer(pi2.id, "pm_card_visa")).status \
            is IntentStatus.SUCCEEDED
        with pytest.raises(GatewayError) as info:
            await gw.cancel_intent(pi2.id, idempotency_key="cancel:race2")
        assert info.value.code == "payment_intent_unexpected_state"
    finally:
        if redis is not None:
            await redis.aclose()


async def test_fake_same_key_at_the_same_time_runs_once(clean_backends) -> None:
    """Two processes asking with one idempotency key at once (a re-claimed entry):
    one PaymentIntent, one charge, both get it."""
    redis = connect_redis(clean_backends.redis_url)
    try:
        first = FakeGateway(slow_seconds=0.2, store=RedisStore(redis))
        second = FakeGateway(slow_seconds=0.2, store=RedisStore(redis))
        kw = dict(amount=600, currency="usd", idempotency_key="pi:twice",
                  flow=Flow.OFF_SESSION, payment_method="pm_card_slow")
        a, b = await asyncio.gather(first.create_intent(**kw), second.create_intent(**kw))
        assert a.id == b.id and a.status is b.status is IntentStatus.SUCCEEDED
        assert first.calls.get("create_intent", 0) + second.calls.get("create_intent", 0) == 1
    finally:
        await redis.aclose()


async def test_slow_card_on_the_fake() -> None:
    import time

    gw = FakeGateway(slow_seconds=0.2)
    t0 = time.monotonic()
    pi = await gw.create_intent(amount=100, currency="usd", idempotency_key="pi:slow",
                                flow=Flow.OFF_SESSION, payment_method="pm_card_slow")
    assert time.monotonic() - t0 >= 0.2
    assert pi.status is IntentStatus.SUCCEEDED


async def test_server_errors_are_retryable(stub: StripeStub) -> None:
    gw = StripeGateway("sk_test_x", api_base=stub.url, max_network_retries=0)
    try:
        stub.fail_next.append(503)
        with pytest.raises(GatewayError) as info:
            await gw.retrieve_intent("pi_missing")
        assert info.value.retryable
        with pytest.raises(GatewayError) as info:
            await gw.retrieve_intent("pi_missing")
        assert not info.value.retryable and info.value.code == "resource_missing"
    finally:
        await gw.close()


def test_create_gateway_follows_settings() -> None:
    assert create_gateway(load_settings({}, dev=True)).name == "fake"
    gw = create_gateway(load_settings({}, dev=True, payment_gateway="stripe",
                                      stripe_api_key="sk_test_x"))
    assert gw.name == "stripe"


# -- the fake gateway inside the app (dropserver dev) ------------------------------
async def test_dev_confirm_with_the_fake_gateway(server, http, make_token) -> None:
    import asyncpg

    from checkout import holds, inventory
    from checkout.defense import BuyLimits
    from checkout.reserve import BuyRequest, reserve
    from tests.payments_fixtures import make_drop, wait_state

    app = server.app
    assert app.state.payments_gateway.name == "fake"
    db = await asyncpg.connect(app.state.settings.database_url)
    try:
        drop_id, product_id = await make_drop(db)
        redis = app.state.redis
        await inventory.prewarm(redis, {"id": drop_id, "currency": "usd"},
                                [{"product_id": product_id, "price": 2500, "units": 3}])
        await inventory.open_sales(redis, drop_id, product_id)
        hold = await reserve(redis, BuyRequest(drop_id, product_id, "dev-buyer", "k1",
                                               flow="client_confirm"),
                             hold_ttl_ms=60_000, limits=BuyLimits())
        await wait_state(db, hold.hold_id, "payment_pending")
        url = f"/v1/dev/orders/{hold.hold_id}/confirm"
        buyer = {"Authorization": f"Bearer {make_token('dev-buyer')}"}
        r = await http.post(url, json={}, headers={
            "Authorization": f"Bearer {make_token('someone-else')}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "order_not_found"
        r = await http.post(url, json={"payment_method": "pm_card_chargeDeclined"},
                            headers=buyer)
        assert r.status_code == 200
        assert r.json()["state"] == "payment_pending" and r.json()["error"] == "card_declined"
        r = await http.post(url, json={}, headers=buyer)
        assert r.status_code == 200 and r.json()["state"] == "paid"
        assert (await holds.get_hold(redis, hold.hold_id))["state"] == "paid"
        r = await http.post(url, json={}, headers=buyer)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "payment_intent_unexpected_state"
    finally:
        await db.close()


class _DiesMidRequest(RedisStore):
    """A store whose process is SIGKILLed: nothing it started is cleaned up."""

    async def delete(self, kind: str, key: str) -> None:
        pass


async def test_fake_key_of_a_request_that_died_is_taken_over(clean_backends) -> None:
    """A process killed mid-request (an order worker SIGKILLed while creating the
    PaymentIntent) leaves its idempotency key in flight with no one to answer it: the
    next request with that key waits out the lease, then runs it (one intent, one
    charge), instead of answering ``idempotency_key_in_use`` forever."""
    redis = connect_redis(clean_backends.redis_url)
    try:
        doomed = FakeGateway(slow_seconds=30, store=_DiesMidRequest(redis))
        kw = dict(amount=700, currency="usd", idempotency_key="pi:orphaned",
                  flow=Flow.OFF_SESSION, payment_method="pm_card_slow")
        dying = asyncio.create_task(doomed.create_intent(**kw))
        pid = "pi_fake_" + hashlib.sha256(b"pi:orphaned").hexdigest()[:24]
        for _ in range(500):  # until it sleeps in the slow card's confirm
            if await redis.hexists("fakepay:intent", pid):
                break
            await asyncio.sleep(0.01)
        dying.cancel()  # killed: its key stays in flight
        with pytest.raises(asyncio.CancelledError):
            await dying
        heir = FakeGateway(slow_seconds=0.1, in_flight_lease_s=0.5, store=RedisStore(redis))
        t0 = asyncio.get_running_loop().time()
        pi = await asyncio.wait_for(heir.create_intent(**kw), 5)
        assert pi.status is IntentStatus.SUCCEEDED and pi.amount_received == 700
        assert asyncio.get_running_loop().time() - t0 >= 0.3  # waited for the lease
        again = await FakeGateway(store=RedisStore(redis)).create_intent(**kw)
        assert again.id == pi.id and again.status is IntentStatus.SUCCEEDED
        assert heir.calls.get("create_intent") == 1
    finally:
        await redis.aclose()
