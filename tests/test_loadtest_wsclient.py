"""loadtest.wsclient against a real websockets server on loopback."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from websockets.asyncio.server import serve

from loadtest.wsclient import WsConnection, connect
from tests.ws_frames import ws_frame


class Recorder:
    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self.messages: list[bytes | str] = []
        self.close_code: int | None = None
        self.close_reason = ""

    def on_open(self, conn: WsConnection) -> None:
        self.opened.set()

    def on_message(self, conn: WsConnection, data: bytes | str) -> None:
        self.messages.append(data)

    def on_close(self, conn: WsConnection, code: int | None, reason: str) -> None:
        self.close_code, self.close_reason = code, reason
        self.closed.set()


async def test_binds_source_address_sends_headers_and_echoes() -> None:
    seen: dict[str, object] = {}

    async def echo(ws) -> None:
        seen["peer"] = ws.remote_address[0]
        seen["auth"] = ws.request.headers.get("authorization")
        seen["subprotocol"] = ws.subprotocol
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, subprotocols=["drops.v1+json"]) as server:
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        conn = await connect(f"ws://127.0.0.1:{port}/ws", rec, source="127.0.0.7",
                             headers={"Authorization": "Bearer t"},
                             subprotocols=["drops.v1+json"])
        await asyncio.wait_for(rec.opened.wait(), 5)
        assert conn.open and conn.subprotocol == "drops.v1+json"
        conn.send(b"\x01\x02")
        conn.send("hello")
        for _ in range(100):
            if len(rec.messages) == 2:
                break
            await asyncio.sleep(0.01)
        conn.close(1000, "bye")
        await asyncio.wait_for(rec.closed.wait(), 5)
    assert seen == {"peer": "127.0.0.7", "auth": "Bearer t", "subprotocol": "drops.v1+json"}
    assert [bytes(m) if not isinstance(m, str) else m for m in rec.messages] == [
        b"\x01\x02", "hello"]
    assert rec.close_code == 1000


async def test_refused_upgrade_reports_status_without_opening() -> None:
    async def handler(ws) -> None:  # pragma: no cover - never reached
        await ws.close()

    def refuse(connection, request):
        return connection.respond(HTTPStatus.FORBIDDEN, "nope\n")

    async with serve(handler, "127.0.0.1", 0, process_request=refuse) as server:
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        conn = await connect(f"ws://127.0.0.1:{port}/ws", rec)
        await asyncio.wait_for(rec.closed.wait(), 5)
    assert not rec.opened.is_set()
    assert conn.close_code == 403
    assert "HTTP 403" in conn.close_reason


async def test_server_close_code_reaches_handler() -> None:
    async def handler(ws) -> None:
        await ws.close(4008, "slow")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        await connect(f"ws://127.0.0.1:{port}/ws", rec)
        await asyncio.wait_for(rec.closed.wait(), 5)
    assert rec.opened.is_set()
    assert (rec.close_code, rec.close_reason) == (4008, "slow")


# -- the client's own framing after the handshake ---------------------------------------

async def test_every_length_form_and_fragments_round_trip() -> None:
    sizes = [0, 125, 126, 65535, 65536, 300_000]

    async def handler(ws) -> None:
        async for message in ws:
            if message == "fragments":
                await ws.send(["ab", "cd", "é"])  # one text message in three frames
                await ws.send([b"\x00" * 70_000, b"\x01"])
            else:
                await ws.send(message)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        conn = await connect(f"ws://127.0.0.1:{port}/ws", rec)
        await asyncio.wait_for(rec.opened.wait(), 5)
        for n in sizes:
            conn.send(bytes(range(256)) * (n // 256) + b"x" * (n % 256))
            conn.send("é" * (n // 2))
        conn.send("fragments")
        for _ in range(500):
            if len(rec.messages) == 2 * len(sizes) + 2:
                break
            await asyncio.sleep(0.01)
        conn.close()
        await asyncio.wait_for(rec.closed.wait(), 5)
    expected: list[bytes | str] = []
    for n in sizes:
        expected += [bytes(range(256)) * (n // 256) + b"x" * (n % 256), "é" * (n // 2)]
    expected += ["abcdé", b"\x00" * 70_000 + b"\x01"]
    assert [bytes(m) if not isinstance(m, str) else m for m in rec.messages] == expected
    assert rec.close_code == 1000


async def test_server_ping_is_answered_and_client_close_is_clean() -> None:
    seen: dict[str, object] = {}

    async def handler(ws) -> None:
        pong = await ws.ping(b"are you there")
        seen["latency"] = await asyncio.wait_for(pong, 5)
        await ws.send("pinged")
        await ws.wait_closed()
        seen["close"] = (ws.close_code, ws.close_reason)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        conn = await connect(f"ws://127.0.0.1:{port}/ws", rec)
        for _ in range(500):
            if rec.messages:
                break
            await asyncio.sleep(0.01)
        assert rec.messages == ["pinged"]
        conn.close(4000, "done")
        assert not conn.open
        conn.send("dropped: closing")
        await asyncio.wait_for(rec.closed.wait(), 5)
        for _ in range(100):
            if "close" in seen:
                break
            await asyncio.sleep(0.01)
    assert isinstance(seen["latency"], float)
    assert seen["close"] == (4000, "done")
    assert (rec.close_code, rec.close_reason) == (4000, "done")


async def test_a_message_over_max_size_closes_1009() -> None:
    seen: dict[str, object] = {}

    async def handler(ws) -> None:
        await ws.send(b"x" * 2000)
        await ws.wait_closed()
        seen["close"] = ws.close_code

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        await connect(f"ws://127.0.0.1:{port}/ws", rec,
                      factory=lambda *a, **kw: WsConnection(*a, **{**kw, "max_size": 1000}))
        await asyncio.wait_for(rec.closed.wait(), 5)
        for _ in range(100):
            if "close" in seen:
                break
            await asyncio.sleep(0.01)
    assert rec.messages == []
    assert rec.close_code == 1009
    assert seen["close"] == 1009


class FakeTransport:
    """Collects what the client writes (no socket: the bytes arrive as the test says)."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self.closed


def _handshake(conn: WsConnection) -> tuple[FakeTransport, bytes]:
    """Start ``conn`` on a fake transport; return it and the server's 101 head."""
    from websockets.utils import accept_key

    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    request = bytes(transport.written).decode()
    key = next(line.split(":", 1)[1].strip() for line in request.split("\r\n")
               if line.lower().startswith("sec-websocket-key:"))
    transport.written.clear()
    head = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_key(key)}\r\n\r\n")
    return transport, head.encode()


def _client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmask what the client wrote: [(opcode, payload)]; every frame must be masked."""
    from websockets.frames import apply_mask

    out, pos = [], 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b1 & 0x80, "client frames are masked"
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            n, pos = int.from_bytes(data[pos:pos + 2]), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(data[pos:pos + 8]), pos + 8
        mask, pos = data[pos:pos + 4], pos + 4
        out.append((b0 & 0x0F, apply_mask(data[pos:pos + n], mask)))
        pos += n
    return out


def _server_frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = False,
                  ) -> bytes:
    return ws_frame(opcode, payload, fin=fin, mask=b"\0\0\0\0" if masked else None)


async def test_frames_in_the_101_segment_and_split_byte_by_byte() -> None:
    from websockets.uri import parse_uri

    rec = Recorder()
    conn = WsConnection(parse_uri("ws://127.0.0.1:1/ws"), rec)
    transport, head = _handshake(conn)
    stream = (head + _server_frame(0x1, b"first") + _server_frame(0x9, b"p")
              + _server_frame(0x2, b"a" * 300, fin=False) + _server_frame(0x0, b"b")
              + _server_frame(0x2, b"z" * 70_000) + _server_frame(0x8, b"\x0f\xa0bye")
              + _server_frame(0x1, b"after close"))
    conn.data_received(stream[:len(head) + 3])  # the head and part of the first frame
    assert rec.opened.is_set() and rec.messages == []
    for i in range(len(head) + 3, len(stream)):
        conn.data_received(stream[i:i + 1])
    assert rec.messages == ["first", b"a" * 300 + b"b", b"z" * 70_000]
    assert _client_frames(bytes(transport.written)) == [(0x0A, b"p"), (0x08, b"\x0f\xa0")]
    assert (conn.close_code, conn.close_reason) == (4000, "bye")
    assert not conn.open


async def test_protocol_errors_close_with_their_codes() -> None:
    from websockets.uri import parse_uri

    cases = [
        (_server_frame(0x2, b"x", masked=True), 1002),
        (_server_frame(0x1, b"\xff\xfe"), 1007),
        (_server_frame(0x0, b"x"), 1002),  # a continuation of nothing
        (_server_frame(0x2, b"a", fin=False) + _server_frame(0x2, b"b"), 1002),
        (_server_frame(0x9, b"x", fin=False), 1002),
        (_server_frame(0x3, b"x"), 1002),  # reserved opcode
        (bytes([0xC2, 0x01]) + b"x", 1002),  # RSV1 without an extension
    ]
    for data, code in cases:
        rec = Recorder()
        conn = WsConnection(parse_uri("ws://127.0.0.1:1/ws"), rec)
        transport, head = _handshake(conn)
        conn.data_received(head + data + _server_frame(0x1, b"not after an error"))
        frames = _client_frames(bytes(transport.written))
        assert [op for op, _ in frames] == [0x08], data
        assert int.from_bytes(frames[0][1][:2]) == code, data
        assert conn.close_code == code and not conn.open
        assert rec.messages == [], data
