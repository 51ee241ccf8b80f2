"""The node's fan-out board (realtime.board): a worker holds its viewers' commands
while another worker of its node is still writing a drop event, and a worker that
died mid-fan-out holds the others no longer than its lease."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dropserver.services import stop_process
from dropserver.settings import unsafe_rig_env
from realtime.board import BOARD_ENV, INDEX_ENV, LEASE_S, FanoutBoard
from realtime.dispatch import Dispatcher, Job
from realtime.wire import Broadcast
from tests.test_send_lanes import Sock, event


@pytest.fixture
def boards(tmp_path):
    path = str(tmp_path / "board")
    FanoutBoard.create(path, 2)
    made = [FanoutBoard(path, 0), FanoutBoard(path, 1)]
    for b in made:
        b.path = path  # type: ignore[attr-defined]  (for the tests below)
    yield made
    for b in made:
        b.close()


async def test_a_worker_holds_commands_while_another_worker_of_its_node_fans_out(boards):
    """Four workers on two cores: the first done with BUY NOW released its share of the
    rush, whose buys took the cores the others still needed to write BUY NOW."""
    mine, other = Dispatcher(board=boards[0]), Dispatcher(slice_s=0.0005, board=boards[1])
    other.urgent_max_s = other.slice_s  # fixed short slices: the fan-out spans many turns
    socks = [Sock() for _ in range(3000)]
    job = other.submit(Job([(Broadcast(event(1), positioned=True), [s.conn for s in socks])]))
    assert not job.done
    assert mine.holding and not mine.urgent_busy  # nothing of its own to write
    command = asyncio.create_task(mine.urgent_idle())
    while not job.done:
        assert not command.done(), "a command was taken while another worker wrote BUY NOW"
        await asyncio.sleep(0)
    await asyncio.wait_for(command, 5)
    assert all(len(s.got) == 1 for s in socks)
    assert not mine.holding and not other.holding
    await asyncio.wait_for(mine.urgent_idle(), 0.1)  # nobody writing: at once
    mine.close()
    other.close()


async def test_a_dead_workers_slot_holds_the_others_no_longer_than_its_lease(boards):
    """A worker killed in the middle of a fan-out never says it is idle: its slot
    expires by itself."""
    mine = Dispatcher(board=boards[0])
    boards[1].busy(time.monotonic())  # and then "killed": never idle()
    assert mine.holding
    started = time.monotonic()
    await asyncio.wait_for(mine.urgent_idle(), 5)  # a slot that never expired: times out
    assert time.monotonic() - started >= LEASE_S / 2  # it was held, not let through
    assert not mine.holding
    mine.close()


def test_a_worker_sees_only_the_others_slots_and_idle_clears_its_own(boards):
    now = time.monotonic()
    boards[0].busy(now)
    assert not boards[0].others_busy(now)  # its own fan-out is the local urgent lane
    assert boards[1].others_busy(now)
    boards[0].idle()
    assert not boards[1].others_busy(now)
    with pytest.raises(ValueError):  # a slot the board does not have
        FanoutBoard(boards[0].path, 2)


@pytest.mark.timeout(120)
async def test_the_supervisor_gives_each_worker_its_own_slot_on_one_board(clean_backends,
                                                                          tmp_path):
    from tests.conftest import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update({"REDIS_URL": clean_backends.redis_url,
                "DATABASE_URL": clean_backends.database_url, **unsafe_rig_env(),
                "DROPSERVER_LOG_FORMAT": "text", "DROPSERVER_SHUTDOWN_GRACE": "3"})
    argv = [sys.executable, "-m", "dropserver.cli", "serve", "--workers", "3",
            "--port", str(free_port())]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,  # noqa: ASYNC220
                            stderr=subprocess.DEVNULL)
    try:
        # A child read between its fork and its exec still shows the supervisor's own
        # environment: wait until each has exec'd, which its per-worker index says.
        deadline = time.monotonic() + 60
        envs: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            envs = [w.environ() for w in psutil.Process(proc.pid).children()]
            if len(envs) == 3 and all(INDEX_ENV in e for e in envs):
                break
        assert len(envs) == 3 and all(INDEX_ENV in e for e in envs)
        paths = {e.get(BOARD_ENV) for e in envs}
        assert len(paths) == 1 and None not in paths
        (path,) = paths
        assert sorted(int(e[INDEX_ENV]) for e in envs) == [0, 1, 2]
        assert os.stat(path).st_size == 3 * 8  # one slot per worker
    finally:
        stop_process(proc, signal.SIGTERM, 30)
