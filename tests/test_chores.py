"""The node's chores run in one worker per node (dropserver.chores), and a chore worker
killed stops them only until the supervisor respawns it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time

import psutil
import pytest

from dropserver.chores import RESPAWN_BOUND_S, runs_chores
from realtime.board import INDEX_ENV


def test_worker_0_or_a_process_that_is_the_whole_node_runs_the_chores():
    assert runs_chores({})  # --workers 1, dropserver dev, plain uvicorn, tests
    assert runs_chores({INDEX_ENV: "0"})
    assert not runs_chores({INDEX_ENV: "1"})
    assert not runs_chores({INDEX_ENV: "3"})


def _workers(supervisor: int) -> dict[int, int]:
    """index -> pid of the supervisor's workers that have exec'd (their own env)."""
    out = {}
    for child in psutil.Process(supervisor).children():
        try:
            index = child.environ().get(INDEX_ENV)
        except psutil.Error:
            continue
        if index is not None:
            out[int(index)] = child.pid
    return out


async def _hold_state(r, drop_id: int, hold_id: str) -> str:
    from checkout import keys

    raw = await r.hget(keys.hold(drop_id, hold_id), "state")
    return raw.decode() if isinstance(raw, bytes) else str(raw)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_killed_chore_worker_is_respawned_and_sweeps_the_expired_hold(
        clean_backends):
    """``serve --workers 2``: worker 0 stopped (SIGSTOP), a hold expires and stays
    held (worker 1 runs no sweeper); worker 0 SIGKILLed, the supervisor respawns it
    and the hold is swept within RESPAWN_BOUND_S, its unit back in stock; every
    invariant holds after (Redis and PostgreSQL agree, nothing lost or oversold)."""
    import asyncpg
    import httpx

    from benchmarks._buyers import selling_drop
    from benchmarks._support import start_server
    from checkout import keys
    from dropserver.auth import Role, issue_token
    from dropserver.redis_client import connect as connect_redis
    from dropserver.settings import load_settings
    from tests.invariants import check, fake_gateway_payments, quiesce

    backends = clean_backends
    env = {"DROPSERVER_BUY_RATE_IP": "0", "DROPSERVER_SHUTDOWN_GRACE": "2",
           "DROPSERVER_HOLD_TTL": "3", "DROPSERVER_ORDER_CLAIM_IDLE_MS": "1000"}
    server = await asyncio.to_thread(start_server, backends.redis_url,
                                     backends.database_url, workers=2, env=env)
    r = connect_redis(backends.redis_url)
    stopped = None
    try:
        deadline = time.monotonic() + 60
        while len(workers := _workers(server.proc.pid)) < 2:
            assert time.monotonic() < deadline, workers
            await asyncio.sleep(0.2)
        settings = load_settings({}, dev=True)
        drop_id, product_id = await selling_drop(
            server.base_url, issue_token(settings, "chore-creator", Role.CREATOR),
            units=5, per_buyer_limit=1)
        buyer = issue_token(settings, "chore-buyer", Role.VIEWER)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            resp = await http.post(f"/v1/drops/{drop_id}/buy", json={
                "product_id": product_id, "idempotency_key": "chore-1"},
                headers={"Authorization": f"Bearer {buyer}"})
        assert resp.status_code == 201, resp.text
        hold = resp.json()
        stopped = workers[0]
        os.kill(stopped, signal.SIGSTOP)  # worker 0 alive but running nothing
        product = keys.product(drop_id, product_id)
        assert int(await r.hget(product, "remaining")) == 4

        # Past the hold's expiry and two sweep intervals: worker 1 swept nothing.
        await asyncio.sleep(max(0.0, hold["expires_at"] / 1000 - time.time()) + 2.5)
        assert await _hold_state(r, drop_id, hold["hold_id"]) == "held"
        assert int(await r.hget(product, "remaining")) == 4

        killed_at = time.monotonic()
        os.kill(stopped, signal.SIGKILL)
        respawned = swept = None
        while time.monotonic() - killed_at < RESPAWN_BOUND_S + 5:
            now = _workers(server.proc.pid)
            if respawned is None and now.get(0) not in (None, stopped):
                respawned = time.monotonic() - killed_at
            if await _hold_state(r, drop_id, hold["hold_id"]) != "held":
                swept = time.monotonic() - killed_at
                break
            await asyncio.sleep(0.05)
        print(f"\nworker 0 respawned {respawned} s, hold swept {swept} s after SIGKILL")
        assert respawned is not None and swept is not None, (respawned, swept)
        assert swept <= RESPAWN_BOUND_S
        assert await _hold_state(r, drop_id, hold["hold_id"]) == "expired"
        assert int(await r.hget(product, "remaining")) == 5

        await quiesce(r, drop_id, within=60)
        db = await asyncpg.connect(backends.database_url)
        try:
            state = await db.fetchval("SELECT state FROM orders WHERE public_id = $1",
                                      hold["hold_id"])
            assert state == "expired"
            await check(db, r, drop_id, acknowledged={hold["hold_id"]: {
                "user_id": "chore-buyer", "buyer_number": hold["buyer_number"]}},
                payments=await fake_gateway_payments(r))
        finally:
            await db.close()
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        await r.aclose()
        await asyncio.to_thread(server.stop)


# -- deadline-driven loops (dropserver.background.Scheduled) ----------------------------

async def test_scheduled_sleeps_until_the_step_says_capped_and_a_wake_runs_it_at_once():
    import logging

    from dropserver.background import Scheduled

    log = logging.getLogger("test.scheduled")
    calls: list[float] = []
    answers = iter([None, 30.0, 0.05, -1.0, ValueError("boom"), None, None, None])

    async def step():
        calls.append(time.monotonic())
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    loop = Scheduled("t", step, log, "test step", max_wait=1.0, retry=0.2)
    loop.start()
    try:
        await asyncio.sleep(0.3)
        assert len(calls) == 1  # None: asleep for max_wait
        await asyncio.sleep(1.0)
        assert len(calls) == 2  # ... and no longer (30.0 is capped at max_wait too)
        loop.wake()
        await asyncio.sleep(0.05)
        assert len(calls) == 3  # woken at once
        # 0.05 s, then a past deadline (-1: at once), then a failure retried after 0.2.
        await asyncio.sleep(0.6)
        assert len(calls) >= 6
        gaps = [b - a for a, b in itertools.pairwise(calls[2:])]
        assert 0.045 <= gaps[0] < 0.2 and gaps[1] < gaps[2] and 0.19 <= gaps[2] < 1.0
    finally:
        await loop.stop()
    assert not loop.running
    loop.wake()  # a loop that does not run here: nothing


async def test_the_keeper_sleeps_until_the_auction_ends_and_reads_a_soft_close_extension(
        server, http, make_token):
    """The keeper's round says when the next is: none running -> its idle bound; an
    auction running -> its end; a bid in the snipe window moved the end -> the new end;
    past the end -> closed by that round, then KEEPER_INTERVAL while its outcome is
    recorded (how late, in ms, is a figure for a benchmark, not a timed test)."""
    from checkout import auction
    from checkout.auctions_api import END_MARGIN_S, KEEPER_INTERVAL
    from dropserver.auth import Role
    from tests.test_auctions import bearer, live_drop, start_auction

    creator = bearer(make_token("creator-1", Role.CREATOR))
    keeper = server.app.state.auctions.keeper
    await keeper.stop()  # its rounds are this test's
    assert await keeper._step() is None
    drop_id, (pid,) = await live_drop(http, creator)
    a = await start_auction(http, creator, drop_id, product_id=pid, start_price=1000,
                            increment=100, duration_s=5, snipe_window_s=5)
    wait = await keeper._step()
    assert keeper.due_ms == a["ends_at"]
    assert 0 < wait <= 5.0 + END_MARGIN_S  # its end, and a hair after it
    assert abs(time.time() + wait - a["ends_at"] / 1000) < 0.1
    resp = await http.post(f"/v1/drops/{drop_id}/auctions/{a['id']}/bids",
                           json={"amount": 1000, "idempotency_key": "k"},
                           headers=bearer(make_token("bob", Role.VIEWER)))
    assert resp.status_code == 201 and resp.json()["extended"], resp.text
    wait = await keeper._step()
    assert keeper.due_ms == resp.json()["ends_at"] > a["ends_at"]
    await asyncio.sleep(wait)
    wait = await keeper._step()  # the round timed to the (new) end closes it
    state = await auction.read(server.app.state.redis, drop_id, a["id"])
    assert state["state"] == "closed" and state["closed_at"] >= state["ends_at"]
    assert wait in (KEEPER_INTERVAL, None)  # recorded this round already, or next


async def test_the_closer_sleeps_until_the_giveaway_closes_then_draws_it(
        server, http, make_token):
    from drops.giveaway_api import CLOSE_MARGIN_S, CLOSER_INTERVAL_S
    from dropserver.auth import Role
    from tests.test_auctions import bearer, live_drop

    creator = bearer(make_token("creator-1", Role.CREATOR))
    gw = server.app.state.giveaways
    await gw.closer.stop()  # its rounds are this test's
    assert await gw.close_due() is None
    drop_id, _ = await live_drop(http, creator)
    resp = await http.post(f"/v1/drops/{drop_id}/giveaways", headers=creator,
                           json={"prize": "Poster", "duration_s": 2})
    assert resp.status_code == 201, resp.text
    opened = resp.json()
    wait = await gw.close_due()
    assert 0 < wait <= 2.0 + CLOSE_MARGIN_S  # its close, and a hair after it
    assert abs(time.time() + wait - opened["closes_at"] / 1000) < 0.1
    await asyncio.sleep(wait)
    wait = await gw.close_due()
    row = await server.app.state.db.fetchrow(
        "SELECT state, announced_at FROM giveaways WHERE id = $1", opened["id"])
    assert row["state"] == "drawn" and row["announced_at"] is not None
    assert wait == CLOSER_INTERVAL_S  # one more look; then nothing is open
    assert await gw.close_due() is None
