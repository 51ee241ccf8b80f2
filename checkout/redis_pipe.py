"""Auto-pipelining on one Redis connection: the buy path's Redis adapter.

Under a rush thousands of buys wait on Redis at once. redis-py sends a pipeline as
one write, but each one also checks a connection out of the pool and back, wraps the
send in ``wait_for`` (a task) and every reply in a timeout (a timer), and walks its
per-command bookkeeping: in the buy benchmark's profile that was most of the cost of
the script call on the worker's side. :class:`AutoPipeline` does what ioredis calls
auto-pipelining instead: every command issued in one event-loop turn goes out in a
single write on one dedicated connection, and the replies, which Redis sends in order,
are matched to their callers first in, first out. A batch waits for no earlier one.

It is built on redis-py's own :class:`~redis.asyncio.connection.Connection` (the
client's URL, so AUTH, SELECT, TLS and the hiredis parser are redis-py's), used for
bytes in and replies out only. Error replies are raised to their own caller
(redis-py's exception classes, e.g. ``NoScriptError``); they do not disturb the
others. A lost connection fails every command in flight with ``ConnectionError``
and the next command connects again: a command that was in flight may or may not
have run, which is why every buy carries an idempotency key. A reply slower than
``timeout`` seconds closes the connection the same way, checked by one timer per
connection rather than one per command.

With ``wait_replicas=N`` every write ends with ``WAIT N timeout`` and no reply of that
write reaches its caller before Redis says N replicas have everything the connection
wrote so far: one replication round trip per batch, not per command. A batch that
fewer replicas confirmed in time fails to its callers with :class:`NotReplicated`
(a timeout: the commands did run on the primary, a failover may lose them), except
for commands that failed anyway, which get their own error. This is how a buy is
acknowledged only once a failover cannot take its hold away (docs/operations.md).

A primary with fewer replicas connected than wanted (its replica died, or was just
promoted away from it) has nobody a failover could promote, so waiting protects
nothing there: when a WAIT falls short, ``ROLE`` is asked, and if every connected
replica confirmed, the batch is answered and the next second's batches go without
WAIT (``dropserver_redis_unreplicated_seconds_total`` counts that time, and it is
logged). A hold acknowledged then can still be lost if this primary dies before a
replica is back: that is the case of a single Redis lost, which the hold journal
and the rebuild from PostgreSQL repair (checkout.journal, checkout.recovery).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from typing import Any

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dropserver.background import stop_task

__all__ = ["AutoPipeline", "NotReplicated"]

UNREPLICATED = Counter("dropserver_redis_unreplicated_seconds_total",
                       "Seconds the buy path answered without waiting for a replica "
                       "because its Redis primary had none connected")

log = logging.getLogger("dropserver.checkout")


try:  # hiredis' reader, as redis-py's parser sets it up (its "not enough data" mark)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
    from redis._parsers.hiredis import _AsyncHiredisParser
except ImportError:  # another redis-py: every reply through read_response
    _NOT_ENOUGH_DATA = _AsyncHiredisParser = None  # type: ignore[assignment,misc]


def _buffered_replies(conn: Any) -> Any:
    """``gets`` of ``conn``'s hiredis reader: the next complete reply already read in
    (``_NOT_ENOUGH_DATA`` when there is none); None where every reply must go through
    ``read_response`` (no hiredis parser)."""
    parser = getattr(conn, "_parser", None)
    if _AsyncHiredisParser is None or type(parser) is not _AsyncHiredisParser:
        return None
    reader = getattr(parser, "_reader", None)
    return None if reader is None else reader.gets


class NotReplicated(RedisTimeoutError):
    """Fewer replicas than wanted confirmed a batch in time (``WAIT``)."""


class AutoPipeline:
    """Commands issued in one loop turn go to Redis in one write on one connection.

    ``max_batch`` bounds one write; more commands go out in several writes in the
    same turn, in order. ``wait_replicas``/``wait_timeout_ms``: see the module.
    """

    def __init__(self, redis: Redis, *, timeout: float = 5.0, max_batch: int = 512,
                 wait_replicas: int = 0, wait_timeout_ms: int = 200) -> None:
        self.redis = redis
        self.timeout = timeout
        self.max_batch = max_batch
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._unreplicated_until = 0.0  # no replica to wait for: no WAIT until then
        self._packer = redis.connection_pool.make_connection()  # never connected
        self._conn: Any = None  # the live connection, None until (re)connected
        self._reader: asyncio.Task | None = None
        self._flusher: asyncio.Task | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._queue: list[tuple[bytes, asyncio.Future]] = []
        # Sent, reply not read yet, in order: (future, monotonic time sent).
        self._inflight: collections.deque[tuple[asyncio.Future, float]] = collections.deque()
        self._closed = False

    # -- issuing commands -------------------------------------------------------
    def execute(self, *args: Any) -> asyncio.Future:
        """Queue one command; the future gets its reply (or the error it raised)."""
        if self._closed:
            raise RedisConnectionError("the pipeline is closed")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((b"".join(self._packer.pack_command(*args)), fut))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return fut

    async def _flush(self) -> None:
        """Runs once per loop turn with commands: everything queued goes out."""
        try:
            conn = self._conn
            if conn is None:
                conn = await self._connect()
        except asyncio.CancelledError:
            self._flusher = None
            self._fail_queue(RedisConnectionError("the pipeline is closed"))
            raise
        except Exception as exc:
            self._flusher = None
            self._fail_queue(exc if isinstance(exc, RedisConnectionError | RedisTimeoutError)
                             else RedisConnectionError(f"cannot reach Redis: {exc}"))
            return
        queue, self._queue = self._queue, []
        if self.wait_replicas > 0 and time.monotonic() >= self._unreplicated_until:
            queue = self._replicated(queue)
        now = time.monotonic()
        chunks = []
        for i in range(0, len(queue), self.max_batch):
            chunk = queue[i:i + self.max_batch]
            chunks.append(b"".join(packed for packed, _ in chunk))
            self._inflight.extend((fut, now) for _, fut in chunk)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(
                min(self.timeout, 1.0), self._check)
        self._flusher = None  # commands issued from here on need another flush
        # These commands are in flight now: a failed write closes the connection and
        # the reader fails them; commands queued meanwhile belong to the next flush.
        with contextlib.suppress(Exception):
            await conn.send_packed_command(chunks, check_health=False)

    def _replicated(self, queue: list[tuple[bytes, asyncio.Future]],
                    ) -> list[tuple[bytes, asyncio.Future]]:
        """``queue`` followed by a WAIT; its callers hear back after the WAIT."""
        loop = asyncio.get_running_loop()
        pairs = [(loop.create_future(), fut) for _, fut in queue]
        wait = loop.create_future()
        wanted = self.wait_replicas

        def settle(done: asyncio.Future, ok: bool | None = None) -> None:
            if ok is None:
                failed = done.cancelled() or done.exception() is not None
                if not failed and int(done.result()) < wanted:
                    # Short: lagging replicas, or none to wait for? ROLE says.
                    task = asyncio.ensure_future(self._replicas_connected())
                    task.add_done_callback(
                        lambda t: settle(done, ok=not t.cancelled() and t.exception() is None
                                         and t.result() <= int(done.result())))
                    return
                ok = not failed
            for inner, outer in pairs:
                if outer.done():
                    continue
                if not inner.done() or inner.cancelled():
                    outer.set_exception(RedisConnectionError("connection lost"))
                elif inner.exception() is not None:
                    outer.set_exception(inner.exception())  # type: ignore[arg-type]
                elif ok:
                    outer.set_result(inner.result())
                else:
                    outer.set_exception(NotReplicated(
                        f"fewer than {wanted} replica(s) confirmed the write in "
                        f"{self.wait_timeout_ms} ms"))

        wait.add_done_callback(settle)
        packed_wait = b"".join(self._packer.pack_command("WAIT", wanted,
                                                         self.wait_timeout_ms))
        return [*((packed, inner) for (packed, _), (inner, _) in zip(queue, pairs,
                                                                      strict=True)),
                (packed_wait, wait)]

    async def _replicas_connected(self) -> int:
        """Replicas connected to this primary now; below ``wait_replicas``, the next
        second's batches go without WAIT (see the module)."""
        role = await self.redis.execute_command("ROLE")
        connected = len(role[2]) if len(role) > 2 else 0
        if connected < self.wait_replicas:
            if time.monotonic() >= self._unreplicated_until + 1.0:
                log.warning("redis primary has no replica to confirm holds; answering "
                            "without WAIT", extra={"replicas": connected,
                                                   "wanted": self.wait_replicas})
            self._unreplicated_until = time.monotonic() + 1.0
            UNREPLICATED.inc(1.0)
        return connected

    async def _connect(self) -> Any:
        conn = self.redis.connection_pool.make_connection()
        # Replies are bounded by the watchdog (_check), not by a timer per read, and
        # writes are plain transport writes, not a wait_for task each.
        conn.socket_timeout = None
        await conn.connect()
        self._conn = conn
        self._reader = asyncio.ensure_future(self._read(conn))
        return conn

    def _fail_queue(self, exc: Exception) -> None:
        queue, self._queue = self._queue, []
        for _, fut in queue:
            if not fut.done():
                fut.set_exception(exc)

    # -- replies ------------------------------------------------------------------
    async def _read(self, conn: Any) -> None:
        inflight = self._inflight
        # The replies already read in after the one awaited are taken straight from
        # hiredis' reader: redis-py's read_response per reply was most of this task's
        # time in a rush (docs/benchmarks.md, "Buy path"); redis-py still reads the
        # socket and raises what it raises.
        buffered = _buffered_replies(conn)
        push = getattr(getattr(conn, "_parser", None), "_hiredis_PushNotificationType",
                       None)
        try:
            while True:
                try:
                    reply = await conn.read_response(timeout=math.inf,
                                                     disconnect_on_error=False)
                except ResponseError as exc:
                    reply = exc
                while True:
                    if not inflight:
                        raise RedisConnectionError("a reply that nobody asked for")
                    fut, _ = inflight.popleft()
                    if not fut.done():  # done: its caller was cancelled
                        if isinstance(reply, Exception):
                            fut.set_exception(reply)
                        else:
                            fut.set_result(reply)
                    if buffered is None:
                        break
                    reply = buffered()
                    if reply is _NOT_ENOUGH_DATA:
                        break
                    if isinstance(reply, RedisConnectionError) or (
                            isinstance(reply, list) and reply
                            and isinstance(reply[0], RedisConnectionError)):
                        raise reply if isinstance(reply, Exception) else reply[0]
                    if push is not None and isinstance(reply, push):
                        # RESP3 out of band (none is asked for here): handled as
                        # read_response does, and the replies go on from there.
                        await conn._parser.handle_push_response(reply)
                        break
        except asyncio.CancelledError:
            self._lost(conn, RedisConnectionError("the pipeline is closed"))
            raise
        except Exception as exc:
            if not self._closed:
                log.warning("auto-pipeline connection lost",
                            extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
            self._lost(conn, exc if isinstance(exc, RedisConnectionError | RedisTimeoutError)
                       else RedisConnectionError(str(exc)))
        finally:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    def _lost(self, conn: Any, exc: Exception) -> None:
        """``conn`` is dead: every command in flight on it fails, the next connects."""
        if self._conn is not conn:
            return
        self._conn = None
        inflight, self._inflight = self._inflight, collections.deque()
        for fut, _ in inflight:
            if not fut.done():
                fut.set_exception(exc)

    def _check(self) -> None:
        self._watchdog = None
        if not self._inflight:
            return
        if time.monotonic() - self._inflight[0][1] > self.timeout:
            log.warning("redis did not answer in time; reconnecting",
                        extra={"timeout_s": self.timeout, "in_flight": len(self._inflight)})
            self._lost(self._conn, RedisTimeoutError(f"no reply from Redis in {self.timeout} s"))
            if self._reader is not None:
                self._reader.cancel()
            return
        self._watchdog = asyncio.get_running_loop().call_later(min(self.timeout, 1.0),
                                                               self._check)

    # -- lifecycle ----------------------------------------------------------------
    async def aclose(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in (self._flusher, self._reader):
            if task is not None:
                await stop_task(task, log)
        self._fail_queue(RedisConnectionError("the pipeline is closed"))
        if self._conn is not None:
            self._lost(self._conn, RedisConnectionError("the pipeline is closed"))
