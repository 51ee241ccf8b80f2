"""Order workers: the consumer group that feeds order stream entries to the processor.

The reservation script appends ``type=reserve`` and ``type=release`` entries to each
drop's stream ``{drop:<id>}:orders`` (format: docs/topics/checkout.md). Every process
runs ``DROPSERVER_ORDER_WORKERS`` :class:`OrderWorker` consumers in the consumer group
``orders`` of every active drop's stream (the drops in the set ``checkout:drops`` that
prewarm/open_sales fill) and hands each entry to :class:`checkout.orders.OrderProcessor`;
entries of one hold run in stream order, different holds concurrently.

**Outages are waited out, never dead-lettered.** An entry failing because PostgreSQL,
Redis or the gateway is away (:func:`checkout.retry.is_outage`: refused, reset,
shutting down, starting up, too many connections, timeouts, 5xx) is retried with
backoff (0.1 s doubling, capped at 1 s, full jitter) for as long as the outage lasts,
while its hold is alive and after: once the outage ends, a hold that lapsed meanwhile
is recorded ``expired`` and never charged, and its buyer hears ``order.expired``. The
worker keeps the entries it is working on claimed (``XCLAIM ... JUSTID`` every third of
``DROPSERVER_ORDER_CLAIM_IDLE_MS``), so a long outage does not make other consumers
re-claim them and count deliveries.

**Crashes.** A consumer that dies leaves its entries pending; every consumer
periodically XAUTOCLAIMs entries idle longer than ``DROPSERVER_ORDER_CLAIM_IDLE_MS``
and runs them again (every step is idempotent).

**On a Redis Cluster** each drop's stream is on its drop's slot, and a cluster refuses
a command whose keys are on different slots: a round reads the streams with one
blocking XREADGROUP per slot, side by side (one for all of them on one Redis);
claims and acknowledgements are per stream anyway.

**Only what a failover keeps.** On a Redis with replicas (``DROPSERVER_HOLD_REPLICAS``,
a cluster by default) a buy is acknowledged only once a replica has its hold, but the
reservation script wrote the hold and its stream entry on the primary before that, and
a worker reading the stream there would record in PostgreSQL a hold that a failover
then loses: PostgreSQL ahead of the promoted replica, whose buyer counter is behind,
so it gives the same buyer numbers again -- to acknowledged holds, whose rows then
conflict (seen as dead letters "buyer number N is another order's", under load, in
tests/test_cluster_failover.py). So a worker first waits, per stream and batch, until
the replicas have what it read (:class:`ReplicationFence`: the batch's last entry
still in the stream, a write, and the ``WAIT`` the pipeline sends after it), while the
replicas lag as through an outage; entries the primary no longer has (a failover lost
them: a batch's tail) are left unprocessed, like the holds they describe, and the
batch's entries before them are processed.

**Dead letters** (:mod:`checkout.dead_letters`): a malformed entry, one the rules
refuse, one that fails ``DROPSERVER_ORDER_MAX_ATTEMPTS`` times with an error that is
not an outage, or a reserve entry delivered more than ``max_deliveries`` times whose
hold has lapsed (it keeps killing the processes that take it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from checkout import keys
from checkout.dead_letters import dead_letter
from checkout.order_entries import BadEntry, ReserveEntry, fields_text, parse_entry
from checkout.orders import OrderProcessor
from checkout.reserve import auto_pipeline, hot_path_client
from checkout.retry import backoff, is_outage, until_done
from dropserver.background import stop_task
from dropserver.redis_client import is_cluster

__all__ = ["GROUP", "OrderWorker", "ReplicationFence"]

log = logging.getLogger("dropserver.orders")

GROUP = "orders"

ORDERS_PROCESSED = Counter("dropserver_orders_processed_total",
                           "Order stream entries processed", ["type", "result"])
ORDER_SECONDS = Histogram("dropserver_order_processing_seconds",
                          "Time from reading an order entry to its XACK")
ORDER_RETRIES = Counter("dropserver_order_retries_total",
                        "Order entries retried after a failure (outages included)")


def _id(entry_id: Any) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


# On the primary that holds the stream: the newest entry still there between the
# batch's first and last (a failover may have lost the batch's tail: replication is in
# order, so every entry older than one still there is there too; nil: none is), and a
# write, so that the WAIT the pipeline sends after it covers everything this primary
# had when the entries were read.
_FENCE = """
local newest = redis.call('XREVRANGE', KEYS[1], ARGV[2], ARGV[1], 'COUNT', 1)[1]
if not newest then return false end
redis.call('SET', KEYS[2], newest[1], 'PX', 60000)
return newest[1]
"""


def _order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as the stream orders it."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class ReplicationFence:
    """Whether entries read from a stream are on ``replicas`` replicas (see the module
    docstring), over a connection of its own per primary (an auto-pipeline with
    ``WAIT``, as the buy path's; its fallback for a primary without connected replicas
    included). :meth:`check` raises :class:`~checkout.redis_pipe.NotReplicated` (an
    outage) while they lag."""

    def __init__(self, url: str, *, replicas: int, timeout_ms: int) -> None:
        self.redis = hot_path_client(url, max_connections=8)
        self.pipe = auto_pipeline(self.redis, wait_replicas=replicas,
                                  wait_timeout_ms=timeout_ms)

    async def check(self, stream: str, first_id: str, last_id: str) -> str | None:
        """Once the replicas have the stream up to it: the newest entry from
        ``first_id`` to ``last_id`` the primary still has (the entries up to it are
        there); None when it has none of them."""
        newest = await self.pipe.execute("EVAL", _FENCE, 2, stream, f"{stream}:fence",
                                         first_id, last_id)
        return None if newest is None else _id(newest)

    async def aclose(self) -> None:
        await self.pipe.aclose()
        await self.redis.aclose()


class OrderWorker:
    """One consumer of the ``orders`` group on every active drop's stream."""

    def __init__(self, redis: Redis, processor: OrderProcessor, *, consumer: str,
                 claim_idle_ms: int = 15000, max_attempts: int = 5,
                 max_deliveries: int = 10, batch: int = 32, block_ms: int = 1000,
                 concurrency: int = 32, fence: ReplicationFence | None = None) -> None:
        self.redis = redis
        self.fence = fence
        self.processor = processor
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.max_attempts = max_attempts
        self.max_deliveries = max_deliveries
        self.batch = batch
        self.block_ms = block_ms
        self._sem = asyncio.Semaphore(concurrency)
        self._streams: set[str] = set()
        self._last_refresh = 0.0
        self._last_claim = 0.0
        self._in_flight: dict[tuple[str, str], float] = {}  # (stream, id) -> started
        self._task: asyncio.Task | None = None
        self._keeper: asyncio.Task | None = None
        self._stopping = False
        self._loop_errors = 0

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"order-worker:{self.consumer}")
        self._keeper = asyncio.create_task(self._keep_claimed(),
                                           name=f"order-worker-claims:{self.consumer}")

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._task, self._keeper):
            if task is not None:
                await stop_task(task, log)
        self._task = self._keeper = None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.run_once()
                self._loop_errors = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis away: the entries wait in the stream. Log the first failure
                # and then every 60th, retry about once a second.
                if self._loop_errors % 60 == 0:
                    log.warning("order worker loop failed; retrying", exc_info=not
                                is_outage(exc), extra={"error": f"{type(exc).__name__}: "
                                                                f"{exc}"[:300]})
                self._loop_errors += 1
                await asyncio.sleep(backoff(self._loop_errors, cap=1.0))

    async def _keep_claimed(self) -> None:
        """Reset the idle time of the entries this consumer is working on (a long
        outage must not look like a dead consumer), without counting a delivery."""
        interval = max(self.claim_idle_ms / 3000, 0.05)
        while True:
            await asyncio.sleep(interval)
            by_stream: dict[str, list[str]] = {}
            for stream, eid in list(self._in_flight):
                by_stream.setdefault(stream, []).append(eid)
            for stream, ids in by_stream.items():
                try:
                    await self.redis.xclaim(stream, GROUP, self.consumer, 0, ids,
                                            justid=True)
                except Exception:  # Redis away, or the stream gone with a rebuild
                    pass

    # -- one round ---------------------------------------------------------
    async def refresh_streams(self, force: bool = False) -> set[str]:
        now = time.monotonic()
        if not force and now - self._last_refresh < 1.0:
            return self._streams
        self._last_refresh = now
        drop_ids = await self.redis.smembers(keys.ACTIVE_DROPS)
        for raw in drop_ids:
            stream = keys.orders(int(raw))
            if stream not in self._streams:
                try:
                    await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self._streams.add(stream)
        return self._streams

    async def run_once(self) -> int:
        """Claim stale entries, then read new ones; returns how many were handled."""
        streams = await self.refresh_streams()
        if not streams:
            await asyncio.sleep(min(self.block_ms / 1000, 0.5))
            return 0
        handled = 0
        if time.monotonic() - self._last_claim >= self.claim_idle_ms / 2000:
            self._last_claim = time.monotonic()
            handled += await self.claim_stale()
        # One XREADGROUP per hash slot, side by side: a cluster refuses a command whose
        # keys are in different slots (drops' streams are, each on its drop's slot).
        replies = await asyncio.gather(*(self._read(group)
                                         for group in self._read_groups(streams)),
                                       return_exceptions=True)
        failure: BaseException | None = None
        for reply in replies:
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                # a stream was deleted (Redis restarted, recovery rebuilt the drop):
                # forget what we know and create the groups again on the next round
                self._streams.clear()
                self._last_refresh = 0.0
                continue
            if isinstance(reply, BaseException):
                failure = failure or reply
                continue
            for stream, entries in reply or []:
                name = stream.decode() if isinstance(stream, bytes) else stream
                await self._handle_batch(name, entries, delivered=1)
                handled += len(entries)
        if failure is not None:
            raise failure
        return handled

    async def _read(self, streams: list[str]) -> Any:
        """One XREADGROUP of ``streams``, made inside gather's task: redis-py's async
        ``xreadgroup`` makes the command's coroutine when called and returns a wrapper
        awaiting it, so a wrapper handed to gather and cancelled before its task first
        ran (the worker stopped in that loop turn) left the command's coroutine never
        awaited. This coroutine, closed unstarted, has made nothing."""
        return await self.redis.xreadgroup(GROUP, self.consumer, dict.fromkeys(streams, ">"),
                                           count=self.batch, block=self.block_ms)

    def _read_groups(self, streams: set[str]) -> list[list[str]]:
        """The streams to read in one XREADGROUP each: all of them on one Redis, one
        list per hash slot on a cluster."""
        if not is_cluster(self.redis):
            return [sorted(streams)]
        by_slot: dict[int, list[str]] = {}
        for stream in sorted(streams):
            by_slot.setdefault(key_slot(stream.encode()), []).append(stream)
        return list(by_slot.values())

    async def claim_stale(self) -> int:
        """XAUTOCLAIM entries another consumer read and never acknowledged."""
        handled = 0
        for stream in sorted(set(self._streams)):
            start = "0-0"
            while True:
                try:
                    reply = await self.redis.xautoclaim(
                        stream, GROUP, self.consumer, min_idle_time=self.claim_idle_ms,
                        start_id=start, count=self.batch)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    self._streams.discard(stream)
                    break
                start = reply[0]
                entries = [x for x in reply[1] if x and x[1] is not None
                           and (stream, _id(x[0])) not in self._in_flight]
                if entries:
                    log.info("claimed stale order entries",
                             extra={"stream": stream, "count": len(entries)})
                    await self._handle_batch(stream, entries, delivered=None)
                    handled += len(entries)
                if start in (b"0-0", "0-0"):
                    break
        return handled

    async def _handle_batch(self, stream: str, entries: list, delivered: int | None) -> None:
        if self.fence is not None and entries:
            newest = await self._replicated(stream, entries)
            upto = (-1, -1) if newest is None else _order(newest)
            lost = [e for e in entries if _order(_id(e[0])) > upto]
            if lost:
                log.warning("order entries a failover lost are not processed",
                            extra={"stream": stream, "count": len(lost),
                                   "first": _id(lost[0][0])})
                for _entry_id, fields in lost:
                    ORDERS_PROCESSED.labels(fields_text(fields).get("type", "?"),
                                            "lost").inc()
                entries = [e for e in entries if _order(_id(e[0])) <= upto]
        # Entries of one hold run in stream order; different holds run concurrently.
        by_hold: dict[str, list] = {}
        for entry_id, fields in entries:
            hold = fields_text(fields).get("hold_id", "")
            by_hold.setdefault(hold, []).append((entry_id, fields))

        async def run_group(group: list) -> None:
            for entry_id, fields in group:
                async with self._sem:
                    await self._handle_one(stream, entry_id, fields, delivered)

        await asyncio.gather(*(run_group(g) for g in by_hold.values()))

    async def _replicated(self, stream: str, entries: list) -> str | None:
        """Wait until the replicas have what the primary still has of ``entries`` (in
        stream order): the newest of them it has (None: it lost them all). They stay
        claimed meanwhile (:meth:`_keep_claimed`), as through an outage."""
        assert self.fence is not None
        waiting = [(stream, _id(entry_id)) for entry_id, _fields in entries]
        now = time.monotonic()
        for key in waiting:
            self._in_flight.setdefault(key, now)
        attempt = 0
        try:
            while True:
                try:
                    return await self.fence.check(stream, waiting[0][1], waiting[-1][1])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    if attempt % 20 == 0:
                        log.warning("order entries wait for the replicas", extra={
                            "stream": stream, "count": len(entries), "attempt": attempt + 1,
                            "error": f"{type(exc).__name__}: {exc}"[:300]})
                    await asyncio.sleep(backoff(attempt, cap=1.0))
                    attempt += 1
        finally:
            for key in waiting:
                self._in_flight.pop(key, None)

    async def _deliveries(self, stream: str, entry_id: Any) -> int:
        rows = await self.redis.xpending_range(stream, GROUP, min=entry_id, max=entry_id,
                                               count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _handle_one(self, stream: str, entry_id: Any, fields: Mapping,
                          delivered: int | None) -> None:
        key = (stream, _id(entry_id))
        self._in_flight[key] = time.monotonic()
        try:
            await self._process(stream, entry_id, fields, delivered)
        finally:
            self._in_flight.pop(key, None)

    async def _process(self, stream: str, entry_id: Any, fields: Mapping,
                       delivered: int | None) -> None:
        t0 = time.perf_counter()
        kind = fields_text(fields).get("type", "?")
        extra = {"stream": stream, "entry_id": _id(entry_id),
                 "hold_id": fields_text(fields).get("hold_id")}
        try:
            entry = parse_entry(fields)
        except BadEntry as exc:
            await self._give_up(stream, entry_id, fields, "malformed", str(exc))
            return
        if delivered is None:
            delivered = await until_done(lambda: self._deliveries(stream, entry_id),
                                         what="read deliveries", log=log, extra=extra)
        lapsed = isinstance(entry, ReserveEntry) and entry.expires_at_ms < time.time() * 1000
        if delivered > self.max_deliveries and lapsed:
            await self._give_up(stream, entry_id, fields, "too_many_deliveries",
                                f"delivered {delivered} times")
            return
        attempt = failures = 0
        first_outage = 0.0
        while True:
            try:
                await self.processor.handle(entry)
                break
            except asyncio.CancelledError:
                raise
            except BadEntry as exc:
                await self._give_up(stream, entry_id, fields, "rejected", str(exc))
                return
            except Exception as exc:
                ORDER_RETRIES.inc()
                error = f"{type(exc).__name__}: {exc}"[:300]
                if is_outage(exc):
                    now = time.monotonic()
                    if attempt == 0 or now - first_outage >= 60:
                        first_outage = now
                        log.warning("order entry waits for an outage to end",
                                    extra={**extra, "attempt": attempt + 1, "error": error})
                else:
                    failures += 1
                    if failures >= self.max_attempts:
                        await self._give_up(stream, entry_id, fields, "permanent_error",
                                            error)
                        return
                    log.warning("order entry failed, retrying", exc_info=True,
                                extra={**extra, "attempt": failures})
                await asyncio.sleep(backoff(attempt))
                attempt += 1
        await self._ack(stream, entry_id)
        ORDERS_PROCESSED.labels(kind, "ok").inc()
        ORDER_SECONDS.observe(time.perf_counter() - t0)

    async def _ack(self, stream: str, entry_id: Any) -> None:
        async def ack() -> None:
            try:
                await self.redis.xack(stream, GROUP, entry_id)
            except ResponseError as exc:  # the stream went with a rebuild: nothing to ack
                if "NOGROUP" not in str(exc):
                    raise
        await until_done(ack, what="acknowledge the entry", log=log,
                         extra={"stream": stream, "entry_id": _id(entry_id)})

    async def _give_up(self, stream: str, entry_id: Any, fields: Mapping, reason: str,
                       error: str) -> None:
        await dead_letter(self.processor, stream, entry_id, fields, reason, error)
        ORDERS_PROCESSED.labels(fields_text(fields).get("type", "?"), "dead").inc()
        await self._ack(stream, entry_id)

    async def dead_letter(self, stream: str, entry_id: Any, fields: Mapping, reason: str,
                          error: str) -> None:
        """Park the entry in ``orders:dead``, compensate, XACK (see dead_letters)."""
        await self._give_up(stream, entry_id, fields, reason, error)
