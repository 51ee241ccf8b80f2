"""What the streaming benchmark's cases share (:mod:`benchmarks.ingest`): a server and
a drop per case, and the client side of publish-to-playlist.

* :func:`start_server` / :func:`create_drop`: one ``dropserver dev`` process on the
  run's Redis and PostgreSQL, and a drop to publish to.
* :func:`media_bytes`, :func:`video_samples`, :func:`avc1_size`: what the packager
  wrote, read from its files and fMP4 boxes (``tfdt`` + ``trun`` of track 1, the
  ``avc1`` picture size).
* :class:`Watcher`: a viewer that long-polls ``live.m3u8`` with blocking reload and
  fetches every new part as it is listed; :func:`frame_latencies` matches each part's
  video samples to the publisher's frame send times.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks._support import DevServer, start_dev
from dropserver.services import LocalServices

__all__ = ["FPS", "FRAME_TICKS", "PartSeen", "Watcher", "avc1_size", "create_drop",
           "frame_latencies", "media_bytes", "start_server", "stream_size", "video_samples"]

FPS = 30
FRAME_TICKS = 90_000 // FPS


# ----------------------------------------------------------------------- helpers
_SEGMENT_FILE = re.compile(r"^s\d+\.m4s(\.tmp)?$")


def media_bytes(media: Path, drop_id: int) -> int:
    """Bytes of fMP4 media (video + audio) the packager has written for the drop:
    closed segments plus the open one (appended to at every part)."""
    directory = media / "drops" / str(drop_id)
    return sum(p.stat().st_size for p in directory.iterdir() if _SEGMENT_FILE.match(p.name))


def video_samples(part: bytes) -> list[tuple[int, int]]:
    """(decode time, duration) of track 1's samples in one ``moof``+``mdat``."""
    out: list[tuple[int, int]] = []

    def boxes(data: bytes, start: int, end: int):
        pos = start
        while pos + 8 <= end:
            size, kind = struct.unpack_from(">I4s", data, pos)
            if size < 8:
                return
            yield kind, pos + 8, pos + size
            pos += size

    for kind, s, e in boxes(part, 0, len(part)):
        if kind != b"moof":
            continue
        for tkind, ts, te in boxes(part, s, e):
            if tkind != b"traf":
                continue
            track, base, entries = 0, 0, []
            for bkind, bs, _be in boxes(part, ts, te):
                if bkind == b"tfhd":
                    track = struct.unpack_from(">I", part, bs + 4)[0]
                elif bkind == b"tfdt":
                    version = part[bs]
                    base = struct.unpack_from(">Q" if version else ">I", part, bs + 4)[0]
                elif bkind == b"trun":
                    flags = int.from_bytes(part[bs + 1:bs + 4], "big")
                    count = struct.unpack_from(">I", part, bs + 4)[0]
                    pos = bs + 8 + (4 if flags & 0x1 else 0) + (4 if flags & 0x4 else 0)
                    width = 4 * bin(flags & 0xF00).count("1")
                    for _ in range(count):
                        entries.append(struct.unpack_from(">I", part, pos)[0]
                                       if flags & 0x100 else 0)
                        pos += width
            if track == 1:
                t = base
                for duration in entries:
                    out.append((t, duration))
                    t += duration
    return out


def avc1_size(init: bytes) -> tuple[int, int]:
    pos = init.find(b"avc1")
    if pos < 0:
        return 0, 0
    return struct.unpack_from(">HH", init, pos + 4 + 24)


def start_server(services: LocalServices, media: Path, transcode: str) -> DevServer:
    """``dropserver dev --port 0`` on the given Redis/PostgreSQL: one process."""
    return start_dev({"REDIS_URL": services.redis_url, "DATABASE_URL": services.database_url,
                      "DROPSERVER_MEDIA_DIR": str(media),
                      "DROPSERVER_HLS_TRANSCODE": transcode, "DROPSERVER_WORKERS": "1"})


async def create_drop(http: httpx.AsyncClient, token: str) -> int:
    body = {"title": "bench stream", "products": [{"title": "A", "price": 1000, "units": 5}]}
    resp = await http.post("/v1/drops", json=body, headers={"Authorization": f"Bearer {token}"})
    return resp.raise_for_status().json()["id"]


# ------------------------------------------------------- playlist watcher (client)
_PART_URI = re.compile(r'#EXT-X-PART:.*URI="s(\d+)\.(\d+)\.m4s"')


@dataclass
class PartSeen:
    msn: int
    index: int
    seen: float  # time.monotonic() when a playlist listing it arrived
    samples: list[tuple[int, int]]  # (decode time, duration), video


@dataclass
class Watcher:
    http: httpx.AsyncClient
    drop_id: int
    parts: list[PartSeen] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)
    stop: bool = False
    requests: list[float] = field(default_factory=list)  # when each playlist GET returned

    async def run(self) -> None:
        url = f"/v1/drops/{self.drop_id}/hls/live.m3u8"
        seen: set[tuple[int, int]] = set()
        newest: tuple[int, int] | None = None
        while not self.stop:
            params = {} if newest is None else {
                "_HLS_msn": str(newest[0]), "_HLS_part": str(newest[1] + 1)}
            try:
                resp = await self.http.get(url, params=params, timeout=10)
            except httpx.TimeoutException:
                continue
            at = time.monotonic()
            self.requests.append(at)
            if resp.status_code == 404:
                await asyncio.sleep(0.05)
                continue
            if resp.status_code == 503:
                continue
            resp.raise_for_status()
            text = resp.text
            if "#EXT-X-ENDLIST" in text:
                return
            listed = [(int(m), int(i)) for m, i in _PART_URI.findall(text)]
            if self.size == (0, 0):
                init = re.search(r'#EXT-X-MAP:URI="([^"]+)"', text)
                if init:
                    data = (await self.http.get(f"/v1/drops/{self.drop_id}/hls/"
                                                f"{init.group(1)}")).content
                    self.size = avc1_size(data)
            for key in listed:
                if key in seen:
                    continue
                seen.add(key)
                data = (await self.http.get(
                    f"/v1/drops/{self.drop_id}/hls/s{key[0]}.{key[1]}.m4s")).content
                self.parts.append(PartSeen(key[0], key[1], at, video_samples(data)))
            if listed:
                newest = max(listed)
                if f"\ns{newest[0]}.m4s\n" in text:
                    newest = (newest[0] + 1, -1)  # its segment closed: next is s<msn+1>.0


async def stream_size(http: httpx.AsyncClient, drop_id: int) -> tuple[int, int]:
    text = (await http.get(f"/v1/drops/{drop_id}/hls/live.m3u8")).text
    init = re.findall(r'#EXT-X-MAP:URI="([^"]+)"', text)
    if not init:
        return 0, 0
    return avc1_size((await http.get(f"/v1/drops/{drop_id}/hls/{init[-1]}")).content)


def frame_latencies(parts: list[PartSeen], sent: list[float]) -> tuple[
        list[tuple[float, float, float]], int]:
    """(seen, newest-frame latency, oldest-frame latency) per part, and frames placed.

    The first packaged frame is the first keyframe the server received, so its frame
    index is a multiple of the GOP (30); the largest multiple that keeps every
    latency positive is the right one (one GOP less would add a whole second).
    """
    parts = sorted((p for p in parts if p.samples), key=lambda p: (p.msn, p.index))
    if not parts:
        return [], 0
    origin = parts[0].samples[0][0]

    def index(t: int, k: int) -> int:
        return k * FPS + round((t - origin) / FRAME_TICKS)

    best: list[tuple[float, float, float]] = []
    for k in range(0, 10):
        rows = []
        ok = True
        for p in parts:
            first, last = index(p.samples[0][0], k), index(p.samples[-1][0], k)
            if last >= len(sent):
                ok = False
                break
            rows.append((p.seen, p.seen - sent[last], p.seen - sent[first]))
        if not ok or min(r[1] for r in rows) < 0:
            break
        best = rows
    return best, sum(len(p.samples) for p in parts)
