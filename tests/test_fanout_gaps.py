"""A room notices a gap in a drop's live stream: it fills it from history, or sends
every viewer a fresh snapshot when the history no longer has it."""

from __future__ import annotations

from realtime import channels, metrics, publish
from tests.realtime_support import Client, create_drop


async def _lost(r, drop_id: int, n: int, history_size: int = 1000) -> None:
    """Add ``n`` events to the history whose PUBLISH nobody receives (a lost message)."""
    for i in range(n):
        await publish._history_add(
            keys=[channels.meta_key(drop_id), channels.history_key(drop_id)],
            args=[f"{{drop:{drop_id}}}:nobody-listens", publish.new_epoch(), history_size,
                  60, 0, b"",
                  channels.pack_body("chat.message", {"lost": i})],
            client=r)


async def test_gap_is_filled_from_history(server, settings, r):
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url)
    await c.join(drop_id)
    await publish.publish(r, drop_id, "chat.message", {"n": 1})
    before = metrics.GAPS.labels("filled")._value.get()
    await _lost(r, drop_id, 3)
    await publish.publish(r, drop_id, "chat.message", {"n": 5})
    events = await c.events(5)
    assert [e["pos"]["offset"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["data"].get("lost") for e in events[1:4]] == [0, 1, 2]
    assert metrics.GAPS.labels("filled")._value.get() == before + 1
    await c.close()


async def test_gap_older_than_history_sends_fresh_snapshot(server, settings, r):
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url)
    await c.join(drop_id)
    await publish.publish(r, drop_id, "drop.pinned", {"product_id": 1})
    assert (await c.events(1))[0]["pos"]["offset"] == 1
    await _lost(r, drop_id, 400, history_size=5)  # trims offset 2 away
    epoch, offset = await publish.publish(r, drop_id, "chat.message", {"n": "last"})
    frame = await c.recv_until(lambda f: f["t"] in ("joined", "event"))
    assert frame["t"] == "joined" and frame["recovered"] is False and "id" not in frame
    assert frame["snapshot"]["state"] == "live"
    assert frame["pos"] == {"epoch": epoch, "offset": offset}
    # Live events continue after the snapshot.
    await publish.publish(r, drop_id, "chat.message", {"n": "next"})
    (nxt,) = await c.events(1)
    assert nxt["pos"]["offset"] == offset + 1
    await c.close()
