"""One viewer's socket on the send side: a bounded, two-lane queue in front of ASGI send.

Fan-out calls :meth:`Connection.deliver` for every local socket with the same
:class:`realtime.wire.Broadcast` (one encoding per publication and format).
``deliver`` never awaits:

* when nothing is queued, the message is written at once: the pre-framed bytes on
  the transport (:meth:`realtime.asgi.LeanWebSocketProtocol.write_frame`), or
  uvicorn's ``websockets-sansio`` ``send()``, which only suspends while its transport
  is paused (write buffer over the high-water mark) and writes synchronously
  otherwise, so the coroutine is stepped once; if it would suspend, nothing has been
  written yet, the coroutine is closed and the message is queued instead;
* otherwise the message joins this connection's queue, drained by a writer task that
  exists only while something is queued (idle sockets have none).

A socket whose heartbeat ping is due soon (``ping_due``, set by
:class:`realtime.heartbeat.Heartbeat` for the slice whose ping tick comes next) gets
the ping's frame appended to the first message written straight to its transport
(:meth:`realtime.wire.Broadcast.with_ping`): one ``send()`` where the ping would have
cost its own. A message that is queued or goes the ASGI way carries no ping; the
heartbeat's tick pings that socket as before.

The queue has two lanes (:class:`realtime.wire.Lane`). ``URGENT`` messages (drop
events, the buyer's private events, replies, pings) are written before any ``BULK``
one (chat batches, coalesced volatile events), so a socket that fell behind gets BUY
NOW next, not after the chat it has not read yet. Stream positions stay in order:
when a positioned urgent message (a drop event) arrives behind queued chat, that chat
is *shed*: replaced by the messages this viewer must always get (its own, the
creator's and moderators') and a ``skipped`` frame saying up to which position the
rest was left out (docs/protocol.md); the chat is still in history.

The queue is bounded in bytes (``DROPSERVER_WS_SEND_QUEUE_BYTES``). Coalescable events
carry a key ("stock", "viewers"): a newer one replaces the queued one in place. Over
the bound, queued coalescable events are dropped first; a connection that is still
over is closed with :data:`CloseCode.SLOW` (4008) and resumes with its last position.
A stalled reader costs at most the bound plus uvicorn's transport buffer, and never
delays anyone else (websockets#653, appwrite#13415).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from realtime import metrics, protocol
from realtime.protocol import CloseCode, Format
from realtime.wire import Broadcast, Lane, asgi_message

# Chat messages every socket gets even when the rest of the chat is left out
# (``data["role"]`` of ``chat.message``, set by realtime.chat).
STAFF_ROLES = frozenset({"creator", "moderator"})

__all__ = ["Connection"]

log = logging.getLogger("dropserver.realtime")

Send = Callable[[dict[str, Any]], Awaitable[None]]

_background: set[asyncio.Task] = set()  # strong references (asyncio keeps weak ones)


def spawn(coro: Any) -> asyncio.Task:
    """Run ``coro`` in a task that cannot be garbage-collected before it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


class Connection:
    __slots__ = (
        "_bulk",
        "_queued_bytes",
        "_urgent",
        "_writer",
        "auth",
        "close_code",
        "closed",
        "conn_id",
        "creator_id",
        "drop_id",
        "fmt",
        "grace",
        "handling",
        "hb_slot",
        "heard_private",
        "ip",
        "joined",
        "last_seen",
        "limit",
        "node",
        "opened_at",
        "pending",
        "ping_due",
        "principal",
        "proto",
        "room",
        "send",
        "sent_offset",
        "staff",
        "task",
    )

    def __init__(self, send: Send, fmt: Format, limit: int, conn_id: str, ip: str,
                 grace: float = 10.0) -> None:
        self.send = send
        # uvicorn's protocol behind ``send`` when it can take pre-framed bytes
        # (realtime.asgi.LeanWebSocketProtocol.write_frame); None elsewhere (tests).
        proto = getattr(send, "__self__", None)
        self.proto = proto if hasattr(proto, "write_frame") else None
        self.grace = grace  # seconds a closing socket gets to take its last frames
        self.fmt = fmt
        self.limit = limit
        self.conn_id = conn_id
        self.ip = ip
        self.principal: Any = None
        self.auth: Any = None  # realtime.tokens.TokenLife of a signed-in socket
        self.drop_id: int | None = None
        self.creator_id: str | None = None
        # The drop's staff (its creator, an admin, a moderator the creator appointed),
        # as of the join: not counted as a viewer (realtime.presence).
        self.staff = False
        self.room: Any = None
        self.joined = False
        # Publications that arrive while the join is being answered (see hub.Room).
        self.pending: list | None = None
        self.sent_offset = 0
        self.closed = False
        self.close_code: int | None = None
        self.last_seen = time.monotonic()
        self.opened_at = time.time()  # wall clock: private events since (realtime.private)
        self.heard_private: Any = None  # realtime.private.Heard, on the first private event
        # A command (join, buy, chat) is being answered: the server is not reading
        # this socket meanwhile, so its silence is ours, not the peer's.
        self.handling = False
        self.hb_slot = 0  # which heartbeat slice pings this socket (realtime.heartbeat)
        # Its ping is due soon: the next frame written straight to the transport
        # carries it (realtime.heartbeat; cleared once sent).
        self.ping_due = False
        # Queued (message, size, key, chat run) items; None while empty.
        self._urgent: collections.deque | None = None
        self._bulk: collections.deque | None = None
        self._queued_bytes = 0
        self._writer: asyncio.Task | None = None
        self.node = None
        self.task: asyncio.Task | None = None  # the ASGI handler serving this socket

    def heard(self) -> None:
        """The peer answered a heartbeat ping (the pong did not reach the app:
        :class:`realtime.asgi.LeanWebSocketProtocol`); it is alive."""
        self.last_seen = time.monotonic()
        metrics.frame_in("pong")

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def user_id(self) -> str | None:
        principal = self.principal
        return principal.user_id if principal is not None else None

    # -- fan-out side (never awaits) -------------------------------------------
    def deliver(self, b: Broadcast) -> None:
        """Write ``b`` now or queue it in its lane (see the module docstring)."""
        if self.closed:
            return
        message, size, wire = b.message(self.fmt)
        if self._writer is None and not self._urgent and not self._bulk:
            proto = self.proto
            if proto is not None:
                if self.ping_due:
                    # The heartbeat's ping rides in this write (realtime.heartbeat).
                    if proto.write_frame(b.with_ping(self.fmt)):
                        self.ping_due = False
                        return
                elif proto.write_frame(wire):
                    return
            if self._write_now(message):
                return
        self._enqueue(b, message, size)

    def _write_now(self, message: dict[str, Any]) -> bool:
        coro = self.send(message)
        try:
            coro.send(None)
        except StopIteration:
            return True
        except Exception:  # the peer is gone (ClientDisconnected, InvalidState)
            self.closed = True
            return True
        # The transport is paused: uvicorn awaits `writable` before writing anything.
        coro.close()
        return False

    def _enqueue(self, b: Broadcast, message: dict[str, Any], size: int) -> None:
        if b.lane is Lane.URGENT:
            if b.positioned and self._bulk:
                self._shed_chat()  # a drop event is not queued behind chat
            if self._urgent is None:
                self._urgent = collections.deque()
            self._urgent.append((message, size, None, None))
            self._queued_bytes += size
        else:
            bulk = self._bulk
            if bulk is None:
                bulk = self._bulk = collections.deque()
            key = b.key
            if key is not None:
                for i, (_, old_size, old_key, _run) in enumerate(bulk):
                    if old_key == key:
                        bulk[i] = (message, size, key, None)
                        self._queued_bytes += size - old_size
                        metrics.COALESCED.labels("queue").inc()
                        break
                else:
                    bulk.append((message, size, key, None))
                    self._queued_bytes += size
            else:
                bulk.append((message, size, None, b.chat))
                self._queued_bytes += size
        if self._queued_bytes > self.limit:
            self._shed_coalescable()
            if self._queued_bytes > self.limit:
                self.close_slow()
                return
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain_queue())

    def _shed_coalescable(self) -> None:
        """Drop every queued coalescable event: a newer one will come."""
        bulk = self._bulk
        if not bulk:
            return
        kept = collections.deque(item for item in bulk if item[2] is None)
        dropped = len(bulk) - len(kept)
        if dropped:
            metrics.COALESCED.labels("shed").inc(dropped)
            self._bulk = kept
            self._recount()

    def _shed_chat(self) -> None:
        """Replace the queued chat with what this viewer must always get and a
        ``skipped`` frame up to the last position it covered (urgent lane, in order
        after what is already there: those have older positions)."""
        bulk = self._bulk
        if not bulk or not any(item[3] is not None for item in bulk):
            return
        me = self.user_id
        frames: list[dict[str, Any]] = []
        left_out = 0
        last: tuple[str, int] | None = None
        rest: collections.deque = collections.deque()
        for item in bulk:
            run = item[3]
            if run is None:
                rest.append(item)
                continue
            last = (run.epoch, run.last)
            for offset, data in run.messages:
                if data.get("role") in STAFF_ROLES or (me is not None
                                                       and data.get("user_id") == me):
                    frames.append(protocol.event_frame("chat.message", data, run.epoch,
                                                       offset))
                else:
                    left_out += 1
        assert last is not None
        frames.append(protocol.skipped_frame(left_out, *last))
        metrics.CHAT_SHED.inc(left_out)
        message, size = asgi_message(protocol.encode(frames, self.fmt))
        self._bulk = rest or None
        if self._urgent is None:
            self._urgent = collections.deque()
        self._urgent.append((message, size, None, None))
        self._recount()

    def _recount(self) -> None:
        self._queued_bytes = sum(item[1] for q in (self._urgent, self._bulk) if q
                                 for item in q)

    async def _drain_queue(self) -> None:
        try:
            while not self.closed:
                if self._urgent:
                    message, size, _, _ = self._urgent.popleft()
                elif self._bulk:
                    message, size, _, _ = self._bulk.popleft()
                else:
                    break
                self._queued_bytes -= size
                await self.send(message)
        except Exception:
            self.closed = True
        finally:
            self._writer = None
            if not self._urgent:
                self._urgent = None  # idle sockets hold no deque
            if not self._bulk:
                self._bulk = None

    # -- closing ------------------------------------------------------------------
    def close_slow(self) -> None:
        metrics.SLOW_CLOSES.inc()
        log.info("slow consumer closed", extra={"conn_id": self.conn_id,
                                                "drop_id": self.drop_id,
                                                "queued_bytes": self._queued_bytes})
        self.close(CloseCode.SLOW, "slow")

    def close(self, code: int, reason: str = "", after: dict[str, Any] | None = None) -> None:
        """Stop delivering; send ``after`` (if any) then a close frame, in a task."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        self._urgent = self._bulk = None
        self._queued_bytes = 0
        spawn(self._send_close(code, reason, after))

    async def _send_close(self, code: int, reason: str, after: dict[str, Any] | None) -> None:
        try:
            async with asyncio.timeout(self.grace):
                if after is not None:
                    await self.send(after)
                await self.send({"type": "websocket.close", "code": int(code),
                                 "reason": reason})
        except TimeoutError:
            # The peer reads nothing, not even our close frame: stop serving it so
            # its task and state go now; uvicorn then closes the transport.
            if self.task is not None and not self.task.done():
                self.task.cancel()
        except Exception:
            pass  # already gone
