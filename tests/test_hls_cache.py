"""What the origin tells a CDN: Cache-Control per HLS file, blocking reloads and
blocking part requests (preload hints) held until the part is there, a part too far
ahead refused at once, and every request counted in ``dropserver_hls_requests_total``.

The packager here writes into the served drop directory from the test, as a publisher
on another worker would: the server sees it only through ``live.json``.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from streaming.hls import (
    BLOCKING_PLAYLIST_CACHE,
    ENDED_PLAYLIST_CACHE,
    FINAL_PLAYLIST_CACHE,
    LIVE_PLAYLIST_CACHE,
    MEDIA_CACHE,
    MISSING_CACHE,
    TIMEOUT_CACHE,
)
from streaming.packager import Packager
from tests.conftest import running
from tests.test_streaming_packager import h264_frames
from tests.test_whip import make_drop


class Feeder:
    """H.264 frames into a packager, a few at a time (a publisher, sped up)."""

    def __init__(self, packager: Packager, seconds: float = 6.0) -> None:
        self.packager = packager
        self.frames = h264_frames(seconds)
        self.next = 0
        packager.start_session(audio=False)

    def until(self, predicate) -> None:
        while not predicate():
            data, pts, _ = self.frames[self.next]
            self.packager.add_video(data, pts)
            self.next += 1

    def parts(self, n: int) -> None:
        """Until ``n`` more parts are written."""
        target = self.written() + n
        self.until(lambda: self.written() >= target)

    def written(self) -> int:
        pl = self.packager.playlist
        return sum(len(s.parts) for s in pl.segments) + len(pl.parts)


def metric(text: str, kind: str) -> float:
    m = re.search(rf'^dropserver_hls_requests_total{{kind="{kind}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
async def origin(settings):
    async with running(settings) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            yield http


async def test_cache_headers_by_kind_of_file(origin, settings) -> None:
    http = origin
    drop_id = await make_drop(settings.database_url, state="live")
    hls = f"/v1/drops/{drop_id}/hls"
    feeder = Feeder(Packager(Path(settings.media_dir) / "drops" / str(drop_id)))
    feeder.until(lambda: len(feeder.packager.playlist.segments) >= 2)

    live = await http.get(f"{hls}/live.m3u8")
    assert live.status_code == 200
    assert live.headers["cache-control"] == LIVE_PLAYLIST_CACHE == "public, max-age=1"
    assert (await http.get(f"{hls}/index.m3u8")).headers["cache-control"] == LIVE_PLAYLIST_CACHE
    pl = feeder.packager.playlist
    blocking = await http.get(f"{hls}/live.m3u8", params={
        "_HLS_msn": str(pl.next_msn - 1), "_HLS_part": "0"})  # there already
    assert blocking.status_code == 200
    assert blocking.headers["cache-control"] == BLOCKING_PLAYLIST_CACHE
    for name in ("init1.mp4", "s0.m4s", "s1.2.m4s"):
        r = await http.get(f"{hls}/{name}")
        assert r.status_code == 200, name
        assert r.headers["cache-control"] == MEDIA_CACHE, name
        assert "immutable" in r.headers["cache-control"]
    gone = await http.get(f"{hls}/s0.99.m4s")  # a part its segment never had
    assert gone.status_code == 404 and gone.headers["cache-control"] == MISSING_CACHE
    assert gone.headers["access-control-allow-origin"] == "*"
    odd = await http.get(f"{hls}/nothing.txt")
    assert odd.status_code == 404 and odd.headers["cache-control"] == MISSING_CACHE

    # Ended: cacheable for a minute while the drop may still go live again; a day once
    # the drop is over and its stream cannot continue.
    feeder.packager.finish()
    assert (await http.get(f"{hls}/live.m3u8")).headers["cache-control"] == ENDED_PLAYLIST_CACHE
    ended_drop = await make_drop(settings.database_url, state="ended")
    done = Feeder(Packager(Path(settings.media_dir) / "drops" / str(ended_drop)), 2.5)
    done.until(lambda: len(done.packager.playlist.segments) >= 1)
    done.packager.finish()
    for name in ("live.m3u8", "replay.m3u8", "index.m3u8"):
        r = await http.get(f"/v1/drops/{ended_drop}/hls/{name}")
        assert r.headers["cache-control"] == FINAL_PLAYLIST_CACHE, name


async def test_a_hinted_part_and_a_blocking_reload_wait_for_the_part(origin, settings) -> None:
    """The two requests an LL-HLS player sends for the next part (rfc8216bis 6.2.5.2
    and 6.2.6), both made before the part exists: each is answered as soon as it is
    written, the part with its bytes, the playlist listing it."""
    http = origin
    drop_id = await make_drop(settings.database_url)
    hls = f"/v1/drops/{drop_id}/hls"
    directory = Path(settings.media_dir) / "drops" / str(drop_id)
    feeder = Feeder(Packager(directory))
    feeder.until(lambda: len(feeder.packager.playlist.segments) >= 1)
    hint = feeder.packager.playlist.preload_uri
    msn, part = (int(x) for x in re.match(r"s(\d+)\.(\d+)\.m4s", hint).groups())
    assert not (directory / hint).exists()

    started = time.monotonic()
    part_req = asyncio.create_task(http.get(f"{hls}/{hint}"))
    playlist_req = asyncio.create_task(http.get(f"{hls}/live.m3u8", params={
        "_HLS_msn": str(msn), "_HLS_part": str(part)}))
    await asyncio.sleep(0.5)
    assert not part_req.done() and not playlist_req.done()
    feeder.parts(1)
    got_part, got_playlist = await part_req, await playlist_req
    waited = time.monotonic() - started
    assert 0.5 <= waited < 2.0
    assert got_part.status_code == 200 and got_part.content == (directory / hint).read_bytes()
    assert got_part.headers["cache-control"] == MEDIA_CACHE
    assert got_playlist.status_code == 200 and f'URI="{hint}"' in got_playlist.text
    assert got_playlist.headers["cache-control"] == BLOCKING_PLAYLIST_CACHE


async def test_a_part_that_cannot_have_been_hinted_is_refused_at_once(origin, settings) -> None:
    """Only the open segment's parts and the next segment's first can be hinted: a
    part further ahead is a 404 now (cacheable for a second), not a 404 after a hold
    of three target durations that a crowd behind a CDN would all sit through."""
    http = origin
    drop_id = await make_drop(settings.database_url)
    hls = f"/v1/drops/{drop_id}/hls"
    feeder = Feeder(Packager(Path(settings.media_dir) / "drops" / str(drop_id)))
    feeder.until(lambda: len(feeder.packager.playlist.segments) >= 1)
    ahead = feeder.packager.playlist.next_msn + 2
    started = time.monotonic()
    r = await http.get(f"{hls}/s{ahead}.0.m4s")
    assert r.status_code == 404 and time.monotonic() - started < 0.5
    assert r.headers["cache-control"] == MISSING_CACHE


async def test_a_blocking_reload_that_times_out_is_cached_a_second(origin, settings) -> None:
    http = origin
    drop_id = await make_drop(settings.database_url)
    feeder = Feeder(Packager(Path(settings.media_dir) / "drops" / str(drop_id)))
    feeder.until(lambda: len(feeder.packager.playlist.segments) >= 1)
    pl = feeder.packager.playlist
    r = await http.get(f"/v1/drops/{drop_id}/hls/live.m3u8", params={
        "_HLS_msn": str(pl.next_msn + 1), "_HLS_part": "0"})  # nobody feeds it now
    assert r.status_code == 503
    # Cacheable for a second: behind a collapsing proxy an uncacheable answer sends the
    # waiting crowd to the origin one at a time (tests/test_hls_cdn.py).
    assert r.headers["cache-control"] == TIMEOUT_CACHE == "public, max-age=1"
    far = await http.get(f"/v1/drops/{drop_id}/hls/live.m3u8", params={
        "_HLS_msn": str(pl.next_msn + 5)})
    assert far.status_code == 400 and far.headers["cache-control"] == "public, max-age=1"


async def test_requests_are_counted_by_kind(origin, settings) -> None:
    http = origin
    drop_id = await make_drop(settings.database_url)
    hls = f"/v1/drops/{drop_id}/hls"
    feeder = Feeder(Packager(Path(settings.media_dir) / "drops" / str(drop_id)))
    feeder.until(lambda: len(feeder.packager.playlist.segments) >= 1)
    before = (await http.get("/metrics")).text
    pl = feeder.packager.playlist
    for path, params in (("live.m3u8", {}), ("live.m3u8", {}), ("init1.mp4", {}),
                         ("s0.m4s", {}), ("s0.0.m4s", {}), ("s0.1.m4s", {}),
                         ("s0.77.m4s", {}),
                         ("live.m3u8", {"_HLS_msn": str(pl.next_msn), "_HLS_part": "0"})):
        await http.get(f"{hls}/{path}", params=params)
    after = (await http.get("/metrics")).text
    grew = {kind: metric(after, kind) - metric(before, kind) for kind in (
        "playlist", "blocking_playlist", "init", "segment", "part", "missing")}
    assert grew == {"playlist": 2, "blocking_playlist": 1, "init": 1, "segment": 1,
                    "part": 3, "missing": 1}


def test_a_stream_continued_after_a_lost_worker_never_reuses_a_served_name(
        tmp_path: Path) -> None:
    """A worker killed mid-segment leaves parts of a segment that was never closed
    (and maybe an init segment no closed segment names). The worker that continues the
    stream must not write other bytes under those names: a CDN keeps media it has
    served for a year (immutable). The unfinished segment is listed as a gap
    (rfc8216bis 4.4.4.7 EXT-X-GAP: players skip it), so the numbering stays whole."""
    first = Feeder(Packager(tmp_path))
    first.until(lambda: len(first.packager.playlist.segments) >= 2)
    first.parts(2)  # segment 2 has parts on disk, and is never closed: the worker dies
    served = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix in (".m4s", ".mp4")}
    lost_msn = first.packager.playlist.next_msn

    second = Feeder(Packager(tmp_path))  # another worker, same directory
    second.until(lambda: len(second.packager.playlist.segments) >= lost_msn + 2)
    for name, data in served.items():
        assert (tmp_path / name).read_bytes() == data, f"{name} was written again"
    pl = second.packager.playlist
    assert [s.msn for s in pl.segments] == list(range(len(pl.segments)))
    gaps = [s.msn for s in pl.segments if s.gap]
    assert gaps == [lost_msn]
    text = (tmp_path / "live.m3u8").read_text()
    lines = text.splitlines()
    gap_at = lines.index("#EXT-X-GAP")
    assert lines[gap_at + 2] == f"s{lost_msn}.m4s"
    assert "init2.mp4" in text  # a new init for the new session, not init1 again
    # A third worker after a clean end still sees the one gap (segments.jsonl).
    second.packager.end_session()
    assert [s.msn for s in Packager(tmp_path).playlist.segments if s.gap] == [lost_msn]


def timeouts(text: str, publisher: str) -> float:
    m = re.search(rf'^dropserver_hls_blocking_timeouts_total{{publisher="{publisher}"}} (\S+)$',
                  text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_a_blocking_reload_that_times_out_says_whether_its_publisher_sent_media(
        settings) -> None:
    """``dropserver_hls_blocking_timeouts_total{publisher}``: a 503 while no media came
    from the publisher is ``silent`` (its stall), one while media came in yet the part
    asked for was not there is ``sending`` (the server's), one on a worker without
    the publisher ``elsewhere``. The e2e pages (tests/e2e/conftest.py) allow only the
    first kind."""
    from streaming.live import DropStream

    silent_drop = await make_drop(settings.database_url, state="live")
    sending_drop = await make_drop(settings.database_url, state="live")
    elsewhere_drop = await make_drop(settings.database_url, state="live")
    async with running(settings) as server:
        streaming = server.app.state.streaming
        feeds = {}
        for drop_id in (silent_drop, sending_drop):
            stream = streaming.streams[drop_id] = DropStream(streaming, drop_id, "creator-1")
            feeds[drop_id] = (stream, Feeder(stream.packager))
        elsewhere = Feeder(Packager(Path(settings.media_dir) / "drops" / str(elsewhere_drop)))
        elsewhere.until(lambda: len(elsewhere.packager.playlist.segments) >= 1)

        def feed_one(drop_id: int) -> None:  # through the publisher's sink
            stream, feeder = feeds[drop_id]
            data, pts, _ = feeder.frames[feeder.next]
            stream.add_video(data, pts)
            feeder.next += 1

        for drop_id in feeds:
            while not feeds[drop_id][1].packager.playlist.segments:
                feed_one(drop_id)

        def next_part(packager: Packager) -> str:
            msn, part = packager.playlist.preload_uri[1:-4].split(".")
            return f"live.m3u8?_HLS_msn={msn}&_HLS_part={part}"

        async with httpx.AsyncClient(base_url=server.base_url, timeout=20) as http:
            before = (await http.get("/metrics")).text

            async def ask(drop_id: int, packager: Packager) -> int:
                return (await http.get(f"/v1/drops/{drop_id}/hls/{next_part(packager)}")
                        ).status_code

            async def trickle() -> None:  # one frame while held: not a whole part
                await asyncio.sleep(0.5)
                feed_one(sending_drop)

            statuses = await asyncio.gather(
                ask(silent_drop, feeds[silent_drop][1].packager),
                ask(sending_drop, feeds[sending_drop][1].packager),
                ask(elsewhere_drop, elsewhere.packager), trickle())
            after = (await http.get("/metrics")).text
        for stream, _ in feeds.values():
            await stream.recorder.stop()
    assert statuses[:3] == [503, 503, 503]
    assert {p: timeouts(after, p) - timeouts(before, p)
            for p in ("silent", "sending", "elsewhere")} == \
        {"silent": 1, "sending": 1, "elsewhere": 1}
