"""One drop's stream in this process: publisher sessions, packager, status, moments.

Status (broadcast as ``stream.status`` through ``realtime.publish``):

* ``live`` -- a publisher is connected and its media is on the live playlist (said
  once the session's first part is written, so a player started on it finds the
  playlist: players must not poll for a playlist that is not there);
* ``reconnecting`` -- the connection was lost (not ended with DELETE); a new WHIP POST
  within ``DROPSERVER_STREAM_RECONNECT_GRACE`` continues the same stream after an
  ``EXT-X-DISCONTINUITY``;
* ``offline`` -- ended by DELETE or after the grace: the playlists get ENDLIST and the
  stream is kept as the drop's replay. A later POST for the same drop (still not
  ended) continues it again, with a discontinuity.

Files live on shared disk (``media_dir/drops/<id>/``) so any worker serves HLS; the
publisher's WebRTC session lives in one worker, which owns the drop's directory
while live (a Redis key ``{drop:<id>}:stream:owner`` guards against two workers
writing it).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realtime.publish import publish
from streaming import replay
from streaming.ingest import Publisher
from streaming.packager import PART_FILES_KEPT, Packager
from streaming.transcode import H264Transcoder

__all__ = ["DropStream", "StreamStatus", "Streaming", "owner_key"]

log = logging.getLogger("dropserver.streaming")

OWNER_TTL = 10  # seconds; refreshed every OWNER_TTL / 3 while live


class StreamStatus(enum.StrEnum):
    LIVE = "live"
    RECONNECTING = "reconnecting"
    OFFLINE = "offline"


def owner_key(drop_id: int) -> str:
    return f"{{drop:{int(drop_id)}}}:stream:owner"


class DropStream:
    """Packager and status of one drop, driven by its publisher sessions."""

    def __init__(self, streaming: Streaming, drop_id: int, creator_id: str) -> None:
        self.streaming = streaming
        self.drop_id = drop_id
        self.creator_id = creator_id
        self.dir = streaming.drop_dir(drop_id)
        settings = streaming.settings
        self.changed = asyncio.Event()  # set and replaced on every new part
        self.packager = Packager(self.dir, segment_seconds=settings.hls_segment_seconds,
                                 part_seconds=settings.hls_part_seconds,
                                 on_update=self._on_update)
        self.status = StreamStatus.OFFLINE
        self.publisher: Publisher | None = None
        # When the publisher's last frame or audio packet arrived (time.monotonic):
        # tells a blocking reload that timed out on a silent publisher from one that
        # timed out while media came in (streaming.hls, BLOCKING_TIMEOUTS).
        self.media_at = -1.0
        self.recorder = replay.MomentRecorder(
            streaming.redis, streaming.db, drop_id,
            lambda: round(self.packager.replay_seconds * 1000),
            redis_url=settings.redis_url)
        self._grace: asyncio.Task | None = None
        self._owner: asyncio.Task | None = None
        self._announce = False  # say "live" at the new session's first playlist write
        self._tasks: set[asyncio.Task] = set()

    def _on_update(self) -> None:
        event, self.changed = self.changed, asyncio.Event()
        event.set()
        if self._announce and self.publisher is not None:
            self._announce = False
            task = asyncio.get_running_loop().create_task(self._announce_live())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _announce_live(self) -> None:
        if self.publisher is not None:  # not lost meanwhile
            await self._set_status(StreamStatus.LIVE)

    # The Publisher's sink: forwards to the packager.
    def add_video(self, annexb: bytes, pts: int) -> None:
        self.media_at = time.monotonic()
        self.packager.add_video(annexb, pts)

    def add_audio(self, packet: bytes, pts: int) -> None:
        self.media_at = time.monotonic()
        self.packager.add_audio(packet, pts)

    @property
    def keyframe_due(self) -> bool:
        return self.packager.keyframe_due

    def keyframe_requested(self) -> None:
        self.packager.keyframe_requested()

    def transcoder(self) -> H264Transcoder:
        return H264Transcoder()

    async def attach(self, publisher: Publisher) -> None:
        """A publisher connected (first time, replacing another, or reconnecting)."""
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        old, self.publisher = self.publisher, publisher
        if old is not None:
            await old.close()  # on_closed sees it is no longer current
            self.packager.end_session()
        self.packager.start_session(audio=publisher.audio_codec is not None)
        self._announce = True
        if self._owner is None:
            self._owner = asyncio.create_task(self._hold_owner())
        await self.recorder.start()

    async def detach(self, publisher: Publisher, lost: bool) -> None:
        if publisher is not self.publisher:
            return  # an old session replaced by a newer one
        self.publisher = None
        self._announce = False
        self.packager.end_session()
        self._on_update()
        if lost and self.streaming.settings.stream_reconnect_grace > 0:
            await self._set_status(StreamStatus.RECONNECTING)
            self._grace = asyncio.create_task(self._finish_after_grace())
        else:
            await self.finish()

    async def _finish_after_grace(self) -> None:
        await asyncio.sleep(self.streaming.settings.stream_reconnect_grace)
        self._grace = None
        await self.finish()

    async def finish(self) -> None:
        """ENDLIST, the VOD replay playlist, the ``replays`` row, status offline."""
        await self.recorder.stop()
        rows = await replay.moments(self.streaming.db, self.drop_id)
        self.packager.finish(replay.dateranges(rows))
        self._on_update()
        self.streaming.linger(self.packager)
        if self.packager.playlist.segments:
            await replay.finalize(self.streaming.db, self.drop_id,
                                  str(self.dir / "replay.m3u8"), self.packager.duration_ms)
        await self._set_status(StreamStatus.OFFLINE)
        if self._owner is not None:
            self._owner.cancel()
            self._owner = None
        with contextlib.suppress(Exception):
            await self.streaming.redis.delete(owner_key(self.drop_id))
        self.streaming.streams.pop(self.drop_id, None)

    async def _hold_owner(self) -> None:
        key = owner_key(self.drop_id)
        node = self.streaming.node_id
        while True:
            with contextlib.suppress(Exception):
                await self.streaming.redis.set(key, node, ex=OWNER_TTL)
            await asyncio.sleep(OWNER_TTL / 3)

    async def _set_status(self, status: StreamStatus) -> None:
        self.status = status
        data = {"status": status.value, "hls": self.streaming.hls_url(self.drop_id)}
        try:
            await publish(self.streaming.redis, self.drop_id, "stream.status", data)
        except Exception:  # viewers miss a status; the stream goes on
            log.exception("stream.status publish failed", extra={"drop_id": self.drop_id})


@dataclass
class Streaming:
    """Everything streaming keeps on ``app.state.streaming``."""

    settings: Any
    redis: Any
    db: Any
    node_id: str
    media_dir: Path
    streams: dict[int, DropStream] = field(default_factory=dict)
    publishers: dict[str, tuple[int, Publisher]] = field(default_factory=dict)
    # ended streams whose part files are deleted later (Packager.drop_lingering_parts)
    _lingering: dict[Packager, asyncio.TimerHandle] = field(default_factory=dict)

    def linger(self, packager: Packager) -> None:
        """Delete an ended stream's part files as many segments later as live parts
        are kept after leaving the playlist: players holding the last live playlist
        still get them."""
        def drop() -> None:
            self._lingering.pop(packager, None)
            packager.drop_lingering_parts()

        delay = PART_FILES_KEPT * self.settings.hls_segment_seconds
        old = self._lingering.pop(packager, None)
        if old is not None:
            old.cancel()
        self._lingering[packager] = asyncio.get_running_loop().call_later(delay, drop)

    def drop_dir(self, drop_id: int) -> Path:
        return self.media_dir / "drops" / str(int(drop_id))

    def hls_url(self, drop_id: int, name: str = "live.m3u8") -> str:
        base = self.settings.public_url.rstrip("/")
        return f"{base}/v1/drops/{int(drop_id)}/hls/{name}"

    def new_session_id(self) -> str:
        return secrets.token_urlsafe(12)

    async def close_all(self) -> None:
        for _, publisher in list(self.publishers.values()):
            await publisher.close()
        for stream in list(self.streams.values()):
            if stream._grace is not None:
                stream._grace.cancel()
                stream._grace = None
                await stream.finish()
        for packager, handle in list(self._lingering.items()):
            handle.cancel()
            packager.drop_lingering_parts()
        self._lingering.clear()
