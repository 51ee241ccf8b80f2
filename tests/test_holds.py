"""release.lua / settle.lua and the expiry sweeper against a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from checkout import holds, inventory, keys
from checkout.defense import BuyLimits
from checkout.holds import Reason, Sweeper
from checkout.reserve import BuyRefused, BuyRequest, reserve

OFF = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=0)


async def selling(r, units=3):
    await inventory.prewarm(r, {"id": 1, "currency": "usd"},
                            [{"product_id": 5, "price": 500, "units": units}])
    await inventory.open_sales(r, 1, 5)


async def buy(r, user="u1", key="k", ttl_ms=600_000):
    return await reserve(r, BuyRequest(1, 5, user, key), hold_ttl_ms=ttl_ms, limits=OFF)


async def releases(r):
    out = []
    for _id, fields in await r.xrange(keys.orders(1)):
        f = {k.decode(): v.decode() for k, v in fields.items()}
        if f["type"] == "release":
            out.append(f)
    return out


async def test_cancel_returns_stock_once_and_only_for_the_owner(r):
    await selling(r)
    hold = await buy(r)
    other = await holds.release(r, hold.hold_id, Reason.CANCELLED, owner="u2")
    assert not other.released and other.error == "not_owner"
    done = await holds.release(r, hold.hold_id, Reason.CANCELLED, owner="u1")
    assert done.released and done.remaining == 3 and done.user_id == "u1"
    again = await holds.release(r, hold.hold_id, Reason.CANCELLED, owner="u1")
    assert not again.released and again.state == "cancelled"
    assert (await inventory.remaining(r, 1)) == {5: 3}
    assert [(e["hold_id"], e["reason"]) for e in await releases(r)] == [
        (hold.hold_id, "cancelled")]
    rec = await holds.get_hold(r, hold.hold_id)
    assert rec["state"] == "cancelled" and rec["buyer_number"] == 1
    assert await r.pttl(keys.hold(1, hold.hold_id)) > 0  # kept for a while, then gone
    assert await r.zscore(keys.expiry(1), hold.hold_id) is None
    # The buyer may buy again (open holds and units went back), with a new key.
    assert (await buy(r, key="k2")).buyer_number == 2


async def test_expiry_is_not_early(r):
    await selling(r)
    hold = await buy(r)
    res = await holds.release(r, hold.hold_id, Reason.EXPIRED)
    assert not res.released and res.state == "not_due"
    assert (await inventory.remaining(r, 1)) == {5: 2}


async def test_sweeper_releases_expired_holds_and_calls_back(r):
    await selling(r)
    seen = []

    async def on_release(result):
        seen.append(result)

    sweeper = Sweeper(r, 0.05, on_release)
    h1 = await buy(r, "u1", ttl_ms=150)
    h2 = await buy(r, "u2", ttl_ms=600_000)
    assert (await inventory.remaining(r, 1)) == {5: 1}
    sweeper.start()
    try:
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
    finally:
        await sweeper.stop()
    assert [s.hold_id for s in seen] == [h1.hold_id]
    assert seen[0].remaining == 2 and seen[0].state == "expired"
    assert (await inventory.remaining(r, 1)) == {5: 2}
    assert (await holds.get_hold(r, h1.hold_id))["state"] == "expired"
    assert (await holds.get_hold(r, h2.hold_id))["state"] == "held"
    assert [e["reason"] for e in await releases(r)] == ["expired"]


async def test_many_sweepers_release_each_hold_once(r):
    await selling(r, units=40)
    for i in range(40):
        await buy(r, f"u{i}", ttl_ms=1)
    await asyncio.sleep(0.05)
    sweepers = [Sweeper(r, 1) for _ in range(6)]
    results = await asyncio.gather(*(s.sweep() for s in sweepers))
    released = [x.hold_id for res in results for x in res]
    assert len(released) == 40 and len(set(released)) == 40
    assert (await inventory.remaining(r, 1)) == {5: 40}
    assert len(await releases(r)) == 40


async def test_cancel_racing_expiry_returns_stock_once(r):
    await selling(r, units=1)
    hold = await buy(r, ttl_ms=1)
    await asyncio.sleep(0.01)
    a, b = await asyncio.gather(
        holds.release(r, hold.hold_id, Reason.EXPIRED),
        holds.release(r, hold.hold_id, Reason.CANCELLED, owner="u1"))
    assert [a.released, b.released].count(True) == 1
    assert (await inventory.remaining(r, 1)) == {5: 1}


async def test_settled_hold_never_expires_and_keeps_its_units(r):
    await selling(r, units=2)
    hold = await buy(r, ttl_ms=1)
    assert await holds.mark_paid(r, hold.hold_id) == "ok"
    assert await holds.mark_paid(r, hold.hold_id) == "noop"
    await asyncio.sleep(0.01)
    assert await Sweeper(r, 1).sweep() == []
    assert (await inventory.remaining(r, 1)) == {5: 1}
    # Not an open hold any more, but the unit counts towards the per-buyer limit (1).
    with pytest.raises(BuyRefused) as err:
        await buy(r, key="k2")
    assert err.value.code == "limit_reached"
    # A settled hold cannot be cancelled (state stays paid, stock stays sold).
    res = await holds.release(r, hold.hold_id, Reason.CANCELLED, owner="u1")
    assert not res.released and res.state == "paid"


async def test_settle_after_expiry_tells_the_caller(r):
    await selling(r)
    hold = await buy(r, ttl_ms=1)
    await asyncio.sleep(0.01)
    await Sweeper(r, 1).sweep()
    with pytest.raises(LookupError, match="expired"):
        await holds.mark_paid(r, hold.hold_id)


async def test_unknown_hold_ids(r):
    assert await holds.get_hold(r, "nope") is None
    assert await holds.get_hold(r, "1-5-0000000000000000") is None
    res = await holds.release(r, "1-5-0000000000000000", Reason.CANCELLED)
    assert res.error == "not_found"
    assert (await holds.release(r, "../etc", Reason.CANCELLED)).error == "not_found"


async def test_sweeper_forgets_drops_with_nothing_left_to_expire(r):
    await selling(r)
    await r.sadd(keys.ACTIVE_DROPS, 77)  # a drop whose keys are gone
    assert await Sweeper(r, 1).sweep() == []
    assert {int(x) for x in await r.smembers(keys.ACTIVE_DROPS)} == {1}
