"""The streaming package as mounted by dropserver.app: WHIP in, HLS and replays out."""

from __future__ import annotations

import tempfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Route

from dropserver.component import Component
from realtime.moderators import guard_sales
from streaming import ingest
from streaming.hls import hls_file, replay_timeline, stream_status
from streaming.live import Streaming
from streaming.whip import whip_delete, whip_options, whip_post, whip_session_other

__all__ = ["component"]


def media_dir(configured: str) -> Path:
    """``DROPSERVER_MEDIA_DIR``, or ``<tmp>/dropserver-media`` shared by local workers
    and kept across restarts so replays survive in development."""
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / "dropserver-media"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def startup(app: Starlette) -> None:
    state = app.state
    ingest.install(transcode_all=state.settings.hls_transcode == "always")
    state.streaming = Streaming(settings=state.settings, redis=state.redis, db=state.db,
                                node_id=state.node_id,
                                media_dir=media_dir(state.settings.media_dir))


async def shutdown(app: Starlette) -> None:
    await app.state.streaming.close_all()


routes = [
    Route("/v1/drops/{drop_id:id}/whip", guard_sales(whip_post), methods=["POST"]),
    Route("/v1/drops/{drop_id:id}/whip", whip_options, methods=["OPTIONS"]),
    Route("/v1/drops/{drop_id:id}/whip/{session_id}", guard_sales(whip_delete),
          methods=["DELETE"]),
    Route("/v1/drops/{drop_id:id}/whip/{session_id}", whip_session_other,
          methods=["PATCH", "OPTIONS"]),
    Route("/v1/drops/{drop_id:id}/hls/{name}", hls_file, methods=["GET", "HEAD"]),
    Route("/v1/drops/{drop_id:id}/stream", stream_status, methods=["GET"]),
    Route("/v1/drops/{drop_id:id}/replay", replay_timeline, methods=["GET"]),
]

component = Component(name="streaming", routes=routes, startup=startup, shutdown=shutdown)
