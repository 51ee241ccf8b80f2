"""WHIP endpoint (RFC 9725): the creator publishes to ``/v1/drops/{drop_id}/whip``.

* POST with ``Content-Type: application/sdp`` and the creator's bearer token (4.7,
  RFC 6750) -> ``201 Created``, the SDP answer and a ``Location`` naming the WHIP
  session (4.2). The answer carries every ICE candidate (aiortc gathers before
  answering), so no trickle ICE.
* DELETE on the session URL ends the session (4.2) -> 200.
* PATCH (trickle ICE / ICE restart, 4.3.1) is not supported -> 405; OPTIONS -> 204
  with ``Accept-Post: application/sdp``. A client that loses its connection simply
  POSTs again and continues the same stream (streaming.live).

Errors are JSON (``dropserver.errors``): 401 no/invalid token, 403 not the drop's
creator, 404 no such drop or session, 409 drop already ended or the stream is being
published through another worker, 415 not ``application/sdp``, 400/422 bad offer.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response

from dropserver.auth import Role, require, require_drop_owner
from dropserver.errors import ApiError, Conflict, NotFound, ValidationFailed
from dropserver.http import read_body
from dropserver.observability import bind
from streaming.ingest import BadOffer, Publisher
from streaming.live import DropStream, Streaming, owner_key

__all__ = ["STREAMABLE_STATES", "whip_delete", "whip_options", "whip_post", "whip_session_other"]

log = logging.getLogger("dropserver.streaming")

SDP = "application/sdp"
MAX_OFFER_BYTES = 64 * 1024
# Streaming makes sense until the drop is over: a creator may test before going live.
STREAMABLE_STATES = frozenset({"draft", "scheduled", "live", "selling", "sold_out", "closed"})


def _drop_id(request: Request) -> int:
    return request.path_params["drop_id"]  # the ``id`` convertor: 1 <= id < 10^18


async def _owned_drop(request: Request, drop_id: int):
    who = await require(request, Role.CREATOR)
    row = await request.app.state.db.fetchrow(
        "SELECT id, creator_id, state FROM drops WHERE id = $1", drop_id)
    if row is None:
        raise NotFound("no such drop", code="drop_not_found")
    require_drop_owner(who, row["creator_id"])
    return who, row


async def _read_offer(request: Request) -> str:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != SDP:
        # RFC 9725 4.2: a POST that is not application/sdp gets a 4xx.
        raise ApiError("WHIP expects Content-Type: application/sdp",
                       code="unsupported_media_type", status=415)
    body = await read_body(request, MAX_OFFER_BYTES, "offer")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("the offer is not UTF-8 text", code="bad_offer") from None


async def whip_post(request: Request) -> Response:
    drop_id = _drop_id(request)
    _, drop = await _owned_drop(request, drop_id)
    bind(drop_id=drop_id, user_id=drop["creator_id"])
    if drop["state"] not in STREAMABLE_STATES:
        raise Conflict(f"drop is {drop['state']}: its stream is over",
                       code="drop_not_streamable", details={"state": drop["state"]})
    offer = await _read_offer(request)
    streaming: Streaming = request.app.state.streaming
    owner = await streaming.redis.get(owner_key(drop_id))
    if owner is not None and owner.decode() != streaming.node_id:
        raise Conflict("this drop is being published through another server process; "
                       "retry shortly", code="publishing_elsewhere",
                       headers={"Retry-After": "10"})

    session_id = streaming.new_session_id()
    stream = streaming.streams.get(drop_id)
    if stream is None:
        stream = DropStream(streaming, drop_id, drop["creator_id"])

    async def on_closed(pub: Publisher, lost: bool) -> None:
        streaming.publishers.pop(pub.id, None)
        await streaming.db.execute(
            "UPDATE stream_sessions SET state = $2, ended_at = now() WHERE id = $1",
            pub.id, "failed" if lost else "ended")
        await stream.detach(pub, lost)

    publisher = Publisher(session_id, sink=stream, on_closed=on_closed,
                          read_timeout=streaming.settings.whip_read_timeout)
    try:
        answer = await publisher.accept(offer)
    except BadOffer as exc:
        status = 422 if exc.code.startswith("offer_") else 400
        raise (ValidationFailed if status == 422 else ApiError)(
            str(exc), code=exc.code, status=status) from None
    streaming.streams[drop_id] = stream
    streaming.publishers[session_id] = (drop_id, publisher)
    await streaming.db.execute(
        "INSERT INTO stream_sessions (id, drop_id, creator_id, state, video_codec, "
        "audio_codec) VALUES ($1, $2, $3, 'live', $4, $5)",
        session_id, drop_id, drop["creator_id"], publisher.video_codec, publisher.audio_codec)
    await stream.attach(publisher)
    log.info("whip publish", extra={"drop_id": drop_id, "session": session_id,
                                    "video": publisher.video_codec,
                                    "audio": publisher.audio_codec})
    location = f"/v1/drops/{drop_id}/whip/{session_id}"
    return Response(answer, status_code=201, media_type=SDP, headers={
        "Location": location, "ETag": f'"{session_id}"'})


async def whip_delete(request: Request) -> Response:
    drop_id = _drop_id(request)
    await _owned_drop(request, drop_id)
    streaming: Streaming = request.app.state.streaming
    found = streaming.publishers.get(request.path_params["session_id"])
    if found is None or found[0] != drop_id:
        row = await streaming.db.fetchrow(
            "SELECT state FROM stream_sessions WHERE id = $1 AND drop_id = $2",
            request.path_params["session_id"], drop_id)
        if row is not None and row["state"] == "live":
            # Known but served by another worker (see docs/streaming.md).
            raise Conflict("this session is held by another server process",
                           code="publishing_elsewhere")
        raise NotFound("no such WHIP session", code="session_not_found")
    await found[1].close()
    return Response(status_code=200)


async def whip_options(request: Request) -> Response:
    return Response(status_code=204, headers={"Accept-Post": SDP,
                                              "Allow": "OPTIONS, POST"})


async def whip_session_other(request: Request) -> Response:
    # RFC 9725 4.3.1: no trickle ICE or ICE restart support -> 405.
    raise ApiError("trickle ICE and ICE restarts are not supported; POST a new offer",
                   code="method_not_allowed", status=405, headers={"Allow": "DELETE"})
