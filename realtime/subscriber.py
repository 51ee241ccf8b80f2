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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from realtime import metrics

__all__ = ["Subscriber"]

log = logging.getLogger("dropserver.realtime")

PING_EVERY = 5.0
SILENT_LIMIT = 15.0


class Subscriber:
    def __init__(self, redis_url: str, on_message: Callable[[bytes, bytes], None],
                 on_reconnect: Callable[[], None]) -> None:
        self._url = redis_url
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._client: Any = None
        self._pubsub: Any = None
        self._wanted: set[bytes] = set()
        self._waiters: dict[bytes, list[asyncio.Future]] = {}
        self._task: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._stopping = False
        self.reconnects = 0

    async def start(self) -> None:
        # No retries inside redis-py: a failure must reach the loop below.
        self._client = aioredis.Redis.from_url(
            self._url, decode_responses=False, retry=Retry(NoBackoff(), 0),
            socket_keepalive=True, socket_connect_timeout=5)
        await self._connect(first=True)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pubsub")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
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
        if self._connected.is_set():
            with contextlib.suppress(Exception):  # the reader notices a dead connection
                await self._pubsub.subscribe(name)
        # While disconnected, the reconnect subscribes to every wanted channel.
        async with asyncio.timeout(wait):
            await fut

    async def unsubscribe(self, channel: str) -> None:
        name = channel.encode()
        self._wanted.discard(name)
        if self._connected.is_set():
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(name)

    async def kill_connection_for_tests(self) -> None:  # pragma: no cover - debugging aid
        await self._drop_connection()

    # -- internals ------------------------------------------------------------------
    async def _connect(self, first: bool = False) -> None:
        pubsub = self._client.pubsub()
        await pubsub.ping()  # opens the connection
        if self._wanted:
            await pubsub.subscribe(*self._wanted)
        self._pubsub = pubsub
        self._connected.set()
        if not first:
            self.reconnects += 1
            metrics.RESUBSCRIBES.inc()
            log.warning("pubsub reconnected; filling gaps from history",
                        extra={"channels": len(self._wanted), "reconnects": self.reconnects})
            self._on_reconnect()

    async def _drop_connection(self) -> None:
        self._connected.clear()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                if self._pubsub is None:
                    await self._connect()
                    backoff = 0.05
                await self._read_until_error()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pubsub connection lost", extra={
                    "error": f"{type(exc).__name__}: {exc}"[:200]})
                await self._drop_connection()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _read_until_error(self) -> None:
        pubsub = self._pubsub
        last_heard = last_ping = time.monotonic()
        while True:
            msg = await pubsub.get_message(timeout=PING_EVERY)
            now = time.monotonic()
            if msg is None:
                if now - last_heard > SILENT_LIMIT:
                    raise ConnectionError(f"no reply from Redis for {SILENT_LIMIT:.0f} s")
                if now - last_ping >= PING_EVERY:
                    await pubsub.ping()
                    last_ping = now
                continue
            last_heard = now
            kind = msg["type"]
            if kind == "message":
                try:
                    self._on_message(msg["channel"], msg["data"])
                except Exception:
                    log.exception("publication handler failed")
            elif kind == "subscribe":
                for fut in self._waiters.pop(msg["channel"], ()):
                    if not fut.done():
                        fut.set_result(None)
