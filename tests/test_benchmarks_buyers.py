"""The benchmarks' WebSocket buyers (benchmarks/_buyers.py) against the real app."""

from __future__ import annotations

import asyncio

from benchmarks._buyers import buy, open_buyers, selling_drop
from dropserver.auth import Role
from tests.conftest import running


async def test_an_idle_buyer_answers_the_heartbeat_and_can_still_buy(settings, make_token):
    # A rush of thousands of buyers can take longer to connect than the server's
    # ping interval + pong timeout: the first buyers sit silent meanwhile.
    async with running(settings, ws_ping_interval=0.5, ws_pong_timeout=0.5) as srv:
        drop_id, product_id = await selling_drop(
            srv.base_url, make_token("rush-creator", Role.CREATOR), units=1)
        [buyer] = await open_buyers(f"{srv.ws_url}/ws", drop_id,
                                    [make_token("idle-buyer", Role.VIEWER)])
        try:
            await asyncio.sleep(2.5)  # several rounds of pings, nothing else sent
            assert not buyer.closed.done(), buyer.closed.result()
            frame = await buy(buyer, product_id, "k1")
            assert frame["t"] == "reply" and frame["data"]["buyer_number"] == 1
        finally:
            buyer.close()


async def test_a_rush_on_variants_takes_every_unit_of_every_variant(settings, make_token):
    """benchmarks.reserve --variants: each buyer buys one variant until it is gone; the
    product sells out with buyer numbers 1..units and each variant empty."""
    from benchmarks._buyers import rush, split_units
    from checkout import inventory

    assert split_units(10, 3) == [4, 3, 3]
    # Bot defence off (as the benchmark's own limits are far above a rush's needs).
    async with running(settings, buy_velocity_window_ms=0, buy_rate_per_user=0,
                       buy_rate_per_ip=0) as srv:
        drop_id, product_id, variant_ids = await selling_drop(
            srv.base_url, make_token("rush-creator", Role.CREATOR), units=30,
            per_buyer_limit=10, max_holds_per_user=10, variants=3)
        # 4 buyers of 10 units at most each: two of them start on the first variant,
        # one each on the others; a buyer whose variant is gone moves to the next.
        buyers = await open_buyers(f"{srv.ws_url}/ws", drop_id,
                                   [make_token(f"v-buyer-{i}", Role.VIEWER) for i in range(4)])
        result = await rush(buyers, product_id, units=30, per_user=10,
                            variant_ids=variant_ids)
        assert result["holds"] == 30 and result["numbers_ok"], result
        left = await inventory.variants_remaining(srv.app.state.redis, drop_id)
        assert left == {product_id: dict.fromkeys(variant_ids, 0)}
