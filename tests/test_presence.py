"""Viewer counts across processes and nodes (real Redis, real sockets)."""

from __future__ import annotations

import asyncio

import asyncpg

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


async def test_the_drops_creator_and_admins_are_not_viewers(settings, r, make_token):
    """The creator's console joins the drop with the creator's token; it is not an
    audience member, nor is an admin watching. A viewer alone sees 1, not 2."""
    drop_id, _ = await create_drop(settings.database_url, creator="creator-1")
    async with running(settings, viewers_coalesce_ms=100) as server:
        console = await Client.connect(server.ws_url)
        await console.join(drop_id, token=make_token("creator-1", "creator"))
        admin = await Client.connect(server.ws_url)
        await admin.join(drop_id, token=make_token("admin-1", "admin"))
        other_creator = await Client.connect(server.ws_url)  # watching someone's drop
        await other_creator.join(drop_id, token=make_token("creator-2", "creator"))
        viewer = await Client.connect(server.ws_url)
        await viewer.join(drop_id, token=make_token("viewer-1", "viewer"))
        for c in (console, viewer):
            await c.recv_until(lambda f: f.get("event") == "viewers"
                               and f["data"]["count"] == 2, wait=5)
        await asyncio.sleep(0.3)  # a few more ticks: the count stays
        assert await presence.report(r, drop_id, "probe", 0, ttl_s=1) == 2
        for c in (console, admin, other_creator, viewer):
            await c.close()


async def test_the_creators_moderators_are_not_viewers(settings, r, make_token):
    """A moderator the creator appointed is staff like the creator: present to keep
    the chat, not part of the audience figure. A moderator of another creator's drops
    watching this one is a viewer like anyone."""
    drop_id, _ = await create_drop(settings.database_url, creator="creator-1")
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=1) as db:
        await db.execute("INSERT INTO users (id) VALUES ('creator-2') ON CONFLICT DO NOTHING")
        await db.execute(
            "INSERT INTO creator_moderators (creator_id, user_id, appointed_by) VALUES "
            "('creator-1', 'mod-1', 'creator-1'), ('creator-2', 'mod-2', 'creator-2')")
    async with running(settings, viewers_coalesce_ms=100) as server:
        mod = await Client.connect(server.ws_url)
        await mod.join(drop_id, token=make_token("mod-1"))
        theirs = await Client.connect(server.ws_url)  # moderates creator-2's drops only
        await theirs.join(drop_id, token=make_token("mod-2"))
        viewer = await Client.connect(server.ws_url)
        await viewer.join(drop_id, token=make_token("viewer-1"))
        for c in (mod, viewer):
            await c.recv_until(lambda f: f.get("event") == "viewers"
                               and f["data"]["count"] == 2, wait=5)
        await asyncio.sleep(0.3)  # a few more ticks: the count stays
        assert await presence.report(r, drop_id, "probe", 0, ttl_s=1) == 2
        await mod.close()  # the moderator leaving leaves the audience as it was
        await asyncio.sleep(0.3)
        assert await presence.report(r, drop_id, "probe", 0, ttl_s=1) == 2
        for c in (theirs, viewer):
            await c.close()
