"""Shoppable replays: drop moments stored with their place in the video.

While a drop is live, :class:`MomentRecorder` listens to the drop's channel (the
same messages viewers get, ``realtime.channels``, through the gateway's subscriber:
sharded on a Redis Cluster) and stores each BUY NOW, sold out,
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

from dropserver.background import stop_task
from realtime import channels, history
from realtime.sharded_subscriber import subscriber_for
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
    """Listens to one drop's channel while it is live and stores its moments.

    It listens through the gateway's own subscriber (``realtime.sharded_subscriber``):
    SUBSCRIBE on one Redis, SSUBSCRIBE on the shard that owns the drop's channel on a
    cluster (where the drop's events go out with SPUBLISH, which a classic SUBSCRIBE
    never hears), following slot moves and failovers. When that subscription was
    down for a while (``on_reconnect``), what the drop published meanwhile is read
    from its history, and each durable event is stored once, by its offset. A moment
    filled in that way gets ``media_ms`` of when it was read, not when it happened
    (seconds apart at most); one the history no longer has (its epoch changed: Redis
    lost it) is logged and left out."""

    RECOVER_LIMIT = 1000  # history entries read after a gap, at most

    def __init__(self, redis: Any, db: Any, drop_id: int,
                 media_ms: Callable[[], int], *, redis_url: str) -> None:
        self.redis = redis
        self.redis_url = redis_url
        self.db = db
        self.drop_id = drop_id
        self.media_ms = media_ms
        self._task: asyncio.Task | None = None
        self._subscriber: Any = None
        self._ready = asyncio.Event()
        # raw publications, and None for "the subscription was down: fill the gap"
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._seen: history.Position | None = None  # the last durable event handled

    async def start(self) -> None:
        if self._task is None:
            self._ready.clear()
            self._task = asyncio.create_task(self._run(), name=f"moments-{self.drop_id}")
            # subscribed before we return, so no event published after is missed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), 5)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task, log)
            self._task = None
        if self._subscriber is not None:
            subscriber, self._subscriber = self._subscriber, None
            await subscriber.stop()

    def _on_message(self, channel: bytes, raw: bytes) -> None:
        self._inbox.put_nowait(raw)

    def _on_reconnect(self) -> None:
        self._inbox.put_nowait(None)

    async def _subscribe(self) -> None:
        """Subscribed to the drop's channel, retried until Redis answers. The drop's
        position is read first: what is published until the subscription is
        confirmed is then read from the history (:meth:`_run`)."""
        while True:
            subscriber = subscriber_for(self.redis_url, self._on_message, self._on_reconnect)
            try:
                self._seen = await history.position(self.redis, self.drop_id)
                await subscriber.start()
                await subscriber.subscribe(channels.drop_channel(self.drop_id))
                self._subscriber = subscriber
                return
            except asyncio.CancelledError:
                await subscriber.stop()
                raise
            except Exception:
                log.exception("moment recorder could not subscribe; trying again",
                              extra={"drop_id": self.drop_id})
                await subscriber.stop()
                self._ready.set()  # start() returns; the moments come once it can
                await asyncio.sleep(1)

    async def _run(self) -> None:
        await self._subscribe()
        self._ready.set()
        raw: bytes | None = None  # first, what came between the position and the subscription
        while True:
            try:
                if raw is None:
                    await self._fill_gap()
                else:
                    await self._handle(raw)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("moment recorder failed", extra={"drop_id": self.drop_id})
            raw = await self._inbox.get()

    async def _fill_gap(self) -> None:
        since = self._seen or history.Position("", 0)
        found = await history.recover(self.redis, self.drop_id, since, self.RECOVER_LIMIT)
        if not found.recovered:
            log.warning("moment recorder: events missed while unsubscribed are not in "
                        "the history; their moments are not stored",
                        extra={"drop_id": self.drop_id})
            self._seen = found.position
            return
        for pub in found.publications:
            await self._store(pub)

    async def _handle(self, raw: bytes) -> None:
        try:
            pubs = channels.parse_publications(raw)  # one creator action: several
        except ValueError:
            return
        for pub in pubs:
            await self._store(pub)

    async def _store(self, pub: channels.Publication) -> None:
        if pub.kind is channels.Kind.DURABLE:
            seen = self._seen
            if seen is not None and pub.epoch == seen.epoch and pub.offset <= seen.offset:
                return  # stored already (heard live and read again from history)
            self._seen = history.Position(pub.epoch, pub.offset)
        found = moment_from_event(pub.event, pub.data)
        if found is not None:
            kind, product = found
            await record_moment(self.db, self.drop_id, kind, product, self.media_ms())
