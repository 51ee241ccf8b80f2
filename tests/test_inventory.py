"""checkout/inventory.py against a real Redis (contract 2)."""

from __future__ import annotations

import pytest

from checkout import inventory, keys
from checkout.inventory import InventoryError

DROP = {"id": 7, "currency": "USD", "max_holds_per_user": 1}
PRODUCTS = [
    {"product_id": 11, "price": 2500, "units": 100, "per_buyer_limit": 2},
    {"product_id": 12, "price": 900, "units": 5, "per_buyer_limit": 1},
]


async def test_prewarm_loads_products_and_marks_loaded(r):
    await inventory.prewarm(r, DROP, PRODUCTS)
    assert await inventory.remaining(r, 7) == {11: 100, 12: 5}
    p = await inventory.product_state(r, 7, 11)
    assert p["price"] == "2500" and p["limit"] == "2" and p["state"] == "pending"
    assert p["currency"] == "usd" and p["buyers"] == "0"
    meta = await r.hgetall(keys.meta(7))
    assert meta[b"loaded"] == b"1" and meta[b"max_holds"] == b"1"
    assert await r.sismember(keys.ACTIVE_DROPS, 7)
    # Every key of the drop hashes to one cluster slot.
    assert keys.product(7, 11).startswith("{drop:7}:") and keys.meta(7).startswith("{drop:7}")


async def test_prewarm_is_idempotent_and_never_resets_sold_stock(r):
    await inventory.prewarm(r, DROP, PRODUCTS)
    # 30 units go out (as reserve.lua would take them).
    await r.hincrby(keys.product(7, 11), "remaining", -30)
    await inventory.prewarm(r, DROP, PRODUCTS)
    assert (await inventory.remaining(r, 7))[11] == 70
    # The creator adds 10 units: remaining moves by the difference only.
    more = [dict(PRODUCTS[0], units=110, price=3000), PRODUCTS[1]]
    await inventory.prewarm(r, DROP, more)
    assert (await inventory.remaining(r, 7))[11] == 80
    assert (await inventory.product_state(r, 7, 11))["price"] == "3000"
    # Units cut below what is sold: nothing left, never negative.
    await inventory.prewarm(r, DROP, [dict(PRODUCTS[0], units=20), PRODUCTS[1]])
    assert (await inventory.remaining(r, 7))[11] == 0


async def test_open_and_close_sales(r):
    await inventory.prewarm(r, DROP, PRODUCTS)
    assert await inventory.open_sales(r, 7, 11) == 100
    p = await inventory.product_state(r, 7, 11)
    assert p["state"] == "selling" and int(p["opened_at"]) > 0
    opened = p["opened_at"]
    assert await inventory.open_sales(r, 7, 11) == 100  # idempotent, keeps opened_at
    assert (await inventory.product_state(r, 7, 11))["opened_at"] == opened
    await inventory.close_sales(r, 7, 11)
    assert (await inventory.product_state(r, 7, 11))["state"] == "closed"
    assert (await inventory.product_state(r, 7, 12))["state"] == "pending"
    await inventory.open_sales(r, 7, 12)
    await inventory.close_sales(r, 7)
    assert (await inventory.product_state(r, 7, 12))["state"] == "closed"
    await inventory.close_sales(r, 7)  # idempotent


async def test_open_sales_refuses_unknown_product_and_unloaded_drop(r):
    with pytest.raises(InventoryError) as err:
        await inventory.open_sales(r, 7, 11)
    assert err.value.code == "not_prewarmed"
    await inventory.prewarm(r, DROP, PRODUCTS)
    await r.hdel(keys.meta(7), "loaded")  # as after a Redis loss, before recovery
    with pytest.raises(InventoryError) as err:
        await inventory.open_sales(r, 7, 11)
    assert err.value.code == "not_ready"


async def test_open_sales_survives_script_flush(r):
    await inventory.prewarm(r, DROP, PRODUCTS)
    await r.script_flush()  # NOSCRIPT on the next EVALSHA: the script is loaded again
    assert await inventory.open_sales(r, 7, 12) == 5


async def test_remaining_of_unknown_drop_is_empty(r):
    assert await inventory.remaining(r, 999) == {}
    await inventory.close_sales(r, 999)


async def test_prewarm_rejects_bad_rows(r):
    with pytest.raises(ValueError):
        await inventory.prewarm(r, DROP, [{"product_id": 1, "price": 0, "units": 1}])
    with pytest.raises(ValueError):
        await inventory.prewarm(r, DROP, [{"product_id": 1, "price": "10", "units": 1}])
