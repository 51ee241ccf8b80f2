"""The chat quiet (realtime.room, realtime.chatstream): in a big room a drop event takes
the chat in front of it thinned (the staff's messages and each viewer's own, a
``skipped`` count for the rest) and the next chat batch waits
``DROPSERVER_CHAT_QUIET_MS`` after the event reached every socket; small rooms and
other events are not touched, and history stays exact."""

from __future__ import annotations

import asyncio
import time

from dropserver.auth import Role
from dropserver.redis_client import connect as connect_redis
from realtime import history
from realtime.publish import publish
from tests.realtime_support import Client, create_drop
from tests.test_chat_stream import chat, drop_event, make_room
from tests.test_fanout_priority import running_big
from tests.test_send_lanes import offsets, settle


def _events(message: list | dict) -> list[dict]:
    return message if isinstance(message, list) else [message]


async def _fanned_out(room) -> None:
    await settle()
    while room.hub.dispatcher.urgent_busy:  # noqa: ASYNC110 (steps the loop one turn at a time)
        await asyncio.sleep(0)


async def test_a_drop_event_takes_the_open_chat_thinned_keeping_staff_and_own():
    room, socks = make_room(6, chat_batch_ms=5000, chat_quiet_ms=1000)
    room.on_publication(chat(1))  # the first after a quiet spell leaves at once
    await settle()
    roles = {9: "creator", 12: "moderator"}
    for offset in range(2, 21):
        user = {7: "viewer-2", 15: "viewer-2", 9: "boss", 12: "mod"}.get(offset, "")
        room.on_publication(chat(offset, user=user, role=roles.get(offset)))
    late = socks[5]
    room.discard(late.conn)
    room.joined(late.conn, "e1", 10)  # joined mid-batch: its answer had up to 10
    room.on_publication(drop_event(21, "drop.state"))
    room.on_publication(drop_event(22))  # one creator action
    await _fanned_out(room)
    for i, sock in enumerate(socks):
        message = _events(sock.got[-1])
        kept = [f["pos"]["offset"] for f in message if f.get("event") == "chat.message"]
        skipped = [f for f in message if f["t"] == "skipped"]
        assert [f.get("event") for f in message[-2:]] == ["drop.state", "drop.buy_now"]
        assert len(skipped) == 1 and skipped[0]["pos"]["offset"] == 20
        if sock is late:
            assert kept == [12]  # the moderator's; the creator's (9) its answer had
            assert len(kept) + skipped[0]["count"] == 10
        elif i == 2:
            assert kept == [7, 9, 12, 15]  # its own two, and the staff's
            assert len(kept) + skipped[0]["count"] == 19
        else:
            assert kept == [9, 12]
            assert skipped[0]["count"] == 17
    assert not room.chat


async def test_a_chat_batch_in_progress_is_thinned_in_front_of_a_drop_event():
    room, socks = make_room(4000, slice_s=0.0003, chat_quiet_ms=1000)
    room.hub.dispatcher.bulk_max_s = 0.0003  # fixed slices (tests/test_chat_stream.py)
    posters = {f"viewer-{i}" for i in range(0, 4000, 80)}  # 50 posters
    for n, user in enumerate(sorted(posters), start=1):
        room.chat.add(chat(n, user=user))
    room.chat.add(chat(51, user="boss", role="creator"))
    room.position = history.Position("e1", 51)  # as if applied one by one
    room._flush_chat()  # one batch of 51 messages, fanned out slice by slice
    job = room._chat_job
    assert job is not None and not job.done
    served = {s for s in socks if s.got}
    assert 0 < len(served) < len(socks)
    room.on_publication(drop_event(52))
    await _fanned_out(room)
    assert job.cancelled
    merged = [s for s in socks if s not in served and len(s.got) == 1]
    assert len(merged) > len(socks) // 2
    own_seen = 0
    for sock in merged:
        message = _events(sock.got[0])
        assert message[-1]["event"] == "drop.buy_now"
        kept = [f["pos"]["offset"] for f in message if f.get("event") == "chat.message"]
        skipped = next(f for f in message if f["t"] == "skipped")
        assert skipped["pos"]["offset"] == 51
        user = sock.conn.user_id
        if user in posters:
            own = sorted(posters).index(user) + 1
            assert kept == [own, 51]
            own_seen += 1
        else:
            assert kept == [51]
        assert len(kept) + skipped["count"] == 51
    assert own_seen > 10
    for sock in served:  # had the whole batch before BUY NOW: nothing repeated
        assert offsets(sock.frames()) == [*range(1, 52), 52]


async def test_the_next_chat_batch_waits_the_quiet_after_a_drop_event():
    room, socks = make_room(5, chat_batch_ms=100, chat_quiet_ms=400)
    room.on_publication(chat(1))
    await settle()
    sent_at = time.monotonic()  # before the drop event reached anyone
    room.on_publication(drop_event(2))
    await _fanned_out(room)
    room.on_publication(chat(3))  # due after the 100 ms interval, but the quiet is on
    before = len(socks[0].got)
    async with asyncio.timeout(5):
        while len(socks[0].got) == before:  # noqa: ASYNC110 (polls the recorded socket)
            await asyncio.sleep(0.005)
    arrived = time.monotonic()
    assert arrived - sent_at >= 0.4 - 0.005, arrived - sent_at
    assert offsets(socks[0].frames()) == [1, 2, 3]  # whole: not thinned after the quiet


async def test_chat_during_the_quiet_is_one_sampled_batch_after_it():
    room, socks = make_room(3, chat_batch_ms=100, chat_quiet_ms=300, chat_read_rate=20.0)
    room.on_publication(chat(1))
    await settle()
    sent_at = time.monotonic()
    room.on_publication(drop_event(2))
    await _fanned_out(room)
    for offset in range(3, 23):  # 20 messages in the quiet
        room.on_publication(chat(offset))
    async with asyncio.timeout(5):
        while len(socks[0].got) < 3:  # noqa: ASYNC110 (polls the recorded socket)
            await asyncio.sleep(0.005)
    assert time.monotonic() - sent_at >= 0.3 - 0.005
    await asyncio.sleep(0.3)
    for sock in socks:
        assert len(sock.got) == 3  # the first chat, BUY NOW, one batch after the quiet
        last = _events(sock.got[-1])
        got = [f for f in last if f["t"] == "event"]
        left = sum(f["count"] for f in last if f["t"] == "skipped")
        assert len(got) + left == 20 and len(got) == 2  # a sample: 20/s x 100 ms


async def test_a_small_room_and_other_events_are_not_touched():
    # A small room: every message at once, before and after a drop event.
    room, socks = make_room(3, chat_batch_viewers=10, chat_batch_ms=1000,
                            chat_quiet_ms=1000)
    room.on_publication(chat(1))
    await settle()
    room.on_publication(drop_event(2))
    await _fanned_out(room)
    room.on_publication(chat(3))
    await settle()
    for s in socks:
        assert len(s.got) == 3 and offsets(s.frames()) == [1, 2, 3]
    # A big room, a durable event that is not a drop event (a pin): the chat in front
    # of it whole, and no quiet after it.
    room, socks = make_room(3, chat_batch_ms=300, chat_quiet_ms=5000)
    room.on_publication(chat(1))
    await settle()
    for offset in (2, 3, 4):
        room.on_publication(chat(offset))
    room.on_publication(drop_event(5, "chat.pinned"))
    await _fanned_out(room)
    assert [f["pos"]["offset"] for f in socks[0].got[-1]] == [2, 3, 4, 5]
    room.on_publication(chat(6))
    await asyncio.sleep(0.6)
    assert offsets(socks[0].frames()) == [1, 2, 3, 4, 5, 6]


async def test_no_quiet_when_the_setting_is_zero():
    room, socks = make_room(3, chat_batch_ms=2000, chat_quiet_ms=0)
    room.on_publication(chat(1))
    await settle()
    for offset in (2, 3, 4):
        room.on_publication(chat(offset))
    room.on_publication(drop_event(5))
    await _fanned_out(room)
    assert [f["pos"]["offset"] for f in socks[0].got[-1]] == [2, 3, 4, 5]


async def test_end_to_end_the_quiet_thins_live_chat_and_a_resume_gets_it_all(settings,
                                                                           make_token):
    """A real server, a big room: the posts in the open batch when BUY NOW is published
    reach a reader as the creator's message and a ``skipped`` count, the poster gets
    its own, and a resume with ``since`` gets every message from history."""
    drop_id, pids = await create_drop(settings.database_url, creator="creator-1")
    async with running_big(settings, chat_batch_ms=4000, chat_read_rate=1000.0,
                           chat_quiet_ms=1000) as srv:
        talker = await Client.connect(srv.ws_url, token=make_token("talker"))
        reader = await Client.connect(srv.ws_url, token=make_token("reader"))
        host = await Client.connect(srv.ws_url, token=make_token("creator-1", Role.CREATOR))
        for c in (talker, reader, host):
            start = (await c.join(drop_id))["pos"]
        first = await talker.request({"t": "chat.send", "text": "first"})
        # The first after a quiet spell leaves at once; wait until the reader has it.
        await reader.recv_until(lambda f: f.get("event") == "chat.message", 5)
        sent = [first["data"]["pos"]["offset"]]
        for i in range(5):  # held in the open batch: the next is due in 4 s
            reply = await talker.request({"t": "chat.send", "text": f"hype {i}"})
            sent.append(reply["data"]["pos"]["offset"])
        boss = await host.request({"t": "chat.send", "text": "BUY NOW in 1"})
        sent.append(boss["data"]["pos"]["offset"])
        client = connect_redis(settings.redis_url)
        try:
            await publish(client, drop_id, "drop.buy_now", {"product_id": pids[0]})
        finally:
            await client.aclose()

        async def message_with_buy_now(c: Client) -> list[dict]:
            async with asyncio.timeout(5):
                while True:
                    message = _events(await c.recv_message(5))
                    if any(f.get("event") == "drop.buy_now" for f in message):
                        return message

        def kept(message: list[dict]) -> list[int]:
            return [f["pos"]["offset"] for f in message if f.get("event") == "chat.message"]

        r_message = await message_with_buy_now(reader)
        assert kept(r_message) == [sent[-1]]  # the creator's alone
        skipped = next(f for f in r_message if f["t"] == "skipped")
        assert skipped["count"] == 5 and skipped["pos"]["offset"] == sent[-1]
        assert kept(await message_with_buy_now(talker)) == sent[1:]  # its own, all
        again = await Client.connect(srv.ws_url)
        resumed = await again.join(drop_id, since=start)
        assert resumed["recovered"] is True
        events = resumed["events"]
        assert [e["pos"]["offset"] for e in events if e["event"] == "chat.message"] == sent
        assert events[-1]["event"] == "drop.buy_now"
        for c in (talker, reader, host, again):
            await c.close()
