"""Outbound webhooks lose nothing: a receiver that fails half its requests (an error
answer, a dropped connection, no answer within the timeout) and a server killed with
SIGKILL mid-queue, then started again. Every (event, endpoint) pair ends delivered --
answered 2xx at least once with a valid signature -- and nothing is left pending."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from dropserver.auth import Role, issue_token
from dropserver.outbound import enqueue
from tests.conftest import free_port
from tests.webhook_receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
TYPES = ("order.paid", "drop.reminder", "tip.paid", "payout.sent")


class Server:
    """``dropserver dev --workers 2`` on the test's Redis and PostgreSQL, in a process
    group of its own so that a kill takes the supervisor and both workers at once."""

    def __init__(self, settings, log_path: Path) -> None:
        self.settings = settings
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DROPSERVER_", "STRIPE_"))}
        env.update({
            "REDIS_URL": self.settings.redis_url,
            "DATABASE_URL": self.settings.database_url,
            "DROPSERVER_LOG_FORMAT": "text", "DROPSERVER_LOG_LEVEL": "warning",
            "DROPSERVER_SHUTDOWN_GRACE": "1",
            "DROPSERVER_WEBHOOK_TIMEOUT": "1",
            "DROPSERVER_WEBHOOK_CONCURRENCY": "8",
            "DROPSERVER_WEBHOOK_POLL_INTERVAL": "0.1",
            # 1 + 40 attempts: half failing, a pair is failed once in 2^41
            "DROPSERVER_WEBHOOK_RETRY_SCHEDULE": ",".join(["0.2"] * 40),
        })
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dropserver.cli", "dev", "--workers", "2",
                 "--port", str(self.port)], env=env, cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.1)
        raise AssertionError("server not ready: " + self.log_path.read_text()[-3000:])

    def kill(self) -> None:
        """SIGKILL to the supervisor and its workers: no shutdown hook runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


async def _enqueue(db: asyncpg.Pool, n: int, start: int) -> list[str]:
    ids = []
    for i in range(start, start + n):
        async with db.acquire() as conn, conn.transaction():
            ids.append(await enqueue(conn, TYPES[i % len(TYPES)], {"n": i},
                                     creator_id="creator-a", key=f"restart:{i}"))
    return ids


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_no_delivery_lost_across_a_failing_receiver_and_a_killed_server(
        settings, tmp_path):
    server = Server(settings, tmp_path / "server.log")
    db = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    rx = Receiver(fail_rate=0.5, modes=("500", "drop", "slow"), slow_s=3.0, seed=11)
    await rx.start()
    try:
        await asyncio.to_thread(server.start)
        secrets: dict[str, str] = {}
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            for path, user, role, events in (
                    ("/creator", "creator-a", Role.CREATOR, ["order.paid", "drop.reminder"]),
                    ("/platform", "admin-1", Role.ADMIN, list(TYPES))):
                token = issue_token(settings, user, role)
                r = await http.post("/v1/webhooks/endpoints", json={
                    "url": rx.url + path, "events": events},
                    headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 201, r.text
                secrets[path] = r.json()["secret"]
        ids = await _enqueue(db, 150, 0)
        deadline = time.monotonic() + 60
        while len({r.headers["webhook-id"] for r in rx.delivered()}) < 60:
            assert time.monotonic() < deadline, "60 events not delivered within 60 s"
            await asyncio.sleep(0.02)
        await asyncio.to_thread(server.kill)
        pending = await db.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
        unfanned = await db.fetchval(
            "SELECT count(*) FROM outbound_events WHERE fanned_out_at IS NULL")
        assert pending + unfanned > 50, "the kill should come mid-queue"
        ids += await _enqueue(db, 100, 150)  # while the server is down
        await asyncio.to_thread(server.start)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            left = await db.fetchval(
                "SELECT (SELECT count(*) FROM webhook_deliveries WHERE state <> 'delivered')"
                " + (SELECT count(*) FROM outbound_events WHERE fanned_out_at IS NULL)")
            if left == 0:
                break
            await asyncio.sleep(0.2)
        # -- invariants -----------------------------------------------------------------
        expected = {(i, "/platform") for i in ids}
        expected |= {(i, "/creator") for n, i in enumerate(ids)
                     if TYPES[n % len(TYPES)] in ("order.paid", "drop.reminder")}
        rows = await db.fetch(
            """SELECT d.event_id, e.url, d.state FROM webhook_deliveries d
               JOIN webhook_endpoints e ON e.id = d.endpoint_id""")
        made = collections.Counter((r["event_id"], r["url"].removeprefix(rx.url))
                                   for r in rows)
        assert set(made) == expected and max(made.values()) == 1  # one row per pair
        states = collections.Counter(r["state"] for r in rows)
        assert states == {"delivered": len(expected)}, states
        answered = collections.Counter()
        for req in rx.delivered():
            Webhook(secrets[req.path]).verify(req.body, req.headers)  # raises if bad
            answered[(req.headers["webhook-id"], req.path)] += 1
        lost = expected - set(answered)
        assert not lost, f"{len(lost)} of {len(expected)} deliveries never answered 2xx"
        failures = collections.Counter(r.answer for r in rx.requests)
        assert failures["500"] and failures["drop"] and failures["slow"]
        print(f"\n{len(expected)} deliveries of {len(ids)} events, 0 lost; requests "
              f"{dict(failures)}; duplicates (2xx more than once) "
              f"{sum(n - 1 for n in answered.values())}")
    finally:
        await asyncio.to_thread(server.kill)
        await rx.stop()
        await db.close()
