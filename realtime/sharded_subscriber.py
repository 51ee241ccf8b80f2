"""Sharded pub/sub on a Redis Cluster: one subscriber connection per shard.

On a cluster a drop's publications go out with SPUBLISH on the drop's channel
(``{drop:D}:events``), so they reach only the shard that owns the channel's slot, and
a node must SSUBSCRIBE on a node of *that* shard. :class:`ShardedSubscriber` has the
interface of :class:`~realtime.subscriber.Subscriber` and keeps one such subscriber
(a :class:`_ShardLink`, the same never-deaf connection with its watchdog) per node
that serves a wanted channel, routing each channel by its slot.

It subscribes on the shard's **replica** when it has one (a primary propagates its
SPUBLISH messages to its replicas, which deliver them to their own subscribers), the
primary otherwise. When the primary dies, that replica is the one promoted, and the
subscription is already there: publications made on the new primary from its first
moment reach this node, where a subscription on the old primary would have had to
move after the promotion and missed what was published meanwhile -- and private
events (``{user:U}:events``, an order's outcome) have no history to fill that gap.
(Valkey ends a replica's shard-channel subscriptions as it takes over, with a
``sunsubscribe``; they are renewed on the same node within milliseconds, before the
publishers have learnt where the new primary is.)

A channel moves when its node stops serving it:

* a failover or a lost node: the link fails (or falls silent); the slot map is read
  again until a live node serves the slot (a promoted replica, 2-15 s later
  depending on ``cluster-node-timeout``), and the channel is subscribed there;
* a slot migration (CLUSTER SETSLOT ... NODE): the old owner ends the subscription
  with an unsolicited ``sunsubscribe``; the channel is subscribed on the new owner.

Either way ``on_reconnect`` then runs once, so the hub fills the gap from each drop's
history (publications made while nobody listened are in the history; the stock and
viewer counts, volatile, come with the next update) and sends every signed-in socket
the current state of its user's orders that it has not heard (realtime.private).
That is what covers a replica that lagged: what the old primary published and had
not yet passed to it (an ``order.paid`` among them) dies with the old primary, and the
promotion's ``sunsubscribe`` is the move that has it recovered. The failover test
(tests/test_cluster_failover.py) freezes the replica 2 s before the kill for this.
Each move is logged and counted in ``dropserver_pubsub_resubscribes_total`` like a
reconnect.

Centrifuge's Redis broker (broker_redis.go) does the same with a sharded PUBSUB per
cluster slot range and resubscribes on MOVED; redis-py's ClusterPubSub follows moves
too, but hides the gap, which this gateway must fill.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot

from dropserver.background import stop_task
from dropserver.redis_client import cluster_nodes, connect, is_cluster_url
from realtime import metrics
from realtime.subscriber import PING_EVERY, SILENT_LIMIT, Subscriber

__all__ = ["ShardedSubscriber", "subscriber_for"]

log = logging.getLogger("dropserver.realtime")

Addr = tuple[str, int]


def subscriber_for(redis_url: str, on_message: Callable[[bytes, bytes], None],
                   on_reconnect: Callable[[], None], **kwargs: Any) -> Any:
    """A :class:`Subscriber` for one Redis, a :class:`ShardedSubscriber` for a cluster."""
    cls = ShardedSubscriber if is_cluster_url(redis_url) else Subscriber
    return cls(redis_url, on_message, on_reconnect, **kwargs)


class _ShardLink(Subscriber):
    """The subscriber connection to one primary, in the sharded dialect."""

    SUBSCRIBE = "SSUBSCRIBE"
    UNSUBSCRIBE = "SUNSUBSCRIBE"
    MESSAGE = b"smessage"
    CONFIRMED = b"ssubscribe"

    def __init__(self, owner: ShardedSubscriber, addr: Addr, **kwargs: Any) -> None:
        super().__init__(f"{addr[0]}:{addr[1]}", owner._on_message, owner._on_reconnect,
                         **kwargs)
        self.addr = addr
        self._owner = owner

    def _make_client(self) -> Any:
        return aioredis.Redis(host=self.addr[0], port=self.addr[1], decode_responses=False,
                              protocol=2, socket_keepalive=True, socket_connect_timeout=5,
                              **self._owner._auth)

    async def _subscribe_all(self, conn: Any) -> None:
        # On a cluster one SSUBSCRIBE names channels of one slot only: one each.
        wanted = list(self._wanted)
        if wanted:
            await conn.send_packed_command(
                conn.pack_commands([(self.SUBSCRIBE, name) for name in wanted]),
                check_health=False)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _lost(self) -> None:
        self._owner._check_homes(f"connection to {self.addr[0]}:{self.addr[1]} lost")

    def _unsubscribed(self, channel: bytes) -> None:
        self._owner._unheard.add(channel)
        self._owner._check_homes(f"{channel.decode(errors='replace')} left "
                                 f"{self.addr[0]}:{self.addr[1]} (slot moved)")


class ShardedSubscriber:
    """The process's pub/sub on a cluster: :class:`Subscriber`'s interface."""

    def __init__(self, redis_url: str, on_message: Callable[[bytes, bytes], None],
                 on_reconnect: Callable[[], None], *, ping_every: float = PING_EVERY,
                 silent_limit: float = SILENT_LIMIT) -> None:
        self._url = redis_url
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._link_args = {"ping_every": ping_every, "silent_limit": silent_limit}
        _, opts = cluster_nodes(redis_url)
        self._auth = {k: v for k, v in opts.items() if v}
        self._cluster: Any = None
        self._links: dict[Addr, _ShardLink] = {}
        self._home: dict[bytes, _ShardLink] = {}  # wanted channel -> its link
        self._unheard: set[bytes] = set()  # ended by Redis (sunsubscribe): subscribe again
        # Wanted but not placed on a link yet: a subscribe() that gave up (its wait
        # ran out while it waited for the lock or for its shard link's connection) is
        # still made, by the mover.
        self._homeless: set[bytes] = set()
        self._lock = asyncio.Lock()  # links are made and channels moved one at a time
        self._making: dict[Addr, asyncio.Task] = {}  # links being made, by address
        self._mover: asyncio.Task | None = None
        self._again = False
        self._stopping = False
        self.moves = 0

    async def start(self) -> None:
        self._cluster = connect(self._url, decode_responses=False)
        await self._cluster.initialize()

    async def stop(self) -> None:
        self._stopping = True
        if self._mover is not None:
            await stop_task(self._mover, log)
        for making in list(self._making.values()):
            await stop_task(making, log)
        for link in list(self._links.values()):
            await link.stop()
        self._links.clear()
        if self._cluster is not None:
            await self._cluster.aclose()

    @property
    def channels(self) -> set[bytes]:
        return set(self._home) | self._homeless

    @property
    def reconnects(self) -> int:
        return self.moves + sum(link.reconnects for link in self._links.values())

    @property
    def links(self) -> dict[Addr, Any]:
        """The live shard links by primary address (tests look at them)."""
        return dict(self._links)

    async def subscribe(self, channel: str, wait: float = 5.0) -> None:
        """Subscribe on the shard that owns the channel; returns once confirmed.

        The channel is wanted from the first moment: when ``wait`` runs out first
        (TimeoutError), it is subscribed all the same, by the mover once its shard
        link is there, and ``on_reconnect`` runs then (the hub fills the gap).

        Only the first channel of a shard waits for the lock (its link is made);
        the others go straight to their shard's link. A lock per subscribe made a
        burst of them (2,000 buyers joining a worker at once) a convoy: each waiter
        takes the lock one event-loop turn after the previous, so on a busy worker
        most of them ran out of time before their turn and the mover, retrying them
        all, held the lock even longer."""
        name = channel.encode()
        if name not in self._home:
            self._homeless.add(name)
        try:
            async with asyncio.timeout(wait):
                link = self._home.get(name)
                if link is None:
                    link = await self._place(name)
                await link.subscribe(channel, wait)
        except BaseException:
            if name in self._homeless:
                self._check_homes(f"{channel} not subscribed in time")
            raise

    async def _place(self, name: bytes) -> _ShardLink:
        """Home ``name`` on its shard's link (made first if there is none)."""
        addr = self._home_for(name)
        link = self._links.get(addr)
        if link is None:
            # Every subscribe that needs this link waits for the one making it, and
            # all wake together once it is there (not one per loop turn, as a queue
            # on the lock would).
            making = self._making.get(addr)
            if making is None:
                making = self._making[addr] = asyncio.get_running_loop().create_task(
                    self._make_link(addr), name="pubsub-link")
                making.add_done_callback(lambda _: self._making.pop(addr, None))
            link = await asyncio.shield(making)
        if name in self._homeless:  # not unsubscribed, nor placed by the mover, meanwhile
            self._home[name] = link
            self._homeless.discard(name)
        return self._home.get(name, link)

    async def _make_link(self, addr: Addr) -> _ShardLink:
        async with self._lock:  # one at a time with the mover
            return await self._link(addr)

    async def unsubscribe(self, channel: str) -> None:
        self._unheard.discard(channel.encode())
        self._homeless.discard(channel.encode())
        link = self._home.pop(channel.encode(), None)
        if link is not None:
            await link.unsubscribe(channel)

    # -- routing ------------------------------------------------------------------
    def _serving(self, name: bytes) -> list[Addr]:
        """The nodes of the shard that serves ``name``'s slot: primary first."""
        nodes = self._cluster.nodes_manager.slots_cache.get(key_slot(name)) or []
        return [(n.host, int(n.port)) for n in nodes]

    def _home_for(self, name: bytes) -> Addr:
        """Where to subscribe to ``name``: its shard's replica, else its primary."""
        serving = self._serving(name)
        if not serving:
            node = self._cluster.nodes_manager.get_node_from_slot(key_slot(name))
            return node.host, int(node.port)
        # A node whose link is down (dead, or not told yet that it is) comes last.
        for addr in [*serving[1:], serving[0]]:
            link = self._links.get(addr)
            if link is None or link.connected:
                return addr
        return serving[0]

    async def _link(self, addr: Addr) -> _ShardLink:
        """The running link to ``addr`` (started here when there is none)."""
        link = self._links.get(addr)
        if link is None:
            link = _ShardLink(self, addr, **self._link_args)
            await link.start()
            self._links[addr] = link
        return link

    def _check_homes(self, why: str) -> None:
        """A link failed or lost a channel: find each channel's owner again."""
        if self._stopping:
            return
        self._again = True
        if self._mover is None or self._mover.done():
            # Once per move, not per channel: the mover re-checks every channel.
            log.warning("sharded pubsub: checking where channels live", extra={"why": why})
            self._mover = asyncio.get_running_loop().create_task(self._move(),
                                                                 name="pubsub-move")

    async def _move(self) -> None:
        """Until every wanted channel is subscribed on its slot's live primary."""
        delay = 0.1
        while not self._stopping:
            self._again = False
            try:
                moved = await self._move_once()
            except Exception as exc:
                log.warning("sharded pubsub: cannot move channels yet",
                            extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
                moved, settled = 0, False
            else:
                settled = (not self._unheard and not self._homeless
                           and all(link.connected for link in set(self._home.values())))
            if moved:
                self.moves += 1
                metrics.RESUBSCRIBES.inc()
                log.warning("sharded pubsub: channels moved; filling gaps from history",
                            extra={"channels": moved, "moves": self.moves})
                self._on_reconnect()
            if settled and not self._again:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _move_once(self) -> int:
        async with self._lock:
            # Read the slot map again (it is fine to ask even when nothing moved).
            await self._cluster.nodes_manager.initialize()
            moving: list[tuple[bytes, _ShardLink, Addr]] = []
            for name, link in self._home.items():
                if (link.addr not in self._serving(name) or not link.connected
                        or name in self._unheard):
                    moving.append((name, link, self._home_for(name)))
            homeless = [(name, self._home_for(name)) for name in self._homeless]
            for addr in {owner for *_, owner in moving} | {owner for _, owner in homeless}:
                await self._link(addr)
            # No await from here to the gather: the channels change homes at once, and
            # every SSUBSCRIBE goes out together (one round trip for all, not one each).
            confirm: dict[bytes, Any] = {}
            for name, old, owner in moving:
                if self._home.get(name) is not old:
                    continue  # unsubscribed meanwhile
                old._wanted.discard(name)
                self._home[name] = self._links[owner]
                confirm[name] = self._links[owner].subscribe(name.decode(), 5.0)
            placed = 0
            for name, owner in homeless:  # a subscribe() that gave up: made here
                if name not in self._homeless:
                    continue  # unsubscribed (or placed by subscribe()) meanwhile
                self._home[name] = self._links[owner]
                self._homeless.discard(name)
                confirm[name] = self._links[owner].subscribe(name.decode(), 5.0)
                placed += 1
            failed: BaseException | None = None
            results = await asyncio.gather(*confirm.values(), return_exceptions=True)
            for name, result in zip(confirm, results, strict=True):
                if isinstance(result, BaseException):
                    failed = failed or result
                else:
                    self._unheard.discard(name)
            if failed is not None:
                raise failed  # logged by _move, which tries again
            for addr in list(self._links):
                # The set again each time: a subscribe() may home a channel on a
                # link while another link is being stopped.
                if addr not in {link.addr for link in self._home.values()}:
                    await self._links.pop(addr).stop()
            return len(moving) + placed
