"""Shared fixtures: real Redis and PostgreSQL, started once per test session by the
same launcher as `dropserver dev`, and emptied between tests.

Set TEST_REDIS_URL / TEST_DATABASE_URL to run against servers of your own (they are
flushed and truncated between tests: never point them at data you want to keep).
``TEST_REDIS_CLUSTER=1`` runs the tests against a local Redis Cluster (3 primaries, 3
replicas) instead of one Redis; ``TEST_REDIS_URL`` may also be a ``redis+cluster://``
URL. The ``cluster`` fixture starts a cluster of its own for the tests that need one
whatever the switch says (failover, slot moves).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from dropserver.auth import Role, issue_token
from dropserver.db import migrate
from dropserver.redis_client import connect, connect_sync, ready
from dropserver.serve import bind_socket, uvicorn_config
from dropserver.services import LocalServices
from dropserver.settings import Settings, load_settings

ON_CLUSTER = (os.environ.get("TEST_REDIS_CLUSTER", "") not in ("", "0")
              or os.environ.get("TEST_REDIS_URL", "").split("://", 1)[0].endswith("+cluster"))
# For a test of one Redis's own machinery (its single subscriber connection, CLIENT
# KILL of it): tests/test_cluster_moves.py covers the cluster's sharded subscriber.
only_single_redis = pytest.mark.skipif(ON_CLUSTER, reason="one Redis's own machinery")


def run_sync(coro):
    """Run a coroutine to completion from sync code, even inside a running loop."""
    result: list = []
    error: list = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # re-raised in the caller
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@dataclass(frozen=True)
class Backends:
    redis_url: str
    database_url: str


async def _prepare_db(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def backends() -> Iterator[Backends]:
    redis_url = os.environ.get("TEST_REDIS_URL", "")
    database_url = os.environ.get("TEST_DATABASE_URL", "")
    with contextlib.ExitStack() as stack:
        if not (redis_url and database_url):
            services = stack.enter_context(LocalServices(
                want_redis=not redis_url, want_postgres=not database_url,
                redis_cluster=ON_CLUSTER))
            redis_url = redis_url or services.redis_url
            database_url = database_url or services.database_url
        run_sync(_prepare_db(database_url))
        yield Backends(redis_url, database_url)


async def _truncate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'schema_migrations'")
        if tables:
            names = ", ".join(f'"{r["tablename"]}"' for r in tables)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture
def clean_backends(backends: Backends) -> Backends:
    """Empty Redis and PostgreSQL before the test."""
    client = connect_sync(backends.redis_url)
    try:
        client.flushall()  # every primary of a cluster
        client.script_flush()
    finally:
        client.close()
    run_sync(_truncate(backends.database_url))
    return backends


# The test servers' heartbeat: one ping an hour, so no test client is pinged (an extra
# frame in what it reads) or closed as silent (4001) because a loaded machine made it
# slow to read. A test ABOUT heartbeats sets its own ``ws_ping_interval`` and
# ``ws_pong_timeout`` (tests/test_fanout.py, tests/test_benchmarks_buyers.py).
TEST_WS_PING_INTERVAL = 3600.0


@pytest.fixture
def settings(clean_backends: Backends, tmp_path) -> Settings:
    return load_settings(
        {},
        dev=True,
        redis_url=clean_backends.redis_url,
        database_url=clean_backends.database_url,
        log_format="text",
        order_workers=1,
        media_dir=str(tmp_path / "media"),
        ws_ping_interval=TEST_WS_PING_INTERVAL,
    )


@pytest.fixture
def make_token(settings: Settings) -> Callable[..., str]:
    def make(sub: str = "viewer-1", role: Role | str = Role.VIEWER, **kw) -> str:
        return issue_token(settings, sub, role, **kw)

    return make


@dataclass
class RunningServer:
    app: object
    base_url: str
    ws_url: str
    port: int


def _task_stacks() -> str:
    """Every other unfinished task of this loop and the awaits it is suspended in,
    innermost last (``Task.get_stack`` shows only the outermost coroutine)."""
    lines = []
    for t in asyncio.all_tasks():
        if t is asyncio.current_task() or t.done():
            continue
        where, coro = [], t.get_coro()
        while coro is not None:
            frame = next((getattr(coro, a) for a in ("cr_frame", "gi_frame", "ag_frame")
                          if getattr(coro, a, None) is not None), None)
            if frame is None:
                break
            where.append(f"{frame.f_code.co_name} ({os.path.relpath(frame.f_code.co_filename)}"
                         f":{frame.f_lineno})")
            coro = next((getattr(coro, a) for a in ("cr_await", "gi_yieldfrom", "ag_await")
                         if getattr(coro, a, None) is not None), None)
            if coro is not None and not hasattr(coro, "cr_frame"):
                # anext() of an async generator (a lifespan): follow the generator
                gen = getattr(frame.f_locals.get("self"), "gen", None)
                coro = gen if hasattr(gen, "ag_frame") else coro
        lines.append(f"{t.get_name()}: " + " > ".join(where[-5:]))
    return "\n".join(lines)[:8000]


async def start_server(settings: Settings) -> tuple[RunningServer, Callable]:
    """Start the real app under uvicorn on a free loopback port in this loop."""
    import uvicorn

    from dropserver.app import create_app

    app = create_app(settings)
    config = uvicorn_config(app, settings)
    sock = bind_socket("127.0.0.1", 0, reuse_port=False)
    port = sock.getsockname()[1]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        done, _ = await asyncio.wait([task], timeout=15)
        if not done:  # say what the shutdown still waits for, then give up on it
            waiting = _task_stacks()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            sock.close()
            raise AssertionError(f"the server did not stop within 15 s:\n{waiting}")
        sock.close()
        with contextlib.suppress(asyncio.CancelledError):
            task.result()

    running = RunningServer(app, f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", port)
    return running, stop


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    running, stop = await start_server(settings)
    try:
        yield running
    finally:
        await stop()


@contextlib.asynccontextmanager
async def running(settings: Settings, **changes: object) -> AsyncIterator[RunningServer]:
    """The app, with ``changes`` applied to ``settings``, for the length of the block."""
    srv, stop = await start_server(settings.replace(**changes))
    try:
        yield srv
    finally:
        await stop()


@pytest.fixture
async def r(clean_backends: Backends) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client of the test Redis (pool big enough for the buy-rush tests)."""
    client = connect(clean_backends.redis_url, max_connections=512)
    await ready(client)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def http(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalServices]:
    """A Redis Cluster of its own (3 primaries, 3 replicas; no PostgreSQL) for the
    tests that kill or move its nodes: ``cluster.redis_url``, ``cluster.redis_nodes``,
    ``cluster.stop_service("redis-N", kill=True)``."""
    with LocalServices(want_postgres=False, redis_cluster=True) as services:
        yield services


@pytest.fixture(scope="module")
def cluster_backends(cluster: LocalServices, backends: Backends) -> Backends:
    """The test PostgreSQL with the module's own cluster (see :func:`cluster`)."""
    return Backends(cluster.redis_url, backends.database_url)
