"""A drop's slot changing hands on a Redis Cluster: moved by the operator (CLUSTER
SETSLOT and MIGRATE, as ``valkey-cli --cluster reshard`` does) or taken over by a
replica when its primary is killed. The buy path's per-shard auto-pipelines follow
(MOVED), the sharded subscriber follows (``sunsubscribe``, a lost connection) and
fills the gap, and sales go on with the same counters."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis
import redis.asyncio

from checkout import inventory, keys
from checkout.defense import BuyLimits
from checkout.redis_pipe import AutoPipeline, NotReplicated
from checkout.reserve import BuyRequest, ReserveBatcher, reserve_batched
from dropserver import local_cluster
from dropserver.redis_client import connect, publish_command, ready
from realtime import channels
from realtime.sharded_subscriber import ShardedSubscriber

OFF = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=0)


def _node_client(node) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port, decode_responses=True)


def move_slot(cluster, slot: int, target) -> None:
    """Migrate ``slot`` (its keys too) to the primary ``target``."""
    source = next(n for n in cluster.redis_nodes if cluster.is_running(n.name)
                  and n == local_cluster.primary_for(cluster, _key_in(slot)))
    src, dst = _node_client(source), _node_client(target)
    try:
        src_id = src.execute_command("CLUSTER", "MYID")
        dst_id = dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while names := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000,
                                "KEYS", *names)
        for node in (dst, src):
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    finally:
        src.close()
        dst.close()


_SLOT_KEYS: dict[int, str] = {}


def _key_in(slot: int) -> str:
    return _SLOT_KEYS[slot]


def _drop_slot(drop_id: int) -> int:
    slot = local_cluster.slot_of(keys.meta(drop_id))
    _SLOT_KEYS[slot] = keys.meta(drop_id)
    return slot


async def _selling(r, drop_id: int, units: int) -> None:
    await inventory.prewarm(r, {"id": drop_id, "currency": "eur", "max_holds_per_user": 1},
                            [{"product_id": 1, "price": 1000, "units": units,
                              "per_buyer_limit": 1}])
    await inventory.open_sales(r, drop_id, 1)


async def _wait_for(cond, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


async def _client_and_subscriber(cluster) -> tuple:
    """A cluster client and a started sharded subscriber that keeps what it hears
    (``got``) and counts its gap fills (``reconnects``)."""
    r = connect(cluster.redis_url)
    await ready(r)
    got: list[bytes] = []
    reconnects: list[int] = []
    sub = ShardedSubscriber(cluster.redis_url, lambda ch, data: got.append(data),
                            lambda: reconnects.append(1))
    await sub.start()
    return r, sub, got, reconnects


async def test_a_slot_moved_mid_sale_buys_and_fan_out_follow(cluster):
    drop_id = 7001
    slot = _drop_slot(drop_id)
    r, sub, got, reconnects = await _client_and_subscriber(cluster)
    batcher = ReserveBatcher(r)
    try:
        await _selling(r, drop_id, units=10)
        channel = channels.drop_channel(drop_id)
        await sub.subscribe(channel)
        before = local_cluster.primary_for(cluster, keys.meta(drop_id))
        # Subscribed on the shard's replica (it is the one a failover promotes).
        replica = local_cluster.replica_of(cluster, before)
        assert set(sub.links) == {(replica.host, replica.port)}
        await r.execute_command(publish_command(r), channel, b"one")
        await _wait_for(lambda: b"one" in got)

        first = [await reserve_batched(batcher, BuyRequest(drop_id, 1, f"u{i}", "k"),
                                       hold_ttl_ms=60_000, limits=OFF) for i in range(3)]
        target = next(n for n in cluster.redis_nodes
                      if n != before and local_cluster.primary_for(cluster, "{x}") is not None
                      and _role(n) == "master")
        await asyncio.to_thread(move_slot, cluster, slot, target)
        assert local_cluster.primary_for(cluster, keys.meta(drop_id)) == target

        # The subscription was ended by the old shard (sunsubscribe): it moves to a
        # node of the new one.
        target_shard = {(target.host, target.port),
                        *((n.host, n.port) for n in [local_cluster.replica_of(cluster, target)])}
        await _wait_for(lambda: reconnects and len(sub.links) == 1
                        and set(sub.links) <= target_shard)
        await r.execute_command(publish_command(r), channel, b"two")
        await _wait_for(lambda: b"two" in got)
        # The buy path's pipeline to the old owner gets MOVED and follows it.
        after = await asyncio.gather(*[
            reserve_batched(batcher, BuyRequest(drop_id, 1, f"v{i}", "k"),
                            hold_ttl_ms=60_000, limits=OFF) for i in range(3)])
        numbers = sorted(h.buyer_number for h in first + list(after))
        assert numbers == [1, 2, 3, 4, 5, 6]
        assert await inventory.remaining(r, drop_id) == {1: 4}
    finally:
        await batcher.aclose()
        await sub.stop()
        await r.aclose()


def _role(node) -> str:
    with _node_client(node) as c:
        return c.info("replication")["role"]


@pytest.mark.slow
async def test_a_killed_primary_the_subscriber_and_the_buys_move_to_its_replica(cluster):
    drop_id = 7002
    _drop_slot(drop_id)
    r, sub, got, reconnects = await _client_and_subscriber(cluster)
    batcher = ReserveBatcher(r, wait_replicas=1)
    victim = None
    try:
        await _selling(r, drop_id, units=10)
        channel = channels.drop_channel(drop_id)
        await sub.subscribe(channel)
        hold = await reserve_batched(batcher, BuyRequest(drop_id, 1, "u0", "k"),
                                     hold_ttl_ms=60_000, limits=OFF)
        victim = local_cluster.primary_for(cluster, keys.meta(drop_id))
        await asyncio.to_thread(cluster.stop_service, victim.name, kill=True)
        # Until the replica is promoted a buy is answered "retry" (a connection error
        # or a timeout: the hold may or may not exist; the same key finds it).
        deadline = time.monotonic() + 30
        while True:
            try:
                again = await reserve_batched(batcher, BuyRequest(drop_id, 1, "u0", "k"),
                                              hold_ttl_ms=60_000, limits=OFF)
                break
            except (redis.ConnectionError, redis.TimeoutError):
                assert time.monotonic() < deadline, "sales did not resume"
                await asyncio.sleep(0.2)
        assert again.hold_id == hold.hold_id and again.replay  # WAIT: the replica had it
        promoted = local_cluster.primary_for(cluster, keys.meta(drop_id))
        assert promoted != victim
        # The subscription was on the replica that got promoted: it stays on that node
        # (renewed there when the node, taking over, ended it: at most one gap fill),
        # and what the new primary publishes is heard.
        assert set(sub.links) == {(promoted.host, promoted.port)}
        await r.execute_command(publish_command(r), channel, b"after")
        await _wait_for(lambda: b"after" in got)
        assert len(reconnects) <= 1
    finally:
        await batcher.aclose()
        await sub.stop()
        await r.aclose()
        if victim is not None:
            await asyncio.to_thread(cluster.start_service, victim.name)
            await asyncio.to_thread(local_cluster.wait_cluster_ok, cluster.redis_nodes,
                                    deadline=time.monotonic() + 60)


async def test_a_subscription_that_timed_out_is_still_made(cluster):
    """A subscribe that gives up before its shard link exists (a worker that connected
    sixty sockets at once on a loaded machine: the shard link's connection not made
    within the wait) still subscribes the channel once the link is there: the
    channel stays wanted. Without that the user's channel was never subscribed, and
    every order event of the buyers whose subscribe timed out was lost for as long as
    their sockets stayed open (the killed-primary rush, at load 17-25)."""
    r = connect(cluster.redis_url)
    await ready(r)
    got: list[bytes] = []
    sub = ShardedSubscriber(cluster.redis_url, lambda ch, data: got.append(ch),
                            lambda: None)
    await sub.start()
    try:
        names = [channels.user_channel(f"late-{i}") for i in range(6)]
        for name in names:  # no link exists yet: each gives up while it is made
            with pytest.raises(TimeoutError):
                await sub.subscribe(name, wait=0.0001)
        deadline = time.monotonic() + 20
        while True:
            for name in names:
                await r.execute_command(publish_command(r), name, b"x")
            await asyncio.sleep(0.2)
            if {ch.decode() for ch in got} >= set(names):
                break
            assert time.monotonic() < deadline, \
                f"never subscribed: {sorted(set(names) - {c.decode() for c in got})}"
        assert {n.encode() for n in names} <= sub.channels
        # Unsubscribed, a channel that never got its home is forgotten too.
        await sub.unsubscribe(names[0])
        assert names[0].encode() not in sub.channels
    finally:
        await sub.stop()
        await r.aclose()


async def test_a_burst_of_user_subscriptions_on_a_busy_worker_is_confirmed_at_once(cluster):
    """2,000 buyers joining one worker at once subscribe 2,000 user channels while the
    worker is busy (here a task that takes 2 ms of every event-loop turn). Each
    subscribe used to queue on the subscriber's lock, which hands over one waiter per
    loop turn, so the burst took 2,000 turns at least: on a loaded worker most ran out
    of their 5 s, each logged "checking where channels live", the hub logged "user
    channel not subscribed yet; waiting again" for each, and the mover re-read the
    slot map and subscribed them one by one under the same lock (with 5 ms a turn,
    1,653 of 2,000 timed out here before the fix; with 2 ms, 2,033 turns). Now the
    burst takes a few dozen turns (39 here; counted, so the check does not depend on
    the machine's speed), with no slot-map re-read and nothing logged."""
    import logging

    r, sub, got, _ = await _client_and_subscriber(cluster)

    class Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    lines = Lines()
    logging.getLogger("dropserver.realtime").addHandler(lines)
    manager = type(sub._cluster.nodes_manager)
    reads = 0
    initialize = manager.initialize

    async def counted(self, *args, **kwargs):
        nonlocal reads
        reads += 1
        return await initialize(self, *args, **kwargs)

    manager.initialize = counted
    busy, turns = True, 0

    async def other_work() -> None:
        nonlocal turns
        while busy:
            turns += 1
            until = time.perf_counter() + 0.002
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    worker = asyncio.get_running_loop().create_task(other_work())
    names = [channels.user_channel(f"burst-{i}") for i in range(2000)]
    try:
        results = await asyncio.gather(*(sub.subscribe(n) for n in names),
                                       return_exceptions=True)
        took, busy = turns, False
        await worker
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of {len(names)} not confirmed: {failed[0]!r}"
        assert took < 500, f"the burst took {took} event-loop turns"
        assert reads == 0, f"the slot map was read {reads} times"
        assert lines.lines == [], lines.lines[:5]
        sample = names[::200]
        for name in sample:
            await r.execute_command(publish_command(r), name, name.encode())
        await _wait_for(lambda: {c.decode() for c in got} >= set(sample), within=10)
    finally:
        busy = False
        manager.initialize = initialize
        logging.getLogger("dropserver.realtime").removeHandler(lines)
        await sub.stop()
        await r.aclose()


async def test_a_batch_no_replica_confirmed_in_time_is_not_acknowledged(cluster):
    """WAIT after each batch: with the primary's replica frozen, the batch's callers
    get NotReplicated (a buy answers 503 and is retried), never a reply a failover
    could take back; thawed, the same commands are answered again."""
    key = "{drop:7003}:x"
    primary = local_cluster.primary_for(cluster, key)
    replica = local_cluster.replica_of(cluster, primary)
    client = redis.asyncio.Redis(host=primary.host, port=primary.port)
    pipe = AutoPipeline(client, wait_replicas=1, wait_timeout_ms=100)
    try:
        assert await pipe.execute("SET", key, "1") in (True, b"OK")
        os.kill(cluster.pids[replica.name], signal.SIGSTOP)
        try:
            results = await asyncio.gather(pipe.execute("SET", key, "2"),
                                           pipe.execute("GET", key), return_exceptions=True)
        finally:
            os.kill(cluster.pids[replica.name], signal.SIGCONT)
        assert all(isinstance(x, NotReplicated) for x in results), results
        assert await pipe.execute("GET", key) == b"2"  # it ran; it was not acknowledged
    finally:
        await pipe.aclose()
        await client.aclose()


async def test_a_viewer_gets_every_event_in_order_across_a_slot_move(cluster, settings):
    """The whole gateway on a cluster: a viewer joined to a drop, the drop's slot moved
    to another primary between two events; the viewer gets all of them, in order
    (what the old owner published before the move, the new owner after)."""
    from realtime.publish import publish
    from tests.conftest import running
    from tests.realtime_support import Client, create_drop

    drop_id, _ = await create_drop(settings.database_url)
    r = connect(cluster.redis_url)
    await ready(r)
    try:
        async with running(settings, redis_url=cluster.redis_url) as srv:
            viewer = await Client.connect(srv.ws_url)
            await viewer.join(drop_id)
            for n in range(1, 4):
                await publish(r, drop_id, "chat.message", {"n": n})
            before = local_cluster.primary_for(cluster, channels.meta_key(drop_id))
            target = next(n for n in cluster.redis_nodes
                          if n != before and cluster.is_running(n.name) and _role(n) == "master")
            slot = local_cluster.slot_of(channels.meta_key(drop_id))
            _SLOT_KEYS[slot] = channels.meta_key(drop_id)
            await asyncio.to_thread(move_slot, cluster, slot, target)
            for n in range(4, 7):
                await publish(r, drop_id, "chat.message", {"n": n})
            events = await viewer.events(6, wait=15)
            assert [e["data"]["n"] for e in events] == [1, 2, 3, 4, 5, 6]
            assert [e["pos"]["offset"] for e in events] == [1, 2, 3, 4, 5, 6]
    finally:
        await r.aclose()
