"""Auto-pipelining on a Redis Cluster: one :class:`~checkout.redis_pipe.AutoPipeline`
per primary, each command routed by its key's slot.

The buy path's calls are EVALSHAs of scripts whose keys all carry the drop's hash tag
and the buyers' ``order.held`` publications (SPUBLISH on the user's channel): each has
one slot, so each goes to the pipeline of the primary that owns that slot, and the
commands of one loop turn still leave in one write per primary.

Redirections and failovers, as a cluster client must handle them (the cluster spec,
"Redirection and resharding"; redis-py's RedisCluster does the same per command):

* ``MOVED`` -- the slot lives elsewhere now (a slot migration or a promoted replica):
  the slot map learns the new owner (redis-py's ``NodesManager.move_slot``) and the
  command is sent there. Nothing ran, so sending it again is safe.
* ``ASK`` -- the slot is being migrated and the key is already on the target:
  ``ASKING`` then the command, back to back on the target's connection.
* ``TRYAGAIN`` / ``CLUSTERDOWN`` -- a moment of migration or failover: retried after a
  short pause, a few times.
* a lost connection or a timeout (the primary died): the command may or may not have
  run, so it is *not* sent again here; it fails to its caller like on one Redis (a
  buy answers 503 ``unavailable``, and the buyer's retry carries the same idempotency
  key), and the slot map is read again in the background so the next command finds
  the promoted replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from checkout.redis_pipe import AutoPipeline

__all__ = ["ClusterAutoPipeline"]

log = logging.getLogger("dropserver.checkout")

_ATTEMPTS = 5


def _slot(args: tuple[Any, ...]) -> int:
    name = args[0].upper() if isinstance(args[0], str) else args[0].decode().upper()
    if name in ("EVALSHA", "EVAL"):
        if int(args[2]) < 1:
            raise ValueError(f"{name} without keys cannot be routed on a cluster")
        key = args[3]
    else:
        key = args[1]
    return key_slot(key if isinstance(key, bytes) else str(key).encode())


class ClusterAutoPipeline:
    """:class:`AutoPipeline`'s ``execute`` on a cluster (one pipeline per primary)."""

    def __init__(self, cluster: RedisCluster, *, node_client: Any = Redis,
                 timeout: float = 5.0, max_batch: int = 512, wait_replicas: int = 0,
                 wait_timeout_ms: int = 200) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self.max_batch = max_batch
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._node_client = node_client  # makes the Redis of one node (host=, port=)
        self._pipes: dict[str, AutoPipeline] = {}
        self._clients: list[Any] = []
        self._ready = False
        self._refresh: asyncio.Task | None = None
        self._closed = False

    def execute(self, *args: Any) -> asyncio.Future:
        """Queue one command on its slot's primary; the future gets its reply."""
        if self._closed:
            raise RedisConnectionError("the pipeline is closed")
        if self._ready and args[0] != "SCRIPT":
            # The usual case: the slot map is known, the command goes straight into
            # its primary's pipeline in this loop turn; only a redirection or a
            # cluster error needs the slow path.
            slot = _slot(args)
            fut = self._pipe(self.cluster.nodes_manager.get_node_from_slot(slot)).execute(
                *args)
            out = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda f: self._settle(f, out, args, slot))
            return out
        return asyncio.ensure_future(self._call(args))

    def _settle(self, fut: asyncio.Future, out: asyncio.Future, args: tuple,
                slot: int) -> None:
        if out.done():
            return
        if fut.cancelled():
            out.cancel()
            return
        exc = fut.exception()
        if exc is None:
            out.set_result(fut.result())
        elif isinstance(exc, AskError | TryAgainError | ClusterDownError):
            task = asyncio.ensure_future(self._call(args, first_error=exc))
            task.add_done_callback(lambda t: self._copy(t, out))
        else:
            if isinstance(exc, RedisConnectionError | RedisTimeoutError):
                self._refresh_soon()
            out.set_exception(exc)

    @staticmethod
    def _copy(task: asyncio.Future, out: asyncio.Future) -> None:
        if out.done():
            return
        if task.cancelled():
            out.cancel()
        elif task.exception() is not None:
            out.set_exception(task.exception())  # type: ignore[arg-type]
        else:
            out.set_result(task.result())

    async def _call(self, args: tuple, first_error: Exception | None = None) -> Any:
        if not self._ready:
            await self.cluster.initialize()
            self._ready = True
        if args[0] == "SCRIPT":  # SCRIPT LOAD: every primary needs it
            primaries = self.cluster.nodes_manager.get_nodes_by_server_type("primary")
            replies = await asyncio.gather(*[self._pipe(n).execute(*args)
                                             for n in primaries])
            return replies[0]
        slot = _slot(args)
        error = first_error
        for attempt in range(_ATTEMPTS):
            if error is not None:
                await self._handle(error, attempt)
            node = self.cluster.nodes_manager.get_node_from_slot(slot)
            pipe = self._pipe(node)
            try:
                if isinstance(error, AskError) and not isinstance(error, MovedError):
                    target = self._pipe_at(error.host, error.port)
                    target.execute("ASKING")
                    return await target.execute(*args)
                return await pipe.execute(*args)
            except (AskError, TryAgainError, ClusterDownError) as exc:
                error = exc
            except (RedisConnectionError, RedisTimeoutError):
                self._refresh_soon()
                raise
        assert error is not None
        raise error

    async def _handle(self, error: Exception, attempt: int) -> None:
        if isinstance(error, MovedError):
            await self.cluster.nodes_manager.move_slot(error)
        elif isinstance(error, TryAgainError | ClusterDownError):
            await asyncio.sleep(0.05 * (attempt + 1))
            if isinstance(error, ClusterDownError):
                with contextlib.suppress(Exception):
                    await self.cluster.nodes_manager.initialize()

    def _pipe(self, node: Any) -> AutoPipeline:
        return self._pipe_at(node.host, int(node.port))

    def _pipe_at(self, host: str, port: int) -> AutoPipeline:
        name = f"{host}:{port}"
        pipe = self._pipes.get(name)
        if pipe is None:
            kwargs = self.cluster.nodes_manager.connection_kwargs
            auth = {k: kwargs[k] for k in ("username", "password") if kwargs.get(k)}
            client = self._node_client(host=host, port=port, **auth)
            self._clients.append(client)
            pipe = self._pipes[name] = AutoPipeline(
                client, timeout=self.timeout, max_batch=self.max_batch,
                wait_replicas=self.wait_replicas, wait_timeout_ms=self.wait_timeout_ms)
        return pipe

    def _refresh_soon(self) -> None:
        """Read the slot map again (once at a time): a primary may have failed over."""
        if self._closed or (self._refresh is not None and not self._refresh.done()):
            return

        async def refresh() -> None:
            for delay in (0.2, 0.5, 1.0, 2.0, 2.0, 2.0):
                await asyncio.sleep(delay)
                with contextlib.suppress(Exception):
                    await self.cluster.nodes_manager.initialize()
                    return

        self._refresh = asyncio.ensure_future(refresh())

    async def aclose(self) -> None:
        self._closed = True
        if self._refresh is not None:
            self._refresh.cancel()
        for pipe in self._pipes.values():
            await pipe.aclose()
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
