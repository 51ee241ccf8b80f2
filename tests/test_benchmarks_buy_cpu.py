"""The buy CPU benchmark's storm (benchmarks/buy_cpu.py) against the real app: every
buyer sends its buys back to back and every answer is counted by its code."""

from __future__ import annotations

from benchmarks._buyers import open_buyers, selling_drop
from benchmarks.buy_cpu import storm
from dropserver.auth import Role
from tests.conftest import running


async def test_a_storm_on_a_sold_out_product_is_all_sold_out_and_on_stock_all_holds(
        settings, make_token):
    async with running(settings, buy_rate_per_user=0, buy_rate_per_ip=0,
                       buy_velocity_window_ms=0) as srv:
        creator = make_token("cpu-creator", Role.CREATOR)
        ws = f"{srv.ws_url}/ws"
        # Sold out: another buyer takes the one unit first.
        drop_id, product_id = await selling_drop(srv.base_url, creator, units=1,
                                                 max_holds_per_user=3)
        first, *buyers = await open_buyers(
            ws, drop_id, [make_token(f"cpu-{i}", Role.VIEWER) for i in range(5)])
        try:
            taken = await first.command("buy", {"product_id": product_id,
                                                "idempotency_key": "first"})
            assert taken["t"] == "reply", taken
            refused = await storm(buyers, product_id, buys=3, tag="r")
        finally:
            for b in (first, *buyers):
                b.close()
        assert refused["codes"] == {"sold_out": 12}, refused
        assert refused["answers"] == 12 and refused["seconds"] >= 0
        # In stock: a unit for every buy, three per buyer.
        drop_id, product_id = await selling_drop(srv.base_url, creator, units=12,
                                                 per_buyer_limit=3, max_holds_per_user=3)
        buyers = await open_buyers(
            ws, drop_id, [make_token(f"cpu-{i}", Role.VIEWER) for i in range(4)])
        try:
            held = await storm(buyers, product_id, buys=3, tag="h")
        finally:
            for b in buyers:
                b.close()
        assert held["codes"] == {"held": 12}, held
