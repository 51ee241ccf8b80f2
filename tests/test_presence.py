"""Viewer counts across processes and nodes (real Redis, real sockets)."""

from __future__ import annotations

import asyncio

from realtime import presence
from tests.conftest import running
from tests.realtime_support import Client, create_drop


async def test_counts_sum_over_nodes_and_dead_nodes_expire(r):
    assert await presence.report(r, 1, "node-a", 10, ttl_s=0.3) == 10
    assert await presence.report(r, 1, "node-b", 5, ttl_s=10) == 15
    # node-a stops reporting (crashed): it leaves the total after its TTL.
    await asyncio.sleep(0.35)
    assert await presence.report(r, 1, "node-b", 6, ttl_s=10) == 6
    assert await r.hkeys(presence.presence_key(1)) == [b"node-b"]
    # A clean stop reports zero and leaves at once.
    assert await presence.report(r, 1, "node-b", 0, ttl_s=10) == 0
    # Counts, not rosters: one small field per node.
    assert await r.hlen(presence.presence_key(1)) == 0


async def test_viewers_event_counts_every_process(settings, r):
    drop_id, _ = await create_drop(settings.database_url)
    fast = {"viewers_coalesce_ms": 100}
    async with running(settings, node_id="n1", **fast) as one, \
            running(settings, node_id="n2", **fast) as two:
        clients = [await Client.connect(one.ws_url) for _ in range(2)]
        clients.append(await Client.connect(two.ws_url))
        for c in clients:
            await c.join(drop_id)
        for c in clients:
            frame = await c.recv_until(lambda f: f.get("event") == "viewers"
                                       and f["data"]["count"] == 3, wait=5)
            assert frame["t"] == "volatile"
        # One leaves: every viewer sees the lower count.
        await clients.pop().close()
        for c in clients:
            await c.recv_until(lambda f: f.get("event") == "viewers"
                               and f["data"]["count"] == 2, wait=5)
        late = await Client.connect(two.ws_url)
        joined = await late.join(drop_id)
        assert joined["viewers"] in (2, 3)  # the count as of the last tick
        for c in [*clients, late]:
            await c.close()
    # Both processes stopped cleanly: nothing is counted any more.
    assert await r.hlen(presence.presence_key(drop_id)) == 0


async def test_viewers_counts_sockets_not_users(settings, make_token):
    """docs/protocol.md: every socket joined to the drop counts, guests too, and one
    user with two tabs counts twice."""
    drop_id, _ = await create_drop(settings.database_url)
    async with running(settings, viewers_coalesce_ms=100) as srv:
        token = make_token("two-tabs")
        clients = [await Client.connect(srv.ws_url, token=token),
                   await Client.connect(srv.ws_url, token=token),
                   await Client.connect(srv.ws_url)]  # a guest
        for c in clients:
            await c.join(drop_id)
        frame = await clients[2].recv_until(lambda f: f.get("event") == "viewers"
                                            and f["data"]["count"] == 3, wait=5)
        assert frame["data"] == {"count": 3}
        for c in clients:
            await c.close()
