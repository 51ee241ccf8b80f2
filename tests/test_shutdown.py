"""A server's shutdown ends in bounded time, whatever one background task does.

Seen in full runs under load: a test server did not stop within 15 s, its lifespan
suspended in a background loop's ``stop`` (the awaited task cancelled once and never
seen to end). Every background task is now stopped by
:func:`dropserver.background.stop_task` (cancelled again and again, for at most a few
seconds, then left behind with a warning that says where it waits), and the database
pools are terminated when a connection is still held after a few seconds.

Every bound here is read on a virtual clock (tests.virtual_clock): the test moves the
loop's time and sees *when* the code gave up, so a busy machine, which only slows the
test down, cannot fail it (3 of 3 runs under load failed on the wall-clock deadlines).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
import pytest

from dropserver.background import Periodic, stop_task
from tests.conftest import start_server
from tests.virtual_clock import virtual_clock

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


async def _end(*tasks: asyncio.Task) -> None:
    """Leave nothing running behind a failed test: cancel until each task ends."""
    for _ in range(10):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            return
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.1)


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again():
    ended: list[str] = []
    task = asyncio.create_task(_swallows(2, ended))
    await asyncio.sleep(0)
    with virtual_clock() as clock:
        stopper = asyncio.create_task(stop_task(task, log, within=5.0))
        took = await clock.run_until(stopper.done, limit=5.0)
    await _end(stopper, task)
    assert stopper.result() is True
    assert ended == ["cancelled"] and task.cancelled()
    # cancelled at once, then again every 0.5 s: the third cancel, at 1 s, ends it
    assert took == pytest.approx(1.0, abs=clock.step), took


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
    with caplog.at_level(logging.WARNING, logger="tests.shutdown"), virtual_clock() as clock:
        stopper = asyncio.create_task(stop_task(task, log, within=1.0))
        took = await clock.run_until(stopper.done, limit=5.0)
    release.set()  # whatever happened: nothing is left running behind the test
    await _end(stopper, task)
    assert stopper.result() is False
    # given up at its bound, not before it and not a step after
    assert took == pytest.approx(1.0, abs=clock.step), took
    [rec] = [r for r in caplog.records if r.getMessage() == "task did not stop"]
    assert rec.task == "stubborn" and "stubborn" in rec.suspended_in
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
    with virtual_clock() as clock:
        stopper = asyncio.create_task(stop_task(victim, log, within=30.0))
        await clock.advance(0.1)
        running = not stopper.done()
        stopper.cancel()
        took = await clock.run_until(stopper.done, limit=2.0)
    release.set()  # whatever happened: nothing is left running behind the test
    await _end(stopper, victim)
    assert running and took is not None and stopper.cancelled()
    assert victim.done()


async def test_a_periodic_loop_whose_step_swallows_cancellation_stops():
    ended: list[str] = []
    started = asyncio.Event()

    async def step() -> None:
        started.set()
        await _swallows(1, ended)

    loop = Periodic("swallowing", 0.01, step, log, "test step")
    with virtual_clock() as clock:
        loop.start()
        assert await clock.run_until(started.is_set, limit=1.0) is not None
        stopper = asyncio.create_task(loop.stop())
        took = await clock.run_until(stopper.done, limit=5.0)
    await _end(stopper)
    stopper.result()
    assert ended == ["cancelled"]
    assert took == pytest.approx(0.5, abs=clock.step), took  # the second cancel ends it


async def test_a_pool_with_a_connection_still_held_is_terminated(clean_backends):
    from dropserver.app import _close_pool

    pool = await asyncpg.create_pool(clean_backends.database_url, min_size=1, max_size=2)
    held = await pool.acquire()  # a task that never gave its connection back
    with virtual_clock() as clock:
        closing = asyncio.create_task(_close_pool(pool, within=0.5))
        took = await clock.run_until(closing.done, limit=5.0)
    closing.result()
    assert took == pytest.approx(0.5, abs=clock.step), took
    assert pool.is_closing()
    with pytest.raises(asyncpg.InterfaceError):  # the held connection went with it
        await held.fetchval("SELECT 1")


async def test_a_server_stops_although_a_request_holds_a_database_connection(settings):
    """The server's own pool, a connection taken and never released: before, the
    lifespan's ``pool.close()`` waited for it forever (the conftest's stop gives up
    after 15 s and fails)."""
    running, stop = await start_server(settings)
    held = await running.app.state.db.acquire()
    with virtual_clock(step=0.05) as clock:
        stopping = asyncio.create_task(stop())
        # the server's sockets, Redis and PostgreSQL are served for a real moment
        # each step, so the clock does not run ahead of them
        took = await clock.run_until(stopping.done, limit=12.0, real_wait=0.002)
    if took is None:
        stopping.cancel()
    assert took is not None, "the server did not stop within 12 s of its clock"
    stopping.result()
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
    with virtual_clock() as clock:
        stopper = asyncio.create_task(stop())
        took = await clock.run_until(stopper.done, limit=5.0, real_wait=0.001)
    await _end(stopper, task)
    assert took is not None and stopper.exception() is None, which
    assert ended == ["cancelled"] and task.done()
