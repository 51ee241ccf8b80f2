"""The process's one Redis pub/sub connection, which never goes silently deaf.

redis-py's ``PubSub`` reconnects and resubscribes on its own, which would hide a lost
connection and the publications missed meanwhile (python-socketio#1581: a worker
deaf for 24 h after Redis killed its subscriber over the output-buffer limit). Here
the subscriber owns the connection: any error, or 15 s without a byte (PINGs are sent
every 5 s), drops it; a fresh one subscribes to every wanted channel again, the loss
is logged and counted (``dropserver_pubsub_resubscribes_total``), and
``on_reconnect`` lets the hub fill the gap from each drop's history.

:meth:`subscribe` returns once Redis confirmed the subscription, so a history read
made afterwards cannot miss a publication that the channel did not deliver.

The connection is redis-py's own :class:`~redis.asyncio.connection.Connection`
(the URL's AUTH, SELECT, TLS; the hiredis parser), read directly: ``PubSub.get_message``
wraps every message in a retry helper and a timeout, ~20 us a message, and under a
rush every hold brings one (its ``order.held``). Silence is caught by one timer per
connection instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from dropserver.background import stop_task
from realtime import metrics
from realtime.connection import spawn

__all__ = ["Subscriber"]

log = logging.getLogger("dropserver.realtime")

PING_EVERY = 5.0
SILENT_LIMIT = 15.0


class Subscriber:
    # The pub/sub dialect: classic here; sharded (SSUBSCRIBE) for one shard of a
    # cluster in realtime.sharded_subscriber.
    SUBSCRIBE = "SUBSCRIBE"
    UNSUBSCRIBE = "UNSUBSCRIBE"
    MESSAGE = b"message"
    CONFIRMED = b"subscribe"

    def __init__(self, redis_url: str, on_message: Callable[[bytes, bytes], None],
                 on_reconnect: Callable[[], None], *, ping_every: float = PING_EVERY,
                 silent_limit: float = SILENT_LIMIT) -> None:
        self._url = redis_url
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._ping_every = ping_every
        self._silent_limit = silent_limit
        self._client: Any = None
        self._conn: Any = None  # the live connection, None while (re)connecting
        self._wanted: set[bytes] = set()
        self._waiters: dict[bytes, list[asyncio.Future]] = {}
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._heard = 0  # replies read on the live connection (the watchdog compares)
        self._silent: str | None = None  # why the watchdog dropped the connection
        self._watchdog: asyncio.TimerHandle | None = None
        self.reconnects = 0

    async def start(self) -> None:
        # RESP2: in RESP3 publications arrive as pushes, which the reader below
        # would hand to redis-py's push handler instead of returning them.
        self._client = self._make_client()
        await self._connect(first=True)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pubsub")

    def _make_client(self) -> Any:
        return aioredis.Redis.from_url(
            self._url, decode_responses=False, protocol=2, socket_keepalive=True,
            socket_connect_timeout=5)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await stop_task(self._task, log)
        await self._drop_connection()
        if self._client is not None:
            await self._client.aclose()

    @property
    def channels(self) -> set[bytes]:
        return set(self._wanted)

    async def subscribe(self, channel: str, wait: float = 5.0) -> None:
        """Subscribe and wait for Redis's confirmation."""
        name = channel.encode()
        self._wanted.add(name)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(name, []).append(fut)
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the reader notices a dead connection
                await self._send(self._conn, self.SUBSCRIBE, name)
        # While disconnected, the reconnect subscribes to every wanted channel.
        async with asyncio.timeout(wait):
            await fut

    async def unsubscribe(self, channel: str) -> None:
        name = channel.encode()
        self._wanted.discard(name)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._send(self._conn, self.UNSUBSCRIBE, name)

    async def kill_connection_for_tests(self) -> None:  # pragma: no cover - debugging aid
        await self._drop_connection()

    # -- internals ------------------------------------------------------------------
    @staticmethod
    async def _send(conn: Any, *args: Any) -> None:
        await conn.send_packed_command(conn.pack_command(*args), check_health=False)

    async def _connect(self, first: bool = False) -> None:
        conn = self._client.connection_pool.make_connection()
        conn.socket_timeout = None  # reads wait for publications; the watchdog bounds silence
        try:
            async with asyncio.timeout(self._silent_limit):
                await conn.connect()
                await self._send(conn, "PING")
                pong = await conn.read_response(timeout=math.inf)
                if pong not in (b"PONG", "PONG", True):
                    raise ConnectionError(f"unexpected answer to PING: {pong!r}")
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        # Live before the SUBSCRIBE below: a subscribe() meanwhile sends its own (a
        # second confirmation is harmless) instead of waiting for one never asked for.
        self._conn = conn
        if self._wanted:  # confirmations are read (and waiters woken) by the reader
            try:
                await self._subscribe_all(conn)
            except BaseException:
                await self._drop_connection()
                raise
        if not first:
            self.reconnects += 1
            metrics.RESUBSCRIBES.inc()
            log.warning("pubsub reconnected; filling gaps from history",
                        extra={"channels": len(self._wanted), "reconnects": self.reconnects})
            self._on_reconnect()

    async def _subscribe_all(self, conn: Any) -> None:
        await self._send(conn, self.SUBSCRIBE, *self._wanted)

    def _lost(self) -> None:
        """The connection failed (a hook: a cluster's shard link reports it)."""

    def _unsubscribed(self, channel: bytes) -> None:
        """Redis ended a subscription nobody asked to end (a hook: a cluster does
        that to a shard channel whose slot moved to another node)."""

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                if self._conn is None:
                    await self._connect()
                    backoff = 0.05
                await self._read_until_error(self._conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error, self._silent = self._silent or f"{type(exc).__name__}: {exc}", None
                log.warning("pubsub connection lost", extra={"error": error[:200]})
                await self._drop_connection()
                self._lost()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _read_until_error(self, conn: Any) -> None:
        self._silent = None
        self._watchdog = asyncio.get_running_loop().call_later(
            self._ping_every, self._check, conn, self._heard, time.monotonic())
        on_message, waiters = self._on_message, self._waiters
        message, confirmed = self.MESSAGE, self.CONFIRMED
        try:
            while True:
                reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
                self._heard += 1
                kind = reply[0]
                if kind == message:
                    try:
                        on_message(reply[1], reply[2])
                    except Exception:
                        log.exception("publication handler failed")
                elif kind == confirmed:
                    for fut in waiters.pop(reply[1], ()):
                        if not fut.done():
                            fut.set_result(None)
                elif kind == b"sunsubscribe" and reply[1] in self._wanted:
                    self._unsubscribed(reply[1])
                # "pong" (the watchdog's PING) and "unsubscribe": heard, nothing to do
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None

    def _check(self, conn: Any, heard: int, last_heard: float) -> None:
        """Every ``ping_every`` s: PING, and drop ``conn`` after ``silent_limit`` of silence."""
        self._watchdog = None
        if conn is not self._conn:
            return
        now = time.monotonic()
        if self._heard != heard:
            heard, last_heard = self._heard, now
        elif now - last_heard > self._silent_limit:
            self._silent = f"no reply from Redis for {self._silent_limit:g} s"
            spawn(self._drop_connection())  # ends the read; _run logs it and reconnects
            return
        spawn(self._ping(conn))
        self._watchdog = asyncio.get_running_loop().call_later(
            self._ping_every, self._check, conn, heard, last_heard)

    async def _ping(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # a dead connection: the reader sees it
            await self._send(conn, "PING")
