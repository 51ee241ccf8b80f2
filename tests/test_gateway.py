"""The /ws gateway with real sockets, Redis and PostgreSQL: join, snapshot, ordering,
resume, formats, bad frames."""

from __future__ import annotations

import asyncio
import contextlib
import json

import msgpack
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from realtime.publish import publish, publish_user, publish_volatile
from tests.realtime_support import JSON, MSGPACK, Client, create_drop


async def test_join_returns_snapshot(server, settings, r):
    drop_id, (p1, p2) = await create_drop(settings.database_url,
                                          products=((2500, 100), (4000, 5)))
    await publish(r, drop_id, "drop.pinned", {"product_id": p2})
    c = await Client.connect(server.ws_url)
    joined = await c.join(drop_id)
    assert joined["t"] == "joined" and joined["drop_id"] == drop_id
    assert joined["recovered"] is False
    snap = joined["snapshot"]
    assert snap["state"] == "live"
    assert snap["countdown"]["starts_at"]
    assert [(p["product_id"], p["price"], p["remaining"]) for p in snap["products"]] == [
        (p1, 2500, 100), (p2, 4000, 5)]
    assert snap["chat"] == [] and "viewers" in snap
    # The position covers the pin published before the join.
    assert joined["pos"]["offset"] == 1 and joined["pos"]["epoch"]
    assert joined["node"] == server.app.state.node_id
    await c.close()


async def test_events_arrive_in_order_with_positions(server, settings, r):
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url)
    await c.join(drop_id)
    # Fan-out writes pre-framed bytes straight to uvicorn's protocol (realtime.asgi).
    [conn] = server.app.state.realtime.connections
    assert conn.proto is not None and hasattr(conn.proto, "write_frame")
    for i in range(50):
        await publish(r, drop_id, "chat.message", {"i": i})
    events = await c.events(50)
    assert [e["data"]["i"] for e in events] == list(range(50))
    assert [e["pos"]["offset"] for e in events] == list(range(1, 51))
    await c.close()


async def test_resume_receives_exactly_the_missed_events(server, settings, r):
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url)
    await c.join(drop_id)
    await publish(r, drop_id, "drop.state", {"state": "selling", "previous": "live"})
    (first,) = await c.events(1)
    await c.close()
    for i in range(3):
        await publish(r, drop_id, "chat.message", {"i": i})
    c2 = await Client.connect(server.ws_url)
    joined = await c2.join(drop_id, since=first["pos"])
    assert joined["recovered"] is True and "snapshot" not in joined
    assert [e["data"]["i"] for e in joined["events"]] == [0, 1, 2]
    assert [e["pos"]["offset"] for e in joined["events"]] == [2, 3, 4]
    # And live events continue right after.
    await publish(r, drop_id, "drop.sold_out", {"product_id": 1})
    (live,) = await c2.events(1)
    assert live["pos"]["offset"] == 5
    await c2.close()


async def test_resume_too_old_gets_fresh_snapshot_not_partial(server, settings, r):
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url)
    joined = await c.join(drop_id, since={"epoch": "not-the-epoch", "offset": 3})
    assert joined["recovered"] is False and "snapshot" in joined
    assert joined["events"] == []
    await c.close()


async def test_json_subprotocol(server, settings, r):
    drop_id, (pid,) = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url, fmt=JSON)
    assert c.ws.subprotocol == JSON
    joined = await c.join(drop_id)
    assert joined["snapshot"]["products"][0]["product_id"] == pid
    await publish(r, drop_id, "drop.buy_now", {"product_id": pid, "price": 2500,
                                               "currency": "usd", "remaining": 100})
    raw = await asyncio.wait_for(c.ws.recv(), 5)
    assert isinstance(raw, str) and '"drop.buy_now"' in raw
    await c.close()


async def test_either_frame_kind_is_read_on_either_subprotocol(server, settings):
    """docs/protocol.md: text is JSON everywhere; binary is msgpack on a msgpack
    connection and UTF-8 JSON on a JSON one; answers come in the connection's kind."""
    drop_id, _ = await create_drop(settings.database_url)
    on_json = await Client.connect(server.ws_url, fmt=JSON)
    await on_json.ws.send(json.dumps({"t": "join", "id": "b", "drop_id": drop_id}).encode())
    raw = await asyncio.wait_for(on_json.ws.recv(), 5)
    assert isinstance(raw, str) and json.loads(raw)["t"] == "joined"
    await on_json.ws.send(msgpack.packb({"t": "ping", "id": "m"}))  # msgpack: not JSON
    err = json.loads(await asyncio.wait_for(on_json.ws.recv(), 5))
    assert err["t"] == "error" and err["code"] == "bad_frame"
    on_msgpack = await Client.connect(server.ws_url)
    await on_msgpack.ws.send(json.dumps({"t": "ping", "id": "t"}))  # text: JSON
    raw = await asyncio.wait_for(on_msgpack.ws.recv(), 5)
    assert isinstance(raw, bytes) and msgpack.unpackb(raw) == {"t": "pong", "id": "t"}
    await on_json.close()
    await on_msgpack.close()


async def test_msgpack_is_default_and_binary(server, settings, r):
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url, fmt=MSGPACK)
    assert c.ws.subprotocol == MSGPACK
    await c.send({"t": "join", "drop_id": drop_id, "id": 1})
    raw = await asyncio.wait_for(c.ws.recv(), 5)
    assert isinstance(raw, bytes) and msgpack.unpackb(raw)["t"] == "joined"
    await c.close()


async def test_volatile_and_private_events(server, settings, r, make_token):
    drop_id, (pid,) = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url, token=make_token("alice"))
    await c.join(drop_id)
    await publish_volatile(r, drop_id, "stock", {"products": {pid: 7}})
    stock = await c.recv_until(lambda f: f.get("event") == "stock")
    assert stock["t"] == "volatile" and stock["data"]["products"] == {pid: 7}
    # The user channel subscription is made right after the join.
    await asyncio.sleep(0.2)
    await publish_user(r, "alice", "order.paid", {"order_id": "o-1"})
    private = await c.recv_until(lambda f: f.get("t") == "private")
    assert private["event"] == "order.paid" and private["data"] == {"order_id": "o-1"}
    await c.close()


async def test_ping_pong_and_ids_echoed(server):
    c = await Client.connect(server.ws_url)
    reply = await c.request({"t": "ping"})
    assert reply == {"t": "pong", "id": "r1"}
    await c.close()


@pytest.mark.parametrize("raw, code", [
    (b"\xc1\xc1", "bad_frame"),                                  # not msgpack
    (msgpack.packb([1, 2]), "bad_frame"),                        # not a map
    (msgpack.packb({"id": "x"}), "bad_frame"),                   # no type
    (msgpack.packb({"t": "teleport", "id": "x"}), "unknown_type"),
    (msgpack.packb({"t": "join", "drop_id": "7", "id": "x"}), "invalid_field"),
    (msgpack.packb({"t": "join", "drop_id": -1, "id": "x"}), "invalid_field"),
    (msgpack.packb({"t": "chat.send", "text": "hi", "id": "x"}), "not_joined"),
    (msgpack.packb({"t": "join", "drop_id": 999999, "id": "x"}), "drop_not_found"),
    (msgpack.packb({"t": "buy", "product_id": 1, "id": "x"}), "not_joined"),
])
async def test_bad_frames_get_error_and_connection_survives(server, raw, code):
    c = await Client.connect(server.ws_url)
    await c.ws.send(raw)
    err = await c.recv()
    assert err["t"] == "error" and err["code"] == code and err["message"]
    if b"id" in raw:
        assert err.get("id") == "x"
    # Still usable.
    assert (await c.request({"t": "ping"}))["t"] == "pong"
    await c.close()


async def test_bad_json_text_frame(server):
    c = await Client.connect(server.ws_url, fmt=JSON)
    await c.ws.send("{not json")
    err = await c.recv()
    assert err["code"] == "bad_frame"
    await c.close()


async def test_oversized_frame_closes_with_1009_and_server_survives(server, settings):
    c = await Client.connect(server.ws_url)
    await c.ws.send(b"\x80" * (settings.ws_max_message_bytes + 1))
    with pytest.raises(ConnectionClosed) as info:
        await c.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    c2 = await Client.connect(server.ws_url)
    assert (await c2.request({"t": "ping"}))["t"] == "pong"
    await c2.close()


async def test_too_many_bad_frames_close_4000(server):
    c = await Client.connect(server.ws_url)
    for _ in range(10):
        await c.ws.send(b"\xc1")
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await c.recv()
    assert info.value.rcvd.code == 4000


async def test_join_twice_is_an_illegal_transition(server, settings):
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url)
    await c.join(drop_id)
    err = await c.join(drop_id)
    assert err["t"] == "error" and err["code"] == "already_joined"
    await c.close()


async def test_draft_drop_hidden_from_viewers_but_not_creator(server, settings, make_token):
    drop_id, _ = await create_drop(settings.database_url, state="draft")
    c = await Client.connect(server.ws_url)
    assert (await c.join(drop_id))["code"] == "drop_not_found"
    await c.close()
    owner = await Client.connect(server.ws_url)
    joined = await owner.join(drop_id, token=make_token("creator-1", "creator"))
    assert joined["t"] == "joined" and joined["snapshot"]["state"] == "draft"
    await owner.close()


async def test_invalid_token_on_join_is_an_error_not_a_close(server, settings):
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url)
    err = await c.join(drop_id, token="garbage")
    assert err["code"] == "token_invalid"
    assert (await c.join(drop_id))["t"] == "joined"
    await c.close()


async def test_buy_is_delegated_to_registered_command(server, settings, make_token):
    drop_id, (pid,) = await create_drop(settings.database_url)
    seen = {}

    async def buy(app, ctx, data):
        seen.update(user=ctx.principal.user_id, drop=ctx.drop_id, data=data)
        if data.get("product_id") != pid:
            from dropserver.errors import Conflict
            raise Conflict("not selling", code="not_selling")
        return {"order_id": "o-1"}

    server.app.state.commands["buy"] = buy
    guest = await Client.connect(server.ws_url)
    await guest.join(drop_id)
    assert (await guest.request({"t": "buy", "product_id": pid}))["code"] == "token_missing"
    await guest.close()
    c = await Client.connect(server.ws_url, token=make_token("bob"))
    await c.join(drop_id)
    reply = await c.request({"t": "buy", "product_id": pid})
    assert reply == {"t": "reply", "id": "r2", "data": {"order_id": "o-1"}}
    assert seen == {"user": "bob", "drop": drop_id, "data": {"product_id": pid}}
    err = await c.request({"t": "buy", "product_id": pid + 1})
    assert err["t"] == "error" and err["code"] == "not_selling"
    await c.close()


async def test_watch_client_prints_frames_and_resumes(server, settings, r):
    import io

    from realtime.watch import watch

    drop_id, _ = await create_drop(settings.database_url)
    out = io.StringIO()
    task = asyncio.create_task(watch(f"{server.ws_url}/ws", drop_id, out=out))
    try:
        async with asyncio.timeout(5):
            while '"joined"' not in out.getvalue():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await publish(r, drop_id, "drop.state", {"state": "selling", "previous": "live"})
        async with asyncio.timeout(5):
            while '"drop.state"' not in out.getvalue():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
    import json

    frames = [json.loads(line) for line in out.getvalue().splitlines()]
    assert frames[0]["t"] == "joined"
    assert any(f.get("event") == "drop.state" for f in frames)


async def test_malformed_authorization_header_is_an_invalid_token(server, settings):
    drop_id, _ = await create_drop(settings.database_url)
    ws = await websockets.connect(f"{server.ws_url}/ws", subprotocols=[MSGPACK],
                                  additional_headers={"Authorization": "Basic abc"})
    c = Client(ws, MSGPACK)
    assert (await c.join(drop_id))["code"] == "token_invalid"
    await c.close()


async def test_frame_flood_is_rate_limited_and_server_survives(server, http):
    c = await Client.connect(server.ws_url)
    for _ in range(300):
        await c.send({"t": "ping"})
    frames = []
    with contextlib.suppress(TimeoutError):
        while True:
            frames.append(await c.recv(1))
    kinds = [f["t"] for f in frames]
    # One error per one-second window over the budget (normally exactly one).
    assert kinds.count("error") >= 1 and 0 < kinds.count("pong") < 300
    assert next(f for f in frames if f["t"] == "error")["code"] == "rate_limited"
    assert (await http.get("/healthz")).status_code == 200
    await asyncio.sleep(1.0)  # the next second's budget
    assert (await c.request({"t": "ping"}))["t"] == "pong"
    await c.close()


async def test_a_frame_flood_says_when_to_send_again(server, http):
    """The frames past FRAMES_PER_SECOND in a second are dropped unread (so they carry
    no id to answer) and the first of them is answered with one ``rate_limited``: an
    outside client got it without any ``details``, so it could not tell when its
    dropped frames (a buy among them) could be sent again. It says
    ``retry_after_ms``, the rest of the second, as chat's ``rate_limited`` does."""
    from realtime.gateway import FRAMES_PER_SECOND

    c = await Client.connect(server.ws_url)
    for i in range(FRAMES_PER_SECOND * 3):
        await c.send({"t": "ping", "id": i})
    error = await c.recv_until(lambda f: f["t"] == "error")
    assert error["code"] == "rate_limited" and "id" not in error, error
    assert 1 <= error["details"]["retry_after_ms"] <= 1000, error
    await asyncio.sleep(error["details"]["retry_after_ms"] / 1000)
    assert (await c.request({"t": "ping"}))["t"] == "pong"
    await c.close()


async def test_metrics_name_the_gateway(server, http, settings):
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url)
    await c.join(drop_id)
    text = (await http.get("/metrics")).text
    for name in ("dropserver_ws_connections", "dropserver_fanout_seconds",
                 "dropserver_pubsub_resubscribes_total", "dropserver_ws_slow_closes_total",
                 "dropserver_history_gaps_total", "dropserver_recoveries_total"):
        assert name in text, name
    await c.close()


def _sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return sample.value
    return 0.0


async def test_client_frames_are_counted_by_type(server, http, settings):
    drop_id, _ = await create_drop(settings.database_url)
    name = "dropserver_ws_frames_received_total"
    before = (await http.get("/metrics")).text
    c = await Client.connect(server.ws_url)
    await c.join(drop_id)
    for _ in range(3):
        assert (await c.request({"t": "ping"}))["t"] == "pong"
    await c.ws.send(b"\xc1\xc1")  # not msgpack
    assert (await c.recv_until(lambda f: f["t"] == "error"))["code"] == "bad_frame"
    after = (await http.get("/metrics")).text
    assert _sample(after, name, type="ping") - _sample(before, name, type="ping") == 3
    assert _sample(after, name, type="join") - _sample(before, name, type="join") == 1
    assert _sample(after, name, type="invalid") - _sample(before, name, type="invalid") == 1
    await c.close()


async def test_heartbeat_pongs_are_taken_below_the_app(server, http, settings):
    # realtime.asgi answers a pong without queueing it for the app: it keeps the
    # socket alive and is counted, but no longer spends the app's frame budget
    # (FRAMES_PER_SECOND), which a flood of any other frame does.
    from realtime.gateway import FRAMES_PER_SECOND

    drop_id, _ = await create_drop(settings.database_url)
    name = "dropserver_ws_frames_received_total"
    for fmt, pong in ((MSGPACK, msgpack.packb({"t": "pong"})), (JSON, '{"t":"pong"}'),
                      (JSON, '{"t": "pong"}')):
        before = _sample((await http.get("/metrics")).text, name, type="pong")
        c = await Client.connect(server.ws_url, fmt=fmt)
        await c.join(drop_id)
        for _ in range(FRAMES_PER_SECOND * 2):
            await c.ws.send(pong)
        reply = await c.request({"t": "ping"})
        assert reply["t"] == "pong", reply  # no rate_limited error came first
        after = _sample((await http.get("/metrics")).text, name, type="pong")
        assert after - before == FRAMES_PER_SECOND * 2
        await c.close()


@contextlib.asynccontextmanager
async def _joined_with_collector_off(server, settings, n: int = 5):
    """``n`` joined clients while the cycle collector is off: what is freed meanwhile
    is freed by reference counting alone."""
    import gc

    drop_id, _ = await create_drop(settings.database_url)
    gc.collect()
    gc.disable()
    try:
        clients = [await Client.connect(server.ws_url) for _ in range(n)]
        for c in clients:
            await c.join(drop_id)
        yield clients
    finally:
        gc.enable()


async def test_closed_sockets_leave_no_connection_for_the_cycle_collector(server, settings):
    # The pong hook ties the protocol and the gateway's Connection together while
    # the socket is served; the gateway unties them when it ends.
    import gc

    from realtime.connection import Connection

    async with _joined_with_collector_off(server, settings) as clients:
        assert len([o for o in gc.get_objects() if isinstance(o, Connection)]) >= 5
        for c in clients:
            await c.close()
        for _ in range(50):
            left = [o for o in gc.get_objects() if isinstance(o, Connection)]
            if not left:
                break
            await asyncio.sleep(0.05)
        assert left == []


async def test_an_upgraded_socket_leaves_no_http_protocol_for_the_cycle_collector(
        server, settings):
    # uvicorn's httptools protocol and its parser reference each other; after the
    # upgrade realtime.asgi.LeanHttpToolsProtocol breaks that, so reference counting
    # frees them at once instead of every socket waiting for a full collection.
    import gc

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    async with _joined_with_collector_off(server, settings) as clients:
        left = [o for o in gc.get_objects() if isinstance(o, HttpToolsProtocol)]
        assert left == []
        for c in clients:
            await c.close()


def test_frames_meeting_an_outage_are_logged_once_a_second_with_a_count(caplog):
    """Each frame of an outage is answered 'unavailable'; the warning is one line per
    second with how many frames it stands for, not a line per frame."""
    import logging

    from redis.exceptions import ConnectionError as RedisConnectionError

    from realtime import gateway
    from realtime.protocol import ClientFrame, ClientType

    now = [100.0]
    outages = gateway.OutageLog(every_s=1.0, clock=lambda: now[0])
    frame = ClientFrame(ClientType.CHAT_SEND, "1", {"text": "hi"})
    with caplog.at_level(logging.WARNING, logger="dropserver.realtime"):
        for _ in range(500):
            outages.frame(frame, RedisConnectionError("Connection refused"))
        now[0] += 1.0
        outages.frame(frame, RedisConnectionError("Connection refused"))
    lines = [r for r in caplog.records if r.getMessage().startswith("backing service")]
    assert [r.left_out for r in lines] == [0, 499]
    assert "Connection refused" in lines[0].error
