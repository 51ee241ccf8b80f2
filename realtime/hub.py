"""The process's viewers by drop and by user, and the Redis publications they get.

One channel subscription per drop with local viewers (subscribed on the first,
dropped a little after the last) and per signed-in user with a local socket; never
a global channel every node must filter (socket.io#5226). Each publication is
decoded once here and handed to its drop's :class:`realtime.room.Room`, which orders
it and fans it out through the process's :class:`realtime.dispatch.Dispatcher`
(encoded once per wire format, drop events before chat, in short slices).

The subscriber's reader never waits for a socket: handing a chat message to its room
costs a parse and an append, so a drop event read behind a burst of chat waits
microseconds, not a fan-out per message. Private events (``order.*``, a user
channel) go to that user's few sockets at once, in the urgent lane.

Joining without a gap: :meth:`Hub.enter` subscribes (waiting for Redis's
confirmation) and buffers the drop's publications for the joining socket;
:meth:`Hub.activate` sends what arrived after the join answer, then the socket is
live (docs/topics/realtime.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from realtime import channels, history, metrics, protocol
from realtime.board import FanoutBoard
from realtime.channels import Kind, MalformedMessage, Publication
from realtime.connection import Connection, spawn
from realtime.dispatch import Dispatcher
from realtime.private import Recovery
from realtime.protocol import ServerType
from realtime.room import Room, merge_volatile
from realtime.sharded_subscriber import subscriber_for
from realtime.wire import Broadcast, Lane

if TYPE_CHECKING:
    from realtime.heartbeat import Heartbeat

__all__ = ["Hub", "Room"]

log = logging.getLogger("dropserver.realtime")

UNSUBSCRIBE_AFTER = 2.0
JOIN_CONCURRENCY = 64  # joins answered at once per process (Redis/PostgreSQL pools)


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
        self.tokens: Any = None  # realtime.tokens.TokenClock (component)
        self.join_slots = asyncio.Semaphore(JOIN_CONCURRENCY)
        self.dispatcher = Dispatcher(board=FanoutBoard.from_env())
        s = self.settings
        self.intervals = {"stock": s.stock_coalesce_ms / 1000,
                          "campaign.progress": s.stock_coalesce_ms / 1000,
                          "giveaway.entries": s.stock_coalesce_ms / 1000,
                          "viewers": s.viewers_coalesce_ms / 1000}
        self.subscriber = subscriber_for(s.redis_url, self._on_message, self._on_reconnect)
        # Private events a socket missed (no user-channel history): the package that
        # owns them adds its source (checkout: the buyer's orders; drops: giveaway wins).
        self.private = Recovery(lambda user_id: self.users.get(user_id, ()),
                                self._send_private, self.redis)

    async def start(self) -> None:
        await self.subscriber.start()

    async def stop(self) -> None:
        self.private.close()
        for room in self.rooms.values():
            room.close()
        self.dispatcher.close()
        await self.subscriber.stop()

    # -- pub/sub ------------------------------------------------------------------------
    def _on_message(self, channel: bytes, raw: bytes) -> None:
        try:
            pubs = channels.parse_publications(raw)
        except MalformedMessage as exc:
            log.warning("malformed publication", extra={"channel": channel, "error": str(exc)})
            return
        if pubs[0].kind is Kind.USER:
            pub = pubs[0]
            user_id = channel.decode()[len("{user:"):-len("}:events")]
            # The origin had it with its reply (often the user's only socket).
            fresh = self.private.fresh
            conns = [c for c in self.users.get(user_id, ()) if c.conn_id != pub.origin
                     and fresh(c, pub.event, pub.data)]
            if conns:
                b = Broadcast(protocol.private_frame(pub.event, pub.data))
                for conn in conns:
                    b.deliver(conn)
            return
        drop_id = int(channel.decode().split(":", 2)[1].rstrip("}"))
        room = self.rooms.get(drop_id)
        if room is not None and room.ready.done():
            for pub in pubs:  # one creator action: leaves in one message (room outbox)
                room.on_publication(pub)

    def _on_reconnect(self) -> None:
        for room in self.rooms.values():
            if room.ready.done():
                room.check_gap()
        # User channels have no history: each socket gets its orders' current state
        # that it has not heard (realtime.private).
        self.private.request(list(self.users))

    def _send_private(self, conn: Connection, event: str, data: dict[str, Any]) -> None:
        Broadcast(protocol.private_frame(event, data)).deliver(conn)

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
        volatile: dict[str, dict[str, Any]] = {}
        for pub in pending:
            if pub.kind is Kind.DURABLE:
                if pub.epoch == epoch and pub.offset <= sent_offset:
                    continue
                frame = protocol.event_frame(pub.event, pub.data, pub.epoch, pub.offset)
                Broadcast(frame, positioned=True).deliver(conn)
                epoch, sent_offset = pub.epoch, pub.offset
            else:
                volatile[pub.event] = merge_volatile(pub.event, volatile.get(pub.event),
                                                     pub.data)
        room.joined(conn, epoch, sent_offset)
        conn.joined = True
        for event, data in volatile.items():
            Broadcast(protocol.volatile_frame(event, data), lane=Lane.BULK,
                      key=event).deliver(conn)
        self._add_user(conn)

    def leave(self, conn: Connection) -> None:
        room = conn.room
        if room is not None:
            room.discard(conn)
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

    def sign_in(self, conn: Connection) -> None:
        """``conn`` gets its user's private events (again: realtime/tokens.py)."""
        self._add_user(conn)

    def sign_out(self, conn: Connection) -> None:
        """``conn`` stops getting its user's private events (its token expired)."""
        self._remove_user(conn)

    def _add_user(self, conn: Connection) -> None:
        user_id = conn.user_id
        if not user_id:
            return
        conns = self.users.get(user_id)
        if conns is None:
            conns = self.users[user_id] = set()
            # What was published to the user before the subscription was confirmed
            # is recovered once it is (realtime.private).
            task = spawn(self._subscribe_user(user_id))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.private.joined(user_id, conn)
        conns.add(conn)

    async def _subscribe_user(self, user_id: str) -> None:
        # A subscribe that gives up (Redis slow or failing over, this process starved)
        # leaves the channel wanted by the subscriber; it is awaited again until
        # confirmed, then the user's sockets are sent what they missed meanwhile.
        channel = channels.user_channel(user_id)
        delay = 0.5
        while True:
            try:
                await self.subscriber.subscribe(channel)
                break
            except Exception as exc:
                if user_id not in self.users:
                    return
                log.warning("user channel not subscribed yet; waiting again",
                            extra={"user_id": user_id,
                                   "error": f"{type(exc).__name__}: {exc}"[:200]})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.private.request((user_id,))

    def _remove_user(self, conn: Connection) -> None:
        user_id = conn.user_id
        conns = self.users.get(user_id) if user_id else None
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        self.private.left(user_id, conn)
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
