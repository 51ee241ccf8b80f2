"""The bare servers (benchmarks/_bare.py): the buy server answers like dropserver and
the buy benchmark's rush (benchmarks/_buyers.py) sells out exactly against it; the
broadcast server hands every message of the drop's channel to every socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from benchmarks._bare import serve_buy
from benchmarks._buyers import buy, open_buyers, rush
from checkout import inventory
from checkout.defense import BuyLimits
from loadtest.floor import serve_broadcast


@contextlib.asynccontextmanager
async def bare_server(r, backends, drop_id: int, *, units: int, limit: int):
    """A selling product (``limit`` per buyer) and a bare server; yields its ws:// URL."""
    await inventory.prewarm(r, {"id": drop_id, "max_holds_per_user": limit},
                            [{"product_id": 1, "price": 2500, "units": units,
                              "per_buyer_limit": limit}])
    await inventory.open_sales(r, drop_id, 1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    limits = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=0)
    server = asyncio.ensure_future(serve_buy(sock, backends.redis_url, limits))
    try:
        yield f"ws://127.0.0.1:{port}/"
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


async def test_bare_server_joins_and_sells_exactly_the_stock(r, clean_backends):
    drop_id, product_id = 77, 1
    async with bare_server(r, clean_backends, drop_id, units=3, limit=10) as url:
        buyers = await open_buyers(url, drop_id, ["a", "b"])
        replies = [await buy(buyers[i % 2], product_id, f"k{i}") for i in range(4)]
        assert [f["t"] for f in replies] == ["reply", "reply", "reply", "error"]
        assert [f["data"]["buyer_number"] for f in replies[:3]] == [1, 2, 3]
        assert replies[3]["code"] == "sold_out"
        # An idempotent retry gets the first hold back, as from dropserver.
        again = await buy(buyers[0], product_id, "k0")
        assert again["data"]["hold_id"] == replies[0]["data"]["hold_id"]
        assert again["data"]["replay"] is True
        for b in buyers:
            b.close()


async def test_rush_sells_out_exactly_and_every_buyer_stops(r, clean_backends):
    drop_id, product_id = 78, 1
    async with bare_server(r, clean_backends, drop_id, units=137, limit=1000) as url:
        buyers = await open_buyers(url, drop_id, [f"u{i}" for i in range(40)])
        async with asyncio.timeout(30):
            result = await rush(buyers, product_id, units=137, per_user=500)
    # Nobody can reach 500 tries before 137 units are gone: every unit is sold once
    # (buyer numbers 1..137) and each buyer stops at its first sold_out.
    assert result["holds"] == 137 and result["numbers_ok"] is True
    assert result["refused"] == {"sold_out": 40}
    assert result["per_second"] > 0
    assert all(b.rush is None for b in buyers)


async def test_rush_counts_a_buyer_closed_before_it_and_still_finishes(r, clean_backends):
    drop_id, product_id = 79, 1
    async with bare_server(r, clean_backends, drop_id, units=5, limit=10) as url:
        buyers = await open_buyers(url, drop_id, ["p", "q", "gone"])
        buyers[2].close()  # as a server closes a socket before BUY NOW
        await buyers[2].closed
        async with asyncio.timeout(30):
            result = await rush(buyers, product_id, units=5, per_user=10)
    assert result["holds"] == 5 and result["numbers_ok"] is True
    assert result["refused"] == {"sold_out": 2, "closed before the rush": 1}


async def test_broadcast_server_relays_the_channel_to_every_socket(r, clean_backends):
    from websockets.asyncio.client import connect

    from dropserver.services import free_port, wait_port

    port = free_port()
    server = asyncio.ensure_future(serve_broadcast(port, clean_backends.redis_url, "bench:c"))
    try:
        await asyncio.to_thread(wait_port, port, deadline_s=10)
        async with connect(f"ws://127.0.0.1:{port}/") as a, \
                connect(f"ws://127.0.0.1:{port}/") as b, asyncio.timeout(10):
            # Until each socket has had a message, the server may not hold it yet.
            both = asyncio.gather(a.recv(), b.recv())
            while not both.done():
                await r.publish("bench:c", b"hello")
                await asyncio.sleep(0.05)
            await both
            assert await r.publish("bench:c", b"BUY NOW") == 1  # one subscriber
            for ws in (a, b):
                while (message := await ws.recv()) != b"BUY NOW":
                    assert message == b"hello"
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


async def _pings_within(port: int, seconds: float) -> int:
    """Open a socket to the server on ``port`` (websockets' sans-I/O client, which
    shows control frames) and count the pings it gets in ``seconds``."""
    from websockets.client import ClientProtocol
    from websockets.frames import Opcode
    from websockets.uri import parse_uri

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/"))
    client.send_request(client.connect())
    pings = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            for data in client.data_to_send():
                writer.write(data)
            left = deadline - loop.time()
            if left <= 0:
                return pings
            try:
                data = await asyncio.wait_for(reader.read(4096), left)
            except TimeoutError:
                return pings
            assert data, "the server closed the socket"
            client.receive_data(data)
            pings += sum(1 for e in client.events_received()
                         if getattr(e, "opcode", None) is Opcode.PING)
    finally:
        writer.close()


async def test_broadcast_server_pings_only_when_asked(r, clean_backends):
    """The fan-out benchmark's ``baseline`` sends no pings; ``baseline-ping`` keeps
    websockets' keepalive, which the socket answers (the client answers each ping)."""
    from dropserver.services import free_port, wait_port

    for interval, least in ((None, 0), (0.2, 3)):
        port = free_port()
        server = asyncio.ensure_future(
            serve_broadcast(port, clean_backends.redis_url, "bench:p", ping_interval=interval))
        try:
            await asyncio.to_thread(wait_port, port, deadline_s=10)
            pings = await _pings_within(port, 2.0)
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
        if interval is None:
            assert pings == 0
        else:
            assert pings >= least
