"""Server messages as they leave: encoded once, framed once, shared by every socket.

Pure (no I/O, no gateway): what the hub, the rooms, the heartbeat and the gateway
hand to :meth:`realtime.connection.Connection.deliver`.

* :func:`server_frame`: one unmasked server data frame (RFC 6455 5.2). A server's
  frames are not masked, so the bytes are the same for every socket;
  :meth:`realtime.asgi.LeanWebSocketProtocol.write_frame` puts them on the transport.
* :class:`Broadcast`: one message (a frame, or a batch: a list of frames) encoded at
  most once per wire format, with what a socket's send queue needs to order it: its
  :class:`Lane` and, for a batch of chat, the :class:`ChatRun` it covers.
* :data:`PING`: the heartbeat's ``{"t": "ping"}``; :meth:`Broadcast.with_ping` is a
  message's frame with the ping's frame after it, for a socket whose ping is due
  (realtime.heartbeat): both leave in one write.
* :class:`Lane`: drop events outrank chat. ``URGENT`` messages (durable drop events,
  the buyer's private events, replies, pings) never wait behind ``BULK`` ones (chat
  batches, coalesced volatile events) in a socket's queue (realtime.connection).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

from realtime import protocol
from realtime.protocol import Format

__all__ = ["PING", "Broadcast", "ChatRun", "Lane", "asgi_message", "server_frame"]


class Lane(enum.IntEnum):
    URGENT = 0  # durable drop events, private events, replies, errors, pings
    BULK = 1  # chat batches, coalesced volatile events (stock, viewers, ...)


@dataclass(frozen=True, slots=True)
class ChatRun:
    """The chat messages a message accounts for: every ``chat.message`` from the one
    after the socket's previous position up to ``last``, delivered or left out.

    ``messages`` are ``(offset, data)`` of all of them (a socket that cannot take the
    message keeps only those it must always get: see ``Connection``); ``sent`` how
    many of them the message carries."""

    epoch: str
    last: int
    messages: tuple[tuple[int, dict[str, Any]], ...]
    sent: int


def asgi_message(payload: bytes | str) -> tuple[dict[str, Any], int]:
    """The ASGI ``websocket.send`` message for ``payload``, and its size."""
    if isinstance(payload, bytes):
        return {"type": "websocket.send", "bytes": payload}, len(payload)
    return {"type": "websocket.send", "text": payload}, len(payload)


class Broadcast:
    """One frame (or a batch: a list of frames), encoded at most once per format, for
    many connections: the ASGI message, and the WebSocket frame's bytes."""

    __slots__ = ("_frame", "_json", "_msgpack", "_pinged", "chat", "key", "lane",
                 "positioned")

    def __init__(self, frame: dict[str, Any] | list[dict[str, Any]], *,
                 lane: Lane = Lane.URGENT, key: str | None = None,
                 chat: ChatRun | None = None, positioned: bool = False) -> None:
        self._frame = frame
        self._msgpack: tuple[dict[str, Any], int, bytes] | None = None
        self._json: tuple[dict[str, Any], int, bytes] | None = None
        self._pinged: dict[Format, bytes] | None = None  # with_ping's, by format
        self.lane = lane
        self.key = key  # coalescable: a newer one replaces a queued one of the same key
        self.chat = chat
        # Carries stream positions (events, joined, skipped): a socket's queue keeps
        # these in offset order.
        self.positioned = positioned or chat is not None

    @property
    def frames(self) -> list[dict[str, Any]]:
        """The frames of this message, in order (a batch's list, or the one frame)."""
        frame = self._frame
        return list(frame) if isinstance(frame, list) else [frame]

    def message(self, fmt: Format) -> tuple[dict[str, Any], int, bytes]:
        if fmt is Format.MSGPACK:
            if self._msgpack is None:
                self._msgpack = _encoded(protocol.encode(self._frame, fmt))
            return self._msgpack
        if self._json is None:
            self._json = _encoded(protocol.encode(self._frame, fmt))
        return self._json

    def with_ping(self, fmt: Format) -> bytes:
        """This message's frame then the heartbeat's ping frame, as one write's bytes
        (built once per format, however many sockets take it)."""
        pinged = self._pinged
        if pinged is None:
            pinged = self._pinged = {}
        wire = pinged.get(fmt)
        if wire is None:
            wire = pinged[fmt] = self.message(fmt)[2] + PING.message(fmt)[2]
        return wire

    def deliver(self, conn: Any) -> None:
        conn.deliver(self)


PING = Broadcast({"t": protocol.ServerType.PING.value})


def _encoded(payload: bytes | str) -> tuple[dict[str, Any], int, bytes]:
    message, size = asgi_message(payload)
    return message, size, server_frame(payload)


def server_frame(payload: bytes | str) -> bytes:
    """One unfragmented, unmasked server data frame (binary for bytes, text for str).

    RFC 6455, 5.2: FIN set, no RSV bits, the opcode; a server's frames are not masked;
    the length in 7 bits, or 126 and 16 bits, or 127 and 64 bits. The same bytes as
    websockets' ``Frame(...).serialize(mask=False)`` (tests/test_asgi_reading.py)
    without building a frame object per reply."""
    if isinstance(payload, str):
        payload, first = payload.encode(), 0x81  # FIN + text
    else:
        first = 0x82  # FIN + binary
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 1 << 16:
        return _HEAD16.pack(first, 126, n) + payload
    return _HEAD64.pack(first, 127, n) + payload


_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
