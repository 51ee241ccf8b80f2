"""A buyer's open socket hears each order outcome once, even when the process's pub/sub
subscription was lost (or not yet made) while the outcome was published on the user's
channel, which keeps no history: the hub asks checkout for the current state of the
user's orders and sends each socket what it has not heard (realtime/private.py). On the
real app with the fake gateway; every test ends with the invariants of
tests/invariants.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest

from dropserver.auth import Role
from realtime import channels
from tests.conftest import only_single_redis, running
from tests.invariants import check, fake_gateway_payments, quiesce
from tests.payments_fixtures import wait_for
from tests.realtime_support import Client
from tests.test_auctions import live_drop
from tests.test_reserve_api import bearer, post_buy, selling_drop


@pytest.fixture
async def db(clean_backends) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(clean_backends.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


class Gate:
    """Holds the hub's subscriber back from (re)connecting or subscribing until opened."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    def hold(self, target, name: str, only=lambda *args: True) -> None:
        original = getattr(target, name)

        async def gated(*args, **kwargs):
            if only(*args):
                await self.open.wait()
            return await original(*args, **kwargs)

        setattr(target, name, gated)


async def _privates(c: Client, seconds: float) -> AsyncIterator[dict]:
    """The private frames that reach ``c`` within ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            frame = await c.recv(left)
        except TimeoutError:
            return
        if frame.get("t") == "private":
            yield frame


async def _private(c: Client, hold_id: str, seconds: float) -> Counter[str]:
    """The private events about ``hold_id`` that reach ``c`` within ``seconds``."""
    heard: Counter[str] = Counter()
    async for frame in _privates(c, seconds):
        if frame["data"].get("order_id") == hold_id:
            heard[frame["event"]] += 1
    return heard


async def _told(db, hold_id: str, state: str) -> None:
    await wait_for(lambda: db.fetchval(
        "SELECT 1 FROM orders WHERE public_id = $1 AND state = $2 AND told = $2",
        hold_id, state), 15)


async def _paid_while_nobody_listens(http, db, c: Client, gate: Gate, hold_id: str,
                                     buyer: dict) -> None:
    """Pay the order while ``gate`` keeps the user channel unsubscribed; then open it:
    the socket hears ``order.paid``, once."""
    resp = await http.post(f"/v1/dev/orders/{hold_id}/confirm", headers=buyer, json={})
    assert resp.status_code == 200, resp.text
    await _told(db, hold_id, "paid")  # published while nobody listened
    gate.open.set()
    heard = await _private(c, hold_id, 3.0)
    assert heard == Counter({"order.paid": 1}), heard


async def _buy_while_listening(server, http, db, c: Client, user: str, buyer: dict,
                               drop_id: int, pid: int) -> str:
    """``c`` joins, its user channel is subscribed, the user buys over HTTP and is told
    order.payment; the hold id."""
    await c.join(drop_id)
    user_channel = channels.user_channel(user).encode()
    hub = server.app.state.realtime
    await wait_for(lambda: _async(user_channel in hub.subscriber.channels), 5)
    await asyncio.sleep(0.2)  # the subscription is confirmed
    resp = await post_buy(http, drop_id, buyer, pid)
    assert resp.status_code == 201, resp.text
    hold_id = resp.json()["hold_id"]
    await _told(db, hold_id, "payment_pending")
    return hold_id


async def _invariants(server, db, drop_id: int, hold_id: str, user: str) -> None:
    redis = server.app.state.redis
    await quiesce(redis, drop_id, within=20)
    await check(db, redis, drop_id, acknowledged={hold_id: {"user_id": user}},
                payments=await fake_gateway_payments(redis))


@only_single_redis
async def test_an_outcome_told_while_the_subscription_was_lost_is_heard_once(
        server, http, db, make_token) -> None:
    """The buyer's socket stays open; the process's pub/sub connection is killed and kept
    from reconnecting while the order is paid and order.paid is published (to nobody).
    After it reconnects the socket hears order.paid, once, and order.payment (heard
    before the loss) is not sent again."""
    hub = server.app.state.realtime
    creator = bearer(make_token("creator-1", Role.CREATOR))
    drop_id, pid = await selling_drop(http, creator, units=2)
    c = await Client.connect(server.ws_url, token=make_token("buyer-a"))
    try:
        buyer = bearer(make_token("buyer-a", Role.VIEWER))
        hold_id = await _buy_while_listening(server, http, db, c, "buyer-a", buyer,
                                             drop_id, pid)
        before = await _private(c, hold_id, 1.0)
        assert before == Counter({"order.held": 1, "order.payment": 1}), before

        gate = Gate()
        gate.hold(hub.subscriber, "_connect")
        redis = server.app.state.redis
        assert await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        await wait_for(lambda: _async(hub.subscriber._conn is None), 5)
        await _paid_while_nobody_listens(http, db, c, gate, hold_id, buyer)
        assert not c.ws.close_code  # the socket stayed open
        await _invariants(server, db, drop_id, hold_id, "buyer-a")
    finally:
        await c.close()


@only_single_redis
async def test_an_outcome_told_before_a_new_socket_is_subscribed_is_heard_once(
        server, http, db, make_token) -> None:
    """The sibling: the buyer's first socket on this process connects while the outcome
    is being published, before its user channel's subscription is confirmed. It hears
    the outcome once, when the subscription is made."""
    hub = server.app.state.realtime
    creator = bearer(make_token("creator-1", Role.CREATOR))
    drop_id, pid = await selling_drop(http, creator, units=2)
    buyer = bearer(make_token("buyer-b", Role.VIEWER))
    resp = await post_buy(http, drop_id, buyer, pid)
    assert resp.status_code == 201, resp.text
    hold_id = resp.json()["hold_id"]
    await _told(db, hold_id, "payment_pending")
    gate = Gate()
    gate.hold(hub.subscriber, "subscribe",
              only=lambda channel, *_: channel == channels.user_channel("buyer-b"))
    c = await Client.connect(server.ws_url, token=make_token("buyer-b"))
    try:
        await c.join(drop_id)
        await _paid_while_nobody_listens(http, db, c, gate, hold_id, buyer)
        await _invariants(server, db, drop_id, hold_id, "buyer-b")
    finally:
        await c.close()


async def _async(value):
    return value


@only_single_redis
@pytest.mark.parametrize("elsewhere", [False, True], ids=["same-process", "other-process"])
async def test_a_buyer_who_reconnects_right_after_an_outcome_does_not_hear_it_again(
        server, http, db, settings, make_token, monkeypatch, elsewhere) -> None:
    """A new socket is offered what changed from a little before it opened (clocks):
    a buyer whose socket closed just after it heard ``order.paid`` and who reconnects
    at once -- to the same process or to another one -- must not hear it again on the
    new socket (the fault rig counts a buyer's events over all their sockets). The
    window is widened to 30 s here so that the reconnect surely falls inside it,
    however slow the machine."""
    from realtime import private

    monkeypatch.setattr(private, "CLOCK_SLACK_S", 30.0)
    monkeypatch.setattr(private, "LEFT_KEEP_S", 34.0, raising=False)
    creator = bearer(make_token("creator-1", Role.CREATOR))
    drop_id, pid = await selling_drop(http, creator, units=2)
    hub = server.app.state.realtime
    a = await Client.connect(server.ws_url, token=make_token("buyer-c"))
    try:
        buyer = bearer(make_token("buyer-c", Role.VIEWER))
        hold_id = await _buy_while_listening(server, http, db, a, "buyer-c", buyer,
                                             drop_id, pid)
        resp = await http.post(f"/v1/dev/orders/{hold_id}/confirm", headers=buyer, json={})
        assert resp.status_code == 200, resp.text
        await _told(db, hold_id, "paid")
        heard = await _private(a, hold_id, 1.0)
        assert heard == Counter({"order.held": 1, "order.payment": 1, "order.paid": 1}), heard
    finally:
        await a.close()
    await wait_for(lambda: _async("buyer-c" not in hub.users), 5)
    async with contextlib.AsyncExitStack() as stack:
        other = (await stack.enter_async_context(running(settings)) if elsewhere
                 else server)
        b = await Client.connect(other.ws_url, token=make_token("buyer-c"))
        stack.push_async_callback(b.close)
        await b.join(drop_id)  # the user's channel is subscribed there: recovery runs
        again = await _private(b, hold_id, 2.0)
        assert again == Counter(), again
        # The new socket still hears what is news: the refund of the paid order.
        staff = bearer(make_token("admin-1", Role.ADMIN))
        resp = await http.post(f"/v1/orders/{hold_id}/refund", headers=staff)
        assert resp.status_code == 200, resp.text
        news = await _private(b, hold_id, 5.0)
        assert news == Counter({"order.refunded": 1}), news
    await _invariants(server, db, drop_id, hold_id, "buyer-c")


async def test_a_told_marker_set_by_a_retried_command_is_still_its_own(r) -> None:
    """On a cluster the buyer is told with SET NX (the marker) then SPUBLISH. redis-py's
    cluster client sends a command again when its connection failed, so a SET NX
    carried out by a primary that died before answering comes twice: the second must
    not read as "told already", or the event is never published (a plain SET NX
    answers nil to it). The marker holds the teller's token (SET NX GET)."""
    from checkout.order_events import TOLD_TTL_S, claim_marker

    marker = "{drop:1}:told:h-retried:paid"
    assert await claim_marker(r, marker, "try-1")
    assert await claim_marker(r, marker, "try-1")  # the same command, sent again
    assert not await claim_marker(r, marker, "try-2")  # another teller: told already
    assert 0 < await r.ttl(marker) <= TOLD_TTL_S
    assert await r.set("{drop:1}:told:h-plain:paid", 1, nx=True)  # what it replaced:
    assert not await r.set("{drop:1}:told:h-plain:paid", 1, nx=True)  # a retry reads "told"


async def test_auction_events_told_while_nobody_listened_are_heard_once(
        server, http, db, make_token) -> None:
    """``auction.outbid`` and ``auction.won`` reach a bidder's socket whose user channel
    was not subscribed yet when they were published: recovered from PostgreSQL's bids
    and auctions (checkout.auction_events), once each."""
    hub = server.app.state.realtime
    creator = bearer(make_token("creator-1", Role.CREATOR))
    drop_id, (pid,) = await live_drop(http, creator)
    resp = await http.post(f"/v1/drops/{drop_id}/auctions", headers=creator, json={
        "product_id": pid, "start_price": 1000, "increment": 100, "duration_s": 5,
        "snipe_window_s": 1})
    assert resp.status_code == 201, resp.text
    aid = resp.json()["id"]
    gates = {user: Gate() for user in ("alice", "bob")}
    for user, gate in gates.items():
        gate.hold(hub.subscriber, "subscribe",
                  only=lambda channel, *_, user=user: channel == channels.user_channel(user))
    url = f"/v1/drops/{drop_id}/auctions/{aid}/bids"
    alice, bob = (bearer(make_token(u, Role.VIEWER, name=u)) for u in ("alice", "bob"))
    sockets = [await Client.connect(server.ws_url, token=make_token(u)) for u in
               ("alice", "bob")]
    try:
        for c in sockets:
            await c.join(drop_id)
        for who, amount, key in ((alice, 1000, "a1"), (bob, 1100, "b1")):
            resp = await http.post(url, json={"amount": amount},
                                   headers={**who, "Idempotency-Key": key})
            assert resp.status_code == 201, resp.text
        await wait_for(lambda: db.fetchval(  # journaled: what recovery reads
            "SELECT count(*) = 2 FROM auction_bids WHERE auction_id = $1", aid), 10)
        gates["alice"].open.set()
        heard = await _auction_private(sockets[0], aid, 3.0)
        assert [e for e, _ in heard] == ["auction.outbid"], heard
        assert heard[0][1]["amount"] == 1100 and heard[0][1]["your_amount"] == 1000
        assert heard[0][1]["next_min"] == 1200
        await wait_for(lambda: db.fetchval(  # Bob won; his hold is an order
            "SELECT o.id IS NOT NULL FROM auctions a JOIN orders o ON o.public_id = "
            "a.hold_id WHERE a.id = $1 AND a.winner_id = 'bob'", aid), 20)
        gates["bob"].open.set()
        heard = await _auction_private(sockets[1], aid, 3.0)
        assert [e for e, _ in heard] == ["auction.won"], heard
        assert heard[0][1]["amount"] == 1100 and heard[0][1]["hold_id"]
        assert await _auction_private(sockets[0], aid, 1.0) == []  # nothing twice
    finally:
        for c in sockets:
            await c.close()


async def _auction_private(c: Client, auction_id: int, seconds: float) -> list:
    return [(frame["event"], frame["data"]) async for frame in _privates(c, seconds)
            if frame["data"].get("auction_id") == auction_id]
