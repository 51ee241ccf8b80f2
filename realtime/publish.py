"""Publishing drop events: the contract every package uses to reach viewers.

* :func:`publish` -- durable: gets a position ``(epoch, offset)``, goes into the drop's
  capped history (a Redis Stream) and out on the drop's channel, in one Lua script
  (``scripts/history_add.lua``), so history order is channel order.
* :func:`publish_many` -- several durable events of one action (``drop.state`` and
  ``drop.buy_now``): consecutive positions, one publication, so each viewer gets
  them as one message.
* :func:`publish_volatile` -- coalescable, latest wins ("stock", "viewers",
  "campaign.progress"); not in history.
* :func:`publish_user` -- private to every socket of one user on any node ("order.*").

History size and lifetime come from settings (:func:`configure`, called at start-up).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import msgpack

from dropserver.redis_client import is_cluster
from realtime import channels
from realtime._lua import load

__all__ = ["configure", "publish", "publish_many", "publish_user", "publish_volatile",
           "user_message"]

_history_add = load("history_add")
_limits = {"history_size": 1000, "history_ttl": 86400}


def configure(*, history_size: int, history_ttl: int) -> None:
    """Set the history cap and TTL used by :func:`publish` in this process."""
    if history_size < 1 or history_ttl < 1:
        raise ValueError("history_size and history_ttl must be positive")
    _limits["history_size"] = history_size
    _limits["history_ttl"] = history_ttl


# Epochs come from a generator of their own, seeded from os.urandom (a test's
# random.seed() leaves it alone), and seeded again in a forked child.
_epochs = random.Random()
os.register_at_fork(after_in_child=_epochs.seed)


def new_epoch() -> str:
    """A new history's epoch: 32 random bits in hex. Not a secret (every viewer is
    told it), only new: each bid passes one in case its drop's history is gone, and
    ``secrets`` (a getrandom call each) was 1% of a worker in the bids benchmark."""
    return f"{_epochs.getrandbits(32):08x}"


async def publish(redis: Any, drop_id: int, event: str, data: dict, *,
                  recent: tuple[str, int] | None = None) -> tuple[str, int]:
    """Durable, ordered event for every viewer of ``drop_id``; returns its position.

    ``recent=(list_key, size)`` also keeps ``data`` (msgpack) in that capped list,
    newest first, in the same atomic step: the list is in offset order (chat's recent
    messages, which the join snapshot lists).
    """
    return (await publish_many(redis, drop_id, [(event, data)], recent=recent))[0]


async def publish_many(redis: Any, drop_id: int, events: Sequence[tuple[str, dict]], *,
                       recent: tuple[str, int] | None = None) -> list[tuple[str, int]]:
    """Durable events with consecutive positions, published as one message (viewers
    get them in one WebSocket message); returns their positions. ``recent``: as for
    :func:`publish`, keeping the last event's data."""
    if not events:
        return []
    keys = [channels.meta_key(drop_id), channels.history_key(drop_id)]
    item, size = b"", 0
    if recent is not None:
        keys.append(recent[0])
        item = msgpack.packb(events[-1][1], use_bin_type=True)
        size = max(int(recent[1]), 1)
    epoch, last = await _history_add(
        keys=keys,
        args=[channels.drop_channel(drop_id), new_epoch(), _limits["history_size"],
              _limits["history_ttl"], size, item,
              *(channels.pack_body(e, d) for e, d in events)],
        client=redis,
    )
    if isinstance(epoch, bytes):
        epoch = epoch.decode()
    first = int(last) - len(events) + 1
    return [(epoch, first + i) for i in range(len(events))]


async def publish_volatile(redis: Any, drop_id: int, event: str, data: dict) -> None:
    """Latest-wins event for every viewer of ``drop_id``; may be coalesced."""
    await _publish(redis, channels.drop_channel(drop_id),
                   b"V" + channels.pack_body(event, data))


async def _publish(redis: Any, channel: str, message: bytes) -> None:
    # SPUBLISH on a cluster: the message stays on the channel's shard.
    if is_cluster(redis):
        await redis.spublish(channel, message)
    else:
        await redis.publish(channel, message)


def user_message(user_id: str, event: str, data: dict, *, origin: str = "",
                 ) -> tuple[str, bytes]:
    """The channel and payload :func:`publish_user` publishes (for callers that send
    the PUBLISH themselves, e.g. through a pipeline)."""
    body = channels.pack_body(event, data)
    head = b"P" + origin.encode() + b":" if origin else b"U"
    return channels.user_channel(user_id), head + body


async def publish_user(redis: Any, user_id: str, event: str, data: dict, *,
                       origin: str = "") -> None:
    """Private event for every socket of ``user_id`` on every node; never coalesced.

    ``origin``: the id of a connection that already has the event (it went out with
    the reply to that connection's command); every other socket still gets it.
    """
    await _publish(redis, *user_message(user_id, event, data, origin=origin))
