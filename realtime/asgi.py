"""Serving ``/ws`` lean: what each idle socket costs is most of a node's memory.

Measured with ``benchmarks/fanout.py`` (docs/topics/realtime.md): through the
full Starlette stack an idle joined socket cost ~27 KiB; these two changes bring it
down without giving up uvicorn (workers, lifespan, HTTP on the same port):

* :class:`FastPath` hands WebSocket scopes for ``/ws`` straight to the gateway,
  skipping Starlette's middleware and router coroutines that would otherwise stay
  suspended for the socket's lifetime (HTTP requests still go through all of it);
* :class:`LeanWebSocketProtocol` is uvicorn's ``websockets-sansio`` protocol that,
  once the handshake is done, drops the parsed request and response (headers and
  all) it otherwise keeps for the life of the connection.

Fan-out writes skip uvicorn's ASGI ``send`` too: a publication for thousands of
sockets is framed once (:func:`realtime.wire.server_frame`, RFC 6455 5.2; server
frames are unmasked, so the bytes are the same for every socket) and
:meth:`LeanWebSocketProtocol.write_frame` puts those bytes on each transport, where
uvicorn would build a coroutine, wait on its ``writable`` event and frame the payload
again per socket. Anything it cannot write at once (writing paused, closing, an
extension negotiated) goes the ASGI way.

:class:`LeanHttpToolsProtocol` is uvicorn's HTTP protocol (httptools) that, once it
has handed a connection over to the WebSocket protocol, lets go of its parser. The
parser keeps the protocol's bound methods as callbacks, so without this each
WebSocket left a dead protocol, parser, flow control and their buffers (~22 objects)
in a reference cycle that only the cycle collector frees: work for every full
collection, and memory held until one runs.

Heartbeat pongs stop here too: a message that is exactly a client's ``pong`` frame
(``PONG_BINARY``, ``PONG_TEXT``) calls the gateway's ``on_pong`` hook instead of going
through the app's queue, decoding and dispatch. Every socket sends one per ping
interval, and at 50,000 sockets that path cost the workers as much CPU as the
fan-out itself (docs/benchmarks.md). Any other message, a pong with an ``id``
included, takes the ASGI way.

Client data frames are read here too, once the connection is open: a whole, masked,
unfragmented text or binary frame is unmasked (websockets' C ``apply_mask``) and
queued for the app directly, where websockets' generator-based parser built an event
object per frame (~5% of a worker in the buy benchmark, and every heartbeat pong).
Anything else (a control frame, a fragment, RSV bits, an unmasked or oversized frame)
and everything after it in the same read goes to websockets' parser, which handles it
and its errors as before; reading returns here once that parser waits at a frame
boundary again (:meth:`LeanWebSocketProtocol._parser_at_boundary`).

It also stops uvicorn pausing the socket after every message: uvicorn calls
``pause_reading()`` when a message is queued for the app and ``resume_reading()``
when the app takes it, two epoll updates (and, on the stdlib loop, selector
bookkeeping in Python) per frame: 8% of a worker's profile samples in the buy
benchmark. Reading pauses here only once ``QUEUE_FRAMES`` small frames, or one large
one, wait for the app, so a flooding client still cannot queue more than that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.routing import WebSocketRoute
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import apply_mask
from websockets.protocol import State

__all__ = [
    "PONG_BINARY",
    "PONG_TEXT",
    "FastPath",
    "LeanHttpToolsProtocol",
    "LeanWebSocketProtocol",
]

WS_PATH = "/ws"
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
QUEUE_FRAMES = 8  # small frames queued for the app before reading pauses
SMALL_FRAME = 4096  # bytes


class FastPath:
    """ASGI wrapper: ``/ws`` WebSockets straight to the endpoint ``app`` mounts there
    (the gateway's), everything else to ``app``. Found among the app's routes, so this
    module does not import the gateway. An HTTP request that writes (any method but
    GET, HEAD, OPTIONS: the creator's drop actions, payments) runs with the process's
    fan-out expedited (:meth:`realtime.dispatch.Dispatcher.expedite`)."""

    def __init__(self, app: Any) -> None:
        self.app = app  # dropserver.serve finds the drain hook through .app
        self._ws = _ws_endpoint(app)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._ws is not None and scope["type"] == "websocket" and \
                scope["path"] == WS_PATH:
            scope["app"] = self.app
            await self._ws(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] not in _READS:
            hub = getattr(self.app.state, "realtime", None)
            if hub is not None:
                # Someone waits on each of this request's awaits: chat fans out in
                # shorter slices meanwhile (realtime.dispatch).
                with hub.dispatcher.expedite():
                    await self.app(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _ws_endpoint(app: Any) -> Callable[..., Any] | None:
    """The raw ASGI endpoint mounted at ``WS_PATH`` (its ``endpoint`` when it has one)."""
    for route in getattr(app, "routes", ()):
        if isinstance(route, WebSocketRoute) and route.path == WS_PATH:
            return getattr(route.app, "endpoint", route.app)
    return None


class LeanHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that drops its parser after a WebSocket upgrade."""

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The transport belongs to the WebSocket protocol now and this one gets no
        # more data: break the protocol <-> parser cycle (uvicorn does the same on
        # connection_lost, which this protocol no longer sees).
        self.parser = None  # type: ignore[assignment]


# A client's answer to the server's heartbeat ping, as the clients encode it
# (docs/protocol.md): msgpack in a binary frame, JSON in a text frame.
PONG_BINARY = frozenset({b"\x81\xa1t\xa4pong"})  # msgpack {"t": "pong"}
PONG_TEXT = frozenset({b'{"t":"pong"}', b'{"t": "pong"}'})


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol without the handshake kept in memory."""

    # Set by the gateway while it serves the socket: called for a heartbeat pong
    # instead of queueing it for the app (see send_receive_event_to_app).
    on_pong: Callable[[], None] | None = None
    # Frames are read by data_received itself (websockets' parser waits at a boundary).
    # Class defaults: an idle socket keeps no per-instance entry for them.
    _fast = False
    _partial = b""  # the start of a frame that has not fully arrived

    def data_received(self, data: bytes) -> None:
        if not self._fast:
            if not self._parser_at_boundary():
                super().data_received(data)
                return
            self._fast = True
        buf = self._partial + data if self._partial else data
        conn = self.conn
        limit = conn.max_message_size
        if conn.max_fragment_size is not None:
            limit = conn.max_fragment_size if limit is None else min(
                limit, conn.max_fragment_size)
        pos, end = 0, len(buf)
        while pos < end:
            head = _data_frame_head(buf, pos, end, limit)
            if head is None:
                # Not a frame this fast path reads: websockets' parser takes it and
                # everything after it.
                self._partial = b""
                self._fast = False
                super().data_received(bytes(buf[pos:]))
                return
            start, n = head
            if start < 0 or end - start < 4 + n:
                self._partial = buf[pos:] if pos else buf  # the rest has not arrived
                return
            self.curr_msg_data_type = "text" if buf[pos] == 0x81 else "bytes"
            payload = apply_mask(buf[start + 4:start + 4 + n], buf[start:start + 4])
            pos = start + 4 + n
            self.frames = [payload]
            self.send_receive_event_to_app()
            if self.close_sent or self.transport.is_closing():
                self._partial = b""
                return  # closing (an invalid UTF-8 text, or the app): read no more
        if self._partial:
            self._partial = b""

    def _parser_at_boundary(self) -> bool:
        """websockets' parser is open, between messages, and waits for a new frame.

        It waits in ``reader.at_eof()`` before each frame's header and in
        ``read_exact`` inside one; anything unexpected (another websockets version)
        reads False and the parser keeps reading."""
        conn = self.conn
        try:
            if (conn.state is not State.OPEN or conn.extensions or self.close_sent
                    or conn.current_size is not None or conn.reader.buffer
                    or conn.parser_exc is not None):
                return False
            gen = conn.parser
            while gen.gi_yieldfrom is not None:
                gen = gen.gi_yieldfrom
            return gen.gi_code.co_name == "at_eof"
        except AttributeError:
            return False

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # Only the handshake reads these (uvicorn 0.54, websockets_sansio_impl).
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]

    def write_frame(self, wire: bytes) -> bool:
        """Write a data frame serialized by :func:`realtime.wire.server_frame`; False when the
        ASGI ``send`` must take the message instead (it queues, closes or raises)."""
        if (self.close_sent or self.disconnected or not self.writable.is_set()
                or self.conn.state is not State.OPEN or self.conn.extensions):
            return False
        self.transport.write(wire)
        return True

    def send_receive_event_to_app(self) -> None:
        frames = self.frames
        if self.on_pong is not None and len(frames) == 1 and not self.close_sent and (
                frames[0] in (PONG_TEXT if self.curr_msg_data_type == "text"
                              else PONG_BINARY)):
            # Every socket answers a ping each interval: at 50,000 sockets the pongs
            # through ASGI, decode and dispatch cost the workers as much as the
            # fan-out (docs/benchmarks.md). A pong only says the peer is alive.
            self.frames = []
            self.on_pong()
            return
        # One frame read by data_received above (every command), or websockets' parts.
        small = (len(frames[0]) if len(frames) == 1
                 else sum(len(f) for f in frames)) <= SMALL_FRAME
        if self.read_paused or not small or self.queue.qsize() + 1 >= QUEUE_FRAMES:
            super().send_receive_event_to_app()  # queues it and pauses reading
            return
        # uvicorn pauses unless it believes reading is paused already: let it queue
        # the message without pausing.
        self.read_paused = True
        try:
            super().send_receive_event_to_app()
        finally:
            self.read_paused = False


def _data_frame_head(buf: bytes, pos: int, end: int, limit: int | None,
                     ) -> tuple[int, int] | None:
    """The client frame at ``pos``, if the fast path reads it: (where its mask starts,
    payload length); (-1, 0) while its header has not fully arrived. None for anything
    else: not FIN, RSV bits, not text or binary, unmasked (RFC 6455 5.3: every client
    frame is), a 64-bit length, or over ``limit`` (websockets' parser answers 1009)."""
    b0 = buf[pos]
    if b0 != 0x81 and b0 != 0x82:
        return None
    if end - pos < 2:
        return -1, 0
    b1 = buf[pos + 1]
    if not b1 & 0x80:
        return None
    n, start = b1 & 0x7F, pos + 2
    if n == 126:
        if end - start < 2:
            return -1, 0
        n, start = (buf[start] << 8) | buf[start + 1], start + 2
    elif n == 127:
        return None
    if limit is not None and n > limit:
        return None
    return start, n
