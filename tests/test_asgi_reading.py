"""realtime.asgi.LeanWebSocketProtocol reads without pausing the socket per frame, and
still pauses once QUEUE_FRAMES frames wait for an app that is not reading."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import uvicorn
import websockets

from realtime.asgi import QUEUE_FRAMES, LeanWebSocketProtocol, server_frame
from tests.conftest import free_port


class App:
    """Accepts, then reads only when told to; echoes how many messages it read."""

    def __init__(self) -> None:
        self.accepted = asyncio.Event()
        self.read = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        self.accepted.set()
        await self.read.wait()
        count = 0
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            count += 1
            if message.get("text") == "last":
                await send({"type": "websocket.send", "text": str(count)})


@contextlib.asynccontextmanager
async def serving(app: App, *, deflate: bool = True):
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, ws=LeanWebSocketProtocol,
                            log_level="warning", ws_ping_interval=None,
                            ws_per_message_deflate=deflate)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    ws = await websockets.connect(f"ws://127.0.0.1:{port}", close_timeout=1)
    try:
        await asyncio.wait_for(app.accepted.wait(), 5)
        yield server, ws
    finally:
        app.read.set()  # never leave the app (and uvicorn's shutdown) waiting
        await ws.close()
        server.should_exit = True
        await task


def protocol(server: uvicorn.Server) -> LeanWebSocketProtocol:
    (proto,) = [c for c in server.server_state.connections
                if isinstance(c, LeanWebSocketProtocol)]
    return proto


async def wait_for(predicate) -> None:
    async with asyncio.timeout(5):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_frame_waiting_for_the_app_does_not_pause_reading():
    app = App()
    async with serving(app) as (server, ws):
        await ws.send("one")
        proto = protocol(server)
        await wait_for(lambda: proto.queue.qsize() == 1)
        assert not proto.read_paused
        app.read.set()
        await ws.send("last")
        assert await asyncio.wait_for(ws.recv(), 5) == "2"


async def test_a_client_flooding_an_app_that_does_not_read_is_paused_and_loses_nothing():
    app = App()
    async with serving(app) as (server, ws):
        for i in range(200):
            await ws.send(f"m{i}")
            await asyncio.sleep(0.002)  # one frame per read, mostly
        await ws.send("last")
        proto = protocol(server)
        await wait_for(lambda: proto.read_paused)
        await asyncio.sleep(0.2)
        # Reading paused near QUEUE_FRAMES (a read may bring several frames at
        # once): the rest waits in the kernel, not in the server's memory.
        assert proto.read_paused
        assert QUEUE_FRAMES <= proto.queue.qsize() < 50, proto.queue.qsize()
        app.read.set()
        assert await asyncio.wait_for(ws.recv(), 5) == "201"  # every frame, in order


async def test_a_large_frame_pauses_reading_at_once():
    app = App()
    async with serving(app) as (server, ws):
        await ws.send("x" * 10_000)
        proto = protocol(server)
        await wait_for(lambda: proto.queue.qsize() == 1)
        assert proto.read_paused
        app.read.set()
        await ws.send("last")
        assert await asyncio.wait_for(ws.recv(), 5) == "2"


async def test_write_frame_writes_a_frame_serialized_once_and_refuses_when_it_must_not():
    app = App()
    async with serving(app) as (server, ws):
        # permessage-deflate negotiated: these bytes would be wrong; the ASGI way.
        assert protocol(server).conn.extensions
        assert not protocol(server).write_frame(server_frame(b"x"))
    app = App()
    async with serving(app, deflate=False) as (server, ws):  # as dropserver.serve runs
        proto = protocol(server)
        assert proto.write_frame(server_frame(b"\x01\x02"))
        assert proto.write_frame(server_frame("h\u00e9llo"))
        big = bytes(range(256)) * 300  # a 16-bit length, then a 64-bit one
        assert proto.write_frame(server_frame(big))
        assert proto.write_frame(server_frame(big * 2))
        assert await ws.recv() == b"\x01\x02"
        assert await ws.recv() == "h\u00e9llo"
        assert await ws.recv() == big
        assert await ws.recv() == big * 2
        # Writing paused (the peer's buffer is full): the ASGI send must wait instead.
        proto.writable.clear()
        assert not proto.write_frame(server_frame(b"x"))
        proto.writable.set()
        # Once the close frame is out, nothing more.
        proto.close_sent = True
        assert not proto.write_frame(server_frame(b"x"))
        proto.close_sent = False
        await ws.close()
        await wait_for(lambda: proto.disconnected)
        assert not proto.write_frame(server_frame(b"x"))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 1000, 65535, 65536, 100_000])
def test_server_frame_is_the_frame_websockets_serializes(size):
    from websockets.frames import Frame, Opcode

    data = bytes(i % 251 for i in range(size))
    text = "\u00e9" * (size // 2)
    assert server_frame(data) == Frame(Opcode.BINARY, data).serialize(
        mask=False, extensions=[])
    assert server_frame(text) == Frame(Opcode.TEXT, text.encode()).serialize(
        mask=False, extensions=[])
