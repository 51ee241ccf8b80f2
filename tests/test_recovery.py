"""checkout/recovery.py: Redis comes back empty mid-drop; PostgreSQL rebuilds it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from checkout import holds, inventory, keys, recovery
from checkout.defense import BuyLimits
from checkout.reserve import BuyRefused, BuyRequest, Hold, reserve
from dropserver.auth import Role

OFF = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=0)
TTL = 600_000


@pytest.fixture
async def db(clean_backends):
    pool = await asyncpg.create_pool(clean_backends.database_url, min_size=1, max_size=5)
    yield pool
    await pool.close()


async def make_drop(db, units=10, limit=1, state="selling", max_holds=1) -> tuple[int, int]:
    await db.execute("INSERT INTO users (id, role) VALUES ('c1', 'creator')")
    drop_id = await db.fetchval(
        "INSERT INTO drops (creator_id, title, state, max_holds_per_user, currency) "
        "VALUES ('c1', 'd', $1, $2, 'usd') RETURNING id", state, max_holds)
    pid = await db.fetchval(
        "INSERT INTO products (creator_id, title) VALUES ('c1', 'p') RETURNING id")
    await db.execute(
        "INSERT INTO drop_products (drop_id, product_id, price, units, per_buyer_limit, "
        "state, selling_at) VALUES ($1, $2, 700, $3, $4, 'selling', now())",
        drop_id, pid, units, limit)
    return drop_id, pid


async def persist(db, hold: Hold, user: str, key: str, state: str = "held") -> None:
    """Write the orders row exactly as the payments worker does (checkout/orders.py
    _upsert_order) -- here directly, so the test controls which holds reached
    PostgreSQL before the loss."""
    await db.execute("INSERT INTO users (id) VALUES ($1) ON CONFLICT DO NOTHING", user)
    await db.execute(
        "INSERT INTO orders (public_id, drop_id, product_id, user_id, quantity, buyer_number, "
        "unit_price, amount, currency, idempotency_key, state, hold_expires_at, payment_flow) "
        "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11, to_timestamp($12::float8 / 1000), $13)",
        hold.hold_id, hold.drop_id, hold.product_id, user, hold.quantity, hold.buyer_number,
        hold.unit_price, hold.amount, hold.currency, key, state, hold.expires_at, hold.flow)


async def start_selling(r, drop_id, pid, units=10, limit=1, max_holds=1):
    await inventory.prewarm(r, {"id": drop_id, "currency": "usd",
                                "max_holds_per_user": max_holds},
                            [{"product_id": pid, "price": 700, "units": units,
                              "per_buyer_limit": limit}])
    await inventory.open_sales(r, drop_id, pid)


async def buy(r, drop_id, pid, user, key="k", quantity=1) -> Hold:
    return await reserve(r, BuyRequest(drop_id, pid, user, key, quantity), hold_ttl_ms=TTL,
                         limits=OFF)


async def test_flushall_mid_drop_rebuilds_without_oversell(r, db):
    drop_id, pid = await make_drop(db, units=10)
    await start_selling(r, drop_id, pid)
    sold = [await buy(r, drop_id, pid, f"u{i}") for i in range(6)]
    # Four holds reached PostgreSQL (two still held, one paid, one expired); two did not.
    await persist(db, sold[0], "u0", "k")
    await persist(db, sold[1], "u1", "k", state="paid")
    await persist(db, sold[2], "u2", "k", state="expired")
    await persist(db, sold[3], "u3", "k", state="payment_pending")

    await r.flushall()
    with pytest.raises(BuyRefused) as err:
        await buy(r, drop_id, pid, "u9")
    assert err.value.code == "not_ready"
    assert await recovery.find_unloaded(db, r) == [drop_id]

    assert await recovery.rebuild(db, r, drop_id, grace_ms=0)
    assert await recovery.find_unloaded(db, r) == []
    # 10 units - held(u0) - paid(u1) - payment_pending(u3); u2 expired gave it back.
    assert await inventory.remaining(r, drop_id) == {pid: 7}
    p = await inventory.product_state(r, drop_id, pid)
    assert p["state"] == "selling" and p["buyers"] == "4" and int(p["opened_at"]) > 0
    meta = await r.hgetall(keys.meta(drop_id))
    assert meta[b"loaded"] == b"1" and int(meta[b"generation"]) > 0

    # Restored holds: expiry index, per-user limits, idempotent retries.
    assert set(await r.zrange(keys.expiry(drop_id), 0, -1)) == {
        sold[0].hold_id.encode(), sold[3].hold_id.encode()}
    again = await buy(r, drop_id, pid, "u0")
    assert again.replay and again.hold_id == sold[0].hold_id
    for user in ("u0", "u1", "u3"):
        with pytest.raises(BuyRefused) as err:
            await buy(r, drop_id, pid, user, key="new")
        assert err.value.code == "limit_reached"
    assert (await holds.get_hold(r, sold[1].hold_id))["state"] == "paid"
    # u2's hold expired: they may buy again.
    fresh = await buy(r, drop_id, pid, "u2", key="k2")
    assert fresh.buyer_number == 5  # continues after the highest persisted number

    # Sell out the rest concurrently: exactly 10 units in live orders, no duplicates.
    results = await asyncio.gather(*(buy(r, drop_id, pid, f"v{i}") for i in range(50)),
                                   return_exceptions=True)
    new = [h for h in results if isinstance(h, Hold)]
    assert len(new) == 6
    assert {e.code for e in results if isinstance(e, BuyRefused)} == {"sold_out"}
    live_numbers = [sold[0].buyer_number, sold[1].buyer_number, sold[3].buyer_number,
                    fresh.buyer_number] + [h.buyer_number for h in new]
    assert len(set(live_numbers)) == len(live_numbers) == 10
    assert await inventory.remaining(r, drop_id) == {pid: 0}


async def test_failover_that_lost_writes_is_detected_and_rebuilt(r, db):
    """A replica promoted without the last writes keeps the loaded marker: the check
    finds Redis behind PostgreSQL (buyer numbers) and rebuilds."""
    drop_id, pid = await make_drop(db, units=6)
    await start_selling(r, drop_id, pid, units=6)
    sold = [await buy(r, drop_id, pid, f"u{i}") for i in range(2)]
    # Snapshot of what the replica has...
    tag = keys.tag(drop_id)
    snapshot = {k: await r.dump(k) async for k in r.scan_iter(match=f"{tag}*")}
    # ...while the master takes 3 more buys, which the payments worker persists.
    sold += [await buy(r, drop_id, pid, f"u{i}") for i in range(2, 5)]
    for i, h in enumerate(sold):
        await persist(db, h, f"u{i}", "k")
    assert await recovery.find_behind(db, r) == []
    # Failover: the replica (missing the last 3 buys) becomes the master.
    await r.flushall()
    for k, v in snapshot.items():
        await r.restore(k, 0, v)
    assert await inventory.remaining(r, drop_id) == {pid: 4}  # stale: 3 units too many
    stale_hold = await buy(r, drop_id, pid, "late")  # sold on the stale state, never persisted
    assert await recovery.find_unloaded(db, r) == []
    assert await recovery.find_behind(db, r) == [drop_id]

    loop = recovery.RecoveryLoop(db, r, 1, grace_ms=0)
    assert await loop.check() == [drop_id]
    assert await recovery.find_behind(db, r) == []
    assert await inventory.remaining(r, drop_id) == {pid: 1}  # 6 - 5 persisted
    assert (await inventory.product_state(r, drop_id, pid))["buyers"] == "5"
    assert await holds.get_hold(r, stale_hold.hold_id) is None  # went with its stream
    assert await r.xlen(keys.orders(drop_id)) == 0
    last = await buy(r, drop_id, pid, "v1")
    assert last.buyer_number == 6 and last.remaining == 0
    with pytest.raises(BuyRefused) as err:
        await buy(r, drop_id, pid, "v2")
    assert err.value.code == "sold_out"


async def test_restored_holds_expire_and_release(r, db):
    drop_id, pid = await make_drop(db, units=3)
    await start_selling(r, drop_id, pid)
    hold = await reserve(r, BuyRequest(drop_id, pid, "u0", "k"), hold_ttl_ms=50, limits=OFF)
    await persist(db, hold, "u0", "k")
    await r.flushall()
    assert await recovery.rebuild(db, r, drop_id, grace_ms=0)
    assert await inventory.remaining(r, drop_id) == {pid: 2}
    await asyncio.sleep(0.1)
    released = await holds.sweep_drop(r, drop_id)
    assert [x.hold_id for x in released] == [hold.hold_id]
    assert await inventory.remaining(r, drop_id) == {pid: 3}
    # The release reached the (new) order stream for the payments worker.
    [(_id, fields)] = await r.xrange(keys.orders(drop_id))
    assert fields[b"type"] == b"release" and fields[b"reason"] == b"expired"


async def test_rebuild_skips_drops_that_are_not_live_and_loaded_ones(r, db):
    drop_id, _pid = await make_drop(db, state="ended")
    assert await recovery.find_unloaded(db, r) == []
    assert not await recovery.rebuild(db, r, drop_id, grace_ms=0)
    assert await recovery.ensure_loaded(db, r, drop_id, grace_ms=0) == "not_live"
    assert await r.exists(keys.meta(drop_id)) == 0
    live_id, live_pid = await make_drop_more(db)
    await start_selling(r, live_id, live_pid, units=4)
    await buy(r, live_id, live_pid, "x")  # not persisted, but Redis was never lost
    assert await recovery.rebuild(db, r, live_id, grace_ms=0)  # loaded: untouched
    assert await inventory.remaining(r, live_id) == {live_pid: 3}


async def make_drop_more(db) -> tuple[int, int]:
    drop_id = await db.fetchval(
        "INSERT INTO drops (creator_id, title, state) VALUES ('c1', 'd2', 'selling') "
        "RETURNING id")
    pid = await db.fetchval(
        "INSERT INTO products (creator_id, title) VALUES ('c1', 'p2') RETURNING id")
    await db.execute(
        "INSERT INTO drop_products (drop_id, product_id, price, units, state) "
        "VALUES ($1, $2, 700, 4, 'selling')", drop_id, pid)
    return drop_id, pid


async def test_only_one_process_rebuilds(r, db):
    drop_id, pid = await make_drop(db, units=5)
    await start_selling(r, drop_id, pid)
    h = await buy(r, drop_id, pid, "u0")
    await persist(db, h, "u0", "k")
    await r.flushall()
    outcomes = await asyncio.gather(*(recovery.ensure_loaded(db, r, drop_id, grace_ms=100)
                                      for _ in range(8)))
    assert outcomes == ["loaded"] * 8
    assert await inventory.remaining(r, drop_id) == {pid: 4}


# -- through the real app and the payments worker --------------------------------------

@pytest.fixture
def settings(settings):
    return settings.replace(recovery_grace_ms=300, recovery_interval=0.2)


async def test_redis_loss_in_a_live_drop_through_the_app(server, http, make_token):
    """Buy over HTTP with the real payments worker persisting orders; FLUSHALL; the app
    rebuilds from PostgreSQL and keeps selling without overselling."""
    redis, pool = server.app.state.redis, server.app.state.db
    creator = {"Authorization": f"Bearer {make_token('c1', Role.CREATOR)}"}
    resp = await http.post("/v1/drops", headers=creator, json={
        "title": "t", "products": [{"title": "p", "price": 900, "units": 8}]})
    drop_id, pid = resp.json()["id"], resp.json()["products"][0]["product_id"]
    starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
    for action, body in (("schedule", {"starts_at": starts}), ("live", {}),
                         ("buy-now", {"product_id": pid})):
        assert (await http.post(f"/v1/drops/{drop_id}/{action}", json=body,
                                headers=creator)).status_code == 200

    async def post(user: str) -> tuple[int, dict]:
        tok = make_token(user, Role.VIEWER)
        resp = await http.post(f"/v1/drops/{drop_id}/buy", json={"product_id": pid},
                               headers={"Authorization": f"Bearer {tok}",
                                        "Idempotency-Key": f"key-{user}"})
        return resp.status_code, resp.json()

    first = [await post(f"a{i}") for i in range(3)]
    assert [s for s, _ in first] == [201] * 3
    await wait_persisted(redis, pool, drop_id, 3)

    await redis.flushall()
    # Buyers keep coming: every answer is a hold, sold_out or not_ready, never more
    # holds than units.
    results = await asyncio.gather(*(post(f"b{i}") for i in range(20)))
    codes = {s for s, _ in results}
    assert codes <= {201, 409, 503}
    retry = await post("a0")  # the persisted hold survives, same answer
    assert retry[0] == 200 and retry[1]["hold_id"] == first[0][1]["hold_id"]
    late = [await post(f"c{i}") for i in range(10)]
    held = [b for s, b in first + results + late if s == 201]
    assert len(held) == 8
    numbers = [b["buyer_number"] for b in held]
    assert len(set(numbers)) == 8
    assert await inventory.remaining(redis, drop_id) == {pid: 0}
    # PostgreSQL agrees once the orders are persisted: 8 live orders, numbers unique.
    await wait_persisted(redis, pool, drop_id, 8)
    rows = await pool.fetch("SELECT buyer_number FROM orders WHERE drop_id = $1 "
                            "AND state NOT IN ('expired', 'cancelled', 'failed')", drop_id)
    assert sorted(r["buyer_number"] for r in rows) == sorted(numbers)


async def test_a_hold_is_never_unknown_while_redis_rebuilds(server, http, make_token):
    """Redis lost a live drop (FLUSHALL) and nothing has rebuilt it yet: the buyer's
    persisted hold is not 'no such hold'. Reading or cancelling it loads the drop first
    (as a buy does): the answer is the hold, or 503 not_ready while another process is
    still rebuilding; never 404, so a buyer who cancelled is never charged after all."""
    from tests.test_reserve_api import bearer, post_buy, selling_drop

    redis, pool = server.app.state.redis, server.app.state.db
    creator = bearer(make_token("c1", Role.CREATOR))
    drop_id, pid = await selling_drop(http, creator, units=3)
    hold_ids = []
    for user in ("u1", "u2"):
        resp = await post_buy(http, drop_id, bearer(make_token(user, Role.VIEWER)), pid)
        assert resp.status_code == 201, resp.text
        hold_ids.append(resp.json()["hold_id"])
    await wait_persisted(redis, pool, drop_id, 2)

    await redis.flushall()
    got = await http.get(f"/v1/holds/{hold_ids[0]}",
                         headers=bearer(make_token("u1", Role.VIEWER)))
    assert got.status_code in (200, 503), got.text
    await redis.flushall()
    gone = await http.delete(f"/v1/holds/{hold_ids[1]}",
                             headers=bearer(make_token("u2", Role.VIEWER)))
    assert gone.status_code in (200, 503), gone.text
    while gone.status_code == 503:  # the client retries, as Retry-After says
        assert gone.json()["error"]["code"] == "not_ready", gone.text
        await asyncio.sleep(float(gone.headers["Retry-After"]))
        gone = await http.delete(f"/v1/holds/{hold_ids[1]}",
                                 headers=bearer(make_token("u2", Role.VIEWER)))
    assert gone.status_code == 200 and gone.json()["state"] == "cancelled", gone.text
    for _ in range(200):
        state = await pool.fetchval("SELECT state FROM orders WHERE public_id = $1",
                                    hold_ids[1])
        if state == "cancelled":
            break
        await asyncio.sleep(0.05)
    assert state == "cancelled"


async def wait_persisted(redis, pool, drop_id: int, count: int) -> None:
    """Wait for the payments worker to write the orders rows. While its consumer is not
    mounted in the app, write them from the stream exactly as it would (INSERT ...
    ON CONFLICT (public_id) DO NOTHING, state 'held')."""
    for attempt in range(40):
        n = await pool.fetchval("SELECT count(*) FROM orders WHERE drop_id = $1", drop_id)
        if n >= count:
            return
        if attempt == 20:
            for _id, f in await redis.xrange(keys.orders(drop_id)):
                f = {k.decode(): v.decode() for k, v in f.items()}
                if f["type"] != "reserve":
                    continue
                await pool.execute("INSERT INTO users (id) VALUES ($1) ON CONFLICT DO NOTHING",
                                   f["user_id"])
                await pool.execute(
                    "INSERT INTO orders (public_id, drop_id, product_id, user_id, quantity, "
                    "buyer_number, unit_price, amount, currency, idempotency_key, state, "
                    "hold_expires_at, payment_flow) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,"
                    "'held', to_timestamp($11::float8 / 1000), $12) "
                    "ON CONFLICT (public_id) DO NOTHING",
                    f["hold_id"], int(f["drop_id"]), int(f["product_id"]), f["user_id"],
                    int(f["quantity"]), int(f["buyer_number"]), int(f["unit_price"]),
                    int(f["amount"]), f["currency"], f["idempotency_key"],
                    int(f["expires_at"]), f["flow"])
        await asyncio.sleep(0.05)
    pytest.fail(f"fewer than {count} orders rows for drop {drop_id}")


# -- a real Redis restart (no persistence) in the middle of a drop ----------------------

class OwnRedis:
    """A Redis of this test's own, so it can be killed and started again empty."""

    def __init__(self) -> None:
        import tempfile

        from dropserver.services import find_redis_server, free_port

        self.exe = find_redis_server()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rsv-redis-")
        self.proc = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import subprocess
        import time

        import redis as sync_redis

        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--protected-mode", "no",
             "--loglevel", "warning"], stdout=subprocess.DEVNULL)
        for _ in range(200):
            try:
                sync_redis.Redis.from_url(self.url).ping()
                return
            except sync_redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_redis():
    server = OwnRedis()
    server.start()
    yield server
    server.cleanup()


async def test_redis_restart_mid_drop_without_oversell(settings, own_redis, make_token):
    import httpx

    from tests.conftest import start_server

    running, stop = await start_server(settings.replace(redis_url=own_redis.url))
    try:
        async with httpx.AsyncClient(base_url=running.base_url, timeout=10) as http:
            redis, pool = running.app.state.redis, running.app.state.db
            creator = {"Authorization": f"Bearer {make_token('c1', Role.CREATOR)}"}
            resp = await http.post("/v1/drops", headers=creator, json={
                "title": "t", "products": [{"title": "p", "price": 900, "units": 6}]})
            drop_id, pid = resp.json()["id"], resp.json()["products"][0]["product_id"]
            starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat().replace(
                "+00:00", "Z")
            for action, body in (("schedule", {"starts_at": starts}), ("live", {}),
                                 ("buy-now", {"product_id": pid})):
                assert (await http.post(f"/v1/drops/{drop_id}/{action}", json=body,
                                        headers=creator)).status_code == 200

            async def post(user: str) -> tuple[int, dict]:
                tok = make_token(user, Role.VIEWER)
                resp = await http.post(f"/v1/drops/{drop_id}/buy", json={"product_id": pid},
                                       headers={"Authorization": f"Bearer {tok}",
                                                "Idempotency-Key": f"key-{user}"})
                return resp.status_code, resp.json()

            before = [await post(f"a{i}") for i in range(2)]
            assert [s for s, _ in before] == [201, 201]
            await wait_persisted(redis, pool, drop_id, 2)
            # ...and finished with (intent made, buyer told): an entry still in the
            # worker's hands when Redis dies would meet the fake gateway's intents,
            # which live in the same Redis, gone (a real gateway keeps them).
            from tests.invariants import quiesce

            await quiesce(redis, drop_id, within=20)

            from benchmarks._buyers import open_buyers

            [sock] = await open_buyers(f"{running.ws_url}/ws", drop_id,
                                       [make_token("a1", Role.VIEWER)])
            own_redis.stop()       # Redis dies...
            down = await post("x0")
            assert down[0] == 503 and down[1]["error"]["code"] == "unavailable"
            # ...and a socket's frames say so too: retry, not internal_error
            cancel = await asyncio.wait_for(sock.command(
                "cancel_hold", {"hold_id": before[1][1]["hold_id"]}), 30)
            chat = await asyncio.wait_for(sock.command("chat.send", {"text": "hi"}), 30)
            sock.close()
            assert (cancel["t"], cancel["code"]) == ("error", "unavailable"), cancel
            assert (chat["t"], chat["code"]) == ("error", "unavailable"), chat
            own_redis.start()      # ...and comes back empty (no persistence, no scripts)

            results = []
            for i in range(30):
                results.append(await post(f"b{i}"))
                if results[-1][0] == 503:
                    await asyncio.sleep(0.05)
            assert {s for s, _ in results} <= {201, 409, 503}
            held = [b for s, b in before + results if s == 201]
            assert len(held) == 6  # 6 units: 2 before, 4 after, never more
            numbers = [b["buyer_number"] for b in held]
            assert sorted(numbers) == list(range(1, 7))
            assert await inventory.remaining(redis, drop_id) == {pid: 0}
            assert (await post("a0"))[1]["hold_id"] == before[0][1]["hold_id"]
    finally:
        await stop()
