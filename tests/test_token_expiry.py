"""A socket's token is re-checked when it expires: the socket becomes a guest's
(it keeps watching, as a guest may), is told with a ``token_expired`` frame, gets no
more private events, and may sign back in with ``refresh`` and a new token for the
same user, without reconnecting (docs/protocol.md, "Tokens on an open socket")."""

from __future__ import annotations

import asyncio
import math
import time

from dropserver.auth import Role, issue_token
from realtime.publish import publish, publish_user
from tests.realtime_support import JSON, Client, create_drop

LEEWAY = 10  # seconds a token is accepted past its exp (dropserver/auth.py)


def _expiring(settings, sub: str, in_s: float) -> str:
    """A token the server treats as expired ``in_s`` seconds from now (exp + leeway)."""
    now = time.time()
    return issue_token(settings, sub, Role.VIEWER, ttl=60, now=now - 60 - LEEWAY + in_s)


async def _drain(client: Client, wait: float = 0.3) -> list[dict]:
    frames = []
    try:
        while True:
            frames.append(await client.recv(wait))
    except TimeoutError:
        return frames


async def test_an_expired_token_makes_the_socket_a_guest_until_refreshed(server, settings,
                                                                         r):
    drop_id, _ = await create_drop(settings.database_url)
    client = await Client.connect(server.ws_url, fmt=JSON,
                                  token=_expiring(settings, "viewer-exp", 2.0))
    try:
        assert (await client.join(drop_id))["t"] == "joined"
        ok = await client.request({"t": "chat.send", "text": "before"})
        assert ok["t"] == "reply", ok
        expired = await client.recv_until(lambda f: f["t"] == "token_expired", 6)
        assert expired == {"t": "token_expired"}
        # Signed-in actions: refused with token_expired; the socket stays open.
        for frame in ({"t": "chat.send", "text": "after"},
                      {"t": "buy", "product_id": 1, "idempotency_key": "k"}):
            err = await client.request(frame)
            assert err["t"] == "error" and err["code"] == "token_expired", err
        # No private events any more; drop events still come (a guest may watch).
        await publish_user(r, "viewer-exp", "order.paid", {"order_id": "x"})
        await publish(r, drop_id, "drop.pinned", {"product_id": 1})
        frames = await _drain(client, 1.0)
        assert not [f for f in frames if f["t"] == "private"], frames
        assert [f for f in frames if f.get("event") == "drop.pinned"], frames
        # Someone else's token: refused, the socket stays this user's guest.
        other = issue_token(settings, "viewer-other", Role.VIEWER)
        err = await client.request({"t": "refresh", "token": other})
        assert err["t"] == "error" and err["code"] == "token_user_mismatch", err
        # A new token of the same user: signed in again, private events again.
        fresh = issue_token(settings, "viewer-exp", Role.VIEWER, ttl=3600)
        reply = await client.request({"t": "refresh", "token": fresh})
        assert reply["t"] == "reply", reply
        assert reply["data"]["expires_at"] > time.time() * 1000
        assert (await client.request({"t": "chat.send", "text": "again"}))["t"] == "reply"
        await asyncio.sleep(0.2)  # the user channel is subscribed again
        await publish_user(r, "viewer-exp", "order.paid", {"order_id": "y"})
        got = await client.recv_until(lambda f: f["t"] == "private", 5)
        assert got["data"] == {"order_id": "y"}
    finally:
        await client.close()


async def test_a_refresh_before_expiry_moves_the_deadline(server, settings):
    drop_id, _ = await create_drop(settings.database_url)
    client = await Client.connect(server.ws_url, fmt=JSON,
                                  token=_expiring(settings, "viewer-early", 1.5))
    try:
        await client.join(drop_id)
        fresh = issue_token(settings, "viewer-early", Role.VIEWER, ttl=3600)
        assert (await client.request({"t": "refresh", "token": fresh}))["t"] == "reply"
        frames = await _drain(client, 2.5)  # past the old deadline
        assert not [f for f in frames if f["t"] == "token_expired"], frames
        assert (await client.request({"t": "chat.send", "text": "still me"}))["t"] == "reply"
    finally:
        await client.close()


async def test_a_guest_socket_cannot_refresh_into_a_user(server, settings):
    drop_id, _ = await create_drop(settings.database_url)
    client = await Client.connect(server.ws_url, fmt=JSON)
    try:
        await client.join(drop_id)
        token = issue_token(settings, "viewer-late", Role.VIEWER)
        err = await client.request({"t": "refresh", "token": token})
        assert err["t"] == "error" and err["code"] == "token_user_mismatch", err
        bad = await client.request({"t": "refresh", "token": "nope"})
        assert bad["t"] == "error" and bad["code"] == "token_invalid", bad
    finally:
        await client.close()


async def test_the_clock_skips_closed_sockets_and_follows_refreshes(monkeypatch):
    """One timer for every socket: a closed socket is not touched, a refreshed one
    expires at its new second, the others at theirs (at most a second late)."""
    from realtime import tokens

    told: list = []

    class Frame:  # stands in for realtime.hub.Broadcast: records who was told
        def __init__(self, frame: dict) -> None:
            self.frame = frame

        def deliver(self, conn) -> None:
            told.append((conn, self.frame))

    monkeypatch.setattr(tokens, "Broadcast", Frame)

    class Hub:
        def __init__(self) -> None:
            self.tokens = tokens.TokenClock(self)
            self.signed_out: list = []
            self.at: list[float] = []  # when each was signed out
            self.both = asyncio.Event()

        def sign_out(self, conn) -> None:
            self.signed_out.append(conn)
            self.at.append(time.time())
            if len(self.signed_out) == 2:
                self.both.set()

    class Conn:
        def __init__(self) -> None:
            self.closed = False
            self.auth = None
            self.principal = object()

    hub = Hub()
    now = time.time()
    staying, closing, moved = Conn(), Conn(), Conn()
    for conn in (staying, closing, moved):
        conn.auth = tokens.TokenLife(conn, "u")
        hub.tokens.add(conn.auth, now + 0.5)
    tokens.forget(closing)
    hub.tokens.add(moved.auth, now + 2.5)  # a refresh: a later deadline
    # Filed under the second each expires in (so at most a second late), the refresh
    # under its new one.
    assert (staying.auth.due, moved.auth.due) == (math.ceil(now + 0.5), math.ceil(now + 2.5))
    try:
        # What the clock did, not when this test woke up to look (a loaded machine
        # woke it after the refreshed one's second too; it slept a fixed 1.8 s).
        await asyncio.wait_for(hub.both.wait(), 15)
        # the closed one's second (the staying one's) has passed: it was skipped
        assert hub.signed_out == [staying, moved]
        assert hub.at[0] >= now + 0.5 and hub.at[1] >= now + 2.5, (now, hub.at)
        assert told == [(staying, {"t": "token_expired"}), (moved, {"t": "token_expired"})]
    finally:
        hub.tokens.close()
