"""Listening to channels in a test, on one Redis or a Redis Cluster.

The server publishes with PUBLISH on one Redis and with SPUBLISH on a cluster (the
message reaches only its channel's shard), so a test that listens must SUBSCRIBE or
SSUBSCRIBE on the node that owns the channel. :func:`listen` does either and returns
something with redis-py's ``get_message``/``aclose``; :func:`listen_sync` likewise
for blocking tests.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from dropserver.redis_client import is_cluster

__all__ = ["listen", "listen_sync"]


class _Sharded:
    """One node-level PubSub per shard; ``get_message`` reads whichever has one."""

    def __init__(self, pubsubs: list[Any]) -> None:
        self.pubsubs = pubsubs

    async def get_message(self, timeout: float = 0.0,  # noqa: ASYNC109 (redis-py's)
                          **kwargs: Any) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            for ps in self.pubsubs:
                msg = await ps.get_message(timeout=0.01, **kwargs)
                if msg is not None:
                    return msg
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        for ps in self.pubsubs:
            await ps.aclose()


class _ShardedSync(_Sharded):
    def get_message(self, timeout: float = 0.0, **kwargs: Any) -> dict | None:  # type: ignore[override]
        deadline = time.monotonic() + timeout
        while True:
            for ps in self.pubsubs:
                msg = ps.get_message(timeout=0.01, **kwargs)
                if msg is not None:
                    return msg
            if time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        for ps in self.pubsubs:
            ps.close()


def _by_node(client: Any, channels: tuple[str, ...]) -> dict[tuple[str, int], list[str]]:
    out: dict[tuple[str, int], list[str]] = {}
    for ch in channels:
        node = client.nodes_manager.get_node_from_slot(key_slot(ch.encode()))
        out.setdefault((node.host, int(node.port)), []).append(ch)
    return out


async def listen(client: Any, *channels: str) -> Any:
    """Subscribed to ``channels`` (confirmations read) on ``client``'s Redis."""
    if not is_cluster(client):
        pubsub = client.pubsub()
        await pubsub.subscribe(*channels)
        for _ in channels:
            await pubsub.get_message(timeout=1)
        return pubsub
    await client.initialize()
    pubsubs = []
    for (host, port), names in _by_node(client, channels).items():
        ps = aioredis.Redis(host=host, port=port).pubsub()
        for name in names:
            await ps.ssubscribe(name)
            await ps.get_message(timeout=1)
        pubsubs.append(ps)
    return _Sharded(pubsubs)


def listen_sync(client: Any, *channels: str) -> Any:
    """:func:`listen` for a blocking client (``connect_sync``)."""
    if not is_cluster(client):
        pubsub = client.pubsub()
        pubsub.subscribe(*channels)
        for _ in channels:
            pubsub.get_message(timeout=1)
        return pubsub
    pubsubs = []
    for (host, port), names in _by_node(client, channels).items():
        ps = redis.Redis(host=host, port=port).pubsub()
        for name in names:
            ps.ssubscribe(name)
            ps.get_message(timeout=1)
        pubsubs.append(ps)
    return _ShardedSync(pubsubs)
