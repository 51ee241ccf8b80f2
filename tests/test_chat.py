"""Chat over real sockets: post, limits, slow mode, moderation, history on join."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from dropserver.redis_client import connect as connect_redis
from realtime import chat
from realtime.protocol import ProtocolError
from tests.conftest import running
from tests.realtime_support import Client, create_drop


async def _viewer(srv, drop_id, token=None):
    c = await Client.connect(srv.ws_url, token=token)
    joined = await c.join(drop_id)
    assert joined["t"] == "joined", joined
    return c


async def test_post_reaches_everyone_and_html_stays_text(server, settings, make_token):
    drop_id, _ = await create_drop(settings.database_url)
    alice = await _viewer(server, drop_id, make_token("alice", name="Alice"))
    bob = await _viewer(server, drop_id)  # a guest can read chat
    text = "<script>alert(1)</script> &amp; \u202eevil"
    reply = await alice.request({"t": "chat.send", "text": f"  {text}  "})
    assert reply["t"] == "reply" and reply["data"]["message_id"]
    msg = await bob.recv_until(lambda f: f.get("event") == "chat.message")
    assert msg["data"]["text"] == "<script>alert(1)</script> &amp; evil"  # verbatim, no bidi
    assert msg["data"]["user_id"] == "alice" and msg["data"]["name"] == "Alice"
    assert msg["data"]["id"] == reply["data"]["message_id"]
    # Guests cannot post.
    err = await bob.request({"t": "chat.send", "text": "hi"})
    assert err["code"] == "token_missing"
    # A new viewer gets recent chat in the snapshot.
    carol = await Client.connect(server.ws_url)
    joined = await carol.join(drop_id)
    assert [m["text"] for m in joined["snapshot"]["chat"]] == [msg["data"]["text"]]
    for c in (alice, bob, carol):
        await c.close()


async def test_snapshot_chat_is_in_the_order_live_viewers_got_it(server, settings, make_token):
    """Twelve viewers chat at the same moment, three times over: a late joiner's
    ``snapshot.chat`` lists the messages in offset order, as live viewers saw them."""
    drop_id, _ = await create_drop(settings.database_url)
    watcher = await _viewer(server, drop_id)
    senders = [await _viewer(server, drop_id, make_token(f"fan-{i}")) for i in range(12)]
    live: list[dict] = []
    for round_ in range(3):
        replies = await asyncio.gather(*(
            c.request({"t": "chat.send", "text": f"round {round_} from {i}"})
            for i, c in enumerate(senders)))
        assert all(r["t"] == "reply" for r in replies), replies
        live += [f for f in await watcher.events(12) if f["event"] == "chat.message"]
    offsets = [f["pos"]["offset"] for f in live]
    assert offsets == sorted(offsets) and len(set(offsets)) == 36
    late = await Client.connect(server.ws_url)
    joined = await late.join(drop_id)
    assert joined["recovered"] is False
    assert [m["id"] for m in joined["snapshot"]["chat"]] == [f["data"]["id"] for f in live]
    for c in (watcher, late, *senders):
        await c.close()


async def test_length_limit_and_empty_text(server, settings, make_token):
    drop_id, _ = await create_drop(settings.database_url)
    c = await _viewer(server, drop_id, make_token("alice"))
    too_long = "a" * (settings.chat_max_chars + 1)
    err = await c.request({"t": "chat.send", "text": too_long})
    assert err["code"] == "invalid_field" and err["details"]["field"] == "text"
    assert (await c.request({"t": "chat.send", "text": "   \x00 "}))["code"] == "invalid_field"
    ok = await c.request({"t": "chat.send", "text": "é" * settings.chat_max_chars})
    assert ok["t"] == "reply"
    await c.close()


async def test_rate_limit_per_user(settings, make_token):
    drop_id, _ = await create_drop(settings.database_url)
    async with running(settings, chat_rate_per_10s=3) as srv:
        c = await _viewer(srv, drop_id, make_token("alice"))
        codes = [(await c.request({"t": "chat.send", "text": f"m{i}"}))["t"] for i in range(3)]
        assert codes == ["reply"] * 3
        err = await c.request({"t": "chat.send", "text": "one more"})
        assert err["code"] == "rate_limited" and err["details"]["retry_after_ms"] > 0
        # Another user is not limited by alice's messages.
        other = await _viewer(srv, drop_id, make_token("bob"))
        assert (await other.request({"t": "chat.send", "text": "hi"}))["t"] == "reply"
        await c.close()
        await other.close()


async def test_slow_mode_set_by_creator_only(server, settings, make_token):
    drop_id, _ = await create_drop(settings.database_url)
    creator = await _viewer(server, drop_id, make_token("creator-1", "creator"))
    viewer = await _viewer(server, drop_id, make_token("alice"))
    assert (await viewer.request({"t": "chat.slow", "seconds": 5}))["code"] == "forbidden"
    assert (await creator.request({"t": "chat.slow", "seconds": 1}))["t"] == "reply"
    event = await viewer.recv_until(lambda f: f.get("event") == "chat.slow")
    assert event["data"] == {"seconds": 1}
    assert (await viewer.request({"t": "chat.send", "text": "one"}))["t"] == "reply"
    err = await viewer.request({"t": "chat.send", "text": "two"})
    assert err["code"] == "slow_mode" and 0 < err["details"]["retry_after_ms"] <= 1000
    # The creator is exempt.
    assert (await creator.request({"t": "chat.send", "text": "a"}))["t"] == "reply"
    assert (await creator.request({"t": "chat.send", "text": "b"}))["t"] == "reply"
    await asyncio.sleep(1.05)
    assert (await viewer.request({"t": "chat.send", "text": "three"}))["t"] == "reply"
    await creator.request({"t": "chat.slow", "seconds": 0})
    assert (await viewer.request({"t": "chat.send", "text": "four"}))["t"] == "reply"
    await creator.close()
    await viewer.close()


async def test_delete_message(server, settings, make_token):
    drop_id, _ = await create_drop(settings.database_url)
    creator = await _viewer(server, drop_id, make_token("creator-1", "creator"))
    viewer = await _viewer(server, drop_id, make_token("alice"))
    mid = (await viewer.request({"t": "chat.send", "text": "spam"}))["data"]["message_id"]
    assert (await viewer.request({"t": "chat.delete", "message_id": mid}))["code"] == "forbidden"
    reply = await creator.request({"t": "chat.delete", "message_id": mid})
    assert reply["data"]["deleted"] == mid
    deleted = await viewer.recv_until(lambda f: f.get("event") == "chat.deleted")
    assert deleted["data"] == {"id": mid}
    again = await creator.request({"t": "chat.delete", "message_id": mid})
    assert again["code"] == "message_not_found"
    late = await Client.connect(server.ws_url)
    assert (await late.join(drop_id))["snapshot"]["chat"] == []
    conn = await asyncpg.connect(settings.database_url)
    try:
        row = await conn.fetchrow("SELECT user_id, action, message_id, moderator_id "
                                  "FROM chat_moderation")
    finally:
        await conn.close()
    assert dict(row) == {"user_id": "alice", "action": "delete", "message_id": mid,
                         "moderator_id": "creator-1"}
    for c in (creator, viewer, late):
        await c.close()


async def test_mute_then_ban_holds_across_reconnects_and_drops(server, settings, make_token):
    drop_id, _ = await create_drop(settings.database_url)
    other_drop, _ = await create_drop(settings.database_url)  # same creator
    creator = await _viewer(server, drop_id, make_token("creator-1", "creator"))
    viewer = await _viewer(server, drop_id, make_token("troll"))
    assert (await viewer.request({"t": "chat.mute", "user_id": "x"}))["code"] == "forbidden"
    reply = await creator.request({"t": "chat.mute", "user_id": "troll", "seconds": 60})
    assert reply["data"]["action"] == "mute"
    err = await viewer.request({"t": "chat.send", "text": "hi"})
    assert err["code"] == "muted"
    await creator.request({"t": "chat.ban", "user_id": "troll", "reason": "spam"})
    assert (await viewer.request({"t": "chat.send", "text": "hi"}))["code"] == "banned"
    await viewer.close()
    # Reconnect: still banned, here and in the creator's other drop.
    for d in (drop_id, other_drop):
        again = await _viewer(server, d, make_token("troll"))
        assert (await again.request({"t": "chat.send", "text": "hi"}))["code"] == "banned"
        await again.close()
    # Lifting the ban lets the user post again.
    assert (await creator.request({"t": "chat.unban", "user_id": "troll"}))["data"]["lifted"] == 2
    back = await _viewer(server, drop_id, make_token("troll"))
    assert (await back.request({"t": "chat.send", "text": "sorry"}))["t"] == "reply"
    await back.close()
    await creator.close()


async def test_ban_survives_a_lost_redis_cache(server, settings, make_token, clean_backends):

    drop_id, _ = await create_drop(settings.database_url)
    admin = await _viewer(server, drop_id, make_token("root", "admin"))
    assert (await admin.request({"t": "chat.ban", "user_id": "troll"}))["t"] == "reply"
    r = connect_redis(clean_backends.redis_url)
    await r.delete(f"{{drop:{drop_id}}}:chat:blocked")  # e.g. Redis restarted
    await r.aclose()
    viewer = await _viewer(server, drop_id, make_token("troll"))
    assert (await viewer.request({"t": "chat.send", "text": "hi"}))["code"] == "banned"
    await viewer.close()
    await admin.close()


async def test_a_chat_storm_does_not_read_postgresql_per_poster(server, settings, make_token):
    """The drop's mutes and bans are read into Redis once; a socket's first post is
    two Redis scripts. Proven with chat_moderation locked: a read of it would hang."""
    drop_id, _ = await create_drop(settings.database_url)
    first = await _viewer(server, drop_id, make_token("first"))
    assert (await first.request({"t": "chat.send", "text": "hi"}))["t"] == "reply"
    posters = [await _viewer(server, drop_id, make_token(f"fan-{i}")) for i in range(5)]
    db = await asyncpg.connect(settings.database_url)
    try:
        async with db.transaction():
            await db.execute("LOCK TABLE chat_moderation IN ACCESS EXCLUSIVE MODE")
            replies = await asyncio.gather(*(
                p.request({"t": "chat.send", "text": "first words"}, wait=10.0)
                for p in posters))
        assert [r["t"] for r in replies] == ["reply"] * 5, replies
    finally:
        await db.close()
    for c in (first, *posters):
        await c.close()


async def test_a_ban_in_a_drop_whose_moderation_is_already_loaded(server, settings,
                                                                  make_token):
    """Loaded once per drop, the hash still hears later bans, and their lifting."""
    drop_id, _ = await create_drop(settings.database_url)
    creator = await _viewer(server, drop_id, make_token("creator-1", "creator"))
    troll = await _viewer(server, drop_id, make_token("troll"))
    assert (await troll.request({"t": "chat.send", "text": "hi"}))["t"] == "reply"
    assert (await creator.request({"t": "chat.ban", "user_id": "troll"}))["t"] == "reply"
    assert (await troll.request({"t": "chat.send", "text": "hi"}))["code"] == "banned"
    again = await _viewer(server, drop_id, make_token("troll"))
    assert (await again.request({"t": "chat.send", "text": "hi"}))["code"] == "banned"
    assert (await creator.request({"t": "chat.unban", "user_id": "troll"}))["t"] == "reply"
    assert (await again.request({"t": "chat.send", "text": "back"}))["t"] == "reply"
    for c in (creator, troll, again):
        await c.close()


async def test_a_storm_of_posts_is_bounded_per_process_and_the_rest_refused_at_once(
        server, settings, make_token, clean_backends, monkeypatch):
    """With Redis slow (paused), posts wait for one of the process's slots, a bounded
    number queue, and the next are refused at once (rate_limited, retry_after_ms)
    instead of each taking a Redis connection of their own; the creator's post is
    never refused. Once Redis answers, every queued post is accepted."""
    monkeypatch.setattr(chat, "POST_SLOTS", 2, raising=False)
    monkeypatch.setattr(chat, "POST_QUEUE", 3, raising=False)
    drop_id, _ = await create_drop(settings.database_url)
    creator = await _viewer(server, drop_id, make_token("creator-1", "creator"))
    db = await asyncpg.connect(settings.database_url)
    try:  # an appointed moderator is staff too (realtime.moderators)
        await db.execute("INSERT INTO creator_moderators (creator_id, user_id, appointed_by) "
                         "VALUES ('creator-1', 'mod-1', 'creator-1')")
    finally:
        await db.close()
    mod = await _viewer(server, drop_id, make_token("mod-1"))
    fans = [await _viewer(server, drop_id, make_token(f"fan-{i}")) for i in range(8)]
    # The drop's moderation is loaded by a first post, so the rest is Redis alone.
    assert (await fans[0].request({"t": "chat.send", "text": "first"}))["t"] == "reply"
    assert (await mod.request({"t": "chat.send", "text": "hi all"}))["t"] == "reply"
    r = connect_redis(clean_backends.redis_url)
    try:
        await r.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        started = asyncio.get_running_loop().time()
        *replies, staff, moderator = await asyncio.gather(*(
            f.request({"t": "chat.send", "text": f"hello {i}"}, wait=10.0)
            for i, f in enumerate(fans)),
            creator.request({"t": "chat.send", "text": "welcome"}, wait=10.0),
            mod.request({"t": "chat.send", "text": "be nice"}, wait=10.0))
        refused = [x for x in replies if x.get("code") == "rate_limited"]
        accepted = [x for x in replies if x["t"] == "reply"]
        assert len(accepted) == 5 and len(refused) == 3, replies
        assert all(x["details"]["retry_after_ms"] > 0 for x in refused)
        assert staff["t"] == "reply", staff
        assert moderator["t"] == "reply", moderator
        # The accepted ones waited for Redis; the refused did not.
        assert asyncio.get_running_loop().time() - started >= 1.0
    finally:
        await r.execute_command("CLIENT", "UNPAUSE")
        await r.aclose()
    for c in (creator, mod, *fans):
        await c.close()


def test_normalize_pure():
    assert chat.normalize("  hi\tthere\n ", 10) == "hithere"
    assert chat.normalize("a\nb", 10) == "a\nb"
    with pytest.raises(ProtocolError):
        chat.normalize("\u200b\u200b", 10)
    with pytest.raises(ProtocolError):
        chat.normalize("x" * 11, 10)
