"""The join, made cheap: answered from what the room already applied (no history read
from Redis per join) and from a snapshot that chat keeps up to date instead of
throwing away (a chat storm while viewers join rebuilt it for every message)."""

from __future__ import annotations

from realtime import history
from realtime.publish import publish
from realtime.snapshot import SnapshotCache
from tests.realtime_support import Client, create_drop


def _cache_with(pos: int, chat: list[dict]) -> SnapshotCache:
    cache = SnapshotCache(app=None)
    cache._entries[1] = (1e18, {"state": "live", "chat": chat,
                                "pos": {"epoch": "e", "offset": pos}})
    return cache


def test_a_chat_message_right_after_the_snapshot_is_added_to_it():
    cache = _cache_with(5, [{"id": "a"}, {"id": "b"}])
    before = cache._entries[1][1]
    cache.applied(1, "chat.message", {"id": "c"}, "e", 6, chat_history=2)
    snap = cache._entries[1][1]
    assert snap["pos"] == {"epoch": "e", "offset": 6}
    assert [m["id"] for m in snap["chat"]] == ["b", "c"]  # capped at chat_history
    assert before["pos"]["offset"] == 5 and len(before["chat"]) == 2  # not mutated
    cache.applied(1, "chat.message", {"id": "old"}, "e", 4, chat_history=2)
    assert cache._entries[1][1] is snap  # older than the snapshot: nothing to do


def test_anything_else_drops_the_snapshot():
    for event, epoch, offset in (("drop.buy_now", "e", 6), ("chat.message", "e", 7),
                                 ("chat.message", "other", 6), ("chat.deleted", "e", 6)):
        cache = _cache_with(5, [])
        cache.applied(1, event, {"id": "x"}, epoch, offset, chat_history=50)
        assert 1 not in cache._entries, (event, epoch, offset)


async def test_joins_are_answered_without_reading_history(server, settings, r, monkeypatch):
    drop_id, _ = await create_drop(settings.database_url)
    first = await Client.connect(server.ws_url)
    await first.join(drop_id)  # the room exists from here on
    for i in range(3):
        await publish(r, drop_id, "drop.pinned", {"product_id": i})
    await first.events(3)
    calls = []
    real = history.recover

    async def counting(*args, **kwargs):
        calls.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(history, "recover", counting)
    late = await Client.connect(server.ws_url)
    joined = await late.join(drop_id)
    assert joined["pos"]["offset"] == 3
    resumed = await (await Client.connect(server.ws_url)).join(
        drop_id, since={"epoch": joined["pos"]["epoch"], "offset": 1})
    assert resumed["recovered"] is True
    assert [e["data"]["product_id"] for e in resumed["events"]] == [1, 2]
    assert calls == []  # both answered from the room's memory
    await first.close()
    await late.close()


async def test_a_chat_storm_does_not_rebuild_the_snapshot_per_message(server, settings, r):
    drop_id, _ = await create_drop(settings.database_url)
    watcher = await Client.connect(server.ws_url)
    await watcher.join(drop_id)
    cache = server.app.state.realtime.snapshots
    await (await Client.connect(server.ws_url)).join(drop_id)
    builds = cache.builds
    joins = []
    for i in range(20):
        await publish(r, drop_id, "chat.message", {"id": f"m{i}", "user_id": "u",
                                                   "name": "u", "text": f"hi {i}", "at": 0})
        await watcher.events(1)
        c = await Client.connect(server.ws_url)
        joins.append(await c.join(drop_id))
    assert cache.builds - builds <= 2, cache.builds - builds  # the TTL may expire once
    last = joins[-1]
    texts = [m["text"] for m in last["snapshot"]["chat"]] + \
        [e["data"]["text"] for e in last["events"]]
    assert texts[-1] == "hi 19"  # the late joiner has every message up to its join
    assert last["pos"]["offset"] == 20


async def test_viewer_counts_have_a_smaller_budget_than_stock():
    """Profiled during a 20,000-viewer ramp, counts sent at stock's budget took a quarter
    of a worker: a room of N local viewers gets one every N / viewers_budget s."""
    from tests.test_chat_stream import make_room

    room, _ = make_room(4000, coalesce_budget=5000, viewers_budget=1000)
    room.hub.intervals = {"stock": 0.1, "viewers": 1.0}
    assert room.coalesce_interval("stock") == 0.8  # 4,000 / 5,000
    assert room.coalesce_interval("viewers") == 4.0  # 4,000 / 1,000
    small, _ = make_room(200, viewers_budget=1000)
    small.hub.intervals = {"viewers": 1.0}
    assert small.coalesce_interval("viewers") == 1.0
