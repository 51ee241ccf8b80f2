"""The product's Redis clients (dropserver.redis_client), against a real Redis."""

from __future__ import annotations

import asyncio

import redis.utils

from dropserver.redis_client import connect
from tests.conftest import only_single_redis


@only_single_redis  # one pool's connections
async def test_new_connections_do_not_read_package_metadata_each(clean_backends,
                                                                 monkeypatch):
    """A burst of concurrent commands opens a connection each; what they tell Redis
    about the client (CLIENT SETINFO) is read once per process, not per connection
    (1.3 ms of CPU each, in front of everything else on a worker's loop)."""
    reads = []
    real = redis.utils.get_lib_version

    def counted() -> str:
        reads.append(1)
        return real()

    monkeypatch.setattr(redis.utils, "get_lib_version", counted)
    client = connect(clean_backends.redis_url)
    try:
        # 20 commands in flight at once: 20 connections of the pool.
        await asyncio.gather(*(client.blpop([f"nothing-{i}"], timeout=0.2)
                               for i in range(20)))
        assert len(client.connection_pool._available_connections) >= 20
        assert len(reads) <= 1
        # Redis still hears who the client is.
        clients = await client.client_list()
        mine = [c for c in clients if c.get("lib-name") == "redis-py"]
        assert len(mine) >= 20 and all(c.get("lib-ver") == real() for c in mine)
    finally:
        await client.aclose()
