"""realtime.publish and realtime.history against a real Redis."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from realtime import channels, history, publish
from realtime.channels import Kind, MalformedMessage, parse_message
from tests.pubsub_support import listen


async def _listen(client, channel):
    return await listen(client, channel)  # SSUBSCRIBE on the channel's shard on a cluster


async def test_publish_assigns_consecutive_offsets_in_one_epoch_and_publishes(r):
    pubsub = await _listen(r, channels.drop_channel(7))
    e1, o1 = await publish.publish(r, 7, "drop.state", {"state": "live", "previous": "scheduled"})
    e2, o2 = await publish.publish(r, 7, "drop.pinned", {"product_id": 3})
    assert (o1, o2) == (1, 2) and e1 == e2 and e1
    got = []
    while len(got) < 2:
        msg = await pubsub.get_message(timeout=2, ignore_subscribe_messages=True)
        assert msg is not None, "publication not received"
        got.append(parse_message(msg["data"]))
    assert [(p.kind, p.epoch, p.offset, p.event) for p in got] == [
        (Kind.DURABLE, e1, 1, "drop.state"), (Kind.DURABLE, e1, 2, "drop.pinned")]
    assert got[1].data == {"product_id": 3}
    await pubsub.aclose()
    # History holds both, with a TTL, under the drop's hash tag.
    assert await r.xlen(channels.history_key(7)) == 2
    assert 0 < await r.ttl(channels.history_key(7)) <= 86400
    assert 0 < await r.ttl(channels.meta_key(7)) <= 86400
    assert channels.history_key(7).startswith("{drop:7}")


async def test_history_is_capped(r):
    publish.configure(history_size=10, history_ttl=60)
    try:
        for i in range(300):
            await publish.publish(r, 1, "chat.message", {"i": i})
    finally:
        publish.configure(history_size=1000, history_ttl=86400)
    # MAXLEN ~ trims whole radix-tree nodes: bounded, not exact.
    assert await r.xlen(channels.history_key(1)) < 300
    assert await r.ttl(channels.history_key(1)) <= 60


async def test_recent_list_is_kept_in_offset_order_capped_with_the_history_ttl(r):
    key = channels.chat_key(4, "recent")
    results = await asyncio.gather(*[
        publish.publish(r, 4, "chat.message", {"i": i}, recent=(key, 5)) for i in range(40)])
    by_offset = [i for (_, _o), i in sorted(zip(results, range(40), strict=True),
                                            key=lambda x: x[0][1])]
    kept = [msgpack.unpackb(x)["i"] for x in await r.lrange(key, 0, -1)]
    assert kept == by_offset[::-1][:5]  # newest first, the five newest offsets
    assert 0 < await r.ttl(key) <= 86400
    # An event without a list leaves it alone.
    await publish.publish(r, 4, "chat.slow", {"seconds": 0})
    assert await r.llen(key) == 5


async def test_concurrent_publishers_never_share_an_offset(r):
    results = await asyncio.gather(*[
        publish.publish(r, 2, "chat.message", {"i": i}) for i in range(200)])
    assert sorted(o for _, o in results) == list(range(1, 201))
    assert len({e for e, _ in results}) == 1


def test_epochs_are_new_whatever_random_seed_says():
    import random

    epochs = set()
    for _ in range(3):
        random.seed(1)  # a test seeding the shared generator does not repeat epochs
        epochs.add(publish.new_epoch())
    assert len(epochs) == 3
    assert all(len(e) == 8 and int(e, 16) >= 0 for e in epochs)


async def test_new_epoch_after_history_expired(r):
    e1, _ = await publish.publish(r, 3, "drop.state", {"state": "live"})
    await r.delete(channels.meta_key(3))  # what the TTL does
    e2, o2 = await publish.publish(r, 3, "drop.state", {"state": "selling"})
    assert e2 != e1 and o2 == 1
    assert await r.xlen(channels.history_key(3)) == 1


async def test_volatile_and_user_messages(r):
    drop_sub = await _listen(r, channels.drop_channel(5))
    # On a cluster the user's channel lives on the user's shard: a listener each.
    user_sub = await _listen(r, channels.user_channel("u-1"))
    await publish.publish_volatile(r, 5, "stock", {"products": {"1": 4}})
    await publish.publish_user(r, "u-1", "order.paid", {"order_id": "o1"})
    await publish.publish_user(r, "u-1", "order.held", {"order_id": "o2"}, origin="c-ab12")
    kinds = []
    for pubsub, count in ((drop_sub, 1), (user_sub, 2)):
        for _ in range(count):
            msg = await pubsub.get_message(timeout=2, ignore_subscribe_messages=True)
            assert msg is not None
            p = parse_message(msg["data"])
            kinds.append((p.kind, p.event, p.data, p.origin))
        await pubsub.aclose()
    assert kinds == [(Kind.VOLATILE, "stock", {"products": {"1": 4}}, ""),
                     (Kind.USER, "order.paid", {"order_id": "o1"}, ""),
                     (Kind.USER, "order.held", {"order_id": "o2"}, "c-ab12")]
    assert await r.exists(channels.history_key(5)) == 0  # volatile is not history


async def test_recover_exact_gap(r):
    epoch, _ = await publish.publish(r, 9, "a", {"n": 1})
    for n in range(2, 6):
        await publish.publish(r, 9, "a", {"n": n})
    rec = await history.recover(r, 9, history.Position(epoch, 2), limit=100)
    assert rec.recovered and [p.offset for p in rec.publications] == [3, 4, 5]
    assert [p.data["n"] for p in rec.publications] == [3, 4, 5]
    assert rec.position == history.Position(epoch, 5)
    from_start = await history.recover(r, 9, history.Position("", 0), limit=100)
    assert from_start.recovered and [p.offset for p in from_start.publications] == [1, 2, 3, 4, 5]
    up_to_date = await history.recover(r, 9, history.Position(epoch, 5), limit=100)
    assert up_to_date.recovered and up_to_date.publications == []


async def test_recover_refuses_partial(r):
    publish.configure(history_size=5, history_ttl=60)
    try:
        epoch, _ = await publish.publish(r, 4, "a", {})
        for _ in range(400):
            await publish.publish(r, 4, "a", {})
    finally:
        publish.configure(history_size=1000, history_ttl=86400)
    # Offset 1 was trimmed away: no partial answer.
    rec = await history.recover(r, 4, history.Position(epoch, 1), limit=1000)
    assert not rec.recovered and rec.publications == []
    # Too many missed for the limit: no partial answer either.
    rec = await history.recover(r, 4, history.Position(epoch, 398), limit=2)
    assert not rec.recovered
    # Wrong epoch or a future offset: not recovered.
    assert not (await history.recover(r, 4, history.Position("other", 400), 10)).recovered
    assert not (await history.recover(r, 4, history.Position(epoch, 999), 10)).recovered
    ok = await history.recover(r, 4, history.Position(epoch, 399), limit=10)
    assert ok.recovered and [p.offset for p in ok.publications] == [400, 401]


def test_parse_message_rejects_garbage():
    for raw in (b"", b"X123", b"Dnoheader", b"Dep:x:" + msgpack.packb(["a", {}]),
                b"V" + b"\xc1", b"V" + msgpack.packb({"a": 1}),
                b"P" + msgpack.packb(["a", {}]), b"P:" + msgpack.packb(["a", {}])):
        with pytest.raises(MalformedMessage):
            parse_message(raw)


async def test_publish_many_is_one_message_with_consecutive_offsets(r):
    """One creator action (a transition and its payload): one PUBLISH, so every gateway
    hands the events to its viewers together; the history keeps each at its offset."""
    pubsub = await _listen(r, channels.drop_channel(9))
    await publish.publish(r, 9, "drop.pinned", {"product_id": 1})
    positions = await publish.publish_many(r, 9, [
        ("drop.state", {"state": "selling", "previous": "live"}),
        ("drop.buy_now", {"product_id": 1, "remaining": 5})])
    first = await pubsub.get_message(timeout=2, ignore_subscribe_messages=True)
    group = await pubsub.get_message(timeout=2, ignore_subscribe_messages=True)
    assert await pubsub.get_message(timeout=0.3, ignore_subscribe_messages=True) is None
    await pubsub.aclose()
    epoch = positions[0][0]
    assert positions == [(epoch, 2), (epoch, 3)]
    assert [p.offset for p in channels.parse_publications(first["data"])] == [1]
    pubs = channels.parse_publications(group["data"])
    assert [(p.kind, p.event, p.epoch, p.offset) for p in pubs] == [
        (Kind.DURABLE, "drop.state", epoch, 2), (Kind.DURABLE, "drop.buy_now", epoch, 3)]
    assert pubs[1].data == {"product_id": 1, "remaining": 5}
    rec = await history.recover(r, 9, history.Position(epoch, 1), limit=10)
    assert [(p.event, p.offset) for p in rec.publications] == [("drop.state", 2),
                                                                ("drop.buy_now", 3)]
    # A long group (more than 15 events: another msgpack array header) parses too.
    many = await publish.publish_many(r, 9, [("chat.message", {"i": i}) for i in range(20)])
    assert [o for _, o in many] == list(range(4, 24))
    assert await publish.publish_many(r, 9, []) == []


def test_parse_publications_rejects_a_bad_group():
    good = msgpack.packb(["a", {}])
    for raw in (b"Ge:x:" + b"\x91" + good, b"Ge:1:" + b"\x90", b"Ge:1:" + b"\xc1",
                b"Ge:1:" + b"\x91" + msgpack.packb("not a pair"),
                b"Ge:1:" + b"\x91" + msgpack.packb([1, {}]), b"Gnoheader"):
        with pytest.raises(MalformedMessage):
            channels.parse_publications(raw)
    assert [p.offset for p in channels.parse_publications(b"Ge:7:\x92" + good + good)] == [7, 8]
