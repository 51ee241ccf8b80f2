"""Serving HLS from the drop's directory, from any worker.

``GET /v1/drops/{id}/hls/{name}``: ``live.m3u8`` (LL-HLS), ``index.m3u8`` (plain HLS),
``replay.m3u8`` (VOD once the stream ended), ``init<n>.mp4`` and ``s<msn>[.<part>].m4s``.

Blocking playlist reload (rfc8216bis 6.2.5.2): ``live.m3u8?_HLS_msn=M&_HLS_part=P`` is
held until the playlist holds part P of segment M (or a later segment), at most three
target durations, then 503. A request more than two segments ahead is a 400. A part
named by EXT-X-PRELOAD-HINT is likewise held until it is written (6.2.6). The worker
that holds the publisher wakes waiters on each new part; other workers poll the
drop's ``live.json`` every 20 ms.

Headers: playlists ``no-cache`` while live, cacheable once ended; media
``immutable``; ``Access-Control-Allow-Origin: *`` (viewers may be guests on another
origin); ``application/vnd.apple.mpegurl``, ``video/mp4``, ``video/iso.segment``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from dropserver.errors import ApiError, NotFound
from streaming import replay
from streaming.live import DropStream, Streaming, StreamStatus
from streaming.playlist import parse_blocking_request

__all__ = ["hls_file", "replay_timeline", "stream_status"]

_NAME = re.compile(r"^(live\.m3u8|index\.m3u8|replay\.m3u8|init\d{1,6}\.mp4|"
                   r"s\d{1,9}(\.\d{1,4})?\.m4s)$")
_PART = re.compile(r"^s(\d+)\.(\d+)\.m4s$")
CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Expose-Headers": "Content-Length, Date"}
POLL = 0.02


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


async def hls_file(request: Request) -> Response:
    drop_id = _drop_id(request)
    name = request.path_params["name"]
    if not _NAME.match(name):
        raise NotFound("no such HLS file", code="hls_not_found")
    streaming: Streaming = request.app.state.streaming
    directory = streaming.drop_dir(drop_id)
    stream = streaming.streams.get(drop_id)
    settings = streaming.settings
    hold = 3 * max(settings.hls_segment_seconds, 1.0)

    if name == "live.m3u8":
        try:
            blocking = parse_blocking_request(dict(request.query_params))
        except ValueError as exc:
            raise ApiError(str(exc), code="bad_blocking_request") from None
        if blocking is not None:
            state = _state(stream, directory)
            if state is not None and blocking.msn > state[0] + 2:
                # 6.2.5.2: more than two segments ahead of the last one
                raise ApiError("_HLS_msn is too far in the future",
                               code="bad_blocking_request")
            if not await _wait(stream, directory, blocking.msn, blocking.part, hold):
                raise ApiError("the requested part did not arrive in time",
                               code="unavailable", status=503)
    else:
        m = _PART.match(name)
        if m and not (directory / name).exists():
            # A preload hint (6.2.6): wait for that part to be written.
            await _wait(stream, directory, int(m.group(1)), int(m.group(2)), hold)

    path = directory / name
    if not path.is_file():
        raise NotFound("no such HLS file", code="hls_not_found", headers=CORS)
    if name.endswith(".m3u8"):
        body = path.read_bytes()
        ended = b"#EXT-X-ENDLIST" in body
        cache = "public, max-age=60" if ended else "no-cache"
        return Response(body, media_type="application/vnd.apple.mpegurl",
                        headers={**CORS, "Cache-Control": cache})
    media = "video/mp4" if name.endswith(".mp4") else "video/iso.segment"
    headers = {**CORS, "Cache-Control": "public, max-age=31536000, immutable"}
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
