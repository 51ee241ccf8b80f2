"""A drop selling while faults are injected for real, and what its buyers saw.

:class:`Rig` runs ``dropserver dev --workers N`` as a child process against a Redis and
a PostgreSQL of its own (:class:`dropserver.services.LocalServices`, so stopping them
disturbs nothing else), with Stripe played by ``tests.stripe_stub`` on loopback: the
real SDK creates and refunds PaymentIntents, and the stub POSTs signed webhooks to the
server, retrying until they are accepted, as Stripe does.

:class:`Rush` is the crowd: buyers arrive over a few seconds, each on its own
WebSocket, buy one unit (the same idempotency key until an answer comes, through
503s and reconnects), then pay: saved-card buyers are charged off-session by the
order worker, the others confirm "in Stripe.js" (the stub) once ``order.payment``
brings the client secret; a few cancel their hold instead. Everything a buyer heard
is kept: the holds acknowledged to them and every private event.

:func:`run_fault` puts them together: a fresh drop, a rush, a fault in the middle of it
(stop PostgreSQL for N seconds, restart Redis empty, SIGKILL a server worker, SIGKILL
an order worker between the charge and the commit, SIGKILL the supervisor and start the
server again), then waits for the pipeline to go
quiet and returns a :class:`FaultReport` with the broken invariants
(``tests/invariants.py``), what buyers failed to hear, and the timings. The fault tests
(tests/test_faults.py) assert on it; ``python -m benchmarks.faults`` repeats it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import websockets

from dropserver.auth import Role, issue_token
from dropserver.redis_client import connect as connect_redis
from dropserver.services import LocalServices, free_port
from dropserver.settings import load_settings
from tests import invariants
from tests.stripe_stub import StripeStub

__all__ = ["FaultReport", "Rig", "Rush", "alive", "child_map", "port_free", "process_tree",
           "run_fault"]

ROOT = Path(__file__).resolve().parent.parent
JSON_PROTOCOL = "dropserver.json.v1"
# Answers after which a buyer tries the same buy again (same idempotency key).
RETRY_CODES = {"unavailable", "not_ready", "internal", "internal_error", "rate_limited"}
OUTCOME_EVENTS = {"order.paid", "order.failed", "order.expired", "order.cancelled",
                  "order.refunded"}
EVENT_FOR_STATE = {"payment_pending": "order.payment", "authorized": "order.payment",
                   "paid": "order.paid", "failed": "order.failed",
                   "expired": "order.expired", "cancelled": "order.cancelled",
                   "refunded": "order.refunded"}


class Rig:
    """Redis, PostgreSQL, the Stripe stub and ``dropserver dev --workers N``."""

    def __init__(self, *, workers: int = 2, hold_ttl: int = 120,
                 env: dict[str, str] | None = None, redis_cluster: bool = False) -> None:
        self.workers = workers
        self.hold_ttl = hold_ttl
        self.extra_env = env or {}
        # redis_cluster: 3 primaries and 3 replicas (the primary_kill fault needs it)
        self.services = LocalServices(redis_cluster=redis_cluster)
        # A restarted server dies with the thread that started it (setpriv
        # --pdeathsig): one thread for the rig's life, not the event loop's pool.
        self.executor = concurrent.futures.ThreadPoolExecutor(1, "rig-services")
        self.stub = StripeStub()
        self.server: subprocess.Popen | None = None
        self.port = 0
        self.settings = load_settings({}, dev=True)  # the dev secret signs the tokens
        self._log: Any = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> Rig:
        self.services.start()
        self.stub.start()
        self.port = free_port()
        self.stub.webhook_url = f"{self.base_url}/v1/webhooks/stripe"
        self.start_server()
        return self

    def stop(self) -> None:
        self.stop_server()
        self.stub.stop()
        self.services.stop()
        self.executor.shutdown()

    async def fault(self, action: str, name: str) -> None:
        """``stop``, ``kill`` (SIGKILL) or ``start`` one of the rig's servers
        (``redis``, ``redis-N`` of a cluster, ``postgres``)."""
        if action == "kill":
            fn = functools.partial(self.services.stop_service, kill=True)
        else:
            fn = (self.services.stop_service if action == "stop"
                  else self.services.start_service)
        await asyncio.get_running_loop().run_in_executor(self.executor, fn, name)

    def __enter__(self) -> Rig:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def log_path(self) -> Path:
        assert self.services.root is not None
        return self.services.root / "server.log"

    def server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DROPSERVER_", "PROMETHEUS_", "STRIPE_"))}
        env.update({
            "REDIS_URL": self.services.redis_url,
            "DATABASE_URL": self.services.database_url,
            "DROPSERVER_PAYMENT_GATEWAY": "stripe",
            "STRIPE_API_KEY": "sk_test_rig",
            "STRIPE_API_BASE": self.stub.url,
            "STRIPE_WEBHOOK_SECRET": self.stub.webhook_secret,
            "DROPSERVER_HOLD_TTL": str(self.hold_ttl),
            "DROPSERVER_BUY_RATE_IP": "0",          # every buyer is on loopback
            "DROPSERVER_BUY_VELOCITY_WINDOW_MS": "0",
            "DROPSERVER_ORDER_CLAIM_IDLE_MS": "2000",
            "DROPSERVER_SHUTDOWN_GRACE": "1",
            "DROPSERVER_LOG_FORMAT": "json",
            "DROPSERVER_LOG_LEVEL": "info",
        })
        env.update(self.extra_env)
        return env

    def start_server(self, timeout: float = 60.0) -> None:
        self._log = open(self.log_path, "ab")
        from dropserver.services import _setpriv

        self.server = subprocess.Popen(  # dies with this thread, however it dies
            [*_setpriv(as_nobody=False), sys.executable, "-m", "dropserver.cli", "dev",
             "--workers", str(self.workers), "--port", str(self.port)],
            env=self.server_env(), cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"dropserver dev exited with {self.server.returncode}; "
                                   f"log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.base_url + "/readyz", timeout=1) as resp:
                    if resp.status == 200 and len(self.worker_pids()) == self.workers:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dropserver dev not ready; log: {self.log_path}")
            time.sleep(0.1)

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                for pid in self.worker_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.server.kill()
                self.server.wait()
        self.server = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def worker_pids(self) -> list[int]:
        """The supervisor's worker processes (its children)."""
        if self.server is None:
            return []
        path = Path(f"/proc/{self.server.pid}/task/{self.server.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- clients ------------------------------------------------------------------
    async def read_order(self, user: str, order_id: str) -> dict | None:
        """``GET /v1/orders/{id}`` as its buyer (None while the server cannot say)."""
        import httpx

        try:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as http:
                r = await http.get(f"/v1/orders/{order_id}",
                                   headers={"Authorization": f"Bearer {self.token(user)}"})
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def token(self, user: str, role: Role = Role.VIEWER) -> str:
        return issue_token(self.settings, user, role)

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.services.database_url)

    def redis(self) -> aioredis.Redis:
        return connect_redis(self.services.redis_url)

    async def selling_drop(self, *, units: int, per_buyer_limit: int = 1,
                           price: int = 2500) -> tuple[int, int]:
        """A drop through the creator API: created, scheduled, live, BUY NOW
        (:func:`benchmarks._buyers.selling_drop`); a refusal says what the server
        logged."""
        import httpx

        from benchmarks._buyers import selling_drop

        try:
            return await selling_drop(self.base_url, self.token("rig-creator", Role.CREATOR),
                                      units=units, per_buyer_limit=per_buyer_limit,
                                      price=price)
        except httpx.HTTPStatusError as exc:
            raise RuntimeError(f"{exc}: {exc.response.text}\n{self.log_tail()}") from exc


# -- the buyers -------------------------------------------------------------------------

class _Socket:
    """One buyer's WebSocket: replies matched by id, private events kept."""

    def __init__(self, ws: Any, on_event: Any) -> None:
        self.ws = ws
        self.on_event = on_event
        self.pending: dict[str, asyncio.Future] = {}
        self.ids = 0
        self.closed = False  # the server closed it (a killed worker, a resync)
        # The client gave up on it (close() called): what still arrives in its closing
        # handshake is not heard, as a client that moved to a new socket ignores it.
        self.closing = False
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, token: str, drop_id: int, on_event: Any,
                   join_wait: float = 10.0) -> _Socket:
        ws = await websockets.connect(url, subprotocols=[JSON_PROTOCOL],  # type: ignore[list-item]
                                      additional_headers={"Authorization": f"Bearer {token}"},
                                      compression=None, ping_interval=None, open_timeout=5)
        sock = cls(ws, on_event)
        try:
            joined = await sock.request({"t": "join", "drop_id": drop_id}, join_wait)
        except BaseException:  # a join that timed out: the socket must not live on
            await sock.close()
            raise
        if joined.get("t") != "joined":
            await sock.close()
            raise ConnectionError(f"join refused: {joined}")
        return sock

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if self.closing:
                    continue
                message = json.loads(raw)
                for frame in message if isinstance(message, list) else [message]:
                    if frame.get("t") == "ping":  # the gateway's heartbeat
                        await self.ws.send('{"t": "pong"}')
                        continue
                    if frame.get("t") == "private":
                        self.on_event(frame.get("event"), frame.get("data") or {})
                    fut = self.pending.pop(str(frame.get("id")), None)
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed = True
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("socket closed"))

    async def request(self, frame: dict[str, Any], wait: float = 10.0) -> dict[str, Any]:
        self.ids += 1
        rid = f"q{self.ids}"
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            await self.ws.send(json.dumps({**frame, "id": rid}))
            return await asyncio.wait_for(fut, wait)
        finally:  # a send that failed leaves no future failed and never read
            self.pending.pop(rid, None)
            if fut.done() and not fut.cancelled():
                fut.exception()

    async def close(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader


@dataclass
class Buyer:
    user: str
    flow: str                   # off_session (saved card) or client_confirm
    cancels: bool               # cancels the hold instead of paying
    start_at: float
    hold: dict[str, Any] | None = None
    hold_asked_at: float = 0.0  # monotonic: the buy request that got the hold was sent
    hold_heard_at: float = 0.0  # monotonic: its reply arrived
    refused: str = ""
    events: list[tuple[str, dict]] = field(default_factory=list)
    reconnects: int = 0         # events sent while disconnected are not heard
    paid_via_stub: bool = False
    user_no: int = 0
    confirms_won: int = 0       # confirms that succeeded (never more than one)
    notes: list[str] = field(default_factory=list)
    sockets: int = 0            # sockets opened (each reconnect, each failed open)
    heard_on: list[int] = field(default_factory=list)  # which socket heard events[i]

    def heard(self, event: str, data: dict, socket_no: int) -> None:
        self.events.append((event, data))
        self.heard_on.append(socket_no)


class Rush:
    """``buyers`` buyers arrive over ``spread`` seconds and each buys one unit."""

    def __init__(self, rig: Rig, drop_id: int, product_id: int, *, buyers: int = 60,
                 spread: float = 4.0, cancel_share: float = 0.1,
                 saved_card_share: float = 0.5, seed: int | None = None,
                 pay_within: float = 150.0) -> None:
        self.rig, self.drop_id, self.product_id = rig, drop_id, product_id
        rng = random.Random(seed)
        self.buyers = [Buyer(user=f"d{drop_id}-b{i}", user_no=i,
                             flow="off_session" if rng.random() < saved_card_share
                             else "client_confirm",
                             cancels=rng.random() < cancel_share,
                             start_at=rng.uniform(0, spread))
                       for i in range(buyers)]
        self.pay_within = pay_within
        self.started = 0.0  # monotonic: every buyer watching, the rush's clock starts
        self.watching = asyncio.Event()
        self.codes: Counter[str] = Counter()   # every non-reply answer a buyer got

    async def save_cards(self) -> None:
        db = await self.rig.db()
        try:
            for b in self.buyers:
                if b.flow == "off_session":
                    await db.execute(
                        "INSERT INTO users (id, default_payment_method, stripe_customer_id)"
                        " VALUES ($1, 'pm_card_visa', $2) ON CONFLICT (id) DO UPDATE SET "
                        "default_payment_method = 'pm_card_visa', stripe_customer_id = $2",
                        b.user, f"cus_{b.user}")
        finally:
            await db.close()

    @property
    def acknowledged(self) -> dict[str, dict[str, Any]]:
        return {b.hold["hold_id"]: {"user_id": b.user, "buyer_number": b.hold["buyer_number"]}
                for b in self.buyers if b.hold}

    async def run(self) -> None:
        # Everyone is watching before the first buy and the fault (joining reads the
        # drop from PostgreSQL): the rush's clock starts once every socket is open, not
        # a fixed second after the connects began (which a loaded machine outran).
        boxes = await asyncio.gather(*(self._connect(b) for b in self.buyers))
        self.started = time.monotonic()
        self.watching.set()
        await asyncio.gather(*(self._buyer(b, box) for b, box in zip(self.buyers, boxes,
                                                                    strict=True)))

    async def _connect(self, b: Buyer) -> _Socket:
        delay = 0.1
        while True:
            b.sockets += 1
            try:
                return await _Socket.open(self.rig.ws_url, self.rig.token(b.user),
                                          self.drop_id,
                                          lambda e, d, b=b, n=b.sockets: b.heard(e, d, n))
            except (TimeoutError, OSError, ConnectionError, websockets.WebSocketException) as exc:
                b.notes.append(f"connect: {type(exc).__name__}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _command(self, b: Buyer, sock_box: list, frame: dict[str, Any],
                       retry_within: float = 120.0) -> dict[str, Any]:
        """Send until an answer that is not 'try again' (reconnecting as needed)."""
        deadline = time.monotonic() + retry_within
        while True:
            sock = sock_box[0]
            try:
                asked_at = time.monotonic()
                answer = await sock.request(frame)
            except (TimeoutError, ConnectionError, websockets.WebSocketException):
                await sock.close()
                b.reconnects += 1
                sock_box[0] = await self._connect(b)
                continue
            if answer.get("t") == "error":
                code = answer.get("code", "?")
                self.codes[code] += 1
                if code in RETRY_CODES and time.monotonic() < deadline:
                    await asyncio.sleep(0.3)
                    continue
            if frame.get("t") == "buy" and answer.get("t") == "reply":
                b.hold_asked_at, b.hold_heard_at = asked_at, time.monotonic()
            return answer

    async def _buyer(self, b: Buyer, sock: _Socket) -> None:
        # The buys come over ``spread`` seconds of the rush's clock.
        box = [sock]
        await asyncio.sleep(max(0.0, self.started + b.start_at - time.monotonic()))
        try:
            answer = await self._command(b, box, {
                "t": "buy", "product_id": self.product_id, "idempotency_key": "k1",
                "flow": b.flow})
            if answer.get("t") != "reply":
                b.refused = answer.get("code", "?")
                return
            b.hold = answer["data"]
            hold_id = b.hold["hold_id"]
            if b.cancels:
                said = await self._command(b, box, {"t": "cancel_hold", "hold_id": hold_id})
                if said.get("code") == "hold_not_found":  # its own, acknowledged hold
                    b.notes.append(f"cancel of {hold_id} answered hold_not_found")
            elif b.flow == "client_confirm":
                await self._pay_in_stripe_js(b, hold_id, box)
            # stay connected to hear the outcome; the rush's owner closes the sockets
            self._sockets.append(box[0])
            self._owner[id(box[0])] = b.user
        except BaseException:
            await box[0].close()
            raise

    def _confirm(self, intent_id: str, card: str) -> bool:
        try:
            self.rig.stub.confirm_as_buyer(intent_id, card)
        except Exception:  # the stub refuses a second confirm (unexpected state)
            return False
        return True

    async def _pay_in_stripe_js(self, b: Buyer, hold_id: str, box: list) -> None:
        """Wait for order.payment, then confirm the intent with the stub (Stripe.js).
        A socket the server closed is opened again, and the order read over HTTP (as
        the viewer page does): events sent meanwhile were not heard."""
        deadline = time.monotonic() + self.pay_within
        next_read = 0.0
        while time.monotonic() < deadline:
            intent_id = next((d["intent_id"] for e, d in list(b.events)
                              if e == "order.payment" and d.get("order_id") == hold_id),
                             None)
            if box[0].closed:
                await box[0].close()
                b.reconnects += 1
                box[0] = await self._connect(b)
                next_read = 0.0
            if intent_id is None and b.reconnects and time.monotonic() >= next_read:
                next_read = time.monotonic() + 2.0
                order = await self.rig.read_order(b.user, hold_id)
                if order and order["state"] == "payment_pending" and order["payment"]:
                    intent_id = order["payment"]["intent_id"]
                elif order and order["state"] != "held":
                    return  # it ended without us (expired, failed...)
            if intent_id is not None:
                # a fifth of the buyers tap "pay" twice at once (two cards)
                cards = ["pm_card_visa", "pm_card_mastercard"][:2 if b.user_no % 5 == 0
                                                                else 1]
                wins = await asyncio.gather(*(asyncio.to_thread(self._confirm, intent_id,
                                                                card) for card in cards))
                b.confirms_won = sum(wins)
                b.paid_via_stub = b.confirms_won > 0
                return
            await asyncio.sleep(0.05)
        b.notes.append("no order.payment within the payment window")

    _sockets: list[_Socket]

    def sockets_of(self, b: Buyer) -> list[_Socket]:
        return [s for s in self._sockets if self._owner.get(id(s)) == b.user]

    async def __aenter__(self) -> Rush:
        self._sockets = []
        self._owner: dict[int, str] = {}
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(s.close() for s in self._sockets), return_exceptions=True)


# -- a fault during a rush ----------------------------------------------------------------

@dataclass
class FaultReport:
    fault: str
    holds: int = 0
    violations: list[str] = field(default_factory=list)
    unheard: list[str] = field(default_factory=list)     # outcomes buyers did not hear
    duplicates: list[str] = field(default_factory=list)  # outcomes heard twice
    timings: dict[str, float] = field(default_factory=dict)
    buyers_saw: dict[str, int] = field(default_factory=dict)
    rush: Any = None  # the Rush itself, for a closer look
    states: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    read_over_http: int = 0  # outcomes learnt over HTTP after a closed socket
    double_confirms: int = 0  # orders where two confirms both succeeded (must be 0)
    confirmed_twice: int = 0  # orders whose buyer tried two confirms at once
    orphans: list[str] = field(default_factory=list)  # processes that outlived their tree

    @property
    def ok(self) -> bool:
        return not (self.violations or self.unheard or self.duplicates
                    or self.double_confirms or self.orphans)

    def summary(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if k != "rush"}, indent=1,
                          default=str)


async def _order_rows(rig: Rig, drop_id: int) -> int:
    db = await rig.db()
    try:
        return await db.fetchval("SELECT count(*) FROM orders WHERE drop_id = $1", drop_id)
    finally:
        await db.close()


async def _wait(check: Any, within: float, interval: float = 0.02) -> float:
    """Seconds until ``await check()`` is truthy (inf when it never was)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        with contextlib.suppress(Exception):
            if await check():
                return time.monotonic() - t0
        await asyncio.sleep(interval)
    return float("inf")


async def run_fault(rig: Rig, fault: str, *, buyers: int = 60, units: int = 40,
                    spread: float = 4.0, fault_at: float = 1.0, outage: float = 5.0,
                    seed: int | None = None, quiet_within: float = 120.0,
                    pay_within: float = 150.0) -> FaultReport:
    """A fresh drop, a rush, ``fault`` during it; the invariants afterwards.

    ``fault``: ``postgres_down`` (stopped for ``outage`` s), ``redis_restart``
    (restarted empty), ``worker_kill`` (SIGKILL of one server worker; the supervisor
    starts another), ``order_worker_kill`` (an extra order worker process SIGKILLs
    itself right after a PaymentIntent exists and before PostgreSQL records it),
    ``supervisor_kill`` (SIGKILL of ``dropserver dev`` itself: its tree must die by
    itself, then it is started again on the same port), ``primary_kill`` (a rig with
    ``redis_cluster=True``: SIGKILL of the cluster primary that holds the drop; its
    replica takes over, then the killed node is started again and rejoins as a
    replica, as a supervisor would restart it), ``primary_kill_lagging`` (the same
    after its replica was frozen with SIGSTOP for ``outage`` s while buyers bought:
    replication lags, and only what the replica has survives), or ``none``. Any process of
    the server's tree (or the killed order worker) still running at the end is an
    orphan, reported like a broken invariant. ``quiet_within``: how long the order
    stream may take to be read to its end; ``pay_within``: how long a buyer waits to
    hear ``order.payment`` before giving up on paying (a lost event otherwise holds
    the rush that long)."""
    report = FaultReport(fault=fault)
    drop_id, pid = await rig.selling_drop(units=units)
    doomed = None
    if fault == "order_worker_kill":
        doomed = await _doomed_order_worker(rig)
    assert rig.server is not None
    seen = process_tree(rig.server.pid)  # every process of the server's tree
    async with Rush(rig, drop_id, pid, buyers=buyers, spread=spread, seed=seed,
                    pay_within=pay_within) as rush:
        await rush.save_cards()
        rush_task = asyncio.create_task(rush.run())
        await _watching(rush, rush_task)
        await asyncio.sleep(max(0.0, rush.started + fault_at - time.monotonic()))
        t_fault = time.monotonic()
        if fault == "postgres_down":
            await rig.fault("stop", "postgres")
            before = None
            await asyncio.sleep(outage)
            await rig.fault("start", "postgres")
            t_back = time.monotonic()
            report.timings["outage_s"] = round(t_back - t_fault, 2)
            before = await _order_rows(rig, drop_id)

            async def new_row() -> bool:
                return await _order_rows(rig, drop_id) > before
            report.timings["first_order_row_after_return_s"] = round(
                await _wait(new_row, 30), 3)
        elif fault == "redis_restart":
            await rig.fault("stop", "redis")
            await rig.fault("start", "redis")
            t_back = time.monotonic()
            r = rig.redis()
            try:
                async def loaded() -> bool:
                    return bool(await r.hexists(f"{{drop:{drop_id}}}:sale", "loaded"))
                report.timings["sales_resumed_after_restart_s"] = round(
                    await _wait(loaded, 60), 3)
            finally:
                await r.aclose()
        elif fault == "worker_kill":
            victim = random.Random(seed).choice(rig.worker_pids())
            os.kill(victim, signal.SIGKILL)
            t_back = time.monotonic()

            async def replaced() -> bool:
                pids = rig.worker_pids()
                return victim not in pids and len(pids) == rig.workers
            report.timings["worker_replaced_s"] = round(await _wait(replaced, 30), 3)
        elif fault == "order_worker_kill":
            assert doomed is not None
            try:
                out, _ = await asyncio.wait_for(doomed.communicate(), 60)
            finally:
                if doomed.returncode is None:
                    doomed.kill()
            t_back = time.monotonic()
            said = out.decode(errors="replace")
            if doomed.returncode != -signal.SIGKILL:
                raise AssertionError(f"the order worker was not killed mid-charge: {said}")
            report.timings["order_worker_killed_after_s"] = round(t_back - t_fault, 2)
        elif fault == "supervisor_kill":
            t_back = await _kill_supervisor(rig, report)
        elif fault in ("primary_kill", "primary_kill_lagging"):
            t_back = await _kill_primary(rig, drop_id, report, rush, rush_task,
                                         lag=outage if fault == "primary_kill_lagging" else 0)
        elif fault == "none":
            t_back = time.monotonic()
        else:
            raise ValueError(f"unknown fault {fault!r}")
        seen |= process_tree(rig.server.pid) if fault != "supervisor_kill" else set()
        if doomed is not None:
            seen.add(doomed.pid)
        await rush_task
        r = rig.redis()
        db = await rig.db()
        try:
            await invariants.quiesce(r, drop_id, within=quiet_within)
            report.timings["quiet_after_fault_end_s"] = round(time.monotonic() - t_back, 2)
            await _settle_webhooks(rig)
            await invariants.quiesce(r, drop_id, within=quiet_within)
            # the last private events reach the sockets (judged by _buyer_outcomes)

            async def heard() -> bool:
                return await _outcomes_heard(db, rush)
            report.timings["outcomes_heard_after_quiet_s"] = round(
                await _wait(heard, 10, 0.05), 3)
            report.holds = len(rush.acknowledged)
            report.violations = await invariants.violations(
                db, r, drop_id, acknowledged=rush.acknowledged,
                payments=invariants.stub_payments(rig.stub))
            report.states = dict(Counter(
                x["state"] for x in await db.fetch(
                    "SELECT state FROM orders WHERE drop_id = $1", drop_id)))
            report.dead_letters = await r.xlen("orders:dead")
            await _buyer_outcomes(db, rush, report)
            report.double_confirms = sum(b.confirms_won > 1 for b in rush.buyers)
            report.violations += [f"{b.user}: {n}" for b in rush.buyers for n in b.notes
                                  if "answered hold_not_found" in n]
            report.confirmed_twice = sum(b.user_no % 5 == 0 and b.paid_via_stub
                                         for b in rush.buyers)
            current = process_tree(rig.server.pid) if rig.server else set()
            report.orphans += [_describe(p) for p in sorted(seen - current) if alive(p)]
        finally:
            await r.aclose()
            await db.close()
        report.buyers_saw = dict(rush.codes)
        report.rush = rush
    return report


async def _kill_primary(rig: Rig, drop_id: int, report: FaultReport, rush: Rush,
                        rush_task: asyncio.Task, *, lag: float = 0.0) -> float:
    """SIGKILL the cluster primary serving the drop's slot mid-rush; returns once its
    replica serves the slot and a buyer got a hold again. The killed node is started
    again (a supervisor's restart) and waited for as a replica, so the next round
    has a replica to fail over to. ``lag``: first freeze the replica (SIGSTOP) that
    long while the primary keeps selling, then kill the primary and thaw it."""
    from dropserver import local_cluster

    loop = asyncio.get_running_loop()
    key = f"{{drop:{drop_id}}}:sale"
    victim = local_cluster.primary_for(rig.services, key)
    frozen = None
    if lag > 0:
        frozen = local_cluster.replica_of(rig.services, victim)
        os.kill(rig.services.pids[frozen.name], signal.SIGSTOP)
        t_freeze = time.monotonic()
        await asyncio.sleep(lag)
        # Holds a frozen replica cannot have confirmed: asked for after the freeze, or
        # answered more than 0.5 s into it (WAIT gives up after 200 ms). A reply heard
        # just after the freeze to a request sent before it is no such hold: its WAIT
        # was answered by the replica before it froze (seen 23 ms after the freeze for
        # a request sent 577 ms before it, on a loaded machine).
        report.timings["holds_acknowledged_while_replica_frozen"] = sum(
            1 for b in rush.buyers if b.hold and (
                b.hold_asked_at > t_freeze or b.hold_heard_at > t_freeze + 0.5))
    holds_before = len(rush.acknowledged)
    t0 = time.monotonic()
    await rig.fault("kill", victim.name)
    if frozen is not None:
        os.kill(rig.services.pids[frozen.name], signal.SIGCONT)

    async def promoted() -> bool:
        node = await loop.run_in_executor(None, local_cluster.primary_for, rig.services, key)
        return node != victim
    report.timings["replica_promoted_s"] = round(await _wait(promoted, 60, 0.1), 3)

    # Sales resumed: the first hold a buyer heard after the kill, waited for while the
    # rush can still sell (its buyers retry 'unavailable' for two minutes); infinite,
    # and the test says so, when none came before the rush ended.
    async def selling_or_over() -> bool:
        return len(rush.acknowledged) > holds_before or rush_task.done()
    await _wait(selling_or_over, 150, 0.05)
    resumed = sales_resumed(rush, t0)
    report.timings["sales_resumed_s"] = round(resumed, 3)
    t_back = time.monotonic() if resumed == float("inf") else t0 + resumed
    await rig.fault("start", victim.name)
    await loop.run_in_executor(None, functools.partial(
        local_cluster.wait_cluster_ok, rig.services.redis_nodes,
        deadline=time.monotonic() + 60))
    report.timings["old_primary_back_as_replica_s"] = round(time.monotonic() - t0, 2)
    return t_back


def sales_resumed(rush: Rush, t0: float) -> float:
    """Seconds from ``t0`` to the first hold a buyer heard after it (inf: none)."""
    return min((b.hold_heard_at - t0 for b in rush.buyers
                if b.hold and b.hold_heard_at > t0), default=float("inf"))


async def _watching(rush: Rush, rush_task: asyncio.Task, within: float = 60.0) -> None:
    """Until every buyer of ``rush`` watches the drop (its clock started)."""
    waiting = asyncio.ensure_future(rush.watching.wait())
    await asyncio.wait([waiting, rush_task], timeout=within,
                       return_when=asyncio.FIRST_COMPLETED)
    if not rush.watching.is_set():
        waiting.cancel()
        if rush_task.done():
            rush_task.result()  # its error
        raise AssertionError(f"the rush's {len(rush.buyers)} buyers were not all "
                             f"watching within {within} s")


async def _outcomes_heard(db: Any, rush: Rush) -> bool:
    """Every buyer with a hold and a socket that stayed open heard the event of its
    order's current state (those whose socket closed read it over HTTP instead)."""
    states = {r["public_id"]: r["state"] for r in await db.fetch(
        "SELECT public_id, state FROM orders WHERE drop_id = $1", rush.drop_id)}
    for b in rush.buyers:
        if not b.hold or b.reconnects or any(s.closed for s in rush.sockets_of(b)):
            continue
        want = EVENT_FOR_STATE.get(states.get(b.hold["hold_id"]) or "")
        if want and not any(e == want and d.get("order_id") == b.hold["hold_id"]
                            for e, d in b.events):
            return False
    return True


async def _kill_supervisor(rig: Rig, report: FaultReport) -> float:
    """SIGKILL the supervisor of ``dropserver dev --workers N``: its whole tree must die
    and free the port by itself (no process of it outlives it: an orphan serving the port
    or consuming the order stream is a fault of its own); then the server is started
    again as systemd's ``Restart=always`` would, on the same port, and the buyers
    reconnect. Returns the moment it serves again."""
    assert rig.server is not None
    t0 = time.monotonic()
    tree = process_tree(rig.server.pid)
    rig.server.kill()
    await asyncio.to_thread(rig.server.wait)

    async def gone() -> bool:
        return not any(alive(p) for p in tree) and port_free(rig.port)
    report.timings["tree_gone_s"] = round(await _wait(gone, 20, 0.05), 3)
    left = sorted(p for p in tree if alive(p))
    report.orphans += [_describe(p) for p in left]
    for p in left:  # never leave them to the next run
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    rig.stop_server()  # closes the log; the process is gone
    await asyncio.get_running_loop().run_in_executor(rig.executor, rig.start_server)
    t_back = time.monotonic()
    report.timings["server_back_s"] = round(t_back - t0, 2)
    return t_back


def _describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        cmd = "?"
    return f"pid {pid} still alive: {cmd.strip()[:200]}"


def child_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def process_tree(root: int) -> set[int]:
    """``root`` and every living descendant."""
    tree = child_map()
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(tree.get(pid, []))
    return out


def alive(pid: int) -> bool:
    """A process that runs (a zombie waits for its parent and no longer does)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def _settle_webhooks(rig: Rig, within: float = 60.0) -> None:
    async def none_left() -> bool:
        return rig.stub.undelivered() == 0
    await _wait(none_left, within, 0.05)


async def _buyer_outcomes(db: Any, rush: Rush, report: FaultReport) -> None:
    """Each buyer learnt their order's current state: heard it once on a socket that
    stayed open, or -- when the server closed their socket meanwhile (a killed worker,
    a resync after Redis restarted) -- read it over HTTP after reconnecting, as the
    viewer page does. Never heard an outcome twice."""
    states = {r["public_id"]: r["state"] for r in await db.fetch(
        "SELECT public_id, state FROM orders WHERE drop_id = $1", rush.drop_id)}
    for b in rush.buyers:
        if not b.hold:
            continue
        hold_id = b.hold["hold_id"]
        heard = Counter(e for e, d in b.events if d.get("order_id") == hold_id)
        for event, n in heard.items():
            if event in OUTCOME_EVENTS and n > 1:
                on = [s for (e, d), s in zip(b.events, b.heard_on, strict=True)
                      if e == event and d.get("order_id") == hold_id]
                report.duplicates.append(
                    f"{b.user} heard {event} {n} times for {hold_id} (on its sockets "
                    f"{on} of {b.sockets}; {b.reconnects} reconnects"
                    + (f"; {'; '.join(b.notes)}" if b.notes else "") + ")")
        state = states.get(hold_id)
        want = EVENT_FOR_STATE.get(state or "")
        if not want or heard.get(want):
            continue
        closed = b.reconnects or any(s.closed for s in rush.sockets_of(b))
        if closed:
            order = await rush.rig.read_order(b.user, hold_id)
            if order is not None and order["state"] == state:
                report.read_over_http += 1
                continue
        report.unheard.append(f"{b.user}: order {hold_id} is {state}, the buyer heard "
                              f"{dict(heard)}" + (" and could not read it" if closed
                                                  else "")
                              + f" ({b.flow}, {b.reconnects} reconnects, hold "
                              f"{'replayed' if b.hold.get('replay') else 'new'}"
                              + (f", {'; '.join(b.notes)}" if b.notes else "") + ")")


async def _doomed_order_worker(rig: Rig) -> asyncio.subprocess.Process:
    """An order worker process in the server's consumer group that SIGKILLs itself
    between the charge and the commit (tests/order_worker_proc.py); started before the
    rush and blocked first in line, so it takes the first entry."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.order_worker_proc", rig.services.redis_url,
        rig.services.database_url, rig.stub.url, "crash-after-intent", "20000",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if not line.startswith(b"ready"):
        proc.kill()
        raise RuntimeError(f"order worker did not start: {line!r}")
    return proc
