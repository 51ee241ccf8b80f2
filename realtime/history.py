"""Reading a drop's history: the current position and exact recovery.

Recovery follows centrifuge's rules: a client that sends its last position
``(epoch, offset)`` gets every event after it, or nothing and ``recovered=False``
when the epoch changed or the gap is older than the capped history (or larger
than ``limit``). Never a partial recovery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from realtime import channels
from realtime.channels import Publication

__all__ = ["Position", "Recovery", "position", "recover"]


@dataclass(frozen=True, slots=True)
class Position:
    epoch: str
    offset: int


@dataclass(slots=True)
class Recovery:
    recovered: bool
    position: Position
    publications: list[Publication] = field(default_factory=list)


async def position(redis: Any, drop_id: int) -> Position:
    """The drop's current position; ``("", 0)`` before its first event."""
    epoch, offset = await redis.hmget(channels.meta_key(drop_id), "epoch", "offset")
    return Position(epoch.decode() if epoch else "", int(offset or 0))


async def recover(redis: Any, drop_id: int, since: Position, limit: int) -> Recovery:
    """Every event after ``since``, or ``recovered=False`` (see module docstring)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hmget(channels.meta_key(drop_id), "epoch", "offset")
        pipe.xrange(channels.history_key(drop_id), min=f"{since.offset + 1}-0", max="+",
                    count=limit + 1)
        (epoch, offset), entries = await pipe.execute()
    current = Position(epoch.decode() if epoch else "", int(offset or 0))
    if current.offset == 0:
        # Nothing was ever published (or it all expired): only a client that has
        # seen nothing is up to date.
        return Recovery(since.offset == 0, current)
    if since.offset == 0 and not since.epoch:
        # Joined before the drop's first event: everything since offset 1 is missed.
        since = Position(current.epoch, 0)
    if since.epoch != current.epoch or since.offset > current.offset:
        return Recovery(False, current)
    missed = current.offset - since.offset
    if missed == 0:
        return Recovery(True, current)
    if missed > limit or not entries:
        return Recovery(False, current)
    pubs = [channels.parse_history_entry(eid, fields, current.epoch) for eid, fields in entries]
    # The history must start right after `since` and reach the current offset
    # (entries published after the HMGET inside MULTI cannot exist).
    if pubs[0].offset != since.offset + 1 or pubs[-1].offset < current.offset:
        return Recovery(False, current)
    return Recovery(True, current, [p for p in pubs if p.offset <= current.offset])
