"""The WebSocket endpoint ``/ws``: a raw ASGI callable (no Starlette WebSocket object
per socket; see docs/topics/realtime.md for the memory figures behind that choice).

One connection: negotiate the format, accept (or tell the client when to retry),
then read frames until the socket closes. Frames are handled one at a time per
connection; replies and events share the connection's bounded send queue
(realtime.connection). A bad frame gets an ``error`` frame and the connection lives;
``BAD_FRAME_LIMIT`` bad frames in a row close it with 4000. No exception raised while
handling a frame leaves this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from dropserver.auth import GUEST, Principal, bearer_token
from dropserver.errors import ApiError, is_outage
from dropserver.observability import new_id, tally_label
from realtime import chat, history, metrics, protocol, tokens
from realtime.connection import Connection
from realtime.hub import Hub
from realtime.protocol import ClientFrame, ClientType, CloseCode, ErrorCode, ProtocolError
from realtime.wire import Broadcast, asgi_message

__all__ = ["CommandContext", "drain", "endpoint"]

log = logging.getLogger("dropserver.realtime")

BAD_FRAME_LIMIT = 10
_UNHELD = frozenset({ClientType.PING, ClientType.PONG})  # answered during a drop fan-out
FRAMES_PER_SECOND = 50  # per connection; more are answered with rate_limited
OUTAGE_LOG_EVERY_S = 1.0  # one "unavailable for a frame" line per second per process


class OutageLog:
    """The warning for frames that met Redis or PostgreSQL away, at most once per
    ``every_s``, with how many were left out since the last line. Every frame of an
    outage hits it: logged one by one (JSON, redaction) it took 13% of a worker in a
    chat storm that exhausted its Redis pool, on top of the outage."""

    def __init__(self, every_s: float = OUTAGE_LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._next = float("-inf")
        self.left_out = 0

    def frame(self, frame: ClientFrame, exc: BaseException) -> None:
        now = self._clock()
        if now < self._next:
            self.left_out += 1
            return
        self._next = now + self.every_s
        left_out, self.left_out = self.left_out, 0
        log.warning("backing service unavailable for a frame", extra={
            "type": frame.type.value, "command": frame.command,
            "error": f"{type(exc).__name__}: {exc}"[:300], "left_out": left_out})


_outage_log = OutageLog()


@dataclass(slots=True)
class CommandContext:
    """What a delegated command handler (``app.state.commands``) gets as ``ctx``.

    Frames a handler appends to ``after`` leave with its reply, in the same message
    (a batch), e.g. the buyer's own ``order.held``. Not frozen: one is made for every
    buy and bid, and a frozen dataclass's ``__init__`` (``object.__setattr__`` per
    field) took four times as long.
    """

    principal: Principal
    drop_id: int
    ip: str
    conn_id: str
    node_id: str
    after: list[dict[str, Any]] = field(default_factory=list)


def _reconnect_after_ms(settings: Any) -> int:
    return random.randint(settings.reconnect_min_ms, settings.reconnect_max_ms)


def _send_frame(conn: Connection, frame: dict[str, Any] | list[dict[str, Any]],
                positioned: bool = False) -> None:
    Broadcast(frame, positioned=positioned).deliver(conn)


def _send_error(conn: Connection, exc: ProtocolError) -> None:
    _send_refusal(conn, exc.code, exc.message, exc.request_id, exc.details or None)


def _send_refusal(conn: Connection, code: str, message: str, request_id: str | None,
                  details: dict[str, Any] | None) -> None:
    """The ``error`` frame answering one frame (a refused bid, most of a bidding war's
    answers, comes here straight from its ApiError)."""
    tally_label(metrics.ERRORS, code)
    conn.deliver(Broadcast(protocol.error_frame(code, message, request_id, details)))


async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI app for the ``/ws`` route."""
    app = scope["app"]
    state = app.state
    hub: Hub = state.realtime
    settings = state.settings
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    fmt, subprotocol = protocol.negotiate(list(scope.get("subprotocols") or ()))
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if subprotocol:
        accept["subprotocol"] = subprotocol
    refuse = None
    if getattr(state, "draining", False):
        refuse = ("draining", CloseCode.SERVICE_RESTART)
    elif len(hub.connections) >= settings.max_connections:
        refuse = ("overload", CloseCode.TRY_AGAIN_LATER)
    if refuse is not None:
        metrics.REFUSED.inc()
        metrics.CLOSES.labels(str(int(refuse[1]))).inc()
        frame = protocol.going_away_frame(refuse[0], _reconnect_after_ms(settings))
        with contextlib.suppress(Exception):
            await send(accept)
            await send(asgi_message(protocol.encode(frame, fmt))[0])
            await send({"type": "websocket.close", "code": int(refuse[1]),
                        "reason": refuse[0]})
        return
    try:
        token = bearer_token(HTTPConnection(scope))
    except ApiError:
        token = "malformed"  # a bad Authorization header: join answers token_invalid
    client = scope.get("client") or ("", 0)
    conn = Connection(send, fmt, settings.ws_send_queue_bytes, new_id("c-"), client[0],
                      grace=max(1.0, settings.ws_pong_timeout))
    try:
        await send(accept)
    except Exception:  # the peer left during the handshake
        return
    # The headers are not needed any more; drop them from the long-lived scope.
    scope["headers"] = []
    conn.task = asyncio.current_task()
    if hub.heartbeat is not None:
        hub.heartbeat.assign(conn)
    if conn.proto is not None:  # pongs answered below the app (realtime.asgi)
        conn.proto.on_pong = conn.heard
    hub.connections.add(conn)
    metrics.CONNECTIONS.inc()
    try:
        await _serve(app, hub, conn, token, receive)
    except asyncio.CancelledError:
        if not conn.closed:  # not ours (server shutdown): let it propagate
            raise
    finally:
        if conn.proto is not None:
            conn.proto.on_pong = None  # conn <-> protocol: no cycle left behind
        if hub.heartbeat is not None:
            hub.heartbeat.forget(conn)
        hub.connections.discard(conn)
        tokens.forget(conn)
        hub.leave(conn)
        metrics.CONNECTIONS.dec()
        if conn.close_code is not None:
            metrics.CLOSES.labels(str(conn.close_code)).inc()


async def _serve(app: Any, hub: Hub, conn: Connection, token: str | None, receive: Any) -> None:
    bad = 0
    window_start = time.monotonic()
    window_count = 0
    commands = app.state.commands
    dispatcher = hub.dispatcher
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return  # websocket.disconnect
        now = conn.last_seen = time.monotonic()
        if conn.closed:
            continue  # closing: wait for the peer's close
        raw = message.get("bytes")
        if raw is None:
            raw = message.get("text", "")
        if now - window_start >= 1.0:
            window_start, window_count = now, 0
        window_count += 1
        if window_count > FRAMES_PER_SECOND:
            if window_count == FRAMES_PER_SECOND + 1:  # the rest are dropped unread
                wait_ms = max(1, math.ceil((window_start + 1.0 - now) * 1000))
                _send_error(conn, ProtocolError(ErrorCode.RATE_LIMITED,
                                                "too many frames; slow down", None,
                                                {"retry_after_ms": wait_ms}))
            continue
        try:
            frame = protocol.decode(raw, conn.fmt, commands)
        except ProtocolError as exc:
            metrics.frame_in("invalid")
            bad += 1
            _send_error(conn, exc)
            if bad >= BAD_FRAME_LIMIT:
                conn.close(CloseCode.BAD_FRAMES, "too many bad frames")
            continue
        bad = 0
        metrics.frame_in(frame.command or frame.type.value)
        conn.handling = True
        try:
            if dispatcher.holding and frame.type not in _UNHELD:
                # A drop event is still on its way to this process's viewers: every
                # one of them sees BUY NOW before anyone's buy is taken (and the
                # commands held meanwhile resume a few per turn of the loop, in order).
                await dispatcher.urgent_idle()
            reply = await _handle(app, hub, conn, token, frame)
        except ProtocolError as exc:
            exc.request_id = exc.request_id or frame.id
            _send_error(conn, exc)
            continue
        except ApiError as exc:
            _send_refusal(conn, exc.code, exc.message, frame.id, exc.details or None)
            continue
        except Exception as exc:
            if is_outage(exc):  # Redis or PostgreSQL away: retry, as over HTTP (503)
                _outage_log.frame(frame, exc)
                _send_error(conn, ProtocolError(
                    "unavailable", "a backing service is unavailable; retry shortly",
                    frame.id, {"retry_after_ms": 1000}))
                continue
            log.exception("frame handler failed", extra={
                "type": frame.type.value, "command": frame.command, "conn_id": conn.conn_id,
                "drop_id": conn.drop_id})
            _send_error(conn, ProtocolError(ErrorCode.INTERNAL_ERROR, "internal error",
                                            frame.id))
            continue
        finally:
            conn.handling = False
            conn.last_seen = time.monotonic()
        if reply is not None:
            _send_frame(conn, reply)


async def _handle(app: Any, hub: Hub, conn: Connection, token: str | None,
                  frame: ClientFrame) -> dict[str, Any] | list[dict[str, Any]] | None:
    t = frame.type
    if t is ClientType.PING:
        out: dict[str, Any] = {"t": protocol.ServerType.PONG.value}
        if frame.id is not None:
            out["id"] = frame.id
        return out
    if t is ClientType.PONG:
        return None
    if t is ClientType.JOIN:
        await _join(app, hub, conn, token, frame)
        return None
    if conn.room is None:
        raise ProtocolError(ErrorCode.NOT_JOINED, "join a drop first")
    data = frame.data
    if t is ClientType.REFRESH:
        return protocol.reply_frame(frame.id, await tokens.refresh(app, hub, conn,
                                                                   data["token"]))
    tokens.check(conn)  # an expired token is token_expired, not a guest's token_missing
    after: list[dict[str, Any]] = []  # frames that leave with the reply
    if t is ClientType.CHAT_SEND:
        result = await chat.post(app, conn, data["text"])
    elif t is ClientType.CHAT_DELETE:
        result = await chat.delete(app, conn, data["message_id"])
    elif t in (ClientType.CHAT_MUTE, ClientType.CHAT_BAN):
        action = "mute" if t is ClientType.CHAT_MUTE else "ban"
        result = await chat.moderate(app, conn, action, data["user_id"], data["seconds"],
                                     data["reason"])
    elif t is ClientType.CHAT_UNBAN:
        result = await chat.unban(app, conn, data["user_id"])
    elif t is ClientType.CHAT_SLOW:
        result = await chat.set_slow_mode(app, conn, data["seconds"])
    elif t is ClientType.CHAT_PIN:
        result = await chat.pin(app, conn, data["message_id"])
    elif t is ClientType.CHAT_UNPIN:
        result = await chat.unpin(app, conn)
    else:  # a command registered by another package (e.g. checkout's "buy")
        if conn.principal is None or conn.principal.is_guest:
            raise ProtocolError(ErrorCode.TOKEN_MISSING, f"sign in to {frame.command}")
        handler = app.state.commands[frame.command]
        ctx = CommandContext(conn.principal, conn.drop_id, conn.ip, conn.conn_id,
                             hub.node_id)
        result = await handler(app, ctx, data)
        after = ctx.after
    reply = protocol.reply_frame(frame.id, result if isinstance(result, dict) else {})
    return [reply, *after] if after else reply


async def _join(app: Any, hub: Hub, conn: Connection, token: str | None,
                frame: ClientFrame) -> None:
    if conn.room is not None:
        raise ProtocolError(ErrorCode.ALREADY_JOINED, "this connection already joined a drop; "
                            "open another connection for another drop")
    data = frame.data
    drop_id = data["drop_id"]
    token = data.get("token") or token
    who = GUEST
    if token:
        try:
            who = await app.state.verifier.verify(token)
        except ApiError as exc:
            raise ProtocolError(exc.code, exc.message) from None
    # A join storm (a node restart) queues here instead of exhausting Redis and
    # PostgreSQL connection pools.
    async with hub.join_slots:
        await _join_drop(app, hub, conn, who, frame, drop_id)


async def _join_drop(app: Any, hub: Hub, conn: Connection, who: Principal, frame: ClientFrame,
                     drop_id: int) -> None:
    data = frame.data
    snap = await hub.snapshots.get(drop_id)
    if snap is None or (snap["state"] == "draft"
                        and not who.can_manage(snap["drop"]["creator_id"])):
        raise ProtocolError(ErrorCode.DROP_NOT_FOUND, f"no drop {drop_id}",
                            details={"drop_id": drop_id})
    conn.principal = who
    conn.creator_id = snap["drop"]["creator_id"]
    conn.staff = await _is_staff(app, conn)
    room = await hub.enter(conn, drop_id)
    try:
        await _answer_join(app, hub, room, conn, frame, data.get("since"))
    except BaseException:
        hub.leave(conn)
        conn.drop_id = None
        raise
    tokens.track(hub, conn, who)  # signed-in until the token expires


async def _is_staff(app: Any, conn: Connection) -> bool:
    """Whether the joining socket is the drop's staff (from the moderators' cache: no
    PostgreSQL read per join). Unknown (the database unreachable) counts as a viewer:
    a join never fails over the audience figure."""
    try:
        return await chat.is_staff(app, conn)
    except Exception as exc:
        if not is_outage(exc):
            raise
        log.warning("moderators unreadable; counting the socket as a viewer",
                    extra={"creator_id": conn.creator_id})
        return False


async def _answer_join(app: Any, hub: Hub, room: Any, conn: Connection, frame: ClientFrame,
                       since: tuple[str, int] | None) -> None:
    redis = app.state.redis
    limit = app.state.settings.history_size
    if since is not None:
        rec = _from_room(room, history.Position(*since), limit) or await history.recover(
            redis, room.drop_id, history.Position(*since), limit)
        metrics.RECOVERIES.labels("recovered" if rec.recovered else "snapshot").inc()
        if rec.recovered:
            _send_frame(conn, hub.joined_frame(room, frame.id, None, recovered=True,
                                               events=rec.publications, position=rec.position),
                        positioned=True)
            hub.activate(conn, room, rec.position.offset, rec.position.epoch)
            return
    for fresh in (False, True):
        snap = await hub.snapshots.get(room.drop_id, fresh=fresh)
        if snap is None:
            raise ProtocolError(ErrorCode.DROP_NOT_FOUND, f"no drop {room.drop_id}")
        pos = history.Position(snap["pos"]["epoch"], snap["pos"]["offset"])
        rec = _from_room(room, pos, limit) or await history.recover(redis, room.drop_id,
                                                                    pos, limit)
        if rec.recovered:
            break
    else:
        # The history moved on twice while we read it: send the newest snapshot
        # alone; the live events buffered since the subscription follow it.
        rec = history.Recovery(True, pos)
    joined = hub.joined_frame(room, frame.id, snap, recovered=False, events=rec.publications)
    _send_frame(conn, joined, positioned=True)
    last = rec.publications[-1] if rec.publications else None
    epoch, offset = (last.epoch, last.offset) if last else (pos.epoch, pos.offset)
    hub.activate(conn, room, offset, epoch)


def _from_room(room: Any, pos: history.Position, limit: int) -> history.Recovery | None:
    """The events after ``pos`` as the room applied them (no Redis round trip per join;
    what is still on its way reaches the socket through ``conn.pending``), or None."""
    events = room.events_since(pos)
    if events is None or len(events) > limit:
        return None
    return history.Recovery(True, room.position, events)


# -- drain ---------------------------------------------------------------------

async def drain(app: Any) -> None:
    """Tell every socket to come back after a jittered delay, then close it (1012)."""
    hub: Hub | None = getattr(app.state, "realtime", None)
    if hub is None:
        return
    settings = app.state.settings
    conns = list(hub.connections)
    for conn in conns:
        frame = protocol.going_away_frame("restart", _reconnect_after_ms(settings))
        conn.close(CloseCode.SERVICE_RESTART, "service restart",
                   after=asgi_message(protocol.encode(frame, conn.fmt))[0])
    log.info("drained", extra={"connections": len(conns)})
    deadline = time.monotonic() + min(5.0, settings.shutdown_grace)
    while hub.connections and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


class RawEndpoint:
    """Starlette treats a plain function as a WebSocket session handler; an instance
    is mounted as the raw ASGI app it is. ``endpoint``: what
    :class:`realtime.asgi.FastPath` calls directly (one coroutine less per socket)."""

    endpoint = staticmethod(endpoint)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await endpoint(scope, receive, send)
