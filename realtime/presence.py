"""Viewer counts across processes and nodes: counts, never rosters.

Every ``DROPSERVER_VIEWERS_COALESCE_MS`` each process reports its local count per
drop with ``scripts/presence_update.lua`` (a hash field per node, expiring after
``DROPSERVER_PRESENCE_TTL`` seconds: the node heartbeat) and gets the drop's total
back. It hands the total to its own viewers as the volatile "viewers" event when it
changed, so counting costs one Redis call per drop per second per process and no
pub/sub traffic. A crashed node stops reporting and its viewers leave every total
within the TTL.

Viewers are the audience: a socket joined with a token of the drop's staff (its
creator, as the console joins, an admin, or a moderator the creator appointed) is not
counted (``Room.staff``, decided at the join: an appointment or a dismissal counts
from the moderator's next join).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from dropserver.background import Periodic
from realtime._lua import load

__all__ = ["Presence", "presence_key"]

log = logging.getLogger("dropserver.realtime")

_update = load("presence_update")


def presence_key(drop_id: int) -> str:
    return f"{{drop:{int(drop_id)}}}:presence"


async def report(redis: Any, drop_id: int, node_id: str, count: int, ttl_s: float) -> int:
    """Set this node's count for the drop; return the total over live nodes."""
    total = await _update(keys=[presence_key(drop_id)],
                          args=[node_id, count, int(time.time() * 1000), int(ttl_s * 1000)],
                          client=redis)
    return int(total)


class Presence:
    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self._reported: dict[int, int] = {}
        interval = max(0.05, hub.settings.viewers_coalesce_ms / 1000)
        self._loop = Periodic("presence", interval, self.tick, log, "presence update",
                              level=logging.ERROR)
        self.start = self._loop.start

    async def stop(self, *, withdraw: bool = True) -> None:
        await self._loop.stop()
        if withdraw:  # a clean stop leaves the count at once
            hub = self.hub
            for drop_id in list(self._reported):
                with contextlib.suppress(Exception):
                    await report(hub.redis, drop_id, hub.node_id, 0, hub.settings.presence_ttl)

    async def tick(self) -> None:
        hub = self.hub
        ttl = hub.settings.presence_ttl
        drops = set(self._reported) | set(hub.rooms)
        for drop_id in drops:
            room = hub.rooms.get(drop_id)
            local = len(room.conns) - len(room.staff) if room is not None else 0
            if local == 0 and drop_id not in hub.rooms:
                await report(hub.redis, drop_id, hub.node_id, 0, ttl)
                self._reported.pop(drop_id, None)
                continue
            total = await report(hub.redis, drop_id, hub.node_id, local, ttl)
            self._reported[drop_id] = local
            if room is not None and total != room.viewers:
                room.viewers = total
                room.on_volatile("viewers", {"count": total})
