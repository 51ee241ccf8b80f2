"""Serving HLS from the drop's directory, from any worker, fit to sit behind a CDN.

``GET /v1/drops/{id}/hls/{name}``: ``live.m3u8`` (LL-HLS), ``index.m3u8`` (plain HLS),
``replay.m3u8`` (VOD once the stream ended), ``init<n>.mp4`` and ``s<msn>[.<part>].m4s``.

Blocking playlist reload (rfc8216bis 6.2.5.2): ``live.m3u8?_HLS_msn=M&_HLS_part=P`` is
held until the playlist holds part P of segment M (or a later segment), at most three
target durations, then 503. A request more than two segments ahead is a 400. A part
named by EXT-X-PRELOAD-HINT is likewise held until it is written (6.2.6); a part of a
segment after the next one cannot have been hinted and is a 404 at once. The worker
that holds the publisher wakes waiters on each new part; other workers poll the
drop's ``live.json`` every 20 ms.

``Cache-Control`` (:func:`cache_control`) is what a CDN caches by; docs/streaming.md
("Behind a CDN") has the tested proxy configuration. Every request is counted in
``dropserver_hls_requests_total`` by kind, which is how an operator (and the CDN
test) sees what reaches the origin. A blocking reload answered 503 is also counted
in ``dropserver_hls_blocking_timeouts_total`` by whether its publisher sent media
meanwhile (``sending``: the server's stall) or not (``silent``: the publisher's).
``Access-Control-Allow-Origin: *`` (viewers may be guests on another origin);
``application/vnd.apple.mpegurl``, ``video/mp4``, ``video/iso.segment``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from dropserver.errors import ApiError, NotFound
from dropserver.observability import tally
from streaming import replay
from streaming.live import DropStream, Streaming, StreamStatus
from streaming.playlist import parse_blocking_request
from streaming.whip import STREAMABLE_STATES

__all__ = ["BLOCKING_TIMEOUTS", "REQUESTS", "cache_control", "hls_file", "replay_timeline",
           "stream_status"]

_NAME = re.compile(r"^(live\.m3u8|index\.m3u8|replay\.m3u8|init\d{1,6}\.mp4|"
                   r"s\d{1,9}(\.\d{1,4})?\.m4s)$")
_PART = re.compile(r"^s(\d+)\.(\d+)\.m4s$")
CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Expose-Headers": "Content-Length, Date"}
POLL = 0.02

REQUESTS = Counter("dropserver_hls_requests_total",
                   "HLS requests that reached this origin, by kind: playlist, "
                   "blocking_playlist, part, segment, init, missing (404).", ["kind"])
_KINDS = {kind: REQUESTS.labels(kind) for kind in (
    "playlist", "blocking_playlist", "part", "segment", "init", "missing")}
BLOCKING_TIMEOUTS = Counter(
    "dropserver_hls_blocking_timeouts_total",
    "Blocking playlist reloads answered 503 (the part asked for did not arrive within "
    "three target durations), by what the publisher did meanwhile: silent (no media "
    "from it reached this worker while the request was held), sending (media came in, "
    "yet the part was not there in time: the server's stall), elsewhere (this worker "
    "does not hold the drop's publisher; it read live.json).", ["publisher"])
_PUBLISHER = {p: BLOCKING_TIMEOUTS.labels(p) for p in ("silent", "sending", "elsewhere")}

# Cache-Control by what a response is. Media and init segments never change once
# written (names are never reused: see Packager._load), so a CDN keeps them as long as
# it likes (RFC 8216 6.2.2 requires that a URI's content does not change while it is
# listed; Apple's LL-HLS CDN guidance: parts, segments and init segments are long
# cached). Playlists without delivery directives change at every part: one second
# (the shortest max-age there is; AWS MediaPackage also gives LL-HLS playlists one
# second), which lets a proxy answer a crowd tuning in with one origin request a
# second; the player corrects for it with the Age header (rfc8216bis appendix C,
# "CDN Tune-in"). A blocking reload's URL names a playlist at least that new: its
# answer stays right for whoever asks for that URL later, so it is cached as long as
# a segment stays in the live window, and every viewer waiting for the same part
# costs the origin one request (rfc8216bis 6.2.5.2: the query is part of the URL,
# so the cache key must keep it). An ended playlist changes again only if the
# creator goes live again on the same drop; once the drop is over (not streamable)
# it is final.
MEDIA_CACHE = "public, max-age=31536000, immutable"
LIVE_PLAYLIST_CACHE = "public, max-age=1"
BLOCKING_PLAYLIST_CACHE = "public, max-age=30"
ENDED_PLAYLIST_CACHE = "public, max-age=60"
FINAL_PLAYLIST_CACHE = "public, max-age=86400"
# Errors a crowd can meet together are cached for a second too: a 404 (a part not
# written yet and too far ahead to be held, or one deleted), a blocking reload that
# timed out (503: the publisher stalled) and one asked for too far ahead (400). A
# proxy that collapses requests lets one through per key and holds the others until
# its answer; an answer it may not cache sends them to the origin one at a time, each
# held again (measured with nginx: 20 viewers waiting on a no-store 503 reached the
# origin one by one, the last after nginx's 10 s lock timeout). A second is short
# enough that a part, once there, is not hidden for long.
MISSING_CACHE = "public, max-age=1"
TIMEOUT_CACHE = "public, max-age=1"
REFUSED_CACHE = "public, max-age=1"


def cache_control(name: str, *, blocking: bool = False, ended: bool = False,
                  final: bool = False) -> str:
    """The ``Cache-Control`` of an HLS file: ``blocking`` for a playlist asked for with
    ``_HLS_msn``, ``ended`` for one with ``EXT-X-ENDLIST``, ``final`` when the drop is
    over and the stream cannot continue."""
    if not name.endswith(".m3u8"):
        return MEDIA_CACHE
    if ended:
        return FINAL_PLAYLIST_CACHE if final else ENDED_PLAYLIST_CACHE
    return BLOCKING_PLAYLIST_CACHE if blocking else LIVE_PLAYLIST_CACHE


def _drop_id(request: Request) -> int:
    return request.path_params["drop_id"]  # the ``id`` convertor: 1 <= id < 10^18


def _live_state(directory: Path) -> tuple[int, int, bool] | None:
    try:
        state = json.loads((directory / "live.json").read_text())
    except (OSError, ValueError):
        return None
    return state["msn"], state["part"], state["ended"]


def _state(stream: DropStream | None, directory: Path) -> tuple[int, int, bool] | None:
    """The playlist's newest segment and part: from memory in the worker that holds
    the publisher, else from ``live.json``."""
    if stream is not None:
        pl = stream.packager.playlist
        return pl.next_msn, pl.last_part_index, pl.ended
    return _live_state(directory)


def _has(state: tuple[int, int, bool] | None, msn: int, part: int | None) -> bool:
    if state is None:
        return False
    cur_msn, cur_part, ended = state
    if ended or msn < cur_msn:
        return True
    return msn == cur_msn and part is not None and part <= cur_part


async def _wait(stream: DropStream | None, directory: Path, msn: int, part: int | None,
                limit: float) -> bool:
    deadline = time.monotonic() + limit
    while True:
        if stream is not None:
            pl = stream.packager.playlist
            if pl.has(msn, part):
                return True
            event = stream.changed
        elif _has(_live_state(directory), msn, part):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if stream is not None:
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return False
        else:
            await asyncio.sleep(min(POLL, left))


def _kind(name: str, blocking: bool) -> str:
    if name.endswith(".m3u8"):
        return "blocking_playlist" if blocking else "playlist"
    if name.endswith(".mp4"):
        return "init"
    return "part" if _PART.match(name) else "segment"


def _missing() -> NotFound:
    tally(_KINDS["missing"])
    return NotFound("no such HLS file", code="hls_not_found",
                    headers={**CORS, "Cache-Control": MISSING_CACHE})


async def _final(streaming: Streaming, drop_id: int) -> bool:
    """Whether the drop is over, so its stream cannot go on (whip.STREAMABLE_STATES)."""
    state = await streaming.db.fetchval("SELECT state FROM drops WHERE id = $1", drop_id)
    return state is not None and state not in STREAMABLE_STATES


async def hls_file(request: Request) -> Response:
    drop_id = _drop_id(request)
    name = request.path_params["name"]
    if not _NAME.match(name):
        raise _missing()
    streaming: Streaming = request.app.state.streaming
    directory = streaming.drop_dir(drop_id)
    stream = streaming.streams.get(drop_id)
    settings = streaming.settings
    hold = 3 * max(settings.hls_segment_seconds, 1.0)

    blocking = None
    if name == "live.m3u8":
        try:
            blocking = parse_blocking_request(dict(request.query_params))
        except ValueError as exc:
            raise ApiError(str(exc), code="bad_blocking_request",
                           headers={**CORS, "Cache-Control": REFUSED_CACHE}) from None
    tally(_KINDS[_kind(name, blocking is not None)])
    if blocking is not None:
        state = _state(stream, directory)
        if state is not None and blocking.msn > state[0] + 2:
            # 6.2.5.2: more than two segments ahead of the last one
            raise ApiError("_HLS_msn is too far in the future",
                           code="bad_blocking_request",
                           headers={**CORS, "Cache-Control": REFUSED_CACHE})
        asked = time.monotonic()
        if not await _wait(stream, directory, blocking.msn, blocking.part, hold):
            _PUBLISHER["elsewhere" if stream is None
                       else "sending" if stream.media_at >= asked else "silent"].inc()
            raise ApiError("the requested part did not arrive in time",
                           code="unavailable", status=503,
                           headers={**CORS, "Cache-Control": TIMEOUT_CACHE})
    else:
        m = _PART.match(name)
        if m and not (directory / name).exists():
            # A preload hint (6.2.6): wait for that part to be written. Only a part of
            # the open segment or the first of the next can have been hinted.
            msn, part = int(m.group(1)), int(m.group(2))
            state = _state(stream, directory)
            if state is not None and msn > state[0] + 1:
                raise _missing()
            await _wait(stream, directory, msn, part, hold)

    path = directory / name
    if not path.is_file():
        raise _missing()
    if name.endswith(".m3u8"):
        body = path.read_bytes()
        ended = b"#EXT-X-ENDLIST" in body
        final = ended and await _final(streaming, drop_id)
        cache = cache_control(name, blocking=blocking is not None, ended=ended, final=final)
        return Response(body, media_type="application/vnd.apple.mpegurl",
                        headers={**CORS, "Cache-Control": cache})
    media = "video/mp4" if name.endswith(".mp4") else "video/iso.segment"
    headers = {**CORS, "Cache-Control": MEDIA_CACHE}
    if _PART.match(name) or name.endswith(".mp4"):
        # Parts (~0.2 s, tens of KB) and init segments: read at once, from the page
        # cache. FileResponse's thread-pool hops cost more than the read for five
        # parts a second per viewer; whole segments keep it (Range requests).
        return Response(path.read_bytes(), media_type=media, headers=headers)
    return FileResponse(path, media_type=media, headers=headers)


async def stream_status(request: Request) -> JSONResponse:
    """``GET /v1/drops/{id}/stream``: status and playlist URLs, from any worker."""
    drop_id = _drop_id(request)
    streaming: Streaming = request.app.state.streaming
    stream = streaming.streams.get(drop_id)
    directory = streaming.drop_dir(drop_id)
    if stream is not None:
        status = stream.status
    else:
        state = _live_state(directory)
        owner = await streaming.redis.get(f"{{drop:{drop_id}}}:stream:owner")
        status = StreamStatus.LIVE if owner is not None and state and not state[2] \
            else StreamStatus.OFFLINE
    has_replay = (directory / "replay.m3u8").exists()
    return JSONResponse({
        "drop_id": drop_id, "status": status.value,
        "hls": streaming.hls_url(drop_id),
        "hls_plain": streaming.hls_url(drop_id, "index.m3u8"),
        "replay": streaming.hls_url(drop_id, "replay.m3u8") if has_replay else None,
    }, headers=CORS)


async def replay_timeline(request: Request) -> JSONResponse:
    """``GET /v1/drops/{id}/replay``: the VOD playlist and its shoppable moments."""
    drop_id = _drop_id(request)
    streaming: Streaming = request.app.state.streaming
    row = await streaming.db.fetchrow(
        "SELECT duration_ms, finalized_at FROM replays WHERE drop_id = $1", drop_id)
    if row is None:
        raise NotFound("this drop has no replay yet", code="replay_not_found")
    rows = await replay.moments(streaming.db, drop_id)
    return JSONResponse({
        "drop_id": drop_id,
        "playlist": streaming.hls_url(drop_id, "replay.m3u8"),
        "duration_ms": row["duration_ms"],
        "finalized_at": row["finalized_at"].isoformat(),
        "moments": [{"kind": r["kind"], "product_id": r["product_id"],
                     "media_ms": r["media_ms"], "at": r["at"].isoformat()} for r in rows],
    }, headers=CORS)
