"""Fan-out behaviour with real sockets and Redis: slow consumers, loss of the
subscriber connection, coalescing, drain, overload, heartbeats, several processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from dropserver.redis_client import connect as connect_redis
from dropserver.services import stop_process
from dropserver.settings import unsafe_rig_env
from realtime import metrics
from realtime.publish import publish, publish_volatile
from tests.conftest import only_single_redis, running
from tests.realtime_support import MSGPACK, Client, create_drop


async def _wait_for(pred, within=5.0):
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_slow_consumer_is_closed_4008_others_unaffected_and_it_resumes(settings, r):
    drop_id, _ = await create_drop(settings.database_url)
    limit = 64 * 1024
    async with running(settings, ws_send_queue_bytes=limit, history_size=5000) as srv:
        fast = await Client.connect(srv.ws_url)
        await fast.join(drop_id)
        # A client that stops reading: tiny receive buffer, tiny library queue.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        slow_ws = await websockets.connect(f"{srv.ws_url}/ws", sock=sock,
                                           subprotocols=[MSGPACK], compression=None,
                                           ping_interval=None, max_queue=1)
        slow = Client(slow_ws, MSGPACK)
        joined = await slow.join(drop_id)
        hub = srv.app.state.realtime
        before = metrics.SLOW_CLOSES._value.get()
        # The slow client now reads nothing while ~12 MB are published.
        payload = "x" * 6000
        received = []

        async def read_fast():
            while len(received) < 2000:
                frame = await fast.recv(10)
                if frame["t"] == "event":
                    received.append(frame["pos"]["offset"])
                elif frame["t"] == "ping":  # as a real client: a loaded run outlasts
                    await fast.send({"t": "pong"})  # the heartbeat's deadline

        async def read_slow_after_its_close() -> ConnectionClosed:
            # It starts reading as soon as the server closed it: a peer that reads
            # nothing for the close grace (10 s) is let go without its close frame
            # (test below), which a loaded machine's publishing loop alone can take.
            await _wait_for(lambda: metrics.SLOW_CLOSES._value.get() > before, 60)
            try:
                while True:
                    await slow.recv(30)
            except ConnectionClosed as exc:
                return exc

        reader = asyncio.create_task(read_fast())
        slow_reader = asyncio.create_task(read_slow_after_its_close())
        peak = 0
        for i in range(2000):
            await publish(r, drop_id, "chat.message", {"i": i, "pad": payload})
            for conn in hub.connections:
                peak = max(peak, conn.queued_bytes)
        await asyncio.wait_for(reader, 30)
        assert received == list(range(1, 2001))  # every event, in order, to the fast one
        assert peak <= limit  # the bound held
        # Reading again, the slow client finds the close frame 4008 after its backlog.
        closed = await asyncio.wait_for(slow_reader, 60)
        assert closed.rcvd is not None and closed.rcvd.code == 4008
        # It resumes from its last position and gets every event.
        again = await Client.connect(srv.ws_url, max_size=64 << 20)
        resumed = await again.join(drop_id, since=joined["pos"])
        assert resumed["recovered"] is True
        assert [e["pos"]["offset"] for e in resumed["events"]] == list(range(1, 2001))
        await fast.close()
        await again.close()


async def test_a_peer_that_reads_nothing_is_let_go_after_the_grace(settings, r):
    drop_id, _ = await create_drop(settings.database_url)
    async with running(settings, ws_send_queue_bytes=32 * 1024, ws_pong_timeout=1.0) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        ws = await websockets.connect(f"{srv.ws_url}/ws", sock=sock, subprotocols=[MSGPACK],
                                      compression=None, ping_interval=None, max_queue=1)
        stuck = Client(ws, MSGPACK)
        await stuck.join(drop_id)
        hub = srv.app.state.realtime
        assert len(hub.connections) == 1
        for i in range(1500):
            await publish(r, drop_id, "chat.message", {"i": i, "pad": "x" * 6000})
        # Closed as slow, it cannot even take the close frame: after the grace the
        # server stops serving it, so its task and state do not linger.
        await _wait_for(lambda: len(hub.connections) == 0, 15)
        room = hub.rooms.get(drop_id)
        assert room is None or room.conns == set()
        ws.transport.abort()


@only_single_redis
async def test_subscriber_loss_is_noticed_and_history_fills_the_gap(settings, r, server,
                                                                     caplog):
    caplog.set_level(logging.INFO, logger="dropserver.realtime")
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url)
    await c.join(drop_id)
    await publish(r, drop_id, "chat.message", {"i": 0})
    assert (await c.events(1))[0]["data"]["i"] == 0
    before = metrics.RESUBSCRIBES._value.get()
    killed = await r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed >= 1
    for i in range(1, 6):
        await publish(r, drop_id, "chat.message", {"i": i})
    events = await c.events(5, wait=10)
    assert [e["data"]["i"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["pos"]["offset"] for e in events] == [2, 3, 4, 5, 6]
    assert metrics.RESUBSCRIBES._value.get() >= before + 1
    logged = [rec.getMessage() for rec in caplog.records]
    assert "pubsub connection lost" in logged
    assert "pubsub reconnected; filling gaps from history" in logged
    # Live delivery works again after the resubscription.
    await publish(r, drop_id, "chat.message", {"i": 6})
    assert (await c.events(1))[0]["pos"]["offset"] == 7
    await c.close()


@only_single_redis
async def test_a_silent_redis_is_noticed_and_the_subscriber_comes_back(settings, r, caplog):
    from realtime.subscriber import Subscriber

    caplog.set_level(logging.INFO, logger="dropserver.realtime")
    got: list[tuple[bytes, bytes]] = []
    reconnected = asyncio.Event()
    sub = Subscriber(settings.redis_url, lambda ch, data: got.append((ch, data)),
                     reconnected.set, ping_every=0.2, silent_limit=0.6)
    await sub.start()
    try:
        await sub.subscribe("t:silence")
        await r.publish("t:silence", b"1")
        await _wait_for(lambda: got == [(b"t:silence", b"1")])
        # Redis stops answering anyone (the socket stays open): only the PINGs tell.
        await r.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        await asyncio.wait_for(reconnected.wait(), 10)
        assert sub.reconnects == 1
        await r.publish("t:silence", b"2")
        await _wait_for(lambda: got[-1:] == [(b"t:silence", b"2")])
    finally:
        await sub.stop()
    lost = [rec for rec in caplog.records if rec.getMessage() == "pubsub connection lost"]
    assert lost and lost[0].error == "no reply from Redis for 0.6 s"


async def test_stock_updates_are_coalesced_durable_events_never(settings, r):
    drop_id, (pid,) = await create_drop(settings.database_url)
    async with running(settings, stock_coalesce_ms=100) as srv:
        c = await Client.connect(srv.ws_url)
        await c.join(drop_id)
        started = time.monotonic()
        for remaining in range(499, -1, -1):
            await publish_volatile(r, drop_id, "stock", {"products": {pid: remaining}})
            if remaining % 100 == 0:
                await publish(r, drop_id, "drop.state", {"state": "selling", "n": remaining})
        elapsed = time.monotonic() - started
        stock, durable = [], []
        with contextlib.suppress(TimeoutError):
            while True:
                frame = await c.recv(0.5)
                if frame.get("event") == "stock":
                    stock.append(frame["data"]["products"][pid])
                elif frame["t"] == "event":
                    durable.append(frame["data"]["n"])
        assert durable == [400, 300, 200, 100, 0]
        assert stock[-1] == 0  # the latest value always arrives
        assert len(stock) <= elapsed / 0.1 + 3, (len(stock), elapsed)
        assert len(stock) < 100
        await c.close()


async def test_a_burst_leaves_in_one_batch_in_order(settings, server, r):
    """Publications the gateway reads in one go reach each socket as one message (a
    list of frames), in order; a lone publication still leaves alone at once."""
    from tests.conftest import run_sync

    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url)
    await c.join(drop_id)
    await publish(r, drop_id, "chat.message", {"i": 0})
    first = await c.recv_message()
    assert isinstance(first, dict) and first["data"] == {"i": 0}  # alone: not a batch

    async def burst() -> None:
        client = connect_redis(settings.redis_url)
        try:
            for i in range(1, 21):
                await publish(client, drop_id, "chat.message", {"i": i})
        finally:
            await client.aclose()

    run_sync(burst())  # the server's loop (this one) is blocked meanwhile: a backlog
    events = await c.events(20)
    assert [e["data"]["i"] for e in events] == list(range(1, 21))
    offsets = [e["pos"]["offset"] for e in events]
    assert offsets == list(range(offsets[0], offsets[0] + 20))
    assert c.batches >= 1
    await c.close()


async def test_big_rooms_get_coalesced_events_less_often(settings, r):
    """Two local viewers and a budget of 10 frames/s per event: one flush per 0.2 s."""
    drop_id, (pid,) = await create_drop(settings.database_url)
    async with running(settings, stock_coalesce_ms=50, coalesce_budget=10) as srv:
        viewers = [await Client.connect(srv.ws_url) for _ in range(2)]
        for c in viewers:
            await c.join(drop_id)
        started = time.monotonic()
        for remaining in range(199, -1, -1):
            await publish_volatile(r, drop_id, "stock", {"products": {pid: remaining}})
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started
        for c in viewers:
            stock = []
            with contextlib.suppress(TimeoutError):
                while True:
                    frame = await c.recv(0.6)
                    if frame.get("event") == "stock":
                        stock.append(frame["data"]["products"][pid])
            assert stock[-1] == 0  # the latest value always arrives
            # 50 ms alone would allow elapsed / 0.05 flushes; the room's size allows 1 / 0.2 s
            assert len(stock) <= elapsed / 0.2 + 2, (len(stock), elapsed)
            await c.close()


async def test_drain_tells_each_client_when_to_come_back(settings, server):
    drop_id, _ = await create_drop(settings.database_url)
    clients = [await Client.connect(server.ws_url) for _ in range(5)]
    for c in clients:
        await c.join(drop_id)
    await server.app.state.drain()
    delays = []
    for c in clients:
        frame = await c.recv_until(lambda f: f["t"] == "going_away")
        assert frame["reason"] == "restart"
        delays.append(frame["reconnect_after_ms"])
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd.code == 1012
    assert all(settings.reconnect_min_ms <= d <= settings.reconnect_max_ms for d in delays)
    assert len(set(delays)) > 1  # jittered
    # New sockets are told the same while draining.
    late = await Client.connect(server.ws_url)
    frame = await late.recv()
    assert frame["t"] == "going_away" and frame["reason"] == "draining"
    with pytest.raises(ConnectionClosed) as info:
        await late.recv()
    assert info.value.rcvd.code == 1012


async def test_overload_refuses_with_retry_after(settings):
    async with running(settings, max_connections=2) as srv:
        a = await Client.connect(srv.ws_url)
        b = await Client.connect(srv.ws_url)
        await a.request({"t": "ping"})
        await b.request({"t": "ping"})
        c = await Client.connect(srv.ws_url)
        frame = await c.recv()
        assert frame["t"] == "going_away" and frame["reason"] == "overload"
        assert settings.reconnect_min_ms <= frame["reconnect_after_ms"] <= \
            settings.reconnect_max_ms
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd.code == 1013
        await a.close()
        await b.close()


async def test_heartbeat_closes_silent_clients_only(settings):
    async with running(settings, ws_ping_interval=0.3, ws_pong_timeout=0.3) as srv:
        silent = await Client.connect(srv.ws_url)
        alive = await Client.connect(srv.ws_url)

        async def answer_pings():
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while True:
                    frame = await alive.recv(5)
                    if frame["t"] == "ping":
                        await alive.send({"t": "pong"})

        answering = asyncio.create_task(answer_pings())
        with pytest.raises(ConnectionClosed) as info:
            while True:
                frame = await silent.recv(5)
                assert frame["t"] == "ping"
        assert info.value.rcvd.code == 4001
        assert not answering.done()  # the answering client is still connected
        answering.cancel()
        await alive.close()


async def test_pings_ride_with_events_and_a_silent_client_is_still_closed(settings, r):
    """Events every 50 ms: each socket's ping leaves in an event's write, in the fifth
    of the interval before its tick (realtime.heartbeat). A client that reads them and
    answers stays; one that reads them and never answers is closed 4001 as before."""
    drop_id, _ = await create_drop(settings.database_url)
    # A pong timeout of 1.5 s (not the other tests' 0.3 s): the client answering shares
    # the server's event loop, and a loaded CI machine must not make its pong late.
    async with running(settings, ws_ping_interval=3.0, ws_pong_timeout=1.5) as srv:
        assert srv.app.state.realtime.heartbeat.early == 5  # 0.6 s before each tick
        rode = metrics.HEARTBEAT_PINGS.labels("with_data")
        rode_before = rode._value.get()
        silent = await Client.connect(srv.ws_url)
        alive = await Client.connect(srv.ws_url)
        await silent.join(drop_id)
        await alive.join(drop_id)
        pings = 0

        async def answer_pings():
            nonlocal pings
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while True:
                    frame = await alive.recv(5)
                    if frame["t"] == "ping":
                        pings += 1
                        await alive.send({"t": "pong"})

        async def publishing():
            k = 0
            while True:
                await publish(r, drop_id, "drop.buy_now", {"k": k})
                k += 1
                await asyncio.sleep(0.05)

        answering = asyncio.create_task(answer_pings())
        publisher = asyncio.create_task(publishing())
        try:
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    frame = await silent.recv(5)
                    assert frame["t"] in ("event", "ping", "volatile")
            assert info.value.rcvd.code == 4001
            # Silent since its join: closed within interval + timeout + a tick (and
            # a loaded machine's slack).
            assert time.monotonic() - started < 3.0 + 1.5 + 0.12 + 5.0
            await asyncio.sleep(6.5)  # two more rounds for the one that answers
            assert not answering.done()  # the answering client is still connected
            assert pings >= 2
            assert rode._value.get() - rode_before >= 2  # pings rode with events
        finally:
            publisher.cancel()
            answering.cancel()
        await alive.close()


async def test_pings_are_spread_over_the_interval_not_one_burst(settings):
    """A ping burst to every socket at once delays whatever is fanned out behind it;
    the server pings its sockets in slices spread over the ping interval."""
    async with running(settings, ws_ping_interval=1.0, ws_pong_timeout=5.0) as srv:
        async def first_ping(c: Client) -> float:
            await c.recv_until(lambda f: f["t"] == "ping", 5)
            return time.monotonic()

        # Each client listens from its connect on: a ping that waited in a buffer
        # while the others connected (a loaded machine) would read as a burst.
        clients, waits = [], []
        for _ in range(40):
            clients.append(await Client.connect(srv.ws_url))
            waits.append(asyncio.create_task(first_ping(clients[-1])))
        arrivals = await asyncio.gather(*waits)
        assert max(arrivals) - min(arrivals) >= 0.5, max(arrivals) - min(arrivals)
        for c in clients:
            await c.close()


async def test_a_join_queued_longer_than_the_heartbeat_is_not_a_timeout(settings):
    """A connect storm can queue joins for longer than interval + pong timeout; the
    server is not reading those sockets meanwhile, so it must not call them silent."""
    drop_id, _ = await create_drop(settings.database_url)
    async with running(settings, ws_ping_interval=0.2, ws_pong_timeout=0.2) as srv:
        slots = srv.app.state.realtime.join_slots
        held = 0
        while not slots.locked():  # every join slot taken: joins wait
            await slots.acquire()
            held += 1
        c = await Client.connect(srv.ws_url)
        await c.send({"t": "join", "drop_id": drop_id, "id": "j"})
        await asyncio.sleep(1.0)  # > 2 x (interval + timeout)
        for _ in range(held):
            slots.release()
        joined = await c.recv_until(lambda f: f["t"] == "joined", 5)
        assert joined["drop_id"] == drop_id
        await c.close()


@pytest.mark.timeout(120)
async def test_two_worker_processes_both_deliver_one_publication(clean_backends, r, tmp_path):
    from tests.conftest import free_port

    drop_id, _ = await create_drop(clean_backends.database_url)
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update({"REDIS_URL": clean_backends.redis_url,
                "DATABASE_URL": clean_backends.database_url, **unsafe_rig_env(),
                "DROPSERVER_LOG_FORMAT": "text", "DROPSERVER_SHUTDOWN_GRACE": "3"})
    port = free_port()
    argv = [sys.executable, "-m", "dropserver.cli", "serve", "--workers", "2",
            "--port", str(port)]
    with open(tmp_path / "serve.log", "wb") as log_file:  # noqa: ASYNC230
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,  # noqa: ASYNC220
                                stderr=log_file)
    clients: dict[str, Client] = {}
    extra: list[Client] = []
    try:
        deadline = time.monotonic() + 60
        while len(clients) < 2 and time.monotonic() < deadline:
            try:
                c = await Client.connect(f"ws://127.0.0.1:{port}")
            except OSError:
                await asyncio.sleep(0.2)
                continue
            joined = await c.join(drop_id)
            if joined["node"] in clients:
                extra.append(c)
            else:
                clients[joined["node"]] = c
        log = (tmp_path / "serve.log").read_text()[-3000:]
        assert len(clients) == 2, f"sockets reached only {list(clients)}\n{log}"
        await publish(r, drop_id, "drop.buy_now", {"product_id": 1, "price": 100,
                                                   "currency": "usd", "remaining": 5})
        for node, c in clients.items():
            (event,) = await c.events(1, wait=10)
            assert event["event"] == "drop.buy_now", node
        for c in [*clients.values(), *extra]:
            await c.close()
    finally:
        stop_process(proc, signal.SIGTERM, 30)
