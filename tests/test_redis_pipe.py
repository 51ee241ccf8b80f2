"""checkout.redis_pipe.AutoPipeline against a real Redis."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from checkout.redis_pipe import UNREPLICATED, AutoPipeline
from checkout.reserve import hot_path_client
from tests.conftest import only_single_redis
from tests.virtual_clock import virtual_clock

# One Redis's AutoPipeline (a cluster runs one per primary: tests/test_cluster_moves.py).
pytestmark = only_single_redis


@pytest.fixture
async def pipe(r):
    client = hot_path_client(_url(r))
    p = AutoPipeline(client)
    yield p
    await p.aclose()
    await client.aclose()


def _url(r) -> str:
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


async def _clients(r) -> int:
    return len(await r.client_list(_type="normal"))


async def test_replies_reach_their_callers_in_order_in_one_write(r, pipe):
    assert await pipe.execute("PING") == b"PONG"  # connected
    conn, writes = pipe._conn, []
    send = conn.send_packed_command

    async def counting(command, check_health=True):
        writes.append(len(command))
        await send(command, check_health)

    conn.send_packed_command = counting
    futs = [pipe.execute("INCR", "n") for _ in range(1200)]  # one turn
    assert await asyncio.gather(*futs) == list(range(1, 1201))
    assert writes == [3]  # one send: 512 + 512 + 176 commands
    # Later turns, interleaved with other commands, still match.
    a = pipe.execute("SET", "k", "v")
    b = pipe.execute("GET", "k")
    c = pipe.execute("INCR", "n")
    assert await asyncio.gather(a, b, c) == [b"OK", b"v", 1201]
    assert writes == [3, 1]


async def test_replies_read_in_together_are_handed_out_without_a_read_each(r, pipe):
    # A rush's batch comes back in a few socket reads: the replies after the one
    # awaited come straight from hiredis' reader, each error to its own caller still.
    from redis.exceptions import NoScriptError

    assert await pipe.execute("PING") == b"PONG"
    conn, reads = pipe._conn, []
    read = conn.read_response

    async def counting(*a, **kw):
        reads.append(1)
        return await read(*a, **kw)

    conn.read_response = counting
    await r.set("text", "abc")
    futs = []
    for i in range(1000):
        futs.append(pipe.execute("INCR", "n"))
        if i % 100 == 50:
            futs.append(pipe.execute("INCR", "text"))
            futs.append(pipe.execute("EVALSHA", "0" * 40, 0))
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert [x for x in results if not isinstance(x, Exception)] == list(range(1, 1001))
    errors = [x for x in results if isinstance(x, Exception)]
    assert [type(e) for e in errors] == [ResponseError, NoScriptError] * 10
    assert all("not an integer" in str(e) for e in errors[::2])
    assert len(reads) < 100, len(reads)  # was one per reply: 1,020
    assert await pipe.execute("ECHO", "after") == b"after"


async def test_one_connection_for_all_callers(r, pipe):
    before = await _clients(r)
    await asyncio.gather(*[pipe.execute("PING") for _ in range(300)])
    await asyncio.gather(*[pipe.execute("PING") for _ in range(300)])
    assert await _clients(r) == before + 1


async def test_an_error_reply_goes_to_its_own_caller_only(r, pipe):
    await r.set("text", "abc")
    futs = [pipe.execute("INCR", "n"), pipe.execute("INCR", "text"),
            pipe.execute("INCR", "n")]
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)
    assert "not an integer" in str(results[1])


async def test_a_cancelled_caller_does_not_shift_the_replies(r, pipe):
    await r.rpush("q", "x")
    slow = asyncio.ensure_future(pipe.execute("BLPOP", "never", 1))
    nxt = pipe.execute("LPOP", "q")
    await asyncio.sleep(0.05)
    slow.cancel()
    assert await nxt == b"x"
    assert await pipe.execute("ECHO", "after") == b"after"


async def test_a_killed_connection_fails_what_is_in_flight_and_reconnects(r, pipe):
    assert await pipe.execute("PING") == b"PONG"
    blocked = pipe.execute("BLPOP", "never", 0)  # in flight until the connection dies
    async with asyncio.timeout(10):  # Redis has it: blocked (not a fixed 0.1 s)
        while (await r.info("clients"))["blocked_clients"] < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    killed = await r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert killed >= 1
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(blocked, 5)
    assert await pipe.execute("INCR", "after-kill") == 1


async def test_a_silent_redis_times_out_and_the_next_command_reconnects(r, monkeypatch):
    import checkout.redis_pipe as redis_pipe

    client = hot_path_client(_url(r))
    p = AutoPipeline(client, timeout=0.3)
    try:
        assert await p.execute("PING") == b"PONG"  # connected
        # Read on a clock the test moves (the loop's and the pipeline's own): a loaded
        # machine, holding the process a second or two, cannot fail the bound.
        with virtual_clock() as clock:
            monkeypatch.setattr(redis_pipe, "time", SimpleNamespace(monotonic=clock.time))
            blocked = p.execute("BLPOP", "never", 0)
            took = await clock.run_until(blocked.done, limit=5.0, real_wait=0.002)
            monkeypatch.undo()
        # The watchdog looks every 0.3 s and gives up at the first look that finds the
        # command older than 0.3 s: not before 0.3 s, and by the look after. A look can
        # fall exactly 0.3 s after the send (when the PING's watchdog had already run
        # out before the clock was installed, as on a loaded machine), and whether
        # "older than 0.3 s" holds there is float rounding of the clock's absolute
        # time (about half the starts): 0.3 is a give-up on time, not early.
        assert took is not None and 0.3 <= took <= 0.6 + clock.step, took
        with pytest.raises(RedisTimeoutError):
            blocked.result()
        assert await p.execute("ECHO", "again") == b"again"
    finally:
        await p.aclose()
        await client.aclose()


async def test_redis_down_fails_fast_with_a_connection_error():
    from dropserver.services import free_port

    client = hot_path_client(f"redis://127.0.0.1:{free_port()}/0")
    p = AutoPipeline(client)
    try:
        futs = [p.execute("PING") for _ in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 10)
        assert all(isinstance(x, RedisConnectionError) for x in results), results
    finally:
        await p.aclose()
        await client.aclose()


async def test_closed_pipeline_refuses_commands(r, pipe):
    assert await pipe.execute("PING") == b"PONG"
    await pipe.aclose()
    with pytest.raises(RedisConnectionError):
        pipe.execute("PING")


async def test_waiting_for_a_replica_on_a_primary_without_one_answers_and_counts_it(
        r, monkeypatch):
    """WAIT 1 on a Redis with no replica can never be met: nobody a failover could
    promote, so the batch is answered (ROLE says there is no replica), counted, and
    the next second's batches go without WAIT."""
    import checkout.redis_pipe as redis_pipe

    # The pipeline's clock stands still until the test moves it: "the next second"
    # cannot lapse while a loaded machine holds the test between two commands.
    clock = {"now": time.monotonic()}
    monkeypatch.setattr(redis_pipe, "time", SimpleNamespace(monotonic=lambda: clock["now"]))

    async def waits() -> int:  # WAIT commands Redis has run
        return (await r.info("commandstats")).get("cmdstat_wait", {}).get("calls", 0)

    client = hot_path_client(_url(r))
    p = AutoPipeline(client, wait_replicas=1, wait_timeout_ms=50)
    try:
        before, waited = UNREPLICATED._value.get(), await waits()
        assert await p.execute("SET", "wait-k", "v") in (True, b"OK")
        assert UNREPLICATED._value.get() > before
        assert await waits() == waited + 1
        assert await p.execute("GET", "wait-k") == b"v"
        assert await waits() == waited + 1  # no WAIT this time (was: < 40 ms real)
        clock["now"] += 1.0  # the second is over: batches carry WAIT again
        assert await p.execute("GET", "wait-k") == b"v"
        assert await waits() == waited + 2
    finally:
        await p.aclose()
        await client.aclose()
