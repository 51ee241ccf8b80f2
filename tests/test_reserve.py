"""reserve.lua through checkout/reserve.py against a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from checkout import inventory, keys
from checkout.defense import BuyLimits
from checkout.reserve import BuyRefused, BuyRequest, Refusal, reserve

OFF = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=0)
TTL = 600_000


async def selling(r, units=10, limit=1, max_holds=1, kind="standard"):
    await inventory.prewarm(r, {"id": 1, "currency": "eur", "max_holds_per_user": max_holds,
                                "kind": kind},
                            [{"product_id": 5, "price": 1999, "units": units,
                              "per_buyer_limit": limit}])
    await inventory.open_sales(r, 1, 5)


def req(user="u1", key="k1", **kw):
    return BuyRequest(drop_id=1, product_id=5, user_id=user, idempotency_key=key, **kw)


async def buy(r, *a, limits=OFF, **kw):
    return await reserve(r, req(*a, **kw), hold_ttl_ms=TTL, limits=limits)


async def refusal(r, *a, limits=OFF, **kw) -> BuyRefused:
    with pytest.raises(BuyRefused) as err:
        await buy(r, *a, limits=limits, **kw)
    return err.value


async def entries(r):
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _id, fields in await r.xrange(keys.orders(1))]


async def test_reserve_takes_stock_records_hold_and_appends_order(r):
    await selling(r)
    hold = await buy(r)
    assert hold.buyer_number == 1 and hold.remaining == 9 and hold.state == "held"
    assert hold.amount == 1999 and hold.currency == "eur" and hold.flow == "client_confirm"
    assert hold.hold_id.startswith("1-5-") and not hold.replay
    assert (await inventory.remaining(r, 1)) == {5: 9}
    stored = await r.hgetall(keys.hold(1, hold.hold_id))
    assert stored[b"state"] == b"held" and stored[b"user_id"] == b"u1"
    assert await r.zscore(keys.expiry(1), hold.hold_id) == hold.expires_at
    [entry] = await entries(r)
    assert entry == {
        "type": "reserve", "hold_id": hold.hold_id, "drop_id": "1", "product_id": "5",
        "user_id": "u1", "quantity": "1", "buyer_number": "1", "unit_price": "1999",
        "amount": "1999", "currency": "eur", "idempotency_key": "k1",
        "expires_at": str(hold.expires_at), "flow": "client_confirm",
        "created_at": str(hold.expires_at - TTL)}
    second = await buy(r, "u2", "k1")
    assert second.buyer_number == 2 and second.remaining == 8


async def test_a_replay_is_the_first_answer_but_replay_true(r):
    """Whatever happened since (others bought, the hold was paid), a retry with the
    same key answers exactly what the first attempt answered, ``replay`` aside."""
    import dataclasses

    from checkout import holds

    await selling(r)
    first = await buy(r, "u1", "k1")
    await buy(r, "u2", "k2")
    await buy(r, "u3", "k3")
    assert await holds.mark_paid(r, first.hold_id) == "ok"
    again = await buy(r, "u1", "k1")
    assert again.replay and not first.replay
    assert dataclasses.replace(again, replay=False) == first  # remaining 9, state held
    assert again.reply() == {**first.reply(), "replay": True}


async def test_idempotent_retry_returns_the_first_result(r):
    await selling(r)
    first = await buy(r)
    again = await buy(r)
    assert again.replay and again.hold_id == first.hold_id
    assert again.buyer_number == first.buyer_number and again.expires_at == first.expires_at
    assert (await inventory.remaining(r, 1)) == {5: 9}
    assert len(await entries(r)) == 1
    # Same key for another quantity: refused, nothing taken.
    err = await refusal(r, quantity=2)
    assert err.code == "idempotency_mismatch"


async def test_concurrent_retries_with_one_key_take_one_unit(r):
    await selling(r)
    results = await asyncio.gather(*(buy(r) for _ in range(20)))
    assert len({h.hold_id for h in results}) == 1
    assert sum(not h.replay for h in results) == 1
    assert (await inventory.remaining(r, 1)) == {5: 9}


async def test_refusals_each_with_their_code(r):
    await inventory.prewarm(r, {"id": 1, "currency": "eur"},
                            [{"product_id": 5, "price": 100, "units": 2,
                              "per_buyer_limit": 2}])
    assert (await refusal(r)).refusal is Refusal.NOT_SELLING
    await inventory.open_sales(r, 1, 5)
    assert (await refusal(r, quantity=3)).refusal is Refusal.LIMIT_REACHED
    await buy(r, "u1", "a")
    # One open hold per user per product (max_holds_per_user = 1).
    assert (await refusal(r, "u1", "b")).refusal is Refusal.HOLD_EXISTS
    assert (await refusal(r, "u2", "a", quantity=2)).code == "not_enough_stock"
    await buy(r, "u2", "a")
    err = await refusal(r, "u3", "a")
    assert err.refusal is Refusal.SOLD_OUT and err.status == 409
    assert err.details == {"remaining": 0}
    await inventory.close_sales(r, 1)
    assert (await refusal(r, "u4", "a")).refusal is Refusal.NOT_SELLING
    # Nothing refused changed stock or wrote to the stream.
    assert (await inventory.remaining(r, 1)) == {5: 0}
    assert len(await entries(r)) == 2


async def test_unknown_product_and_unloaded_drop(r):
    err = await refusal(r)
    assert err.refusal is Refusal.NOT_READY and err.status == 503
    await selling(r)
    with pytest.raises(BuyRefused) as info:
        await reserve(r, BuyRequest(1, 99, "u", "k"), hold_ttl_ms=TTL, limits=OFF)
    assert info.value.refusal is Refusal.NOT_SELLING


async def test_per_buyer_limit_counts_units_across_holds(r):
    await selling(r, units=10, limit=3, max_holds=5)
    await buy(r, "u1", "a", quantity=2)
    assert (await refusal(r, "u1", "b", quantity=2)).refusal is Refusal.LIMIT_REACHED
    h = await buy(r, "u1", "c", quantity=1)
    assert h.buyer_number == 2 and h.amount == 1999
    assert (await refusal(r, "u1", "d")).refusal is Refusal.LIMIT_REACHED


async def test_max_holds_per_user_from_the_drop(r):
    await selling(r, units=10, limit=5, max_holds=2)
    await buy(r, "u1", "a")
    await buy(r, "u1", "b")
    assert (await refusal(r, "u1", "c")).refusal is Refusal.HOLD_EXISTS


async def test_campaign_drops_use_manual_capture(r):
    await selling(r, kind="campaign")
    assert (await buy(r, flow="off_session")).flow == "manual_capture"


async def test_requested_flow_is_kept(r):
    await selling(r)
    assert (await buy(r, flow="off_session")).flow == "off_session"


async def test_no_oversell_under_concurrency(r):
    await selling(r, units=50)
    results = await asyncio.gather(*(buy(r, f"u{i}", "k") for i in range(400)),
                                   return_exceptions=True)
    holds = [h for h in results if not isinstance(h, BaseException)]
    refused = [e for e in results if isinstance(e, BuyRefused)]
    assert len(holds) == 50 and len(refused) == 350
    assert {e.code for e in refused} == {"sold_out"}
    assert sorted(h.buyer_number for h in holds) == list(range(1, 51))
    assert (await inventory.remaining(r, 1)) == {5: 0}


async def test_per_user_rate_limit(r):
    await selling(r, units=100, limit=100, max_holds=100)
    limits = BuyLimits(per_user=3, per_ip=0, velocity_window_ms=0)
    for i in range(3):
        await buy(r, "u1", f"k{i}", limits=limits)
    err = await refusal(r, "u1", "k9", limits=limits)
    assert err.refusal is Refusal.RATE_LIMITED and err.status == 429
    assert err.details == {"scope": "user"} and err.headers["Retry-After"]
    await buy(r, "u2", "k0", limits=limits)  # others are not affected


async def test_per_ip_rate_limit_counts_refused_attempts(r):
    await selling(r, units=1)
    limits = BuyLimits(per_user=0, per_ip=4, velocity_window_ms=0)
    await buy(r, "u0", "k", ip="10.0.0.1", limits=limits)
    for i in range(1, 4):  # sold out: refused, but they count
        assert (await refusal(r, f"u{i}", "k", ip="10.0.0.1",
                              limits=limits)).code == "sold_out"
    err = await refusal(r, "u9", "k", ip="10.0.0.1", limits=limits)
    assert err.code == "rate_limited" and err.details == {"scope": "ip"}
    assert (await refusal(r, "u9", "k", ip="10.0.0.2", limits=limits)).code == "sold_out"


async def test_velocity_right_after_buy_now(r):
    await selling(r, units=100, limit=100, max_holds=100)
    limits = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=60_000, velocity_max=2)
    await buy(r, "u1", "a", limits=limits)
    await buy(r, "u1", "b", limits=limits)
    err = await refusal(r, "u1", "c", limits=limits)
    assert err.code == "velocity_exceeded" and err.status == 429
    # Outside the window (BUY NOW long ago) the cap does not apply.
    await r.hset(keys.product(1, 5), "opened_at", 1)
    await buy(r, "u1", "c", limits=limits)


async def test_bad_requests_are_rejected_before_redis():
    from dropserver.errors import ValidationFailed

    for bad in (req(key=""), req(key="a b"), req(key="x" * 256), req(quantity=0),
                req(quantity=101), req(flow="manual_capture")):
        with pytest.raises(ValidationFailed):
            bad.validate()
    req().validate()


async def test_batched_reserve_same_decisions_and_survives_script_flush(r):
    from checkout.reserve import ReserveBatcher, reserve_batched

    await selling(r, units=30)
    await r.script_flush()  # the first pipeline gets NOSCRIPT: loaded and sent again
    batcher = ReserveBatcher(r, max_batch=16)

    async def one(i):
        return await reserve_batched(batcher, req(f"u{i}", "k"), hold_ttl_ms=TTL, limits=OFF)

    results = await asyncio.gather(*(one(i) for i in range(100)), one(0),
                                   return_exceptions=True)
    holds = [h for h in results if not isinstance(h, BaseException)]
    errors = [e for e in results if isinstance(e, BaseException)]
    assert all(isinstance(e, BuyRefused) for e in errors), errors
    fresh = [h for h in holds if not h.replay]
    assert len(fresh) == 30
    assert sorted(h.buyer_number for h in fresh) == list(range(1, 31))
    assert {e.code for e in errors} == {"sold_out"}
    assert (await inventory.remaining(r, 1)) == {5: 0}
