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


def test_the_script_call_names_each_product_and_variant_keys_of_its_own():
    # The drop's and product's keys are kept per product (checkout/reserve.py): every
    # call still names exactly the keys of its own drop, product, variant, buyer, IP.
    from checkout import reserve as rs

    limits = BuyLimits(per_user=7, per_ip=0, velocity_window_ms=0)
    calls = [(1, 5, None, "u1", "10.0.0.1"), (2, 5, None, "u1", ""),
             (1, 6, None, "u2", "10.0.0.2"), (1, 5, 3, "u1", "10.0.0.1"),
             (1, 5, 4, "u3", ""), (1, 5, None, "u4", "10.0.0.3")]
    for d, p, v, user, ip in calls * 2:  # the second time from the kept keys
        kl, args = rs.script_call(BuyRequest(d, p, user, "k", ip=ip, variant_id=v), TTL,
                                  limits)
        hold_id = args[3]
        ref = keys.parse_hold_id(hold_id)
        assert (ref.drop_id, ref.product_id, ref.variant_id) == (d, p, v), hold_id
        assert hold_id.startswith(keys.hold_id_prefix(d, p, v)) and hold_id.count("-") == (
            2 if v is None else 3)
        want = [keys.meta(d), keys.product(d, p), keys.units(d, p), keys.open_holds(d, p),
                keys.idem(d), keys.hold(d, hold_id), keys.expiry(d), keys.orders(d),
                keys.rate_user(d, user), keys.rate_ip(d, ip or "-")]
        if v is not None:
            want += [keys.variant(d, p, v), keys.variant_units(d, p, v)]
        assert kl == want
        assert args == [user, 1, "k", hold_id, TTL, "", d, p, *limits.script_args(),
                        *([v] if v is not None else [])]
    # Hold ids are fresh on every call.
    assert len({rs.script_call(req(), TTL, OFF)[1][3] for _ in range(50)}) == 50
    # The kept keys are bounded: a process that sold many products does not grow.
    for p in range(1, rs._PRODUCT_KEYS_MAX + 10):
        rs.script_call(BuyRequest(9, p, "u", "k"), TTL, OFF)
        assert len(rs._PRODUCT_KEYS) <= rs._PRODUCT_KEYS_MAX
    kl, _ = rs.script_call(BuyRequest(9, 3, "u", "k"), TTL, OFF)
    assert kl[1] == keys.product(9, 3)


@pytest.mark.parametrize(("refusal", "detail", "status", "details", "headers"), [
    (Refusal.NOT_READY, "", 503, {}, {"Retry-After": "1"}),
    (Refusal.NOT_READY, "drop is not loaded", 503, {"detail": "drop is not loaded"},
     {"Retry-After": "1"}),
    (Refusal.NOT_SELLING, "paused", 409, {"detail": "paused"}, None),
    (Refusal.SOLD_OUT, "0", 409, {"remaining": 0}, None),
    (Refusal.SOLD_OUT, "", 409, {}, None),
    (Refusal.NOT_ENOUGH_STOCK, "2", 409, {"remaining": 2}, None),
    (Refusal.NOT_ENOUGH_STOCK, "x", 409, {"detail": "x"}, None),
    (Refusal.LIMIT_REACHED, "1", 409, {"detail": "1"}, None),
    (Refusal.HOLD_EXISTS, "1", 409, {"detail": "1"}, None),
    (Refusal.RATE_LIMITED, "user", 429, {"scope": "user"}, {"Retry-After": "2"}),
    (Refusal.RATE_LIMITED, "ip", 429, {"scope": "ip"}, {"Retry-After": "2"}),
    (Refusal.VELOCITY_EXCEEDED, "5", 429, {}, {"Retry-After": "2"}),
    (Refusal.IDEMPOTENCY_MISMATCH, "1-5-ab", 422, {"detail": "1-5-ab"}, None),
    (Refusal.IDEMPOTENCY_KEY_EXPIRED, "1-5-ab", 422, {"detail": "1-5-ab"}, None),
    (Refusal.VARIANT_REQUIRED, "3,4,x", 422, {"field": "variant_id", "variant_ids": [3, 4]},
     None),
    (Refusal.UNKNOWN_VARIANT, "9", 422, {"field": "variant_id"}, None),
])
def test_every_refusal_answers_its_code_status_message_details_and_headers(
        refusal, detail, status, details, headers):
    from checkout.reserve import parse_reply

    for reply in ([b"err", refusal.value.encode(), detail.encode()],
                  ["err", refusal.value, detail]):
        with pytest.raises(BuyRefused) as err:
            parse_reply(req(), reply)
        e = err.value
        assert (e.refusal, e.code, e.status, e.message, e.details, e.headers) == (
            refusal, refusal.value, status, refusal.message, details, headers)
        assert str(e) == refusal.message
    with pytest.raises(ValueError):  # a code this process does not know
        parse_reply(req(), [b"err", b"no_such_code", b""])
