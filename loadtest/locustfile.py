"""Locust users for dropserver: viewers on the WebSocket, one creator on the HTTP API.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \\
        --users 2000 --spawn-rate 200 -t 5m --headless --csv out/drop

Distributed (beyond one machine): ``--master`` on one host and ``--worker
--master-host <it>`` on each load machine, same file. The creator is a single user
(``fixed_count = 1``) on one worker; it tells every worker which drop is on and when
it pressed BUY NOW through Locust's runner messages, so viewers anywhere can measure.

Viewers (``ViewerUser``) connect, keep the socket, receive the snapshot and every
event (the frame logic is :class:`loadtest.viewer.Viewer`, shared with the swarm),
chat sometimes, and buy on BUY NOW with ``--lt-buy-probability``. The creator
(``CreatorUser``) runs drops in a loop: create -> schedule -> live -> [giveaway] -> BUY
NOW -> [sold out] -> end. With ``--lt-giveaway SECONDS`` the creator opens a giveaway
after going live; every viewer enters (``--lt-enter-probability``) at a moment spread
over the first 80 % of the window, and after the draw the creator checks it from the
public API, as a viewer could.

Custom entries in Locust's statistics (web UI and ``--csv``):

| type | name | what |
| --- | --- | --- |
| ``BUYNOW`` | ``fanout`` | creator's BUY NOW call -> this viewer's receipt (wall clocks) |
| ``WS`` | ``buy`` / ``buy sold_out`` | buy command -> its reply; other codes are failures |
| ``WS`` | ``join`` | WebSocket open -> ``joined`` |
| ``WS`` | ``giveaway.enter`` | a giveaway entry -> its reply; refusals are failures |
| ``GIVEAWAY`` | ``shown`` | a viewer was shown the giveaway's draw |
| ``GIVEAWAY`` | ``verify`` | the creator's check of the draw from the public API |
| ``WSERR`` | ``<code>`` | protocol error frames, undecodable frames and lost events (failures) |
| ``WS`` | ``bid`` / ``bid <code>`` | a bid -> its reply (auctions; below) |
| ``AUCTION`` | ``bid_to_viewer`` | the server accepted a bid -> this viewer's receipt |
| ``AUDIT`` | ``auction`` | an auction replayed from its recorded bids; failure: a broken rule |

With ``--lt-scenario auction`` the creator runs auctions instead of drops: a drop with
one unit, live, an auction of ``--lt-auction-duration`` seconds; viewers drawn with
``--lt-bid-probability`` bid in its last ``--lt-war-seconds`` (the next amount, about
once a second each) and then stop (a refusal ``bid_too_low``, ``already_leading`` or
``auction_closed`` is part of the game, not a failure); after the close the creator
reads the auction and its recorded bids over HTTP and replays the rules
(:func:`checkout.auction_rules.replay`): one winner at the highest bid, no bid at or
after the end, every extension as the anti-snipe rule gives, and the close viewers
were shown (``GET .../auctions/{id}``).

Viewers' sockets are gevent sockets (Locust monkey-patches the standard library)
around websockets' sans-I/O client protocol, so a worker process holds thousands.

Against a server on this machine (a loopback ``--host``) each viewer connects from an
address of its own in 127.0.0.0/8 (127.1.0.1, 127.1.0.2, ...; Linux routes all of
them to ``lo``), as a real audience comes from many addresses: otherwise every viewer
shares 127.0.0.1 and the server's per-IP buy limit (``DROPSERVER_BUY_RATE_IP``,
bot defence) refuses most of them. ``--lt-one-address`` turns that off. Where the
system has no such addresses (macOS has only 127.0.0.1) viewers fall back to the
default one, with a warning.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import random
import socket
import time
from typing import Any

import gevent
from gevent.lock import Semaphore
from locust import HttpUser, User, between, events, task
from locust.runners import MasterRunner, WorkerRunner
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from loadtest.viewer import BuyOutcome, UndecodableFrame, Viewer, ViewerConfig, decode_server

# -- shared state of this Locust process ---------------------------------------------------
_drop: dict[str, Any] = {"id": None, "buy_now_wall": {}}  # drop id -> wall time of BUY NOW
_pending: list[tuple[int, float, Any]] = []  # (drop id, receipt wall time, user) before the
# creator's BUY NOW time arrived on this worker
_auction: dict[str, Any] = {}  # --lt-scenario auction: {drop_id, auction_id, war_from,
# war_until} (wall seconds, corrected to the server's clock) of the running auction


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("dropserver")
    group.add_argument("--lt-stock", type=int, default=100, help="units per drop")
    group.add_argument("--lt-buy-probability", type=float, default=0.5)
    group.add_argument("--lt-chat-probability", type=float, default=0.05,
                       help="chance a viewer chats on each of its task ticks (5-15 s)")
    group.add_argument("--lt-join-wait", type=float, default=10.0,
                       help="seconds the creator waits for viewers before going live")
    group.add_argument("--lt-countdown", type=float, default=3.0)
    group.add_argument("--lt-selling", type=float, default=20.0,
                       help="seconds BUY NOW stays open before the drop ends")
    group.add_argument("--lt-drop-id", type=int, default=0,
                       help="watch this existing drop instead of running drops")
    group.add_argument("--lt-encoding", choices=["msgpack", "json"], default="msgpack")
    group.add_argument("--lt-jwt-secret", default=os.environ.get("DROPSERVER_JWT_SECRET", ""),
                       help="HS256 secret for tokens (default: the dev secret)")
    group.add_argument("--lt-scenario", choices=["drop", "auction"], default="drop",
                       help="drop: BUY NOW (default); auction: bidding wars, audited")
    group.add_argument("--lt-auction-duration", type=int, default=20)
    group.add_argument("--lt-snipe-window", type=int, default=5,
                       help="seconds: a bid with less left resets the clock to this")
    group.add_argument("--lt-war-seconds", type=float, default=5.0,
                       help="bidders raise from this long before the end, for this long")
    group.add_argument("--lt-bid-probability", type=float, default=0.3,
                       help="share of viewers that bid in an auction")
    group.add_argument("--lt-giveaway", type=float, default=0.0, metavar="SECONDS",
                       help="the giveaway scenario: after going live the creator opens a "
                            "giveaway with this entry window and every viewer enters "
                            "(0: off)")
    group.add_argument("--lt-giveaway-winners", type=int, default=3)
    group.add_argument("--lt-enter-probability", type=float, default=1.0,
                       help="the share of viewers who enter a giveaway")
    group.add_argument("--lt-one-address", action="store_true",
                       help="connect every viewer from the default source address, even "
                            "to a loopback host (they then share the per-IP buy limit)")


_ADDRESSES = 254 * 256 * 254
_spread: dict[str, bool] = {}  # host -> whether viewers get addresses of their own


def loopback_source(index: int) -> str:
    """Viewer ``index``'s own source address: 127.1.0.1 ... 127.254.255.254 (never
    127.0.0.x, where servers listen, nor a .0 or .255 host part)."""
    a, rest = divmod(index % _ADDRESSES, 256 * 254)
    b, c = divmod(rest, 254)
    return f"127.{a + 1}.{b}.{c + 1}"


def _spreads(host: str, environment: Any) -> bool:
    """Whether viewers of ``host`` connect from addresses of their own (loopback)."""
    if host not in _spread:
        opts = environment.parsed_options
        try:
            first = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
            loopback = ipaddress.ip_address(first).is_loopback
        except (OSError, ValueError, IndexError):
            loopback = False
        _spread[host] = loopback and not (opts is not None and
                                          getattr(opts, "lt_one_address", False))
    return _spread[host]


def _open_socket(uri: Any, index: int, environment: Any) -> socket.socket:
    address = (uri.host, uri.port)
    if _spreads(uri.host, environment):
        try:
            return socket.create_connection(address, timeout=10,
                                            source_address=(loopback_source(index), 0))
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EINVAL):
                raise
            _spread[uri.host] = False
            logging.warning("cannot connect from %s (%s): every viewer now uses the "
                            "default source address, and shares the server's per-IP buy "
                            "limit", loopback_source(index), exc.strerror)
    return socket.create_connection(address, timeout=10)


def _settings(environment: Any):
    from dropserver.settings import load_settings

    secret = getattr(environment.parsed_options, "lt_jwt_secret", "") if \
        environment.parsed_options else ""
    # Signs tokens only (no server): the given secret, else the dev one.
    return load_settings({}, dev=True, jwt_secret=secret)


def _token(environment: Any, sub: str, role: str) -> str:
    from dropserver.auth import Role, issue_token

    return issue_token(_settings(environment), sub, Role(role), ttl=6 * 3600, name=sub)


def _fire(environment: Any, kind: str, name: str, ms: float,
          exc: Exception | None = None) -> None:
    environment.events.request.fire(request_type=kind, name=name, response_time=ms,
                                    response_length=0, exception=exc, context={})


# -- runner messages: the creator's drop id and BUY NOW time reach every worker ----------
def _on_drop(environment: Any, data: dict[str, Any]) -> None:
    _drop["id"] = data["drop_id"]


def _on_buy_now(environment: Any, data: dict[str, Any]) -> None:
    drop_id, wall = data["drop_id"], data["wall"]
    _drop["buy_now_wall"][drop_id] = wall
    keep = []
    for pending_drop, received, _user in _pending:
        if pending_drop == drop_id:
            _fire(environment, "BUYNOW", "fanout", max(0.0, (received - wall) * 1000))
        else:
            keep.append((pending_drop, received, _user))
    _pending[:] = keep


def _on_auction(environment: Any, data: dict[str, Any]) -> None:
    _auction.clear()
    _auction.update(data)


def _relay(name: str, handler):
    """On the master, forward a worker's message to every worker; elsewhere handle it."""

    def listener(environment: Any, msg: Any, **_kw: Any) -> None:
        runner = environment.runner
        if isinstance(runner, MasterRunner):
            runner.send_message(name, msg.data)
        else:
            handler(environment, msg.data)

    return listener


@events.init.add_listener
def _init(environment: Any, **_kw: Any) -> None:
    runner = environment.runner
    if runner is None:
        return
    runner.register_message("lt_drop", _relay("lt_drop", _on_drop))
    runner.register_message("lt_buy_now", _relay("lt_buy_now", _on_buy_now))
    runner.register_message("lt_auction", _relay("lt_auction", _on_auction))
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "lt_drop_id", 0):
        _drop["id"] = opts.lt_drop_id


def _announce(environment: Any, name: str, data: dict[str, Any]) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.send_message(name, data)  # the master relays it to every worker
    else:
        {"lt_drop": _on_drop, "lt_buy_now": _on_buy_now,
         "lt_auction": _on_auction}[name](environment, data)


# -- viewers ------------------------------------------------------------------------------
class ViewerUser(User):
    """One viewer: a WebSocket kept open, a reader greenlet, chat now and then."""

    weight = 100

    def wait_time(self) -> float:
        # Quick while not on the current drop (it may not exist yet); then 5-15 s.
        if self._sock is None or _drop["id"] != self._drop_id:
            return 0.5
        return random.uniform(5, 15)

    def on_start(self) -> None:
        self._index = random.randrange(10**9)
        self._sock = None
        self._reader = None
        self._lock = Semaphore()
        self._drop_id = None
        self.viewer: Viewer | None = None
        self._connect()

    def on_stop(self) -> None:
        self._disconnect()

    # The current drop changes when the creator starts the next one: follow it.
    @task
    def tick(self) -> None:
        if _drop["id"] != self._drop_id or self._sock is None:
            self._disconnect()
            self._connect()
            return
        opts = self.environment.parsed_options
        chance = getattr(opts, "lt_chat_probability", 0.05) if opts else 0.05
        if self.viewer is not None and self.viewer.is_joined and random.random() < chance:
            self._send(self.viewer.chat_message(f"locust says hi {self._index % 1000}"))

    # -- socket plumbing --------------------------------------------------------------
    def _connect(self) -> None:
        drop_id = _drop["id"]
        if drop_id is None:
            return
        opts = self.environment.parsed_options
        cfg = ViewerConfig(drop_id=drop_id,
                           encoding=getattr(opts, "lt_encoding", "msgpack") if opts else
                           "msgpack",
                           buy_probability=getattr(opts, "lt_buy_probability", 0.5)
                           if opts else 0.5, buy_delay_ms=(0.0, 300.0),
                           enter_probability=(getattr(opts, "lt_enter_probability", 1.0)
                                              if opts and getattr(opts, "lt_giveaway", 0)
                                              else 0.0),
                           enter_delay_ms=(0.0, 800.0 * (getattr(opts, "lt_giveaway", 0)
                                                         if opts else 0)))
        user_id = f"locust-{self._index}"
        self.viewer = Viewer(self._index, user_id, cfg, random.random())
        self._drop_id = drop_id
        base = self.environment.host or "http://127.0.0.1:8000"
        url = base.replace("https://", "wss://").replace("http://", "ws://").rstrip("/") + "/ws"
        uri = parse_uri(url)
        self._proto = ClientProtocol(uri, subprotocols=self.viewer.subprotocols())
        started = time.monotonic()
        try:
            sock = _open_socket(uri, self._index, self.environment)
            if uri.secure:
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock,
                                                                server_hostname=uri.host)
            sock.settimeout(None)
        except OSError as exc:
            _fire(self.environment, "WS", "join", (time.monotonic() - started) * 1000, exc)
            return
        self._sock = sock
        request = self._proto.connect()
        request.headers["Authorization"] = "Bearer " + _token(self.environment, user_id,
                                                              "viewer")
        self._proto.send_request(request)
        self._flush()
        self.viewer.connecting(started)
        self._reader = gevent.spawn(self._read_loop, sock, started)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if self._reader is not None:
            self._reader.kill(block=False)
            self._reader = None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        data = b"".join(self._proto.data_to_send())
        if data:
            with self._lock:
                try:
                    sock.sendall(data)
                except OSError:
                    self._sock = None

    def _send(self, message: dict[str, Any]) -> None:
        if self.viewer is None or self._sock is None:
            return
        payload = self.viewer.encode(message)
        if isinstance(payload, str):
            self._proto.send_text(payload.encode())
        else:
            self._proto.send_binary(payload)
        self._flush()

    def _read_loop(self, sock: Any, started: float) -> None:
        viewer, proto = self.viewer, self._proto
        assert viewer is not None
        env = self.environment
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if self._sock is not sock:
                # This socket was replaced (the next drop): the user's viewer and
                # protocol are the new connection's now, not this reader's.
                return
            if not data:
                proto.receive_eof()
                viewer.closed(None, "eof", time.monotonic())
                self._sock = None
                return
            proto.receive_data(data)
            for event in proto.events_received():
                if isinstance(event, Response):
                    if proto.handshake_exc is not None:
                        _fire(env, "WS", "join", (time.monotonic() - started) * 1000,
                              proto.handshake_exc)
                        return
                    for message in viewer.opened(time.monotonic()):
                        self._send(message)
                elif isinstance(event, Frame) and event.opcode in (Opcode.TEXT, Opcode.BINARY):
                    self._frame(event, started)
            self._flush()

    def _frame(self, frame: Frame, started: float) -> None:
        viewer = self.viewer
        assert viewer is not None
        env = self.environment
        now = time.monotonic()
        opts = env.parsed_options
        if opts is not None and getattr(opts, "lt_scenario", "drop") == "auction":
            self._auction_frame(frame)
        before = (viewer.joined_at, viewer.buy_now_at, viewer.buy_outcome,
                  dict(viewer.errors or {}), viewer.gaps + viewer.out_of_order,
                  viewer.gw_reply_at, viewer.gw_drawn)
        data = frame.data.decode() if frame.opcode is Opcode.TEXT else bytes(frame.data)
        for delay, message in viewer.received(data, now):
            if delay > 0:
                gevent.spawn_later(delay, self._send_buy, message)
            else:
                if message.get("t") == "giveaway.enter":
                    viewer.sent_delayed(now, message)
                self._send(message)
        if viewer.errors and self._bids_sent_any():
            # A bid's error answer is the viewer's "other:<code>"; it was counted as
            # the bid's outcome above (WS "bid <code>").
            for code in [c for c in viewer.errors if c.startswith("other:")]:
                del viewer.errors[code]
        if before[0] is None and viewer.joined_at is not None:
            _fire(env, "WS", "join", (viewer.joined_at - started) * 1000)
        if before[1] is None and viewer.buy_now_at is not None and not viewer.buy_now_late:
            wall = _drop["buy_now_wall"].get(self._drop_id)
            received = time.time()
            if wall is None:
                _pending.append((self._drop_id, received, self))
            else:
                _fire(env, "BUYNOW", "fanout", max(0.0, (received - wall) * 1000))
        if before[2] is None and viewer.buy_outcome is not None and \
                viewer.buy_sent_at is not None and viewer.buy_reply_at is not None:
            ms = (viewer.buy_reply_at - viewer.buy_sent_at) * 1000
            if viewer.buy_outcome is BuyOutcome.HELD:
                _fire(env, "WS", "buy", ms)
            elif viewer.buy_outcome is BuyOutcome.SOLD_OUT:
                _fire(env, "WS", "buy sold_out", ms)
            else:
                _fire(env, "WS", "buy", ms, RuntimeError(viewer.buy_code or "rejected"))
        if before[5] is None and viewer.gw_reply_at is not None and \
                viewer.gw_sent_at is not None:
            ms = (viewer.gw_reply_at - viewer.gw_sent_at) * 1000
            _fire(env, "WS", "giveaway.enter", ms,
                  RuntimeError(viewer.gw_code) if viewer.gw_code else None)
        if before[6] is None and viewer.gw_drawn is not None:
            _fire(env, "GIVEAWAY", "shown", 0)
        for code, count in (viewer.errors or {}).items():
            for _ in range(count - before[3].get(code, 0)):
                _fire(env, "WSERR", code, 0, RuntimeError(code))
        lost = viewer.gaps + viewer.out_of_order - before[4]
        if lost > 0:
            _fire(env, "WSERR", "position_gap", 0, RuntimeError(f"{lost} events lost"))

    # -- auctions (--lt-scenario auction) ------------------------------------------------
    def _auction_frame(self, frame: Frame) -> None:
        raw = frame.data.decode() if frame.opcode is Opcode.TEXT else bytes(frame.data)
        try:
            frames = decode_server(raw)
        except UndecodableFrame:
            return  # the viewer's own decoding counts it
        env = self.environment
        for f in frames:
            event, data = f.get("event"), f.get("data") or {}
            if f.get("t") == "event" and event == "auction.bid":
                self._next_min = max(getattr(self, "_next_min", 0), int(data["next_min"]))
                _fire(env, "AUCTION", "bid_to_viewer",
                      max(0.0, time.time() * 1000 - int(data["server_time"])))
            elif f.get("t") == "event" and event == "auction.started":
                self._next_min = int(data["next_min"])
                opts = env.parsed_options
                chance = getattr(opts, "lt_bid_probability", 0.3) if opts else 0.3
                if random.random() < chance:
                    gevent.spawn(self._bid_war, int(data["auction_id"]))
            elif f.get("t") in ("reply", "error") and str(f.get("id", "")).startswith("bid"):
                sent = self._bids_sent.pop(f["id"], None) if hasattr(self, "_bids_sent") \
                    else None
                if sent is None:
                    continue
                ms = (time.monotonic() - sent) * 1000
                if f["t"] == "reply":
                    _fire(env, "WS", "bid", ms)
                else:
                    code = f.get("code", "error")
                    min_amount = (f.get("details") or {}).get("min_amount")
                    if min_amount:
                        self._next_min = max(getattr(self, "_next_min", 0), int(min_amount))
                    # Being outbid first or the close are the game, not failures.
                    expected = code in ("bid_too_low", "auction_closed", "already_leading")
                    _fire(env, "WS", f"bid {code}", ms,
                          None if expected else RuntimeError(code))

    def _bids_sent_any(self) -> bool:
        return hasattr(self, "_bids_sent")

    def _bid_war(self, auction_id: int) -> None:
        """Bid the next amount about once a second through the auction's last seconds."""
        if not hasattr(self, "_bids_sent"):
            self._bids_sent: dict[str, float] = {}
        waited = 0.0  # the creator's announcement may come after the event
        while _auction.get("auction_id") != auction_id and waited < 10:
            gevent.sleep(0.1)
            waited += 0.1
        gevent.sleep(max(0.0, _auction.get("war_from", 0) - time.time())
                     + random.random() * 0.5)
        n = 0
        while time.time() < _auction.get("war_until", 0) and self._sock is not None \
                and _auction.get("auction_id") == auction_id:
            n += 1
            rid = f"bid{self._index}-{auction_id}-{n}"
            self._bids_sent[rid] = time.monotonic()
            self._send({"t": "bid", "id": rid, "auction_id": auction_id,
                        "amount": getattr(self, "_next_min", 0) + random.choice((0, 0, 100)),
                        "idempotency_key": rid})
            gevent.sleep(bid_pause())

    def _send_buy(self, message: dict[str, Any]) -> None:
        """A delayed message: the buy, or the giveaway entry."""
        if self.viewer is not None and self._sock is not None:
            self.viewer.sent_delayed(time.monotonic(), message)
            self._send(message)


def bid_pause(rng: random.Random | None = None) -> float:
    """Seconds a bidder waits between bids in a war: about one a second, never under
    0.75 s. (Exponential pauses, tried first, sometimes put ten bids in three seconds
    and met the server's per-user limit, 10 attempts in 10 s: `rate_limited`, counted
    as a failure of the run.) A war of up to 6 s stays within that limit."""
    return (rng or random).uniform(0.75, 1.25)


# -- the creator ---------------------------------------------------------------------------
class CreatorUser(HttpUser):
    """Runs drops one after another through the HTTP API (one per test, on one worker)."""

    fixed_count = 1
    wait_time = between(1, 2)

    def on_start(self) -> None:
        token = _token(self.environment, "locust-creator", "creator")
        self.client.headers["Authorization"] = f"Bearer {token}"
        # A new connection per call: the creator waits longer between calls than the
        # server keeps an idle connection (uvicorn: 5 s), and a call sent on a
        # connection the server is just closing fails (RemoteDisconnected).
        self.client.headers["Connection"] = "close"

    @task
    def run_drop(self) -> None:
        opts = self.environment.parsed_options
        if opts is not None and getattr(opts, "lt_drop_id", 0):
            self.wait_time = lambda: 3600  # watching someone else's drop: nothing to do
            return

        def opt(name: str, default: Any) -> Any:
            return getattr(opts, name, default) if opts is not None else default

        if opt("lt_scenario", "drop") == "auction":
            self.run_auction(opt)
            return
        with self.client.post("/v1/drops", name="drop create", catch_response=True, json={
            "title": "Locust drop",
            "products": [{"title": "Locust item", "price": 2500,
                          "units": opt("lt_stock", 100)}]}) as resp:
            if resp.status_code != 201:
                resp.failure(f"create: {resp.status_code} {resp.text[:200]}")
                return
            drop = resp.json()
        drop_id, product_id = drop["id"], drop["products"][0]["product_id"]
        path = f"/v1/drops/{drop_id}"
        starts = time.time() + opt("lt_join_wait", 10.0) + opt("lt_countdown", 3.0)
        self.client.post(f"{path}/schedule", name="drop schedule", json={
            "starts_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(starts + 1))})
        _announce(self.environment, "lt_drop", {"drop_id": drop_id})
        gevent.sleep(opt("lt_join_wait", 10.0))
        self.client.post(f"{path}/live", name="drop live", json={})
        gevent.sleep(opt("lt_countdown", 3.0))
        if opt("lt_giveaway", 0.0) > 0:
            self._giveaway(path, opt("lt_giveaway", 0.0), opt("lt_giveaway_winners", 3))
        wall = time.time()
        resp = self.client.post(f"{path}/buy-now", name="drop buy-now",
                                json={"product_id": product_id})
        if resp.status_code == 200:
            _announce(self.environment, "lt_buy_now", {"drop_id": drop_id, "wall": wall})
        gevent.sleep(opt("lt_selling", 20.0))
        self.client.post(f"{path}/end", name="drop end", json={})

    def run_auction(self, opt: Any) -> None:
        """A drop with one unit, an auction of it, then its audit over HTTP."""
        from checkout.auction_rules import bands_of, replay

        resp = self.client.post("/v1/drops", name="drop create", json={
            "title": "Locust auction", "products": [{"title": "Locust lot", "price": 1000,
                                                     "units": 1}]})
        if resp.status_code != 201:
            return
        drop = resp.json()
        drop_id, product_id = drop["id"], drop["products"][0]["product_id"]
        path = f"/v1/drops/{drop_id}"
        self.client.post(f"{path}/schedule", name="drop schedule", json={
            "starts_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))})
        self.client.post(f"{path}/live", name="drop live", json={})
        _announce(self.environment, "lt_drop", {"drop_id": drop_id})
        gevent.sleep(opt("lt_join_wait", 10.0))
        duration, war = opt("lt_auction_duration", 20), opt("lt_war_seconds", 5.0)
        resp = self.client.post(f"{path}/auctions", name="auction start", json={
            "product_id": product_id, "start_price": 1000, "increment": 100,
            "duration_s": duration, "snipe_window_s": opt("lt_snipe_window", 5)})
        if resp.status_code != 201:
            return
        auction = resp.json()
        skew = auction["server_time"] / 1000 - time.time()  # server clock - ours
        war_from = auction["ends_at"] / 1000 - skew - war
        _announce(self.environment, "lt_auction", {
            "drop_id": drop_id, "auction_id": auction["id"], "war_from": war_from,
            "war_until": war_from + war})
        aid = auction["id"]
        started = time.time()
        while time.time() - started < duration * 4 + 30:  # extensions, bounded
            gevent.sleep(1.0)
            state = self.client.get(f"{path}/auctions/{aid}", name="auction get").json()
            if state.get("state") == "closed":
                break
        gevent.sleep(1.0)  # bids reach PostgreSQL off the hot path
        t0 = time.monotonic()
        state = self.client.get(f"{path}/auctions/{aid}", name="auction get").json()
        bids = self.client.get(f"{path}/auctions/{aid}/bids", name="auction bids").json()
        rows = [{"seq": b["seq"], "user_id": b["bidder_id"], "amount": b["amount"],
                 "at_ms": b["at"], "ends_at_ms": b["ends_at"], "extended": b["extended"]}
                for b in bids.get("bids", [])]
        result = replay(start_price=auction["start_price"],
                        bands=bands_of([[b["from"], b["step"]] for b in auction["increments"]]),
                        snipe_window_ms=auction["snipe_window_ms"],
                        first_ends_at=auction["ends_at"], reserve_price=None, bids=rows)
        problems = list(result.problems)
        leading = state.get("leading") or {}
        if state.get("state") != "closed":
            problems.append("the auction did not close")
        elif rows and (leading.get("bidder_id"), leading.get("amount")) != (
                result.leader, result.amount):
            problems.append(f"shown winner {leading} differs from the replay's "
                            f"{result.leader} at {result.amount}")
        if state.get("state") == "closed" and state.get("ends_at") != result.ends_at:
            problems.append(f"end {state.get('ends_at')}, the rules give {result.ends_at}")
        _fire(self.environment, "AUDIT", "auction", (time.monotonic() - t0) * 1000,
              RuntimeError("; ".join(problems)[:500]) if problems else None)
        _auction.clear()
        self.client.post(f"{path}/end", name="drop end", json={})

    def _giveaway(self, path: str, window: float, winners: int) -> None:
        """Open a giveaway, wait for its draw, and check the draw from the public API
        alone, as any viewer can (docs/topics/giveaways.md): ``GIVEAWAY verify``."""
        from drops.giveaway import verify

        with self.client.post(f"{path}/giveaways", name="giveaway open", json={
                "prize": "Locust prize", "winners": winners,
                "duration_s": max(2, round(window))}, catch_response=True) as resp:
            if resp.status_code != 201:
                resp.failure(f"open: {resp.status_code} {resp.text[:200]}")
                return
            gid = resp.json()["id"]
        started = time.monotonic()
        gevent.sleep(window)
        body: dict[str, Any] = {}
        while time.monotonic() - started < window + 30:
            body = self.client.get(f"{path}/giveaways/{gid}", name="giveaway get").json()
            if body.get("state") == "drawn":
                break
            gevent.sleep(0.5)
        if body.get("state") != "drawn":
            _fire(self.environment, "GIVEAWAY", "verify", 0, RuntimeError("not drawn"))
            return
        listed = self.client.get(f"{path}/giveaways/{gid}/entrants",
                                 name="giveaway entrants").json()
        check = verify(body["seed"], body["commitment"], listed["tickets"], body["winners"],
                       [w["ticket"] for w in body["results"]])
        ok = check.ok and len(listed["tickets"]) == body["entries"]
        _fire(self.environment, "GIVEAWAY", "verify", (time.monotonic() - started) * 1000,
              None if ok else RuntimeError(check.problem or "entrant count differs"))
