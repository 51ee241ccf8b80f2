"""The process's viewers by drop, and fan-out from Redis pub/sub to their sockets.

One channel subscription per drop with local viewers (subscribed on the first,
dropped a little after the last) and per signed-in user with a local socket; never
a global channel every node must filter (socket.io#5226). Each publication is
decoded once and encoded once per wire format; every local socket gets the same
message object (realtime.connection writes it without awaiting).

Durable events that arrive in one turn of the event loop leave in one WebSocket
message: a batch, the list of their frames in order (docs/protocol.md). A process
keeping up sends each event alone as soon as it arrives; one that falls behind (a
burst of chat in front of 12,500 local sockets) reads several publications from the
subscriber at once and pays one socket write per viewer for all of them instead of
one per event: on loopback a write costs ~30 us, the frame's size hardly matters.

A room tracks the drop's last position. A durable publication that does not follow
it (a lost subscriber connection, Redis killing the client over its output-buffer
limit) makes the room fetch the missing events from history first; if they are no
longer there, every viewer of the room gets a fresh snapshot (``recovered: false``).

Coalescing (not one frame per sale per viewer): "stock", "campaign.progress" and "viewers" reach a
socket at most once per ``DROPSERVER_STOCK_COALESCE_MS`` / ``..._VIEWERS_COALESCE_MS``
per drop, latest wins ("stock" merges per product). The interval also grows with the
room: one flush costs a socket write per local viewer (~30 us on loopback), so a room
of N local viewers flushes at most every N / ``DROPSERVER_COALESCE_BUDGET`` seconds
(5,000 frames/s per event by default, ~15% of a core: 12,500 viewers in one process
get stock every 2.5 s instead of 125,000 frames/s that would starve BUY NOW and the
buy replies).
Durable events and private events are never coalesced or dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from realtime import channels, history, metrics, protocol
from realtime.asgi import server_frame
from realtime.channels import Kind, MalformedMessage, Publication
from realtime.connection import Connection, spawn
from realtime.protocol import Format, ServerType
from realtime.subscriber import Subscriber

if TYPE_CHECKING:
    from realtime.heartbeat import Heartbeat

__all__ = ["Hub", "Room"]

log = logging.getLogger("dropserver.realtime")

UNSUBSCRIBE_AFTER = 2.0
JOIN_CONCURRENCY = 64  # joins answered at once per process (Redis/PostgreSQL pools)


def asgi_message(payload: bytes | str) -> tuple[dict[str, Any], int]:
    if isinstance(payload, bytes):
        return {"type": "websocket.send", "bytes": payload}, len(payload)
    return {"type": "websocket.send", "text": payload}, len(payload)


class Broadcast:
    """One frame (or a batch: a list of frames), encoded at most once per format, for
    many connections: the ASGI message, and the WebSocket frame's bytes that
    :meth:`realtime.asgi.LeanWebSocketProtocol.write_frame` puts on every socket."""

    __slots__ = ("_frame", "_json", "_msgpack")

    def __init__(self, frame: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._frame = frame
        self._msgpack: tuple[dict[str, Any], int, bytes] | None = None
        self._json: tuple[dict[str, Any], int, bytes] | None = None

    def message(self, fmt: Format) -> tuple[dict[str, Any], int, bytes]:
        if fmt is Format.MSGPACK:
            if self._msgpack is None:
                self._msgpack = _encoded(protocol.encode(self._frame, fmt))
            return self._msgpack
        if self._json is None:
            self._json = _encoded(protocol.encode(self._frame, fmt))
        return self._json

    def deliver(self, conn: Connection, key: str | None = None) -> None:
        message, size, wire = self.message(conn.fmt)
        conn.deliver(message, size, key, wire)


def _encoded(payload: bytes | str) -> tuple[dict[str, Any], int, bytes]:
    message, size = asgi_message(payload)
    return message, size, server_frame(payload)


def _merge(event: str, old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if event == "stock" and old is not None:
        products = dict(old.get("products") or {})
        products.update(new.get("products") or {})
        return {**old, **new, "products": products}
    return new


class Room:
    """The local viewers of one drop."""

    def __init__(self, hub: Hub, drop_id: int) -> None:
        self.hub = hub
        self.drop_id = drop_id
        self.channel = channels.drop_channel(drop_id)
        self.conns: set[Connection] = set()
        self.joining: set[Connection] = set()
        self.position = history.Position("", 0)
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.resyncing = False
        self.backlog: list[Publication] = []
        self.latest: dict[str, dict[str, Any]] = {}  # last volatile data sent, by event
        self.viewers = 0
        self._pending: dict[str, dict[str, Any]] = {}
        self._last_sent: dict[str, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._unsubscribe: asyncio.TimerHandle | None = None
        self._outbox: list[dict[str, Any]] = []  # durable frames of this loop turn
        self._outbox_flush: asyncio.Handle | None = None

    def __len__(self) -> int:
        return len(self.conns) + len(self.joining)

    # -- delivery -----------------------------------------------------------------
    def broadcast(self, frame: dict[str, Any], key: str | None = None) -> int:
        """Send ``frame`` to every local viewer, after the durable frames queued."""
        if self._outbox:
            self.flush_outbox()
        return self._send_all(frame, key)

    def _send_all(self, message: dict[str, Any] | list[dict[str, Any]],
                  key: str | None = None) -> int:
        started = time.perf_counter()
        b = Broadcast(message)
        for conn in self.conns:
            b.deliver(conn, key)
        metrics.FANOUT_SECONDS.observe(time.perf_counter() - started)
        frames = message if isinstance(message, list) else [message]
        for frame in frames:
            metrics.FANOUT_MESSAGES.labels(frame["t"]).inc(len(self.conns))
        return len(self.conns)

    def queue_durable(self, frame: dict[str, Any]) -> None:
        """Send ``frame`` at the end of this loop turn, batched with the others."""
        self._outbox.append(frame)
        if self._outbox_flush is None:
            self._outbox_flush = asyncio.get_running_loop().call_soon(self.flush_outbox)

    def flush_outbox(self) -> None:
        if self._outbox_flush is not None:
            self._outbox_flush.cancel()
            self._outbox_flush = None
        frames, self._outbox = self._outbox, []
        if len(frames) == 1:
            self._send_all(frames[0])
        elif frames:
            metrics.BATCHED.inc(len(frames))
            self._send_all(frames)

    def on_publication(self, pub: Publication) -> None:
        for conn in self.joining:
            if conn.pending is not None:
                conn.pending.append(pub)
        if pub.kind is Kind.DURABLE:
            self.hub.snapshots.invalidate(self.drop_id)
            self._on_durable(pub)
        else:
            self.on_volatile(pub.event, pub.data)

    def _on_durable(self, pub: Publication) -> None:
        if self.resyncing:
            self.backlog.append(pub)
            return
        pos = self.position
        if pub.epoch == pos.epoch and pub.offset <= pos.offset:
            return  # already delivered (filled from history)
        follows = (pub.epoch == pos.epoch and pub.offset == pos.offset + 1) or (
            pos.offset == 0 and pub.offset == 1)
        if not follows:
            self.backlog.append(pub)
            self.resyncing = True
            spawn(self._resync())
            return
        self._apply(pub)

    def _apply(self, pub: Publication) -> None:
        self.position = history.Position(pub.epoch, pub.offset)
        self.queue_durable(protocol.event_frame(pub.event, pub.data, pub.epoch, pub.offset))

    def check_gap(self) -> None:
        """After a lost subscription: fetch whatever was published meanwhile."""
        if not self.resyncing:
            self.resyncing = True
            spawn(self._resync())

    async def _resync(self) -> None:
        try:
            while True:
                rec = await history.recover(self.hub.redis, self.drop_id, self.position,
                                            self.hub.settings.history_size)
                if rec.recovered:
                    if rec.publications:
                        metrics.GAPS.labels("filled").inc()
                        log.info("gap filled from history", extra={
                            "drop_id": self.drop_id, "events": len(rec.publications)})
                    for pub in rec.publications:
                        self._apply(pub)
                    self.position = rec.position
                else:
                    metrics.GAPS.labels("resync").inc()
                    log.warning("gap not in history; sending fresh snapshots",
                                extra={"drop_id": self.drop_id})
                    snap = await self.hub.snapshots.get(self.drop_id, fresh=True)
                    if snap is None:
                        return
                    p = snap["pos"]
                    self.position = history.Position(p["epoch"], p["offset"])
                    self.broadcast(self.hub.joined_frame(self, None, snap, recovered=False,
                                                         events=[]))
                backlog, self.backlog = self.backlog, []
                pos = self.position
                rest = [p for p in backlog
                        if not (p.epoch == pos.epoch and p.offset <= pos.offset)]
                gap = False
                for pub in rest:
                    if pub.epoch == self.position.epoch and \
                            pub.offset == self.position.offset + 1:
                        self._apply(pub)
                    else:
                        gap = True
                        break
                if not gap:
                    return
        except Exception:
            log.exception("resync failed; asking viewers to rejoin",
                          extra={"drop_id": self.drop_id})
            for conn in list(self.conns):
                conn.close(protocol.CloseCode.RESYNC, "resync")
        finally:
            self.resyncing = False
            if self.backlog:  # arrived while the last fetch was in flight
                backlog, self.backlog = self.backlog, []
                for pub in backlog:
                    self._on_durable(pub)

    # -- volatile, coalesced ----------------------------------------------------------
    def coalesce_interval(self, event: str) -> float | None:
        """Seconds between flushes of ``event`` for this room, or None: not coalesced."""
        base = self.hub.intervals.get(event)
        budget = self.hub.settings.coalesce_budget
        if base is None or budget <= 0:
            return base
        return max(base, len(self.conns) / budget)

    def on_volatile(self, event: str, data: dict[str, Any]) -> None:
        interval = self.coalesce_interval(event)
        if interval is None:
            self.latest[event] = data
            self.broadcast(protocol.volatile_frame(event, data), key=event)
            return
        self._pending[event] = _merge(event, self._pending.get(event), data)
        if event in self._timers:
            metrics.COALESCED.labels("room").inc()
            return
        wait = self._last_sent.get(event, 0.0) + interval - time.monotonic()
        if wait <= 0:
            self._flush(event)
        else:
            self._timers[event] = asyncio.get_running_loop().call_later(
                wait, self._flush, event)

    def _flush(self, event: str) -> None:
        self._timers.pop(event, None)
        data = self._pending.pop(event, None)
        if data is None:
            return
        self._last_sent[event] = time.monotonic()
        self.latest[event] = _merge(event, self.latest.get(event), data)
        self.broadcast(protocol.volatile_frame(event, data), key=event)

    def close(self) -> None:
        if self._outbox_flush is not None:
            self._outbox_flush.cancel()
            self._outbox_flush = None
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


class Hub:
    """Rooms and user channels of this process; see the module docstring."""

    def __init__(self, app: Any, snapshots: Any) -> None:
        self.app = app
        self.settings = app.state.settings
        self.redis = app.state.redis
        self.node_id = app.state.node_id
        self.snapshots = snapshots
        self.rooms: dict[int, Room] = {}
        self.users: dict[str, set[Connection]] = {}
        self.connections: set[Connection] = set()
        self.heartbeat: Heartbeat | None = None  # set when heartbeats run (component)
        self.join_slots = asyncio.Semaphore(JOIN_CONCURRENCY)
        s = self.settings
        self.intervals = {"stock": s.stock_coalesce_ms / 1000,
                          "campaign.progress": s.stock_coalesce_ms / 1000,
                          "viewers": s.viewers_coalesce_ms / 1000}
        self.subscriber = Subscriber(s.redis_url, self._on_message, self._on_reconnect)

    async def start(self) -> None:
        await self.subscriber.start()

    async def stop(self) -> None:
        for room in self.rooms.values():
            room.close()
        await self.subscriber.stop()

    # -- pub/sub ------------------------------------------------------------------------
    def _on_message(self, channel: bytes, raw: bytes) -> None:
        try:
            pub = channels.parse_message(raw)
        except MalformedMessage as exc:
            log.warning("malformed publication", extra={"channel": channel, "error": str(exc)})
            return
        if pub.kind is Kind.USER:
            user_id = channel.decode()[len("{user:"):-len("}:events")]
            # The origin had it with its reply (often the user's only socket).
            conns = [c for c in self.users.get(user_id, ()) if c.conn_id != pub.origin]
            if conns:
                b = Broadcast(protocol.private_frame(pub.event, pub.data))
                for conn in conns:
                    b.deliver(conn)
            return
        drop_id = int(channel.decode().split(":", 2)[1].rstrip("}"))
        room = self.rooms.get(drop_id)
        if room is not None and room.ready.done():
            room.on_publication(pub)

    def _on_reconnect(self) -> None:
        for room in self.rooms.values():
            if room.ready.done():
                room.check_gap()

    # -- rooms ------------------------------------------------------------------------
    async def enter(self, conn: Connection, drop_id: int) -> Room:
        """Register ``conn`` as joining ``drop_id``: publications from now on are
        buffered in ``conn.pending`` until :meth:`activate`."""
        room = self.rooms.get(drop_id)
        conn.pending = []
        if room is None:
            room = self.rooms[drop_id] = Room(self, drop_id)
            room.joining.add(conn)
            metrics.ROOMS.inc()
            try:
                await self.subscriber.subscribe(room.channel)
                room.position = await history.position(self.redis, drop_id)
            except BaseException as exc:
                room.ready.set_exception(exc if isinstance(exc, Exception)
                                         else RuntimeError("subscribe cancelled"))
                room.ready.exception()
                self.rooms.pop(drop_id, None)
                metrics.ROOMS.dec()
                raise
            room.ready.set_result(None)
        else:
            if room._unsubscribe is not None:
                room._unsubscribe.cancel()
                room._unsubscribe = None
            room.joining.add(conn)
            await asyncio.shield(room.ready)
        conn.room = room
        conn.drop_id = drop_id
        return room

    def activate(self, conn: Connection, room: Room, sent_offset: int, epoch: str) -> None:
        """The join was answered up to ``(epoch, sent_offset)``: send what arrived
        since, then deliver live."""
        pending, conn.pending = conn.pending or [], None
        room.joining.discard(conn)
        if conn.closed:
            return
        # Frames still queued for this loop turn are in `pending` too: send them to
        # the viewers already in the room before this one joins it.
        room.flush_outbox()
        room.conns.add(conn)
        conn.joined = True
        volatile: dict[str, dict[str, Any]] = {}
        for pub in pending:
            if pub.kind is Kind.DURABLE:
                if pub.epoch == epoch and pub.offset <= sent_offset:
                    continue
                frame = protocol.event_frame(pub.event, pub.data, pub.epoch, pub.offset)
                Broadcast(frame).deliver(conn)
                sent_offset = pub.offset
            else:
                volatile[pub.event] = _merge(pub.event, volatile.get(pub.event), pub.data)
        for event, data in volatile.items():
            Broadcast(protocol.volatile_frame(event, data)).deliver(conn, key=event)
        self._add_user(conn)

    def leave(self, conn: Connection) -> None:
        room = conn.room
        if room is not None:
            room.conns.discard(conn)
            room.joining.discard(conn)
            conn.room = None
            if not len(room) and self.rooms.get(room.drop_id) is room:
                room._unsubscribe = asyncio.get_running_loop().call_later(
                    UNSUBSCRIBE_AFTER, self._drop_room, room)
        self._remove_user(conn)

    def _drop_room(self, room: Room) -> None:
        if len(room) or self.rooms.get(room.drop_id) is not room:
            return
        del self.rooms[room.drop_id]
        room.close()
        metrics.ROOMS.dec()
        spawn(self.subscriber.unsubscribe(room.channel))

    def _add_user(self, conn: Connection) -> None:
        user_id = conn.principal.user_id if conn.principal is not None else None
        if not user_id:
            return
        conns = self.users.get(user_id)
        if conns is None:
            conns = self.users[user_id] = set()
            # Private events are best effort until subscribed; order state is also
            # available over HTTP.
            task = spawn(
                self.subscriber.subscribe(channels.user_channel(user_id)))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        conns.add(conn)

    def _remove_user(self, conn: Connection) -> None:
        user_id = conn.principal.user_id if conn.principal is not None else None
        conns = self.users.get(user_id) if user_id else None
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            del self.users[user_id]
            spawn(
                self.subscriber.unsubscribe(channels.user_channel(user_id)))

    # -- frames -----------------------------------------------------------------------
    def joined_frame(self, room: Room, request_id: str | None, snap: dict[str, Any] | None,
                     *, recovered: bool, events: list[Publication],
                     position: history.Position | None = None) -> dict[str, Any]:
        pos = position or room.position
        frame: dict[str, Any] = {
            "t": ServerType.JOINED.value, "drop_id": room.drop_id, "node": self.node_id,
            "recovered": recovered,
            "pos": {"epoch": pos.epoch, "offset": pos.offset},
            "events": [protocol.event_frame(p.event, p.data, p.epoch, p.offset)
                       for p in events],
            "viewers": room.viewers,
        }
        if snap is not None:
            snap = dict(snap)
            snap["viewers"] = room.viewers
            frame["snapshot"] = snap
            frame["pos"] = dict(snap["pos"])
            if events:
                last = events[-1]
                frame["pos"] = {"epoch": last.epoch, "offset": last.offset}
        if "stock" in room.latest:
            frame["stock"] = room.latest["stock"]
        if request_id is not None:
            frame["id"] = request_id
        return frame

    def live_count(self) -> int:
        return len(self.connections)
