"""The hold journal: every hold a process acknowledges, written to PostgreSQL by it too.

A buy is answered as soon as ``reserve.lua`` has run; the hold reaches PostgreSQL when
a payments worker reads its entry from the drop's order stream -- but the stream lives
in Redis, and a Redis that restarts empty before a worker read the entry takes the hold
with it, after its buyer was told "buyer #24". So the process that answered the buy
also keeps the hold here, in memory, and a background task writes what it holds as
``orders`` rows (state ``held``, the very row the worker inserts first, ``ON CONFLICT
DO NOTHING``) in one statement, a few milliseconds later, whatever happens to Redis.
Outages are waited out (the rows wait in memory, up to :data:`MAX_PENDING`).

Recovery's rebuild waits ``DROPSERVER_RECOVERY_GRACE_MS`` before reading, so rows in
flight land first and are counted; one that lands only after the read (PostgreSQL was
away too) is recorded failed -- the rebuilt Redis may have sold its unit again -- and its
buyer told (``checkout.orders.insert_orders``). Only a process dying in the same few
milliseconds as Redis can still lose a hold.

The hot path pays one list append per hold it answers, a replay's too (a replay may be
the first answer a buyer got: the first attempt's ``WAIT`` failed, 503; the row is
``ON CONFLICT DO NOTHING``); refusals: nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
from prometheus_client import Counter

from checkout.order_rows import insert_orders
from checkout.retry import backoff, is_outage
from dropserver.background import stop_task

__all__ = ["MAX_PENDING", "HoldJournal", "row_for"]

log = logging.getLogger("dropserver.checkout")

MAX_PENDING = 100_000   # holds kept while PostgreSQL is away (then the oldest go)
BATCH = 500

JOURNALED = Counter("dropserver_hold_journal_rows_total",
                    "Acknowledged holds written to PostgreSQL by the process that made "
                    "them", ["result"])


class HoldJournal:
    """Queue acknowledged holds; a task writes them to ``orders``. (A subclass that
    overrides :meth:`flush` journals other rows the same way:
    :class:`checkout.auction_store.BidJournal`.)"""

    WHAT = "hold journal"  # for the logs and the task's name

    def __init__(self, db: asyncpg.Pool) -> None:
        self.db = db
        self._rows: list[tuple] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def add(self, row: tuple) -> None:
        """A new hold (``insert_orders``' row shape). No await: the buy path."""
        self._rows.append(row)
        if len(self._rows) > MAX_PENDING:
            del self._rows[:len(self._rows) - MAX_PENDING]
            JOURNALED.labels("dropped").inc()
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.WHAT.replace(" ", "-"))

    async def stop(self, flush_within: float = 5.0) -> None:
        if self._task is not None:
            await stop_task(self._task, log)
            self._task = None
        if self._rows:  # a clean shutdown writes what it has
            with contextlib.suppress(Exception):
                async with asyncio.timeout(flush_within):
                    await self.flush()

    async def flush(self) -> int:
        """Write the queued rows (at most :data:`BATCH` per statement); returns how
        many. On failure they stay queued."""
        written = 0
        while self._rows:
            batch = self._rows[:BATCH]
            async with self.db.acquire() as conn, conn.transaction():
                await insert_orders(conn, batch)
            del self._rows[:len(batch)]
            JOURNALED.labels("written").inc(len(batch))
            written += len(batch)
        return written

    async def _run(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt == 0 or attempt % 60 == 0:
                    log.warning("%s could not write; retrying", self.WHAT,
                                exc_info=not is_outage(exc),
                                extra={"pending": len(self._rows),
                                       "error": f"{type(exc).__name__}: {exc}"[:300]})
                await asyncio.sleep(backoff(attempt, base=0.05, cap=0.5))
                attempt += 1
                self._wake.set()


def row_for(hold: Any, req: Any, hold_ttl_ms: int) -> tuple:
    """``insert_orders``' row for a new hold and its buy request (reserve.lua set
    ``expires_at = now + ttl`` by Redis' clock, so the hold was made ttl before)."""
    return (hold.hold_id, hold.drop_id, hold.product_id, req.user_id, hold.quantity,
            hold.buyer_number, hold.unit_price, hold.amount, hold.currency,
            req.idempotency_key, hold.expires_at, hold.flow or "client_confirm",
            hold.expires_at - hold_ttl_ms, "held", None, hold.variant_id)
