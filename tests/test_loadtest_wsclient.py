"""loadtest.wsclient against a real websockets server on loopback."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from websockets.asyncio.server import serve

from loadtest.wsclient import WsConnection, connect


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
