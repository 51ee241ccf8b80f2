"""A server's shutdown ends in bounded time, whatever one background task does.

Seen in full runs under load: a test server did not stop within 15 s, its lifespan
suspended in a background loop's ``stop`` (the awaited task cancelled once and never
seen to end). Every background task is now stopped by
:func:`dropserver.background.stop_task` (cancelled again and again, for at most a few
seconds, then left behind with a warning that says where it waits), and the database
pools are terminated when a connection is still held after a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg
import pytest

from dropserver.background import Periodic, stop_task
from tests.conftest import start_server

log = logging.getLogger("tests.shutdown")


async def _swallows(times: int, ended: list[str]) -> None:
    """Ignores its first ``times`` cancellations (a library's ``finally`` that awaits
    again), then ends."""
    ignored = 0
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            ignored += 1
            if ignored > times:
                ended.append("cancelled")
                raise


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again():
    ended: list[str] = []
    task = asyncio.create_task(_swallows(2, ended))
    await asyncio.sleep(0)
    t0 = time.monotonic()
    assert await stop_task(task, log, within=5.0) is True
    assert ended == ["cancelled"] and task.cancelled()
    assert time.monotonic() - t0 < 2.0  # two more cancels, 0.5 s apart at most


async def test_a_task_that_never_ends_is_left_behind_with_a_warning(caplog):
    ended: list[str] = []
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue
        ended.append("released")

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tests.shutdown"):
        assert await stop_task(task, log, within=1.0) is False
    took = time.monotonic() - t0
    assert 0.9 < took < 2.0, took
    [rec] = [r for r in caplog.records if r.getMessage() == "task did not stop"]
    assert rec.task == "stubborn" and "stubborn" in rec.suspended_in
    release.set()
    task.cancel()
    await asyncio.wait([task], timeout=2)
    assert ended == ["released"]


async def test_the_caller_of_stop_task_can_still_be_cancelled():
    """Awaiting a task inside ``suppress(CancelledError)`` swallowed the *caller's*
    cancellation too; stop_task must not."""
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    victim = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_task(victim, log, within=30.0))
    await asyncio.sleep(0.1)
    stopper.cancel()
    done, _ = await asyncio.wait([stopper], timeout=2)
    assert done and stopper.cancelled()
    release.set()
    victim.cancel()
    await asyncio.wait([victim], timeout=2)
    assert victim.done()


async def test_a_periodic_loop_whose_step_swallows_cancellation_stops():
    ended: list[str] = []
    started = asyncio.Event()

    async def step() -> None:
        started.set()
        await _swallows(1, ended)

    loop = Periodic("swallowing", 0.01, step, log, "test step")
    loop.start()
    await asyncio.wait_for(started.wait(), 5)
    t0 = time.monotonic()
    await loop.stop()
    assert ended == ["cancelled"]
    assert time.monotonic() - t0 < 2.0


async def test_a_pool_with_a_connection_still_held_is_terminated(clean_backends):
    from dropserver.app import _close_pool

    pool = await asyncpg.create_pool(clean_backends.database_url, min_size=1, max_size=2)
    held = await pool.acquire()  # a task that never gave its connection back
    t0 = time.monotonic()
    await _close_pool(pool, within=0.5)
    assert time.monotonic() - t0 < 3.0
    assert pool.is_closing()
    with pytest.raises(asyncpg.InterfaceError):  # the held connection went with it
        await held.fetchval("SELECT 1")


async def test_a_server_stops_although_a_request_holds_a_database_connection(settings):
    """The server's own pool, a connection taken and never released: before, the
    lifespan's ``pool.close()`` waited for it forever (the conftest's stop gives up
    after 15 s and fails)."""
    running, stop = await start_server(settings)
    held = await running.app.state.db.acquire()
    t0 = time.monotonic()
    await stop()
    assert time.monotonic() - t0 < 12.0
    with pytest.raises(asyncpg.InterfaceError):
        await held.fetchval("SELECT 1")


def _stoppers():
    """(name, object, install, stop) for each object that stops tasks of its own
    outside stop_task's callers above: install puts a task on it, stop stops it."""
    from checkout.fake_gateway import FakeGateway
    from realtime.sharded_subscriber import ShardedSubscriber
    from realtime.subscriber import Subscriber
    from streaming.replay import MomentRecorder

    def nothing(*_args) -> None:
        return None

    def recorder():
        r = MomentRecorder(None, None, 1, lambda: 0, redis_url="redis://127.0.0.1:1")
        return r, lambda t: setattr(r, "_task", t), r.stop

    def subscriber():
        s = Subscriber("redis://127.0.0.1:1", nothing, nothing)
        return s, lambda t: setattr(s, "_task", t), s.stop

    def sharded():
        s = ShardedSubscriber("redis+cluster://127.0.0.1:1", nothing, nothing)
        return s, lambda t: setattr(s, "_mover", t), s.stop

    def gateway():
        g = FakeGateway()
        return g, g._deliveries.add, g.close

    def pipeline():
        import redis.asyncio as aioredis

        from checkout.redis_pipe import AutoPipeline

        p = AutoPipeline(aioredis.Redis.from_url("redis://127.0.0.1:1"))
        return p, lambda t: setattr(p, "_reader", t), p.aclose

    return {"moment recorder": recorder, "subscriber": subscriber,
            "sharded subscriber": sharded, "fake gateway": gateway,
            "buy pipeline": pipeline}


@pytest.mark.parametrize("which", ["moment recorder", "subscriber", "sharded subscriber",
                                   "fake gateway", "buy pipeline"])
async def test_each_stop_ends_although_its_task_swallowed_a_cancellation(which):
    """The same bound for the objects that stop a task of their own (the replay's moment
    recorder, the pub/sub subscribers, the buy path's pipeline, the fake gateway's
    deliveries): before, each
    cancelled once and awaited inside suppress(CancelledError), and waited forever on a
    task that swallowed the cancel."""
    _obj, install, stop = _stoppers()[which]()
    ended: list[str] = []
    task = asyncio.create_task(_swallows(1, ended))
    install(task)
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop())
    done, _ = await asyncio.wait([stopper], timeout=5)
    if not done:
        task.cancel()
        stopper.cancel()
        await asyncio.wait([stopper, task], timeout=2)
    assert done and stopper.exception() is None, which
    assert ended == ["cancelled"] and task.done()
