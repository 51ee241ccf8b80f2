"""The order workers on a Redis Cluster: each drop's order stream lives on its drop's
slot, so the streams of drops being sold at once are on different slots (and
shards). A worker reads every one of them, and takes over what a dead consumer left
pending on each."""

from __future__ import annotations

import asyncio
import time

from checkout import keys
from checkout.order_entries import ReleaseEntry
from checkout.order_worker import GROUP, OrderWorker
from dropserver import local_cluster
from dropserver.redis_client import connect, ready


class _Recorder:
    """The processor's place: records what the worker hands it (the worker is under
    test here, not the order pipeline)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    async def handle(self, entry: ReleaseEntry) -> None:
        self.seen.append((entry.drop_id, entry.hold_id))


def _drops_on_other_slots(n: int, start: int) -> list[int]:
    drops: list[int] = []
    slots: set[int] = set()
    d = start
    while len(drops) < n:
        slot = local_cluster.slot_of(keys.orders(d))
        if slot not in slots:
            drops.append(d)
            slots.add(slot)
        d += 1
    return drops


async def _add(r, drop_id: int, hold: str) -> None:
    await r.xadd(keys.orders(drop_id), {"type": "release", "hold_id": hold,
                                        "drop_id": str(drop_id), "reason": "expired"})


async def _until(check, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.05)


async def test_a_worker_reads_every_drops_stream_whatever_its_slot(cluster) -> None:
    drops = _drops_on_other_slots(3, 9100)
    r = connect(cluster.redis_url)
    await ready(r)
    rec = _Recorder()
    worker = OrderWorker(r, rec, consumer="w", block_ms=100)  # type: ignore[arg-type]
    try:
        for d in drops:
            await r.sadd(keys.ACTIVE_DROPS, d)
        worker.start()
        for i, d in enumerate(drops):
            await _add(r, d, f"h{i}")
        await _until(lambda: len(rec.seen) == 3)
        assert sorted(rec.seen) == sorted((d, f"h{i}") for i, d in enumerate(drops))
        for d in drops:
            info = {g["name"]: g for g in await r.xinfo_groups(keys.orders(d))}
            assert info[GROUP.encode()]["pending"] == 0 and info[GROUP.encode()]["lag"] == 0
    finally:
        await worker.stop()
        await r.srem(keys.ACTIVE_DROPS, *drops)
        await r.aclose()


async def test_what_a_dead_consumer_left_is_taken_over_on_every_slot(cluster) -> None:
    drops = _drops_on_other_slots(2, 9200)
    r = connect(cluster.redis_url)
    await ready(r)
    rec = _Recorder()
    worker = OrderWorker(r, rec, consumer="heir", claim_idle_ms=300,  # type: ignore[arg-type]
                         block_ms=100)
    try:
        for i, d in enumerate(drops):
            await r.xgroup_create(keys.orders(d), GROUP, id="0", mkstream=True)
            await _add(r, d, f"left{i}")
            # read by a consumer that then died: pending, never acknowledged
            got = await r.xreadgroup(GROUP, "dead", {keys.orders(d): ">"}, count=10)
            assert len(got[0][1]) == 1
            await r.sadd(keys.ACTIVE_DROPS, d)
        worker.start()
        await _until(lambda: len(rec.seen) == 2)
        assert sorted(rec.seen) == sorted((d, f"left{i}") for i, d in enumerate(drops))
        for d in drops:
            assert (await r.xpending(keys.orders(d), GROUP))["pending"] == 0
    finally:
        await worker.stop()
        await r.srem(keys.ACTIVE_DROPS, *drops)
        await r.aclose()


async def test_a_batch_whose_tail_a_failover_lost_has_the_rest_processed(cluster) -> None:
    """A worker read a batch on the primary; a failover then lost the batch's tail (the
    replica never had it; here deleted after the read). The fence (WAIT) finds the
    newest entry the primary still has: the entries up to it are processed at once,
    the lost ones are not (counted ``lost``). A batch it lost whole: nothing. (Before,
    a lost tail left the whole batch unprocessed, and counted lost, until another
    consumer claimed its survivors 15 s later.)"""
    from prometheus_client import REGISTRY

    from checkout.order_worker import ReplicationFence

    d = _drops_on_other_slots(1, 9300)[0]
    stream = keys.orders(d)
    r = connect(cluster.redis_url)
    await ready(r)
    rec = _Recorder()
    fence = ReplicationFence(cluster.redis_url, replicas=1, timeout_ms=2000)
    worker = OrderWorker(r, rec, consumer="w", fence=fence)  # type: ignore[arg-type]

    def lost() -> float:
        return REGISTRY.get_sample_value("dropserver_orders_processed_total",
                                         {"type": "release", "result": "lost"}) or 0.0

    async def read(*holds: str) -> list:
        for hold in holds:
            await _add(r, d, hold)
        got = await r.xreadgroup(GROUP, "w", {stream: ">"}, count=10)
        return got[0][1]

    try:
        await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        entries = await read("kept0", "kept1", "lost2", "lost3")
        assert len(entries) == 4
        await r.xdel(stream, entries[2][0], entries[3][0])  # the tail a failover lost
        before = lost()
        await worker._handle_batch(stream, entries, delivered=1)
        assert sorted(rec.seen) == [(d, "kept0"), (d, "kept1")]
        assert lost() - before == 2

        entries = await read("lost4", "lost5")
        await r.xdel(stream, *(entry_id for entry_id, _fields in entries))
        await worker._handle_batch(stream, entries, delivered=1)
        assert sorted(rec.seen) == [(d, "kept0"), (d, "kept1")]
        assert lost() - before == 4
    finally:
        await fence.aclose()
        await r.aclose()
