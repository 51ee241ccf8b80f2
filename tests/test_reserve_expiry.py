"""Hold expiry through the real app: short holds, fast sweeps."""

from __future__ import annotations

import asyncio

import pytest

from checkout import inventory, keys
from dropserver.auth import Role
from tests.test_reserve_api import bearer, post_buy, selling_drop


@pytest.fixture
def creator(make_token):
    return bearer(make_token("creator-1", Role.CREATOR))


@pytest.fixture
def buyer(make_token):
    def make(sub: str = "buyer-1") -> dict[str, str]:
        return bearer(make_token(sub, Role.VIEWER))

    return make


@pytest.fixture
def settings(settings):  # short holds and fast sweeps for this module
    return settings.replace(hold_ttl=1, hold_sweep_interval=0.1, stock_coalesce_ms=20)


async def test_hold_expiry_returns_stock_and_reopens_sales(server, http, creator, buyer):
    redis = server.app.state.redis
    drop_id, pid = await selling_drop(http, creator, units=1)
    hold = (await post_buy(http, drop_id, buyer(), pid)).json()
    assert await inventory.remaining(redis, drop_id) == {pid: 0}
    drop = None
    for _ in range(60):
        drop = (await http.get(f"/v1/drops/{drop_id}", headers=creator)).json()
        left = await inventory.remaining(redis, drop_id)
        if left == {pid: 1} and drop["state"] == "selling":
            break
        await asyncio.sleep(0.1)
    assert left == {pid: 1}
    rec = (await http.get(f"/v1/holds/{hold['hold_id']}", headers=buyer())).json()
    assert rec["state"] == "expired"
    assert drop["state"] == "selling"  # sold_out -> selling again (drops.mark_back_in_stock)
    assert await redis.zcard(keys.expiry(drop_id)) == 0
    resp = await post_buy(http, drop_id, buyer("buyer-2"), pid)
    assert resp.status_code == 201 and resp.json()["buyer_number"] == 2
