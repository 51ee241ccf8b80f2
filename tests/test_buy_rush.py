"""The purchase rush: 5,000 buyers over WebSockets on `dropserver serve --workers 2`,
100 units, real Redis and PostgreSQL: exactly 100 holds, nobody over the limit."""

from __future__ import annotations

import asyncio
import resource
from collections import Counter

import pytest

from benchmarks._buyers import buy, open_buyers, selling_drop, source_addresses
from benchmarks._support import start_server
from checkout import inventory, keys
from dropserver.auth import Role, issue_token
from dropserver.redis_client import connect as connect_redis
from dropserver.settings import load_settings
from realtime.presence import presence_key

UNITS = 100
USERS = 2500
SOCKETS_PER_USER = 2          # 5,000 sockets: each user buys from two devices at once
RETRIES = 200                 # sockets that send the very same buy twice


@pytest.fixture
def raised_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 20_000)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(120)
async def test_5000_buyers_two_workers_100_units(clean_backends, raised_nofile):
    # Every socket comes from loopback: the per-IP limit would refuse most of them.
    server = start_server(clean_backends.redis_url, clean_backends.database_url, workers=2,
                          env={"DROPSERVER_BUY_RATE_IP": "0"})
    r = connect_redis(clean_backends.redis_url)
    buyers = []
    try:
        settings = load_settings({}, dev=True)
        drop_id, pid = await selling_drop(
            server.base_url, issue_token(settings, "rush-creator", Role.CREATOR),
            units=UNITS, per_buyer_limit=1, max_holds_per_user=1)
        tokens, owners = [], []
        for u in range(USERS):
            tok = issue_token(settings, f"rush-{u}", Role.VIEWER)
            for _ in range(SOCKETS_PER_USER):
                tokens.append(tok)
                owners.append(f"rush-{u}")
        buyers = await open_buyers(server.ws_url, drop_id, tokens,
                                   sources=source_addresses(8))
        assert len(buyers) == USERS * SOCKETS_PER_USER
        # The sockets are spread over both worker processes (SO_REUSEPORT): each
        # process reports its viewers of the drop under its own node id.
        nodes = {}
        for _ in range(60):
            nodes = await r.hgetall(presence_key(drop_id))
            if len(nodes) >= 2:
                break
            await asyncio.sleep(0.1)
        assert len(nodes) == 2, nodes

        async def attempt(i: int):
            key = f"key-{i}"
            first = await buy(buyers[i], pid, key)
            if i < RETRIES:  # the client lost the answer and retries with the same key
                return first, await buy(buyers[i], pid, key)
            return first, None

        results = await asyncio.gather(*(attempt(i) for i in range(len(buyers))))

        holds = {}
        codes = Counter()
        for i, (first, again) in enumerate(results):
            if first["t"] == "reply":
                data = first["data"]
                assert not data["replay"]
                holds[data["hold_id"]] = (owners[i], data)
            else:
                codes[first["code"]] += 1
            if again is not None:
                if first["t"] == "reply":
                    assert again["t"] == "reply" and again["data"]["replay"]
                    assert again["data"]["hold_id"] == first["data"]["hold_id"]
                    assert again["data"]["buyer_number"] == first["data"]["buyer_number"]
                else:  # a refused attempt stays refused, nothing taken
                    assert again["t"] == "error"
        # Exactly 100 holds, buyer numbers 1..100 without duplicates, no buyer over
        # the per-buyer limit of 1 (each user bought from two sockets).
        assert len(holds) == UNITS
        assert sorted(d["buyer_number"] for _u, d in holds.values()) == list(
            range(1, UNITS + 1))
        per_user = Counter(u for u, _d in holds.values())
        assert max(per_user.values()) == 1
        assert set(codes) <= {"sold_out", "limit_reached", "hold_exists"}, codes
        assert sum(codes.values()) == len(buyers) - UNITS
        # Redis agrees: nothing left, 100 reserve entries for the payments worker.
        assert await inventory.remaining(r, drop_id) == {pid: 0}
        entries = await r.xrange(keys.orders(drop_id))
        reserves = [f for _id, f in entries if f[b"type"] == b"reserve"]
        assert len(reserves) == UNITS
        assert {f[b"hold_id"].decode() for f in reserves} == set(holds)
    finally:
        for b in buyers:
            b.close()
        await r.aclose()
        await asyncio.to_thread(server.stop)
