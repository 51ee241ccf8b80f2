"""Outbound webhooks in flight: fan-out, claim, send, retry (the outbox's consumer).

Worker 0 of each node runs one :class:`Dispatcher` (``DROPSERVER_WEBHOOK_CONCURRENCY``
> 0; :mod:`dropserver.chores`). A round runs when there is work, not on a clock: it
listens (``LISTEN``) on :data:`dropserver.outbound.NOTIFY_CHANNEL` over a connection of
its own, so a new event (:func:`dropserver.outbound.enqueue`'s ``NOTIFY``, sent at the
enqueuing transaction's commit), a replay or an endpoint enabled wakes it at once; after
each round it sleeps until the next pending delivery is due (a retry, or a lease that
ends), at most ``DROPSERVER_WEBHOOK_FALLBACK_POLL`` (10 s: anything made due some other
way, e.g. by hand in SQL, waits at most that). While its listening connection is lost
(PostgreSQL restarted) it looks every ``DROPSERVER_WEBHOOK_POLL_INTERVAL`` (0.5 s), as
it always did before, and connects again at most every :data:`RELISTEN_S`. Each round it

1. **fans out** events not yet fanned out (``outbound_events.fanned_out_at IS NULL``):
   one ``webhook_deliveries`` row per enabled endpoint that asked for the type (a
   creator's endpoints for that creator's events, platform endpoints for all), and
   marks the event, in one statement;
2. **claims** due deliveries with ``FOR UPDATE SKIP LOCKED`` (processes never take the
   same one), pushing each one's ``next_attempt_at`` past the attempt's timeout: that
   is its lease. A process that dies mid-request leaves the delivery due again when
   the lease ends, and another process (or the restarted one) sends it again: at least
   once, never lost;
3. **sends** each claimed delivery (POST, the stored body byte for byte, signed with
   :func:`dropserver.outbound.signature_headers`), at most
   ``DROPSERVER_WEBHOOK_CONCURRENCY`` at once, each bounded by
   ``DROPSERVER_WEBHOOK_TIMEOUT``; redirects are not followed;
4. **records** the attempt (``webhook_attempts``) and the outcome: a 2xx answer makes
   the delivery ``delivered``; anything else schedules the next try after the
   ``DROPSERVER_WEBHOOK_RETRY_SCHEDULE`` step (plus up to 10% jitter), and when the
   schedule is spent the delivery is ``failed`` until a replay
   (:func:`replay`) makes it due again with a fresh schedule;
5. once an hour, **prunes** events older than ``DROPSERVER_WEBHOOK_RETENTION_DAYS``
   whose deliveries all ended, with their deliveries and attempts (the delivery log
   keeps that long, as Stripe's keeps 30 days).

None of it runs on a request's path: a slow or dead receiver costs a background task
and a row, never a buyer's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import httpx
from prometheus_client import Counter

from dropserver import __version__
from dropserver.background import stop_task
from dropserver.outbound import NOTIFY_CHANNEL, signature_headers

__all__ = ["ATTEMPTS", "Dispatcher", "replay"]

log = logging.getLogger("dropserver.webhooks")

PRUNE_EVERY_S = 3600.0
RELISTEN_S = 2.0  # the listening connection lost: try again at most this often
# A delivery due but not claimed (another process holds it, or it fell due between the
# claim and the look at the next due time): look again this soon, not at once.
MIN_WAIT_S = 0.1

ATTEMPTS = Counter("dropserver_webhook_attempts_total",
                   "Outbound webhook attempts by outcome: delivered (2xx), retry (a "
                   "failure with tries left), failed (the retry schedule spent)",
                   ["outcome"])

_FAN_OUT = """
WITH ev AS (
    SELECT seq, id, type, creator_id FROM outbound_events
    WHERE fanned_out_at IS NULL ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED),
made AS (
    INSERT INTO webhook_deliveries (event_id, endpoint_id)
    SELECT ev.id, e.id FROM ev JOIN webhook_endpoints e
      ON e.enabled AND ev.type = ANY (e.events)
     AND (e.scope = 'platform' OR e.owner_id = ev.creator_id)
    ON CONFLICT (event_id, endpoint_id) DO NOTHING RETURNING 1)
UPDATE outbound_events o SET fanned_out_at = now()
FROM ev WHERE o.seq = ev.seq
RETURNING (SELECT count(*) FROM made) AS deliveries
"""

_CLAIM = """
WITH due AS (
    SELECT d.id FROM webhook_deliveries d
    JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled
    WHERE d.state = 'pending' AND d.next_attempt_at <= now()
    ORDER BY d.next_attempt_at LIMIT $1 FOR UPDATE OF d SKIP LOCKED)
UPDATE webhook_deliveries d
SET next_attempt_at = now() + make_interval(secs => $2), attempts = d.attempts + 1,
    step = d.step + 1, last_attempt_at = now()
FROM due, webhook_endpoints e, outbound_events ev
WHERE d.id = due.id AND e.id = d.endpoint_id AND ev.id = d.event_id
RETURNING d.id, d.attempts, d.step, d.endpoint_id, e.url, e.secret,
          CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END
              AS previous_secret,
          ev.id AS event_id, ev.type, ev.body
"""


_NEXT_DUE = """
SELECT EXTRACT(EPOCH FROM min(d.next_attempt_at) - clock_timestamp())::float8
FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled
WHERE d.state = 'pending'
"""


class Dispatcher:
    """Fans out, claims and sends deliveries until stopped (see the module docstring).

    ``schedule``: seconds to wait after the 1st, 2nd, ... failed attempt; after
    ``len(schedule) + 1`` failed attempts the delivery is ``failed``. ``dsn``: the
    database to ``LISTEN`` on (None: no listening, a look every ``poll_interval``);
    ``fallback_poll``: the longest sleep while listening."""

    def __init__(self, db: asyncpg.Pool, *, schedule: Sequence[float], timeout: float,
                 concurrency: int, poll_interval: float, fallback_poll: float = 10.0,
                 dsn: str | None = None, retention_days: int = 30) -> None:
        self.db = db
        self.retention_days = retention_days
        self._pruned_at = 0.0
        self.schedule = [float(s) for s in schedule]
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.poll_interval = poll_interval
        self.fallback_poll = max(poll_interval, fallback_poll)
        self.dsn = dsn
        self.lease = timeout + 5.0  # past the attempt's own bound
        self._inflight: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._listen_tried_at = -RELISTEN_S
        self._listen_lost_logged = False
        self._more_to_fan_out = False

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout, follow_redirects=False, trust_env=False,
                headers={"user-agent": f"dropserver-webhooks/{__version__}",
                         "content-type": "application/json"},
                limits=httpx.Limits(max_connections=self.concurrency,
                                    max_keepalive_connections=self.concurrency))
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="webhook-dispatcher")

    async def stop(self) -> None:
        """Stop claiming; in-flight attempts are cancelled (their leases end and they
        are sent again, by this process after a restart or by another)."""
        if self._task is not None:
            await stop_task(self._task, log)
            self._task = None
        if self._listener is not None:
            listener, self._listener = self._listener, None
            listener.terminate()
        for task in list(self._inflight):
            await stop_task(task, log)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def listening(self) -> bool:
        """Whether notifications wake this dispatcher now."""
        return self._listener is not None and not self._listener.is_closed()

    def wake(self) -> None:
        """Run a round now (a notification, an attempt that scheduled a retry)."""
        self._wake.set()

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._wake.set()

    def _listener_lost(self, conn: object) -> None:
        if conn is self._listener:
            self._listener = None
            self._wake.set()  # poll again, and connect again

    async def _listen(self) -> None:
        """Connect the listening connection if it is not (at most every RELISTEN_S)."""
        if self.dsn is None or self.listening:
            return
        if time.monotonic() - self._listen_tried_at < RELISTEN_S:
            return
        self._listen_tried_at = time.monotonic()
        conn = None
        try:
            conn = await asyncpg.connect(self.dsn, timeout=5)
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
        except asyncio.CancelledError:
            if conn is not None:
                conn.terminate()
            raise
        except Exception as exc:
            if conn is not None:
                conn.terminate()
            if not self._listen_lost_logged:
                self._listen_lost_logged = True
                log.warning("webhook dispatcher cannot listen for notifications; polling",
                            extra={"every_s": self.poll_interval, "error": repr(exc)[:300]})
            return
        conn.add_termination_listener(self._listener_lost)
        self._listener = conn
        if self._listen_lost_logged:
            log.info("webhook dispatcher listening again")
        self._listen_lost_logged = False

    async def _run(self) -> None:
        while True:
            busy = False
            due_in: float | None = None
            await self._listen()
            self._wake.clear()  # what wakes it from here on runs another round
            try:
                if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                    self._pruned_at = time.monotonic()
                    await self.prune()
                await self.fan_out()
                free = self.concurrency - len(self._inflight)
                if free > 0:
                    claimed = await self.claim(free)
                    for row in claimed:
                        task = asyncio.create_task(self.attempt(row))
                        self._inflight.add(task)
                        task.add_done_callback(self._inflight.discard)
                    busy = len(claimed) == free
                if not busy and not self._more_to_fan_out:
                    due_in = await self.next_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL away a moment: try next round
                log.warning("webhook dispatch failed", extra={"error": repr(exc)[:300]})
                due_in = self.poll_interval  # soon, as before, listening or not
            if busy:
                await asyncio.sleep(0)  # more may be due: claim again once slots free
                while len(self._inflight) >= self.concurrency:
                    await asyncio.wait(set(self._inflight),
                                       return_when=asyncio.FIRST_COMPLETED)
            else:
                await self._sleep(due_in)

    async def _sleep(self, due_in: float | None) -> None:
        """Until woken, the next delivery is due (``due_in`` seconds), or the poll (the
        fallback while listening) ends."""
        if self._more_to_fan_out or self._wake.is_set():
            await asyncio.sleep(0)
            return
        if self.listening:
            wait = self.fallback_poll
        else:
            wait = self.poll_interval
            if self.dsn is not None:  # and connect again as soon as allowed
                wait = min(wait, max(MIN_WAIT_S, self._listen_tried_at + RELISTEN_S
                                     - time.monotonic()))
        if due_in is not None:
            wait = min(wait, due_in + 0.001 if due_in > 0 else MIN_WAIT_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._wake.wait()

    async def next_due(self) -> float | None:
        """Seconds until the next pending delivery of an enabled endpoint is due (<= 0:
        due now), or None when none is pending."""
        return await self.db.fetchval(_NEXT_DUE)

    # -- the steps ---------------------------------------------------------------
    async def fan_out(self, batch: int = 500) -> int:
        """Make the deliveries of up to ``batch`` new events; returns how many."""
        rows = await self.db.fetch(_FAN_OUT, batch)
        self._more_to_fan_out = len(rows) >= batch  # one row per event: go again
        return int(rows[0]["deliveries"]) if rows else 0

    async def prune(self) -> int:
        """Forget events older than ``retention_days`` whose deliveries all ended
        (delivered or failed), with their deliveries and attempts; returns how many
        events. Pending ones are kept whatever their age."""
        if self.retention_days <= 0:
            return 0
        rows = await self.db.fetch(
            """WITH old AS (
                   SELECT ev.seq, ev.id FROM outbound_events ev
                   WHERE ev.created_at < now() - make_interval(days => $1)
                     AND ev.fanned_out_at IS NOT NULL
                     AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                                     WHERE d.event_id = ev.id AND d.state = 'pending')
                   LIMIT 5000),
               gone AS (DELETE FROM webhook_deliveries d USING old
                        WHERE d.event_id = old.id RETURNING 1)
               DELETE FROM outbound_events ev USING old WHERE ev.seq = old.seq
               RETURNING (SELECT count(*) FROM gone) AS deliveries""", self.retention_days)
        return len(rows)

    async def claim(self, n: int) -> list[asyncpg.Record]:
        return await self.db.fetch(_CLAIM, n, self.lease)

    async def attempt(self, row: asyncpg.Record) -> bool:
        """Send one claimed delivery and record what happened; True if delivered."""
        assert self._client is not None
        secrets_ = [row["secret"]] + ([row["previous_secret"]]
                                      if row["previous_secret"] else [])
        headers = signature_headers(row["event_id"], row["body"], secrets_)
        status: int | None = None
        error: str | None = None
        started = time.monotonic()
        try:
            async with self._client.stream("POST", row["url"], headers=headers,
                                           content=row["body"].encode()) as resp:
                status = resp.status_code
        except httpx.TimeoutException:
            error = f"timeout after {self.timeout:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
        ms = int((time.monotonic() - started) * 1000)
        ok = status is not None and 200 <= status < 300
        if ok:
            error = None
        elif status is not None:
            error = f"HTTP {status}"
        try:
            await self._record(row, ok, status, error, ms)
        except Exception as exc:  # PostgreSQL away: the lease ends, it is sent again
            log.warning("webhook attempt not recorded", extra={
                "delivery_id": row["id"], "ok": ok, "error": repr(exc)[:300]})
        if not ok:
            self.wake()  # its retry is due sooner than the lease the round slept to
        return ok

    async def _record(self, row: asyncpg.Record, ok: bool, status: int | None,
                      error: str | None, ms: int) -> None:
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO webhook_attempts (delivery_id, attempt, status, error, "
                "duration_ms) VALUES ($1, $2, $3, $4, $5)",
                row["id"], row["attempts"], status, error, ms)
            if ok:
                # a late success still counts, whoever claimed it since
                await conn.execute(
                    """UPDATE webhook_deliveries SET state = 'delivered',
                           next_attempt_at = NULL, delivered_at = now(), last_status = $2,
                           last_error = NULL
                       WHERE id = $1 AND state = 'pending'""", row["id"], status)
                outcome = "delivered"
            elif row["step"] > len(self.schedule):
                await conn.execute(
                    """UPDATE webhook_deliveries SET state = 'failed',
                           next_attempt_at = NULL, last_status = $2, last_error = $3
                       WHERE id = $1 AND state = 'pending' AND attempts = $4""",
                    row["id"], status, error, row["attempts"])
                outcome = "failed"
            else:
                wait = self.schedule[row["step"] - 1]
                wait += wait * 0.1 * random.random()
                await conn.execute(
                    """UPDATE webhook_deliveries SET
                           next_attempt_at = now() + make_interval(secs => $4),
                           last_status = $2, last_error = $3
                       WHERE id = $1 AND state = 'pending' AND attempts = $5""",
                    row["id"], status, error, wait, row["attempts"])
                outcome = "retry"
        ATTEMPTS.labels(outcome).inc()
        if outcome != "delivered":
            log.info("webhook attempt failed", extra={
                "delivery_id": row["id"], "endpoint_id": row["endpoint_id"],
                "event": row["type"], "attempt": row["attempts"], "status": status,
                "error": error, "outcome": outcome})


async def replay(db: Any, delivery_id: int) -> bool:
    """Make a delivery due now with a fresh retry schedule (the delivery log's replay);
    False if it is pending already (it will be tried anyway)."""
    row = await db.fetchrow(
        """UPDATE webhook_deliveries SET state = 'pending', step = 0,
               next_attempt_at = now()
           WHERE id = $1 AND state <> 'pending' RETURNING id, pg_notify($2, '')""",
        delivery_id, NOTIFY_CHANNEL)
    return row is not None
