"""The worker's main loop (dropserver.serve._DrainingServer): it wakes once a second,
not uvicorn's ten times, and a stop still starts and ends at once.

uvicorn's loop sleeps 0.1 s between looks at ``should_exit``; a loop that merely slept
a second instead would start a drain up to a second after SIGTERM and stop up to a
second after the drain ended. The signal here is sent to the main thread while its
event loop waits in ``epoll`` with nothing else due (as in an idle worker), from
another thread with ``pthread_kill``: the handler runs inside the interrupted wait, and
nothing but the server itself can wake the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from email.utils import parsedate_to_datetime

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from dropserver.serve import _DrainingServer, bind_socket

DRAIN_S = 0.05  # what the drain itself takes (the gateway's drain polls every 0.05 s)


def _app(drained: list[float]) -> Starlette:
    async def hello(request):
        return PlainTextResponse("hi")

    async def drain() -> None:
        drained.append(time.monotonic())
        await asyncio.sleep(DRAIN_S)

    app = Starlette(routes=[Route("/", hello)])
    app.state.drain = drain
    return app


@contextlib.asynccontextmanager
async def _serving(drained: list[float], **config):
    sock = bind_socket("127.0.0.1", 0, reuse_port=False)
    server = _DrainingServer(
        uvicorn.Config(_app(drained), lifespan="off", log_config=None, **config),
        drain_timeout=5)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)
        yield server, task, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        if not task.done():
            server.should_exit = True
            await asyncio.wait([task], timeout=5)
        sock.close()


def _signal_later(delay: float, sent: list[float]) -> threading.Thread:
    main = threading.main_thread().ident

    def send() -> None:
        time.sleep(delay)
        sent.append(time.monotonic())
        signal.pthread_kill(main, signal.SIGTERM)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


async def test_sigterm_to_an_idle_worker_drains_and_stops_at_once():
    if threading.current_thread() is not threading.main_thread():
        # uvicorn takes signals only in the main thread; SIGTERM would end this process
        pytest.skip("the tests do not run in the main thread")
    drained: list[float] = []
    for attempt in range(3):  # at several phases of the once-a-second tick
        sent: list[float] = []
        drained.clear()
        async with _serving(drained) as (_server, task, _):
            # Wait on the server alone: no timer of this test wakes the loop.
            _signal_later(0.3 + 0.3 * attempt, sent)
            done, _ = await asyncio.wait([task], timeout=10)
            stopped = time.monotonic()
        assert done, "the server did not stop"
        assert drained, "the drain never ran"
        # uvicorn's 10 Hz loop: within 0.1 s each; a 1 s sleep: up to 1 s, then 1 s more
        assert drained[0] - sent[0] < 0.3, f"the drain started {drained[0] - sent[0]:.3f} s late"
        assert stopped - sent[0] < DRAIN_S + 0.45, \
            f"stopped {stopped - sent[0]:.3f} s after SIGTERM"


async def test_should_exit_set_from_another_thread_stops_the_server_at_once():
    async with _serving([]) as (server, task, _):
        await asyncio.sleep(0.2)
        started = time.monotonic()
        threading.Thread(target=setattr, args=(server, "should_exit", True)).start()
        done, _ = await asyncio.wait([task], timeout=10)
        assert done and time.monotonic() - started < 0.4


async def test_the_date_header_names_the_second_the_response_is_made():
    async with _serving([]) as (_server, _task, base), \
            httpx.AsyncClient(base_url=base) as http:
        lags = []
        end = time.time() + 2.5
        while time.time() < end:
            before = time.time()
            r = await http.get("/")
            after = time.time()
            date = parsedate_to_datetime(r.headers["date"]).timestamp()
            assert date <= after, f"Date {r.headers['date']} is ahead of {after}"
            lags.append(before - date)
            await asyncio.sleep(0.03)
        # Set just after each second begins: the second of the response, or the one
        # before in the few ms after a second begins (uvicorn's own tick: up to 2 s old).
        assert max(lags) < 1.5, f"Date lagged {max(lags):.3f} s"
        assert min(lags) >= 0.0


async def test_a_request_limit_keeps_uvicorns_own_tick():
    # --limit-max-requests is counted at each tick: with it set, uvicorn's loop runs.
    async with _serving([], limit_max_requests=2) as (_server, task, base), \
            httpx.AsyncClient(base_url=base) as http:
        for _ in range(2):
            assert (await http.get("/")).status_code == 200
        done, _ = await asyncio.wait([task], timeout=3)
        assert done, "the server did not stop after its request limit"
