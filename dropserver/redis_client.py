"""Which Redis the process talks to: one server, or a Redis (Valkey) Cluster.

``REDIS_URL`` decides. ``redis://`` / ``rediss://`` / ``unix://`` is one server (the
default, unchanged); ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://``
for TLS) is a cluster, reached through redis-py's asyncio
:class:`~redis.asyncio.cluster.RedisCluster`, which learns the slot map from any of
the nodes named and follows MOVED/ASK redirections and failovers. User and password
go before the first host as usual (``redis+cluster://user:secret@h1:7000,h2:7000``);
there is no database number on a cluster.

What differs on a cluster, and where it is handled:

* every key of a drop carries the hash tag ``{drop:<id>}`` (checkout.keys,
  realtime.channels), so a drop's scripts, Streams queue and history run on its slot;
* fan-out uses sharded pub/sub: :func:`publish_command` is ``SPUBLISH`` on a
  cluster (a classic PUBLISH there is broadcast to every node), and the scripts that
  publish are sent in their sharded form (:func:`sharded_source`);
* the subscriber keeps one connection per shard (realtime.sharded_subscriber) and
  the buy path one auto-pipeline per shard (checkout.cluster_pipe).
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.commands.core import AsyncScript
from redis.driver_info import DriverInfo

__all__ = [
    "ClusterAwareScript",
    "ClusterUrlError",
    "cluster_nodes",
    "connect",
    "connect_sync",
    "driver_info",
    "is_cluster",
    "is_cluster_url",
    "publish_command",
    "ready",
    "sharded_source",
]

log = logging.getLogger("dropserver.redis")

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


class ClusterUrlError(ValueError):
    """A ``redis+cluster://`` URL that names no usable node."""


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def is_cluster(client: Any) -> bool:
    """Whether ``client`` talks to a cluster (a RedisCluster or one of its pipelines)."""
    return isinstance(client, RedisCluster | SyncRedisCluster) or isinstance(
        getattr(client, "cluster_client", None), RedisCluster)


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The ``(host, port)`` pairs of a cluster URL and the client options it carries
    (``username``, ``password``, ``ssl``)."""
    scheme, rest = url.split("://", 1)
    if scheme.lower() not in CLUSTER_SCHEMES:
        raise ClusterUrlError(f"not a cluster URL: {scheme}://")
    netloc, _, tail = rest.partition("/")
    opts: dict[str, Any] = {"ssl": scheme.lower() == "rediss+cluster"}
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        if user:
            opts["username"] = unquote(user)
        if password:
            opts["password"] = unquote(password)
    nodes = []
    for part in filter(None, netloc.split(",")):
        match = re.fullmatch(r"\[?([^\]]+?)\]?:(\d{1,5})", part)
        if match is None:
            raise ClusterUrlError(f"cluster node {part!r} is not host:port")
        nodes.append((match.group(1), int(match.group(2))))
    if not nodes:
        raise ClusterUrlError("a redis+cluster:// URL names at least one host:port")
    path, _, query = tail.partition("?")
    if path not in ("", "0"):
        raise ClusterUrlError("a cluster has database 0 only")
    for key, values in parse_qs(urlsplit("x://h/?" + query).query).items():
        if key == "password" and values:
            opts["password"] = values[-1]
    return nodes, opts


_DRIVER_INFO: DriverInfo | None = None


def driver_info() -> DriverInfo:
    """What every connection tells Redis with ``CLIENT SETINFO`` (redis-py, its
    version), read once per process. redis-py reads it from the package metadata for
    each new connection when it is not given: 1.3 ms of CPU per connection, measured,
    which a worker opening hundreds of them in a burst (concurrent commands under a
    chat storm) paid in front of everything else on its event loop."""
    global _DRIVER_INFO
    if _DRIVER_INFO is None:
        _DRIVER_INFO = DriverInfo()
    return _DRIVER_INFO


def connect(url: str, **kwargs: Any) -> aioredis.Redis | RedisCluster:
    """A client for ``url``: ``Redis.from_url`` for one server, ``RedisCluster`` for
    a cluster (same keyword options where the cluster client has them)."""
    kwargs.setdefault("driver_info", driver_info())
    if not is_cluster_url(url):
        return aioredis.Redis.from_url(url, **kwargs)
    nodes, opts = cluster_nodes(url)
    kwargs.pop("connection_class", None)  # the cluster client picks its own
    # Slots of a shard that is failing over are not covered for a moment: the client
    # must still start and serve the other shards.
    kwargs.setdefault("require_full_coverage", False)
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **opts,
                        **kwargs)


async def ready(client: Any) -> None:
    """Learn a cluster's slot map now, before the first commands (nothing to do for
    one Redis). Call it once after :func:`connect`, before concurrent use: redis-py's
    RedisCluster, used concurrently before it knows the map, sends the first commands
    to a startup node whose connections it then replaces, and retries the commands
    those connections carried: a script that had run then runs twice (seen here as a
    history event appended twice). A cluster that cannot be reached yet is logged;
    the client then learns the map on first use."""
    if not is_cluster(client):
        return
    try:
        await client.initialize()
    except Exception as exc:
        log.warning("redis cluster not reachable at start-up",
                    extra={"error": f"{type(exc).__name__}: {exc}"[:200]})


def connect_sync(url: str, **kwargs: Any) -> Any:
    """:func:`connect` for blocking code (the CLI's checks, test fixtures)."""
    import redis
    from redis.cluster import ClusterNode as SyncClusterNode

    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **kwargs)
    nodes, opts = cluster_nodes(url)
    kwargs.setdefault("require_full_coverage", False)
    return SyncRedisCluster(startup_nodes=[SyncClusterNode(h, p) for h, p in nodes],
                            **opts, **kwargs)


def publish_command(client: Any) -> str:
    """``SPUBLISH`` on a cluster (the message stays on its channel's shard),
    ``PUBLISH`` on one server (any Redis version)."""
    return "SPUBLISH" if is_cluster(client) else "PUBLISH"


def sharded_source(source: bytes) -> bytes:
    """A script's source with its publications made sharded (for a cluster)."""
    return re.sub(rb"""(['"])PUBLISH\1""", rb"\1SPUBLISH\1", source)


class ClusterAwareScript:
    """A Lua script called by SHA, sent in its sharded form (:func:`sharded_source`)
    to a cluster and as written to one Redis. Call it like redis-py's script."""

    def __init__(self, source: bytes) -> None:
        self.single = AsyncScript(None, source)  # type: ignore[arg-type]
        sharded = sharded_source(source)
        self.sharded = (self.single if sharded == source
                        else AsyncScript(None, sharded))  # type: ignore[arg-type]

    async def __call__(self, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        script = self.sharded if is_cluster(client) else self.single
        return await script(keys=keys, args=args, client=client)
