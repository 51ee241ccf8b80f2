"""The realtime package as mounted by dropserver.app: ``/ws`` and its machinery, and
the HTTP routes of chat moderators and the moderation audit (realtime.moderators).

Start-up builds, on ``app.state.realtime``, the process's :class:`realtime.hub.Hub`
(rooms, the pub/sub subscriber, the snapshot cache), then starts presence reporting
and heartbeats. Drain tells every socket when to reconnect (realtime.gateway.drain).
"""

from __future__ import annotations

import asyncio
import logging

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from dropserver.background import stop_task
from dropserver.component import Component
from realtime import gateway, moderators, publish
from realtime.heartbeat import Heartbeat, heartbeat_loop
from realtime.hub import Hub
from realtime.presence import Presence
from realtime.snapshot import SnapshotCache
from realtime.tokens import TokenClock

log = logging.getLogger("dropserver.realtime")


async def startup(app: Starlette) -> None:
    state = app.state
    settings = state.settings
    publish.configure(history_size=settings.history_size, history_ttl=settings.history_ttl)
    state.moderators = moderators.ModeratorCache(state.db)
    hub = Hub(app, SnapshotCache(app))
    hub.tokens = TokenClock(hub)  # signed-in sockets until their tokens expire
    await hub.start()
    state.realtime = hub
    state.realtime_presence = Presence(hub)
    state.realtime_presence.start()
    if settings.ws_ping_interval > 0:
        hub.heartbeat = Heartbeat(settings.ws_ping_interval, settings.ws_pong_timeout)
        state.realtime_heartbeat = asyncio.get_running_loop().create_task(
            heartbeat_loop(hub), name="heartbeats")


async def shutdown(app: Starlette) -> None:
    state = app.state
    task = getattr(state, "realtime_heartbeat", None)
    if task is not None:
        await stop_task(task, log)
    presence = getattr(state, "realtime_presence", None)
    if presence is not None:
        await presence.stop()
    hub = getattr(state, "realtime", None)
    if hub is not None:
        if hub.tokens is not None:
            hub.tokens.close()
        await hub.stop()


component = Component(
    name="realtime",
    routes=[WebSocketRoute("/ws", gateway.RawEndpoint()), *moderators.routes],
    startup=startup,
    shutdown=shutdown,
    drain=gateway.drain,
)
