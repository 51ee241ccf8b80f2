"""One viewer's socket on the send side: a bounded byte queue in front of ASGI send.

Fan-out calls :meth:`Connection.deliver` for every local socket with the same
pre-built ASGI message (one encoding per publication and format). ``deliver`` never
awaits:

* when nothing is queued, the message is written at once: uvicorn's
  ``websockets-sansio`` ``send()`` only suspends while its transport is paused
  (write buffer over the high-water mark) and writes synchronously otherwise, so the
  coroutine is stepped once; if it would suspend, nothing has been written yet, the
  coroutine is closed and the message goes to the queue instead;
* otherwise the message joins this connection's queue, drained by a writer task that
  exists only while something is queued (idle sockets have none).

The queue is bounded in bytes (``DROPSERVER_WS_SEND_QUEUE_BYTES``). Coalescable
events carry a key ("stock", "viewers"): a newer one replaces the queued one in
place. Over the bound, queued coalescable events are dropped first; a connection
that is still over is closed with :data:`CloseCode.SLOW` (4008) and resumes with its
last position. A stalled reader costs at most the bound plus uvicorn's transport
buffer, and never delays anyone else (websockets#653, appwrite#13415).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from realtime import metrics
from realtime.protocol import CloseCode, Format

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
        "_queue",
        "_queued_bytes",
        "_writer",
        "close_code",
        "closed",
        "conn_id",
        "creator_id",
        "drop_id",
        "fmt",
        "grace",
        "handling",
        "hb_slot",
        "ip",
        "joined",
        "last_seen",
        "limit",
        "moderation_checked",
        "node",
        "pending",
        "principal",
        "proto",
        "room",
        "send",
        "sent_offset",
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
        self.drop_id: int | None = None
        self.creator_id: str | None = None
        self.moderation_checked = False
        self.room: Any = None
        self.joined = False
        # Publications that arrive while the join is being answered (see hub.Room).
        self.pending: list | None = None
        self.sent_offset = 0
        self.closed = False
        self.close_code: int | None = None
        self.last_seen = time.monotonic()
        # A command (join, buy, chat) is being answered: the server is not reading
        # this socket meanwhile, so its silence is ours, not the peer's.
        self.handling = False
        self.hb_slot = 0  # which heartbeat slice pings this socket (realtime.heartbeat)
        self._queue: collections.deque | None = None
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

    # -- fan-out side (never awaits) -------------------------------------------
    def deliver(self, message: dict[str, Any], size: int, key: str | None = None,
                wire: bytes | None = None) -> None:
        """Write ``message`` now or queue it; ``key`` marks a coalescable event;
        ``wire``: the same message as a WebSocket frame, ready to write."""
        if self.closed:
            return
        if self._writer is None and not self._queue:
            proto = self.proto
            if wire is not None and proto is not None and proto.write_frame(wire):
                return
            if self._write_now(message):
                return
        self._enqueue(message, size, key)

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

    def _enqueue(self, message: dict[str, Any], size: int, key: str | None) -> None:
        queue = self._queue
        if queue is None:
            queue = self._queue = collections.deque()
        if key is not None:
            for i, (_, old_size, old_key) in enumerate(queue):
                if old_key == key:
                    queue[i] = (message, size, key)
                    self._queued_bytes += size - old_size
                    metrics.COALESCED.labels("queue").inc()
                    break
            else:
                queue.append((message, size, key))
                self._queued_bytes += size
        else:
            queue.append((message, size, key))
            self._queued_bytes += size
        if self._queued_bytes > self.limit:
            self._shed()
            if self._queued_bytes > self.limit:
                self.close_slow()
                return
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain_queue())

    def _shed(self) -> None:
        """Drop every queued coalescable event: a newer one will come."""
        assert self._queue is not None
        kept = collections.deque(item for item in self._queue if item[2] is None)
        dropped = len(self._queue) - len(kept)
        if dropped:
            metrics.COALESCED.labels("shed").inc(dropped)
        self._queue = kept
        self._queued_bytes = sum(item[1] for item in kept)

    async def _drain_queue(self) -> None:
        try:
            while self._queue and not self.closed:
                message, size, _ = self._queue.popleft()
                self._queued_bytes -= size
                await self.send(message)
        except Exception:
            self.closed = True
        finally:
            self._writer = None
            if not self._queue:
                self._queue = None  # idle sockets hold no deque

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
        self._queue = None
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
