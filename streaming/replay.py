"""Shoppable replays: drop moments stored with their place in the video.

While a drop is live, :class:`MomentRecorder` listens to the drop's channel (the
same messages viewers get, ``realtime.channels``) and stores each BUY NOW, sold out,
pin and close, and each auction's start, bids and close, in ``replay_moments`` with
``media_ms``: where the newest frame sat in the replay when the event was published.
The replay exposes them twice: ``EXT-X-DATERANGE`` tags in ``replay.m3u8``
(rfc8216bis 4.4.5.1, CLASS ``com.dropserver.moment``) and the JSON timeline of
``GET /v1/drops/{id}/replay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from realtime import channels
from streaming.playlist import DateRange

__all__ = [
    "MOMENT_EVENTS",
    "MomentRecorder",
    "dateranges",
    "finalize",
    "moment_from_event",
    "moments",
    "record_moment",
]

log = logging.getLogger("dropserver.streaming")

# realtime event -> replay_moments.kind (schema.sql)
MOMENT_EVENTS = {
    "drop.buy_now": "buy_now",
    "drop.sold_out": "sold_out",
    "drop.pinned": "pinned",
    "drop.closed": "closed",
    "auction.started": "auction_started",
    "auction.bid": "auction_bid",
    "auction.closed": "auction_closed",
    "giveaway.opened": "giveaway_opened",
    "giveaway.drawn": "giveaway_drawn",
}


def moment_from_event(event: str, data: dict[str, Any]) -> tuple[str, int | None] | None:
    """``(kind, product_id)`` for a drop event worth a moment, else None."""
    kind = MOMENT_EVENTS.get(event)
    if kind is None:
        return None
    product = data.get("product_id")
    if isinstance(product, str) and product.isascii() and product.isdigit():
        product = int(product)
    return kind, product if isinstance(product, int) and not isinstance(product, bool) else None


def dateranges(rows: list[dict[str, Any]]) -> list[DateRange]:
    """EXT-X-DATERANGE tags for stored moments (START-DATE = when it happened)."""
    out = []
    for row in rows:
        attrs = [("X-KIND", row["kind"]), ("X-MEDIA-MS", str(row["media_ms"]))]
        if row["product_id"] is not None:
            attrs.append(("X-PRODUCT-ID", str(row["product_id"])))
        out.append(DateRange(id=f"moment-{row['id']}", start=row["at"], attributes=tuple(attrs)))
    return out


async def record_moment(db: Any, drop_id: int, kind: str, product_id: int | None,
                        media_ms: int, at: datetime | None = None) -> int:
    return await db.fetchval(
        "INSERT INTO replay_moments (drop_id, kind, product_id, media_ms, at) "
        "VALUES ($1, $2, $3, $4, COALESCE($5, now())) RETURNING id",
        drop_id, kind, product_id, max(0, int(media_ms)), at)


async def moments(db: Any, drop_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT id, kind, product_id, media_ms, at FROM replay_moments "
        "WHERE drop_id = $1 ORDER BY media_ms, id", drop_id)
    return [dict(r) for r in rows]


async def finalize(db: Any, drop_id: int, playlist_path: str, duration_ms: int) -> None:
    await db.execute(
        "INSERT INTO replays (drop_id, playlist_path, duration_ms, finalized_at) "
        "VALUES ($1, $2, $3, now()) ON CONFLICT (drop_id) DO UPDATE SET "
        "playlist_path = EXCLUDED.playlist_path, duration_ms = EXCLUDED.duration_ms, "
        "finalized_at = now()", drop_id, playlist_path, duration_ms)


class MomentRecorder:
    """Subscribes to one drop's channel while it is live and stores its moments."""

    def __init__(self, redis: Any, db: Any, drop_id: int,
                 media_ms: Callable[[], int]) -> None:
        self.redis = redis
        self.db = db
        self.drop_id = drop_id
        self.media_ms = media_ms
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
            # subscribed before we return, so no event published after is missed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), 5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(channels.drop_channel(self.drop_id))
                    self._ready.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._handle(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("moment recorder failed; resubscribing",
                              extra={"drop_id": self.drop_id})
                self._ready.set()
                await asyncio.sleep(1)

    async def _handle(self, raw: bytes) -> None:
        try:
            pubs = channels.parse_publications(raw)  # one creator action: several
        except ValueError:
            return
        for pub in pubs:
            found = moment_from_event(pub.event, pub.data)
            if found is not None:
                kind, product = found
                await record_moment(self.db, self.drop_id, kind, product, self.media_ms())
