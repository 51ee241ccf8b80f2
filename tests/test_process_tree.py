"""Processes die together: SIGKILL the supervisor of `dropserver dev --workers 2` or
`dropserver serve --workers 2` and no process of its tree survives (workers, the local
Redis and PostgreSQL, the reaper), and the port is free, within a bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from dropserver.redis_client import connect as connect_redis
from dropserver.settings import unsafe_rig_env
from tests.conftest import free_port
from tests.fault_rig import alive, child_map, port_free, process_tree

BOUND_S = 20.0  # DROPSERVER_SHUTDOWN_GRACE (2 s here) to drain, then a hard stop


def _workers_up(port: int, want: int, proc: subprocess.Popen, deadline: float) -> None:
    nodes: set[str] = set()
    while len(nodes) < want:
        assert proc.poll() is None, "the supervisor exited"
        assert time.monotonic() < deadline, f"saw workers {nodes}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                nodes.add(json.loads(r.read())["node"])
        except OSError:
            time.sleep(0.1)


def kill_supervisor_and_check(proc: subprocess.Popen, port: int, workers: int) -> None:
    _workers_up(port, workers, proc, time.monotonic() + 60)
    tree = process_tree(proc.pid)
    assert len(tree) >= 1 + workers, tree
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    started = time.monotonic()
    while time.monotonic() - started < BOUND_S:
        left = {pid for pid in tree if alive(pid)}
        if not left and port_free(port):
            break
        time.sleep(0.1)
    left = {pid for pid in tree if alive(pid)}
    for pid in left:  # do not leave them to the next test
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert left == set(), f"still alive {BOUND_S:.0f} s after the supervisor's SIGKILL"
    assert port_free(port), "the port is still served"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DROPSERVER_", "STRIPE_", "PROMETHEUS_", "REDIS_URL",
                                "DATABASE_URL"))}
    env.update({"DROPSERVER_LOG_FORMAT": "text", "DROPSERVER_LOG_LEVEL": "warning",
                "DROPSERVER_SHUTDOWN_GRACE": "2", **extra})
    return env


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dev_with_two_workers_dies_whole_with_its_killed_supervisor():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropserver.cli", "dev", "--workers", "2", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        kill_supervisor_and_check(proc, port, 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_serve_with_two_workers_dies_whole_with_its_killed_supervisor(backends):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropserver.cli", "serve", "--workers", "2", "--port",
         str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=_env(REDIS_URL=backends.redis_url, DATABASE_URL=backends.database_url,
                 **unsafe_rig_env()))
    try:
        kill_supervisor_and_check(proc, port, 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the portable fallback: the watchdog alone -----------------------------------------

_CHILD = """
import os, signal, sys, time
import dropserver.lifeline as lifeline
lifeline.set_parent_death_signal = lambda sig: False  # as on a system without prctl
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a graceful stop that hangs
lifeline.watch_parent(os.getppid(), grace=1.0, interval=float(sys.argv[2]))
print(os.getpid(), flush=True)
time.sleep(60)
"""
_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
time.sleep(60)
"""


def _pidfd_works() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


@pytest.mark.parametrize("kind, interval", [
    ("obedient", 0.1), ("stubborn", 0.1),
    # The poll an hour apart: only the pidfd sees the parent go (Linux 5.3+). It
    # polled every 0.5 s: two wake-ups a second in every worker.
    pytest.param("stubborn", 3600.0, marks=pytest.mark.skipif(
        not _pidfd_works(), reason="no pidfd on this system")),
])
def test_the_watchdog_stops_a_child_whose_parent_was_killed(kind, interval):
    """Without PR_SET_PDEATHSIG the watchdog sends SIGTERM itself; a child that does
    not stop on it is exited hard after the grace."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, kind,
                               str(interval)])
    try:
        deadline = time.monotonic() + 20
        child = None
        while child is None and time.monotonic() < deadline:
            kids = child_map().get(parent.pid, [])
            child = kids[0] if kids else None
            time.sleep(0.05)
        assert child is not None
        time.sleep(1.0)  # the child is watching
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        gone_by = time.monotonic() + 5
        while alive(child) and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert not alive(child), f"the {kind} child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# -- the supervisor killed in the middle of a rush ------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_supervisor_killed_mid_rush_loses_no_acknowledged_hold(clean_backends):
    """SIGKILL `dropserver serve --workers 2` while buyers are being answered: its tree
    dies within the bound, a new server finishes the order pipeline, and every
    invariant holds (each acknowledged hold has its one order row, no product or buyer
    over its limits, money as paid, Redis and PostgreSQL agree)."""
    import asyncio

    import asyncpg

    from benchmarks._buyers import buy, open_buyers, selling_drop
    from benchmarks._support import start_server
    from dropserver.auth import Role, issue_token
    from dropserver.settings import load_settings
    from tests.invariants import check, fake_gateway_payments, quiesce

    backends = clean_backends
    env = {"DROPSERVER_BUY_RATE_IP": "0", "DROPSERVER_SHUTDOWN_GRACE": "2",
           "DROPSERVER_ORDER_CLAIM_IDLE_MS": "1000"}
    server = await asyncio.to_thread(start_server, backends.redis_url,
                                     backends.database_url, workers=2, env=env)
    port = int(server.base_url.rsplit(":", 1)[1])
    second = None
    buyers: list = []
    try:
        settings = load_settings({}, dev=True)
        drop_id, product_id = await selling_drop(
            server.base_url, issue_token(settings, "rush-creator", Role.CREATOR),
            units=1000, per_buyer_limit=1)
        users = [f"rush-{i}" for i in range(300)]
        buyers = await open_buyers(server.ws_url, drop_id,
                                   [issue_token(settings, u, Role.VIEWER) for u in users])
        tree = process_tree(server.proc.pid)
        acknowledged: dict[str, dict] = {}
        lost = 0

        async def attempt(i: int) -> None:
            nonlocal lost
            await asyncio.sleep(i * 0.004)  # a rush spread over ~1.2 s
            try:
                frame = await asyncio.wait_for(buy(buyers[i], product_id, f"k-{i}"), 15)
            except (ConnectionError, TimeoutError, OSError):
                lost += 1
                return
            if frame["t"] == "reply":
                data = frame["data"]
                acknowledged[data["hold_id"]] = {"user_id": users[i],
                                                 "buyer_number": data["buyer_number"]}
            else:
                lost += 1

        rush = [asyncio.create_task(attempt(i)) for i in range(len(buyers))]
        await asyncio.sleep(0.5)
        os.kill(server.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(server.proc.wait)
        await asyncio.gather(*rush)
        assert acknowledged and lost, (len(acknowledged), lost)  # killed mid-rush

        deadline = time.monotonic() + BOUND_S
        while ({p for p in tree if alive(p)} or not port_free(port)) \
                and time.monotonic() < deadline:  # noqa: ASYNC110 (polling /proc)
            await asyncio.sleep(0.1)
        assert {p for p in tree if alive(p)} == set() and port_free(port)

        # A new server on the same Redis and PostgreSQL takes the order stream over.
        second = await asyncio.to_thread(start_server, backends.redis_url,
                                         backends.database_url, workers=2, env=env)
        r = connect_redis(backends.redis_url)
        db = await asyncpg.connect(backends.database_url)
        try:
            await quiesce(r, drop_id, within=90)
            await check(db, r, drop_id, acknowledged=acknowledged,
                        payments=await fake_gateway_payments(r))
        finally:
            await db.close()
            await r.aclose()
    finally:
        for b in buyers:
            b.close()
        for srv in (server, second):
            if srv is not None:
                srv.stop()
