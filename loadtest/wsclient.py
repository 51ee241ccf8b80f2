"""A lean asyncio WebSocket client for tens of thousands of sockets per process.

websockets' sans-I/O :class:`websockets.client.ClientProtocol` does the protocol
(handshake, framing, masking, ping/pong, closing handshake); this module only moves
bytes between it and an :class:`asyncio.Protocol`. There is no task and no queue per
connection: frames are handed to a callback in ``data_received``, which is what lets
one process hold ~15,000 viewers in ~25 KiB each.

Sockets are opened here rather than by ``loop.create_connection(host, port)`` so each
can be bound to a chosen source address first (``IP_BIND_ADDRESS_NO_PORT`` defers the
port choice to ``connect()``, so ports are unique per 4-tuple, not per address): one
source/destination address pair has only ~28k ephemeral ports, so a 50,000-viewer
swarm on loopback spreads its sockets over 127.0.0.2, 127.0.0.3, ...
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import WebSocketURI, parse_uri

__all__ = ["Handler", "WsConnection", "connect", "open_socket"]

# Linux <netinet/in.h>; Python's socket module does not name it.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

_resolved: dict[tuple[str, int], tuple] = {}  # (host, port) -> getaddrinfo's first answer


class Handler(Protocol):
    """What a connection reports to (a viewer, in the swarm)."""

    def on_open(self, conn: WsConnection) -> None: ...
    def on_message(self, conn: WsConnection, data: bytes | str) -> None: ...
    def on_close(self, conn: WsConnection, code: int | None, reason: str) -> None: ...


async def open_socket(host: str, port: int, source: str | None = None,
                      connect_timeout: float = 10.0) -> socket.socket:
    """A connected non-blocking TCP socket, bound to ``source`` first when given."""
    loop = asyncio.get_running_loop()
    info = _resolved.get((host, port))
    if info is None:  # once per target (the stdlib loop asks its thread pool each time)
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        info = _resolved[host, port] = infos[0]
    family, _, proto, _, addr = info
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        async with asyncio.timeout(connect_timeout):
            await loop.sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


class WsConnection(asyncio.Protocol):
    """One client WebSocket: bytes in/out of a sans-I/O :class:`ClientProtocol`."""

    __slots__ = ("_fragments", "_handler", "_opened", "_text", "close_code", "close_reason",
                 "handshake_error", "headers", "protocol", "transport", "user")

    def __init__(self, uri: WebSocketURI, handler: Handler, *,
                 headers: dict[str, str] | None = None,
                 subprotocols: list[str] | None = None,
                 max_size: int | None = 1 << 20) -> None:
        self.protocol = ClientProtocol(uri, subprotocols=subprotocols,  # type: ignore[arg-type]
                                       max_size=max_size)
        self._handler = handler
        self.headers = headers or {}
        self.transport: asyncio.Transport | None = None
        self._fragments: list[bytes] | None = None
        self._text = False
        self.user: object = None  # free for the handler (the swarm keeps its viewer here)
        self._opened = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.handshake_error: Exception | None = None

    @property
    def subprotocol(self) -> str | None:
        return self.protocol.subprotocol

    @property
    def open(self) -> bool:
        return self.protocol.state is State.OPEN

    # -- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = self.protocol.connect()
        for name, value in self.headers.items():
            request.headers[name] = value
        self.protocol.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Response):
                self._response(event)
        self._flush()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        close = self.protocol.close_rcvd or self.protocol.close_sent
        if close is not None and self.close_code is None:
            self.close_code, self.close_reason = close.code, close.reason
        if self._opened:
            self._opened = False
            self._handler.on_close(self, self.close_code, self.close_reason or
                                   (str(exc) if exc else ""))
            return
        if self.handshake_error is None:
            self.handshake_error = exc or ConnectionError("closed during handshake")
            self.close_reason = str(self.handshake_error)
        # Never opened: a refused upgrade (close_code is the HTTP status) or a drop.
        self._handler.on_close(self, self.close_code, self.close_reason)

    # -- sending ---------------------------------------------------------------------
    def send(self, data: bytes | str) -> None:
        """Send one message (bytes as binary, str as text); dropped once closing."""
        if self.protocol.state is not State.OPEN:
            return
        if isinstance(data, str):
            self.protocol.send_text(data.encode())
        else:
            self.protocol.send_binary(data)
        self._flush()

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
        elif self.transport is not None and self.protocol.state is State.CONNECTING:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- internals ---------------------------------------------------------------------
    def _response(self, response: Response) -> None:
        if self.protocol.handshake_exc is not None:
            exc = self.protocol.handshake_exc
            self.handshake_error = exc
            if isinstance(exc, InvalidStatus):
                self.close_code = exc.response.status_code
            self.close_reason = _handshake_reason(exc)
            if self.transport is not None:
                self.transport.close()
            return
        self._opened = True
        self._handler.on_open(self)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if not frame.fin:
                self._fragments = [frame.data]
                self._text = opcode is Opcode.TEXT
                return
            data = frame.data
            self._handler.on_message(self, data.decode() if opcode is Opcode.TEXT else data)
        elif opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(frame.data)
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = None
                self._handler.on_message(self, data.decode() if self._text else data)
        elif opcode is Opcode.CLOSE:
            close = self.protocol.close_rcvd
            if close is not None:
                self.close_code, self.close_reason = close.code, close.reason
        # PING is answered by the protocol itself (its PONG is in data_to_send).

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.protocol.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()
        if self.protocol.close_expected():
            # The server closes TCP first after a closing handshake; do not linger.
            asyncio.get_running_loop().call_later(2.0, transport.abort)


def _handshake_reason(exc: Exception) -> str:
    if isinstance(exc, InvalidStatus):
        body = exc.response.body or b""
        return f"HTTP {exc.response.status_code}: {body[:200].decode(errors='replace')}"
    if isinstance(exc, InvalidHandshake):
        return f"handshake: {exc}"
    return repr(exc)


async def connect(url: str, handler: Handler, *, source: str | None = None,
                  headers: dict[str, str] | None = None,
                  subprotocols: list[str] | None = None,
                  ssl_context: ssl.SSLContext | None = None,
                  connect_timeout: float = 10.0,
                  factory: Callable[..., WsConnection] = WsConnection) -> WsConnection:
    """Open a TCP socket (from ``source``) and start the WebSocket handshake.

    Returns once TCP (and TLS) is up; ``handler.on_open`` runs when the server
    accepts the upgrade, ``handler.on_close`` when it refuses or the socket drops.
    """
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    sock = await open_socket(uri.host, uri.port, source, connect_timeout)
    conn = factory(uri, handler, headers=headers, subprotocols=subprotocols)
    try:
        if uri.secure:
            ctx = ssl_context or ssl.create_default_context()
            await loop.create_connection(lambda: conn, sock=sock, ssl=ctx,
                                         server_hostname=uri.host)
        else:
            await loop.create_connection(lambda: conn, sock=sock)
    except BaseException:
        sock.close()
        raise
    return conn

