"""Reminders: "Remind me" over HTTP, and the reminders handed to the outbound
notification 10 minutes before the start and at go-live: once across processes,
again after a reschedule, from PostgreSQL's state alone (a restart loses nothing)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import asyncpg

from drops import reminders as reminders_mod
from drops.reminders import Reminders
from tests.realtime_support import create_drop


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def _scheduled(url: str, minutes: float) -> int:
    drop_id, _ = await create_drop(url, state="scheduled")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("UPDATE drops SET starts_at = now() + make_interval(secs => $2) "
                           "WHERE id = $1", drop_id, minutes * 60)
    finally:
        await conn.close()
    return drop_id


async def _remind(db, drop_id: int, *users: str) -> None:
    for u in users:
        await db.execute("INSERT INTO drop_reminders (drop_id, user_id) VALUES ($1, $2)",
                         drop_id, u)


async def _notices(db, drop_id: int) -> list[dict]:
    rows = await db.fetch("SELECT kind, users, payload FROM drop_reminder_notices "
                          "WHERE drop_id = $1 ORDER BY id", drop_id)
    return [dict(r) for r in rows]


async def _outbound(db, drop_id: int) -> list[dict]:
    """The drop.reminder events in the outbound webhooks' queue (their data)."""
    import json

    rows = await db.fetch("SELECT type, creator_id, body FROM outbound_events "
                          "WHERE drop_id = $1 ORDER BY seq", drop_id)
    assert {(r["type"], r["creator_id"]) for r in rows} <= {("drop.reminder", "creator-1")}
    return [json.loads(r["body"])["data"] for r in rows]


def _process(db) -> Reminders:
    """One process's reminder scan (its own pool: another process)."""
    return Reminders(SimpleNamespace(state=SimpleNamespace(db=db)), "https://shop.example")


async def test_remind_me_over_http(http, settings, make_token):
    drop_id = await _scheduled(settings.database_url, 60)
    alice = _auth(make_token("alice", name="Alice"))
    url = f"/v1/drops/{drop_id}/reminder"
    assert (await http.post(url)).status_code == 401
    assert (await http.get(url, headers=alice)).json() == {"drop_id": drop_id,
                                                            "reminded": False}
    first = await http.post(url, headers=alice)
    assert first.status_code == 201 and first.json() == {"drop_id": drop_id, "reminded": True}
    assert (await http.post(url, headers=alice)).status_code == 200
    assert (await http.get(url, headers=alice)).json()["reminded"] is True
    bad = await http.post(url, json={"when": "soon"}, headers=alice)
    assert bad.status_code == 422
    creator = _auth(make_token("creator-1", "creator"))
    listed = (await http.get(f"/v1/drops/{drop_id}/reminders", headers=creator)).json()
    assert listed == {"drop_id": drop_id, "reminded": 1, "sent": []}
    assert (await http.get(f"/v1/drops/{drop_id}/reminders",
                           headers=alice)).status_code == 403
    assert (await http.delete(url, headers=alice)).status_code == 204
    assert (await http.delete(url, headers=alice)).status_code == 204
    assert (await http.get(url, headers=alice)).json()["reminded"] is False
    # Only a scheduled drop can be reminded of; a draft does not exist for a viewer.
    live, _ = await create_drop(settings.database_url, state="live")
    refused = await http.post(f"/v1/drops/{live}/reminder", headers=alice)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == \
        "drop_not_scheduled"
    draft, _ = await create_drop(settings.database_url, state="draft")
    assert (await http.post(f"/v1/drops/{draft}/reminder", headers=alice)).status_code == 404
    assert (await http.post("/v1/drops/999999/reminder", headers=alice)).status_code == 404


async def test_starting_soon_goes_out_once_across_processes(settings):
    drop_id = await _scheduled(settings.database_url, 5)  # inside the 10 minutes
    later = await _scheduled(settings.database_url, 30)   # not yet due
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=4,
                                   init=_json) as db:
        await _remind(db, drop_id, "u1", "u2", "u3")
        await _remind(db, later, "u1")
        pools = [await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2,
                                           init=_json) for _ in range(4)]
        try:
            handed = await asyncio.gather(*(_process(p).scan() for p in pools))
        finally:
            for p in pools:
                await p.close()
        assert sorted(handed) == [0, 0, 0, 1]
        notices = await _notices(db, drop_id)
        assert [(n["kind"], n["users"]) for n in notices] == [("starting_soon", 3)]
        payload = notices[0]["payload"]
        assert [u["user_id"] for u in payload["users"]] == ["u1", "u2", "u3"]
        assert payload["url"] == f"https://shop.example/d/{drop_id}"
        assert payload["batch"] == 1 and payload["batches"] == 1
        assert payload["for"] == payload["starts_at"]
        assert await _notices(db, later) == []
        # Handed to the outbound webhooks' queue in the same transaction, once.
        assert await _outbound(db, drop_id) == [payload]
        assert await _outbound(db, later) == []
        assert await _process(db).scan() == 0  # nothing twice
        # Someone who asks after it went out is reminded at the next scan, alone.
        await _remind(db, drop_id, "u4")
        assert await _process(db).scan() == 1
        assert [u["user_id"] for u in (await _notices(db, drop_id))[-1]["payload"][
            "users"]] == ["u4"]
        assert [[u["user_id"] for u in e["users"]] for e in await _outbound(db, drop_id)] == [
            ["u1", "u2", "u3"], ["u4"]]


async def test_a_rescheduled_drop_is_reminded_for_its_new_time(settings):
    drop_id = await _scheduled(settings.database_url, 5)
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=2,
                                   init=_json) as db:
        await _remind(db, drop_id, "u1", "u2")
        proc = _process(db)
        assert await proc.scan() == 1
        # Moved later, out of the window: nothing more until the new time is near.
        await db.execute("UPDATE drops SET starts_at = now() + interval '1 hour' "
                         "WHERE id = $1", drop_id)
        assert await proc.scan() == 0
        await db.execute("UPDATE drops SET starts_at = now() + interval '8 minutes' "
                         "WHERE id = $1", drop_id)
        assert await proc.scan() == 1
        notices = await _notices(db, drop_id)
        assert [(n["kind"], n["users"]) for n in notices] == [("starting_soon", 2)] * 2
        assert notices[0]["payload"]["for"] != notices[1]["payload"]["for"]
        assert await proc.scan() == 0


async def test_went_live_and_batches(settings, monkeypatch):
    monkeypatch.setattr(reminders_mod, "BATCH", 2)
    drop_id = await _scheduled(settings.database_url, 60)
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=2,
                                   init=_json) as db:
        await _remind(db, drop_id, "u1", "u2", "u3")
        proc = _process(db)
        assert await proc.scan() == 0  # an hour away
        await db.execute("UPDATE drops SET state = 'live', live_at = now() WHERE id = $1",
                         drop_id)
        assert await proc.scan() == 2
        notices = await _notices(db, drop_id)
        assert [(n["kind"], n["users"]) for n in notices] == [("live", 2), ("live", 1)]
        assert [n["payload"]["batch"] for n in notices] == [1, 2]
        assert [e["batch"] for e in await _outbound(db, drop_id)] == [1, 2]
        assert {n["payload"]["batches"] for n in notices} == {2}
        assert await proc.scan() == 0
        # Gone live without ever being within 10 minutes of a scan: no late
        # "starting soon" for a drop already on air.
        assert {n["kind"] for n in await _notices(db, drop_id)} == {"live"}


async def test_a_worker_without_the_scan_loop_scans_once_when_a_drop_goes_live_on_it(
        settings):
    """Only the node's chore worker runs the scan loop (dropserver.chores): a drop
    that goes live on another worker is reminded at once all the same, by one scan
    of that worker's own, and a second process scanning hands nothing off twice."""
    drop_id = await _scheduled(settings.database_url, 60)
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=2,
                                   init=_json) as db:
        await _remind(db, drop_id, "u1")
        await db.execute("UPDATE drops SET state = 'live', live_at = now() WHERE id = $1",
                         drop_id)
        worker = _process(db)  # never started: another worker runs the loop
        worker.wake()
        deadline = time.monotonic() + 5
        while not await _notices(db, drop_id):
            assert time.monotonic() < deadline, "wake() without the loop scanned nothing"
            await asyncio.sleep(0.05)
        await worker.stop()
        assert worker.handed == 1
        assert await _process(db).scan() == 0  # the chore worker's next scan: nothing
        assert [n["kind"] for n in await _notices(db, drop_id)] == ["live"]


async def test_go_live_reminds_at_once_and_a_restart_loses_nothing(settings, make_token):
    """The running server: go-live wakes the scan (no wait for the next period); a
    reminder that fell due while no server ran goes out when one starts."""
    from tests.conftest import running

    drop_id = await _scheduled(settings.database_url, 60)
    due_while_down = await _scheduled(settings.database_url, 3)
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=2,
                                   init=_json) as db:
        await _remind(db, drop_id, "fan-1")
        await _remind(db, due_while_down, "fan-2")
        async with running(settings) as srv:
            import httpx

            async with httpx.AsyncClient(base_url=srv.base_url, timeout=10) as http:
                # At start-up the scan finds the one already due.
                deadline = time.monotonic() + 10
                while not await _notices(db, due_while_down):
                    assert time.monotonic() < deadline, "the due reminder never went out"
                    await asyncio.sleep(0.1)
                creator = _auth(make_token("creator-1", "creator"))
                started = time.monotonic()
                resp = await http.post(f"/v1/drops/{drop_id}/live", headers=creator)
                assert resp.status_code == 200, resp.text
                while not await _notices(db, drop_id):
                    assert time.monotonic() - started < reminders_mod.SCAN_SECONDS, \
                        "go-live did not wake the reminder scan"
                    await asyncio.sleep(0.05)
                sent = (await http.get(f"/v1/drops/{drop_id}/reminders",
                                       headers=creator)).json()["sent"]
                assert [(s["kind"], s["users"]) for s in sent] == [("live", 1)]
        assert [n["kind"] for n in await _notices(db, drop_id)] == ["live"]


async def _json(conn) -> None:
    import json

    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")

