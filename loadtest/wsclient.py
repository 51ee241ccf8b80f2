"""A lean asyncio WebSocket client for tens of thousands of sockets per process.

websockets' sans-I/O :class:`websockets.client.ClientProtocol` does the opening
handshake (and everything after a refused one). Once the server answers 101, frames
are read and written here: a load generator shares the machine with the server it
measures, and websockets' generator-based parser, per-frame ``secrets`` mask and
event objects made the buy benchmark's client cost ~70 us of CPU per hold. The
framing here is RFC 6455 for a client that negotiated no extension: server frames
unmasked, fragments reassembled, pings answered, the closing handshake, UTF-8 checked,
``max_size`` enforced; a protocol error closes with 1002/1007/1009 as websockets would.
Masks come from a shared ``os.urandom`` pool (4 KiB at a time), not one syscall each.

There is no task and no queue per connection: messages are handed to a callback in
``data_received``, which is what lets one process hold ~15,000 viewers in ~25 KiB
each.

Sockets are opened here rather than by ``loop.create_connection(host, port)`` so each
can be bound to a chosen source address first (``IP_BIND_ADDRESS_NO_PORT`` defers the
port choice to ``connect()``, so ports are unique per 4-tuple, not per address): one
source/destination address pair has only ~28k ephemeral ports, so a 50,000-viewer
swarm on loopback spreads its sockets over 127.0.0.2, 127.0.0.3, ...
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Protocol

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode, apply_mask
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import WebSocketURI, parse_uri

__all__ = ["Handler", "WsConnection", "connect", "open_socket"]

# Linux <netinet/in.h>; Python's socket module does not name it.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

_resolved: dict[tuple[str, int], tuple] = {}  # (host, port) -> getaddrinfo's first answer

# Opcodes (RFC 6455 section 5.2) and close codes (section 7.4.1).
_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_PROTOCOL_ERROR, _INVALID_DATA, _TOO_BIG = 1002, 1007, 1009
_HEAD_END = b"\r\n\r\n"

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class _Masks:
    """Masking keys, 4 bytes each, cut from one ``os.urandom`` read of 4 KiB."""

    __slots__ = ("_pool", "_pos")

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def next(self) -> bytes:
        pos = self._pos
        if pos >= len(self._pool):
            self._pool, pos = os.urandom(4096), 0
        self._pos = pos + 4
        return self._pool[pos:pos + 4]


_masks = _Masks()


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + _U16.pack(n)
    else:
        head = bytes((0x80 | opcode, 0xFF)) + _U64.pack(n)
    mask = _masks.next()
    return head + mask + apply_mask(payload, mask)


class _Fail(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


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
    """One client WebSocket: the handshake by a sans-I/O :class:`ClientProtocol`, then
    frames read and written here."""

    __slots__ = ("_buf", "_close_rcvd", "_close_sent", "_discard", "_fast", "_fragments",
                 "_handler", "_head_tail", "_max_size", "_opened", "_size", "_text",
                 "close_code", "close_reason", "handshake_error", "headers", "protocol",
                 "transport", "user")

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
        self._max_size = max_size
        self._fast = False  # frames are read and written here (after a 101)
        self._discard = False  # after a protocol error: read nothing more
        self._head_tail = b""  # the last bytes of the response head seen so far
        self._buf = b""  # an incomplete frame
        self._size = 0  # bytes in _fragments
        self._close_sent: tuple[int | None, str] | None = None
        self._close_rcvd: tuple[int | None, str] | None = None

    @property
    def subprotocol(self) -> str | None:
        return self.protocol.subprotocol

    @property
    def open(self) -> bool:
        if self._fast:
            return self._close_sent is None and self._close_rcvd is None
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
        if self._fast:
            self._receive(data)
            return
        rest = b""
        if not self._opened and self.protocol.state is State.CONNECTING:
            # Hand the protocol the response head only; frames after a 101 are ours.
            seen = self._head_tail + data
            end = seen.find(_HEAD_END)
            if end < 0:
                self._head_tail = seen[-3:]
            else:
                cut = end + 4 - len(self._head_tail)
                data, rest = data[:cut], data[cut:]
        self._protocol_received(data)
        if rest:
            if self._opened and self.protocol.state is State.OPEN:
                self._fast = True
                self._receive(rest)
            else:  # refused (the body follows) or not parsed yet: the protocol reads on
                self._protocol_received(rest)
        elif self._opened and self.protocol.state is State.OPEN:
            self._fast = True

    def _protocol_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Response):
                self._response(event)
        self._flush()

    def eof_received(self) -> bool | None:
        if not self._fast:
            self.protocol.receive_eof()
            self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._fast:
            close = self._close_rcvd or self._close_sent
            if close is not None and self.close_code is None:
                self.close_code, self.close_reason = close
        else:
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
        if self._fast:
            if self._close_sent is None and self._close_rcvd is None:
                if isinstance(data, str):
                    self.transport.write(client_frame(_TEXT, data.encode()))  # type: ignore[union-attr]
                else:
                    self.transport.write(client_frame(_BINARY, data))  # type: ignore[union-attr]
            return
        if self.protocol.state is not State.OPEN:
            return
        if isinstance(data, str):
            self.protocol.send_text(data.encode())
        else:
            self.protocol.send_binary(data)
        self._flush()

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self._fast:
            if self._close_sent is None and self._close_rcvd is None:
                self._send_close(code, reason)
            return
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
        elif self.transport is not None and self.protocol.state is State.CONNECTING:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- framing after the handshake -----------------------------------------------------
    def _receive(self, data: bytes) -> None:
        if self._close_rcvd is not None or self._discard:
            return  # nothing counts after a close frame or a protocol error
        buf = self._buf + data if self._buf else data
        try:
            pos = self._frames(buf)
        except _Fail as fail:
            self._buf = b""
            self._fail(fail.code, fail.reason)
            return
        self._buf = buf[pos:] if pos < len(buf) else b""

    def _frames(self, buf: bytes) -> int:
        """Handle every complete frame in ``buf``; return where the first incomplete one starts."""
        pos, end = 0, len(buf)
        max_size = self._max_size
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b1 & 0x80:
                raise _Fail(_PROTOCOL_ERROR, "masked server frame")
            if b0 & 0x70:
                raise _Fail(_PROTOCOL_ERROR, "reserved bits must be 0")
            n, start = b1 & 0x7F, pos + 2
            if n == 126:
                if end - start < 2:
                    break
                n, start = _U16.unpack_from(buf, start)[0], start + 2
            elif n == 127:
                if end - start < 8:
                    break
                n, start = _U64.unpack_from(buf, start)[0], start + 8
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if max_size is not None and n > max_size and opcode < _CLOSE:
                raise _Fail(_TOO_BIG, f"frame of {n} bytes exceeds limit of {max_size} bytes")
            if end - start < n:
                break
            payload = buf[start:start + n]
            pos = start + n
            if opcode == _TEXT or opcode == _BINARY:
                if self._fragments is not None:
                    raise _Fail(_PROTOCOL_ERROR, "expected a continuation frame")
                if fin:
                    self._deliver(payload, opcode == _TEXT)
                else:
                    self._fragments, self._size = [payload], n
                    self._text = opcode == _TEXT
            elif opcode == _CONT:
                if self._fragments is None:
                    raise _Fail(_PROTOCOL_ERROR, "unexpected continuation frame")
                self._fragments.append(payload)
                self._size += n
                if max_size is not None and self._size > max_size:
                    raise _Fail(_TOO_BIG, f"message exceeds limit of {max_size} bytes")
                if fin:
                    message = b"".join(self._fragments)
                    self._fragments = None
                    self._deliver(message, self._text)
            elif opcode >= _CLOSE:
                if not fin or n > 125:
                    raise _Fail(_PROTOCOL_ERROR, "fragmented or oversized control frame")
                if opcode == _PING:
                    if self._close_sent is None:
                        self.transport.write(client_frame(_PONG, payload))  # type: ignore[union-attr]
                elif opcode == _CLOSE:
                    self._closed_by_server(payload)
                    return end
                elif opcode != _PONG:
                    raise _Fail(_PROTOCOL_ERROR, f"unknown opcode {opcode}")
            else:
                raise _Fail(_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        return pos

    def _deliver(self, payload: bytes, text: bool) -> None:
        if text:
            try:
                message: bytes | str = payload.decode()
            except UnicodeDecodeError as exc:
                raise _Fail(_INVALID_DATA, f"invalid UTF-8: {exc.reason}") from None
        else:
            message = payload
        self._handler.on_message(self, message)

    def _closed_by_server(self, payload: bytes) -> None:
        if len(payload) == 1:
            raise _Fail(_PROTOCOL_ERROR, "close frame of one byte")
        if payload:
            code = _U16.unpack_from(payload)[0]
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                raise _Fail(_PROTOCOL_ERROR, "close reason is not UTF-8") from None
            self._close_rcvd = (code, reason)
        else:
            self._close_rcvd = (1005, "")  # no status received
        self.close_code, self.close_reason = self._close_rcvd
        if self._close_sent is None:  # echo it (an empty close echoes empty)
            self._close_sent = self._close_rcvd
            echo = payload[:2] if payload else b""
            self.transport.write(client_frame(_CLOSE, echo))  # type: ignore[union-attr]
        self._expect_close()

    def _send_close(self, code: int, reason: str) -> None:
        self._close_sent = (code, reason)
        self.transport.write(  # type: ignore[union-attr]
            client_frame(_CLOSE, _U16.pack(code) + reason.encode()))
        self._expect_close()

    def _fail(self, code: int, reason: str) -> None:
        self._discard = True
        if self._close_sent is None:
            self._send_close(code, reason)
        self.close_code, self.close_reason = code, reason

    def _expect_close(self) -> None:
        # The server closes TCP first after a closing handshake; do not linger.
        transport = self.transport
        if transport is not None:
            asyncio.get_running_loop().call_later(2.0, transport.abort)

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

