"""realtime.asgi.LeanWebSocketProtocol reads without pausing the socket per frame, and
still pauses once QUEUE_FRAMES frames wait for an app that is not reading."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import uvicorn
import websockets

from realtime.asgi import QUEUE_FRAMES, LeanWebSocketProtocol
from realtime.wire import server_frame
from tests.conftest import free_port
from tests.ws_frames import ws_frame


async def accept(scope, receive, send) -> bool:
    """Serve the lifespan (False), or accept the WebSocket (True)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return False
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    return True


class App:
    """Accepts, then reads only when told to; echoes how many messages it read."""

    def __init__(self) -> None:
        self.accepted = asyncio.Event()
        self.read = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        if not await accept(scope, receive, send):
            return
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


# -- client frames read by the protocol itself (the fast path) ---------------------------

class Echo:
    """Accepts and sends every message back as it came (text or bytes)."""

    async def __call__(self, scope, receive, send) -> None:
        if not await accept(scope, receive, send):
            return
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})


@contextlib.asynccontextmanager
async def raw_socket(max_size: int = 1 << 20):
    """An Echo server and a bare TCP client past the handshake: bytes as the test says."""
    import base64
    import os

    port = free_port()
    config = uvicorn.Config(Echo(), host="127.0.0.1", port=port, ws=LeanWebSocketProtocol,
                            log_level="critical", ws_ping_interval=None,
                            ws_per_message_deflate=False, ws_max_size=max_size)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 ")
    try:
        yield server, reader, writer
    finally:
        writer.close()
        server.should_exit = True
        await task


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True,
                 rsv: int = 0) -> bytes:
    return ws_frame(opcode, payload, fin=fin, rsv=rsv,
                    mask=b"\x1f\x2e\x3d\x4c" if masked else None)


async def read_server_frame(reader) -> tuple[int, bytes]:
    async with asyncio.timeout(5):
        b0, b1 = await reader.readexactly(2)
        assert not b1 & 0x80, "server frames are not masked"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2))
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8))
        return b0 & 0x0F, await reader.readexactly(n)


async def test_frames_split_anywhere_between_control_frames_and_fragments_arrive_in_order():
    big = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length, the parser's
    stream = b"".join([
        client_frame(0x1, b"a"),
        client_frame(0x2, b"\x00\x01" * 150),  # a 16-bit length
        client_frame(0x9, b"ping!"),  # a control frame: websockets answers it
        client_frame(0x1, b"b"),
        client_frame(0x1, b"c", fin=False), client_frame(0x0, b"d"),  # one message
        client_frame(0x2, big),
        client_frame(0x1, "é".encode() * 10),
        client_frame(0x2, b""),
    ])
    async with raw_socket() as (server, reader, writer):
        sizes = [1, 2, 3, 5, 7, 11, 13, 4096]
        pos = i = 0
        while pos < len(stream):
            n = sizes[i % len(sizes)]
            writer.write(stream[pos:pos + n])
            await writer.drain()
            if n < 20:
                await asyncio.sleep(0.001)  # small pieces arrive in separate reads
            pos, i = pos + n, i + 1
        got = [await read_server_frame(reader) for _ in range(8)]
        # The next read after the control frame, the fragments and the big one (all
        # websockets' parser's) is on the fast path again.
        writer.write(client_frame(0x1, b"again"))
        assert await read_server_frame(reader) == (0x1, b"again")
        proto = protocol(server)
        assert proto._fast is True
        assert proto._partial == b""
    # The pong leaves at once; the echoes go through the app: only theirs is an order.
    assert [f for f in got if f[0] == 0xA] == [(0xA, b"ping!")]
    assert [f for f in got if f[0] != 0xA] == [
        (0x1, b"a"), (0x2, b"\x00\x01" * 150), (0x1, b"b"), (0x1, b"cd"), (0x2, big),
        (0x1, "é".encode() * 10), (0x2, b"")]


async def test_many_frames_in_one_read_all_reach_the_app():
    async with raw_socket() as (server, reader, writer):
        writer.write(b"".join(client_frame(0x1, f"m{i}".encode()) for i in range(100)))
        got = [await read_server_frame(reader) for _ in range(100)]
        assert protocol(server)._fast is True
    assert got == [(0x1, f"m{i}".encode()) for i in range(100)]


@pytest.mark.parametrize(("data", "code"), [
    (client_frame(0x2, b"x", masked=False), 1002),  # clients must mask
    (client_frame(0x1, b"\xff\xfe"), 1007),  # not UTF-8
    (client_frame(0x2, b"x", rsv=0x40), 1002),  # RSV1 without an extension
    (client_frame(0x2, b"x" * 1001), 1009),  # over ws_max_size (16-bit length)
    (client_frame(0x1, b"a", fin=False) + client_frame(0x1, b"b"), 1002),
])
async def test_bad_frames_get_websockets_close_codes(data, code):
    async with raw_socket(max_size=1000) as (server, reader, writer):
        writer.write(client_frame(0x1, b"fine"))
        assert await read_server_frame(reader) == (0x1, b"fine")
        assert protocol(server)._fast is True
        writer.write(data + client_frame(0x1, b"not after an error"))
        opcode, payload = await read_server_frame(reader)
    assert opcode == 0x8 and int.from_bytes(payload[:2]) == code


async def test_a_short_bad_frame_is_refused_without_waiting_for_more():
    async with raw_socket() as (server, reader, writer):
        writer.write(client_frame(0x1, b"fine"))
        assert await read_server_frame(reader) == (0x1, b"fine")
        assert protocol(server)._fast is True
        writer.write(bytes([0x82, 0x00]))  # an unmasked empty frame: two bytes, no more
        opcode, payload = await read_server_frame(reader)
    assert opcode == 0x8 and int.from_bytes(payload[:2]) == 1002
