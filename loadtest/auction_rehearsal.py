"""``python -m loadtest rehearse --scenario auction``: a bidding war among thousands
in an auction's last seconds, audited.

The coordinator starts the target (or points at a remote one), creates a drop with
one single-unit product per auction and takes it live, connects ``--viewers``
sockets (the lean client, :mod:`loadtest.wsclient`), the first ``--bidders`` of them
signed in as bidders, and then, auction after auction: the creator starts it; in its
last ``--war-seconds`` (by the server's clock) every bidder bids the next amount
(or a little more) as fast as a person taps, for ``--war-seconds``; then stops raising
and only probes the close with bids too low to extend it, until the close refuses
them. Every socket records each ``auction.bid`` (and how long after the server
accepted it it arrived) and the ``auction.closed`` it saw.

Then the audit, for each auction (:func:`audit`): the bids PostgreSQL recorded,
replayed by the rules (:func:`checkout.auction_rules.replay`: each at least the
next minimum, none from the leader, none at or after the end as it stood, each end
and extension as the anti-snipe rule gives), are exactly the bids the bidders were
told were accepted; one winner at the highest bid; every viewer saw every bid once,
in order, and one ``auction.closed`` naming that winner, amount and end; one order
for the winner at that amount. The result is written as JSON under ``--out``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest.stats import summarize
from loadtest.viewer import UndecodableFrame, decode_server
from realtime.protocol import Format, encode

__all__ = ["AuctionConfig", "AuctionRehearsal", "audit", "rehearse_auctions"]

SUBPROTOCOL = {"msgpack": Format.MSGPACK, "json": Format.JSON}


@dataclass
class AuctionConfig:
    viewers: int = 1000
    bidders: int = 200
    auctions: int = 1
    duration_s: int = 15
    snipe_window_s: int = 3
    war_s: float = 5.0           # bidders raise for this long, from this long before the end
    bid_interval_s: float = 1.0  # mean seconds between one bidder's bids (a person's tap)
    start_price: int = 1000
    increment: int = 100
    encoding: str = "msgpack"
    target: str = ""
    jwt_secret: str = ""
    database_url: str = ""
    connect_rate: float = 2000.0
    per_address: int = 12000
    server_workers: int = 0
    server_env: dict[str, str] = field(default_factory=dict)
    max_duration_s: float = 600.0
    out_dir: str = "loadtest-reports"
    quiet: bool = False
    command: str = ""

    def resolved_workers(self) -> int:
        return self.server_workers or max(1, math.ceil(self.viewers / 14000))


class Socket:
    """One viewer's socket: joins, records the auction events, sends bids."""

    def __init__(self, index: int, token: str | None, drop_id: int, fmt: Format,
                 rehearsal: AuctionRehearsal) -> None:
        self.index = index
        self.token = token
        self.drop_id = drop_id
        self.fmt = fmt
        self.r = rehearsal
        self.conn: Any = None
        self.joined = asyncio.Event()
        self.closed = False
        self.next_id = 0
        self.pending: dict[str, asyncio.Future] = {}
        # auction id -> [(seq, amount, ends_at, extended)], auction id -> closed data
        self.bids: dict[int, list[tuple[int, int, int, bool]]] = {}
        self.closes: dict[int, list[dict[str, Any]]] = {}
        self.next_min: dict[int, int] = {}
        self.outbid = 0

    # wsclient's Handler
    def on_open(self, conn: Any) -> None:
        frame: dict[str, Any] = {"t": "join", "drop_id": self.drop_id, "id": "j"}
        if self.token:
            frame["token"] = self.token
        conn.send(encode(frame, self.fmt))

    def on_message(self, conn: Any, data: bytes | str) -> None:
        try:
            frames = decode_server(data)
        except UndecodableFrame:
            self.r.undecodable += 1
            return
        now_ms = time.time() * 1000
        for f in frames:
            t = f.get("t")
            if t == "ping":  # the server's heartbeat (docs/protocol.md, "Heartbeats")
                conn.send(encode({"t": "pong"}, self.fmt))
            elif t == "joined":
                self.joined.set()
            elif t in ("reply", "error") and f.get("id") in self.pending:
                fut = self.pending.pop(f["id"])
                if not fut.done():
                    fut.set_result(f)
            elif t == "event":
                self._event(f.get("event"), f.get("data") or {}, now_ms)
            elif t == "private" and f.get("event") == "auction.outbid":
                self.outbid += 1

    def _event(self, event: str | None, data: dict[str, Any], now_ms: float) -> None:
        if event == "auction.bid":
            aid = int(data["auction_id"])
            self.bids.setdefault(aid, []).append(
                (int(data["seq"]), int(data["amount"]), int(data["ends_at"]),
                 bool(data["extended"])))
            self.next_min[aid] = max(self.next_min.get(aid, 0), int(data["next_min"]))
            self.r.delivery_ms.append(now_ms - int(data["server_time"]))
        elif event == "auction.started":
            self.next_min[int(data["auction_id"])] = int(data["next_min"])
        elif event == "auction.closed":
            self.closes.setdefault(int(data["auction_id"]), []).append(data)

    def on_close(self, conn: Any, code: int | None, reason: str) -> None:
        if not self.closed and not self.joined.is_set():
            self.r.refused_joins[f"{code} {reason}"[:120]] += 1
        elif not self.closed and not self.r.stopping:
            self.r.dropped[f"{code} {reason}"[:120]] += 1
        self.closed = True
        self.joined.set()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_result({"t": "error", "code": "closed"})
        self.pending.clear()

    async def bid(self, auction_id: int, amount: int) -> dict[str, Any]:
        self.next_id += 1
        rid = f"b{self.next_id}"
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        self.conn.send(encode({"t": "bid", "id": rid, "auction_id": auction_id,
                               "amount": amount,
                               "idempotency_key": f"lt-{self.index}-{self.next_id}"},
                              self.fmt))
        try:
            async with asyncio.timeout(10):
                return await fut
        except TimeoutError:
            self.pending.pop(rid, None)
            return {"t": "error", "code": "no_reply"}


class AuctionRehearsal:
    def __init__(self, cfg: AuctionConfig) -> None:
        self.cfg = cfg
        self.t0 = time.monotonic()
        self.sockets: list[Socket] = []
        self.delivery_ms: list[float] = []
        self.refused_joins: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # joined sockets the server closed
        self.stopping = False
        self.undecodable = 0
        self.notes: list[str] = []
        self.rng = random.Random(7)

    def say(self, text: str) -> None:
        if not self.cfg.quiet:
            print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    async def connect(self, ws_url: str, drop_id: int, settings: Any) -> None:
        from dropserver.auth import Role, issue_token
        from loadtest.wsclient import connect

        cfg = self.cfg
        fmt = SUBPROTOCOL[cfg.encoding]
        loopback = ws_url.startswith(("ws://127.", "ws://localhost"))  # the /ws URL
        for i in range(cfg.viewers):
            token = (issue_token(settings, f"lt-bidder-{i}", Role.VIEWER, ttl=6 * 3600,
                                 name=f"Bidder {i}") if i < cfg.bidders else None)
            sock = Socket(i, token, drop_id, fmt, self)
            source = f"127.0.0.{2 + i // cfg.per_address}" if loopback else None
            sock.conn = await connect(ws_url, sock, source=source,
                                      subprotocols=[fmt.value])
            self.sockets.append(sock)
            if cfg.connect_rate > 0 and i % 100 == 99:
                await asyncio.sleep(100 / cfg.connect_rate)
        async with asyncio.timeout(120):
            await asyncio.gather(*(s.joined.wait() for s in self.sockets))
        joined = sum(1 for s in self.sockets if not s.closed)
        self.say(f"{joined:,} of {cfg.viewers:,} viewers joined")
        if self.refused_joins:
            self.notes.append(f"sockets closed before joining: {dict(self.refused_joins)}")
            self.say(self.notes[-1])

    async def war(self, auction: dict[str, Any], offset_ms: float) -> dict[str, Any]:
        """Every bidder bids through the last seconds; returns what they were told."""
        cfg = self.cfg
        aid = int(auction["id"])
        war_start = (auction["ends_at"] - cfg.war_s * 1000 - offset_ms) / 1000  # local s
        accepted: list[dict[str, Any]] = []
        refused: Counter[str] = Counter()
        reply_ms: list[float] = []
        closed_refusals: list[int] = []  # server_time of each auction_closed refusal
        answered: list[float] = []  # local time of each answer

        async def bidder(sock: Socket) -> None:
            await asyncio.sleep(max(0.0, war_start - time.time()) + self.rng.random() * 0.5)
            raise_until = time.monotonic() + cfg.war_s
            floor = 0
            while not sock.closed:
                raising = time.monotonic() < raise_until
                amount = (max(sock.next_min.get(aid, cfg.start_price), floor)
                          + cfg.increment * self.rng.choice((0, 0, 0, 1, 2))) if raising else 1
                sent = time.monotonic()
                reply = await sock.bid(aid, amount)
                reply_ms.append((time.monotonic() - sent) * 1000)
                answered.append(time.monotonic())
                if reply.get("t") == "reply":
                    d = reply["data"]
                    accepted.append({"user_id": f"lt-bidder-{sock.index}", "seq": d["seq"],
                                     "amount": d["amount"], "at": d["server_time"],
                                     "ends_at": d["ends_at"], "extended": d["extended"]})
                else:
                    code = reply.get("code", "?")
                    refused[code] += 1
                    details = reply.get("details") or {}
                    floor = max(floor, int(details.get("min_amount") or 0))
                    if code == "auction_closed":
                        closed_refusals.append(int(details.get("server_time") or 0))
                        return
                    if code in ("no_reply", "closed"):
                        return
                await asyncio.sleep(self.rng.expovariate(1 / cfg.bid_interval_s) if raising
                                    else 0.05 + self.rng.random() * 0.1)

        bidders = [s for s in self.sockets[:cfg.bidders] if not s.closed]
        t_war = time.monotonic()
        await asyncio.gather(*(bidder(s) for s in bidders))
        window = (answered and max(answered) - t_war) or 0.0
        return {"accepted": accepted, "refused": dict(refused), "reply_ms": reply_ms,
                "closed_refusal_times": closed_refusals, "answers": len(answered),
                "answer_window_s": round(window, 2)}

    async def run(self, target: Any) -> dict[str, Any]:
        import asyncpg
        import httpx

        from dropserver.auth import Role, issue_token
        from loadtest.creator import CreatorClient

        cfg = self.cfg
        settings = target.settings
        creator_token = issue_token(settings, "lt-creator", Role.CREATOR, ttl=6 * 3600,
                                    name="Rehearsal Creator")
        creator = CreatorClient(target.base_url, creator_token)
        http = httpx.AsyncClient(base_url=target.base_url, timeout=30,
                                 headers={"authorization": f"Bearer {creator_token}"})
        results: list[dict[str, Any]] = []
        try:
            await creator.create(title=f"Auction rehearsal {cfg.viewers} viewers", units=1,
                                 price=cfg.start_price, products=cfg.auctions)
            drop_id = creator.drop_id
            assert drop_id is not None
            await creator.schedule(starts_in=60)
            await creator.go_live()
            await self.connect(target.ws_url, drop_id, settings)
            db = await asyncpg.connect(target.database_url)
            try:
                for k, product_id in enumerate(creator.product_ids):
                    resp = await http.post(f"/v1/drops/{drop_id}/auctions", json={
                        "product_id": product_id, "start_price": cfg.start_price,
                        "increment": cfg.increment, "duration_s": cfg.duration_s,
                        "snipe_window_s": cfg.snipe_window_s})
                    resp.raise_for_status()
                    auction = resp.json()
                    offset_ms = auction["server_time"] - time.time() * 1000
                    self.say(f"auction {k + 1}/{cfg.auctions} (#{auction['id']}) started, "
                             f"ends in {cfg.duration_s} s")
                    delivered_before = len(self.delivery_ms)
                    war = await self.war(auction, offset_ms)
                    closed_row = await _closed_row(db, auction["id"], within=30)
                    await asyncio.sleep(1.0)  # the last events reach every socket
                    found = await audit(db, auction["id"], war["accepted"],
                                        [s for s in self.sockets if not s.closed],
                                        closed_row)
                    delivery = self.delivery_ms[delivered_before:]
                    n_acc = len(war["accepted"])
                    results.append({
                        "auction_id": auction["id"], "bidders": cfg.bidders,
                        "bids_answered": war["answers"],
                        "bids_accepted": n_acc, "refused": war["refused"],
                        "bids_per_s": (round(war["answers"] / war["answer_window_s"], 1)
                                       if war["answer_window_s"] else None),
                        "reply": summarize(ms / 1000 for ms in war["reply_ms"]),
                        "bid_to_viewer": summarize(ms / 1000 for ms in delivery),
                        "deliveries": len(delivery),
                        "extensions": sum(1 for b in war["accepted"] if b["extended"]),
                        "outcome": closed_row["outcome"] if closed_row else None,
                        "winning_amount": closed_row["winning_amount"] if closed_row else None,
                        "failures": found})
                    self.say(f"auction #{auction['id']}: {n_acc} bids accepted of "
                             f"{war['answers']}, {results[-1]['extensions']} extensions, "
                             f"{'OK' if not found else f'{len(found)} FAILURES'}")
            finally:
                await db.close()
            with contextlib.suppress(Exception):
                await creator.end()
        finally:
            self.stopping = True
            joined = sum(1 for s in self.sockets if not s.closed)
            for s in self.sockets:
                with contextlib.suppress(Exception):
                    s.conn.close()
            await http.aclose()
            await creator.aclose()
        failures = [f"auction {r['auction_id']}: {f}" for r in results for f in r["failures"]]
        if self.undecodable:
            failures.append(f"{self.undecodable} undecodable frames")
        if self.dropped:
            failures.append(f"sockets closed during the run: {dict(self.dropped)}")
        if joined < cfg.viewers:
            failures.append(f"{cfg.viewers - joined} viewers not joined (or dropped)")
        failures += [f"auction {r['auction_id']}: no bid was accepted: no war to judge"
                     for r in results if not r["bids_accepted"]]
        return {"scenario": "auction", "config": asdict(cfg), "auctions": results,
                "viewers_joined": joined,
                "failures": failures, "passed": not failures and len(results) == cfg.auctions,
                "notes": self.notes}


async def _closed_row(db: Any, auction_id: int, within: float) -> dict[str, Any] | None:
    """The auction's row once the keeper recorded its close (every bid copied first)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        row = await db.fetchrow("SELECT * FROM auctions WHERE id = $1 AND state = 'closed'",
                                auction_id)
        if row is not None:
            return dict(row)
        await asyncio.sleep(0.2)
    return None


async def audit(db: Any, auction_id: int, accepted: list[dict[str, Any]],
                sockets: list[Socket], row: dict[str, Any] | None) -> list[str]:
    """Every broken rule of one auction, one line each (empty: it is beyond dispute)."""
    from checkout.auction_rules import bands_of, replay

    if row is None:
        return ["the auction was not recorded closed in PostgreSQL in time"]
    out: list[str] = []
    bids = [dict(r) for r in await db.fetch(
        "SELECT * FROM auction_bids WHERE auction_id = $1 ORDER BY seq", auction_id)]
    result = replay(start_price=row["start_price"],
                    bands=bands_of(row["increments"]),
                    snipe_window_ms=row["snipe_window_ms"], first_ends_at=row["ends_at_ms"],
                    reserve_price=row["reserve_price"], bids=bids)
    out += [f"rules: {p}" for p in result.problems]
    # 1. What bidders were told was accepted is what PostgreSQL kept, and nothing else.
    told = sorted((b["seq"], b["user_id"], b["amount"], b["ends_at"], b["extended"])
                  for b in accepted)
    kept = [(b["seq"], b["user_id"], b["amount"], b["ends_at_ms"], b["extended"])
            for b in bids]
    if told != kept:
        missing = set(told) - set(kept)
        extra = set(kept) - set(told)
        out.append(f"accepted bids {len(told)} vs recorded {len(kept)}: "
                   f"{len(missing)} told but not recorded, {len(extra)} recorded, not told")
    # 2. One winner at the highest bid; the close after every accepted bid.
    if bids:
        top = max(bids, key=lambda b: b["amount"])
        if (row["winner_id"], row["winning_amount"]) != (top["user_id"], top["amount"]):
            out.append(f"winner {row['winner_id']} at {row['winning_amount']}, the highest "
                       f"bid is {top['user_id']} at {top['amount']}")
        late = [b for b in bids if b["at_ms"] >= row["final_ends_at_ms"]
                or b["at_ms"] >= row["closed_at_ms"]]
        if late:
            out.append(f"{len(late)} bids accepted at or after the close")
    if result.ends_at != row["final_ends_at_ms"]:
        out.append(f"end {row['final_ends_at_ms']}, the rules give {result.ends_at}")
    if (result.leader, result.amount) != (row["winner_id"], row["winning_amount"]) and bids:
        out.append("the replay's winner differs from the recorded one")
    if result.outcome.value != row["outcome"]:
        out.append(f"outcome {row['outcome']}, the rules give {result.outcome.value}")
    # 3. Every viewer saw every bid once, in order, and the one close.
    expected_seqs = [b["seq"] for b in bids]
    wrong_stream = wrong_close = 0
    for s in sockets:
        seen = [b[0] for b in s.bids.get(auction_id, [])]
        if seen != expected_seqs:
            wrong_stream += 1
        closes = s.closes.get(auction_id, [])
        if len(closes) != 1 or any((
                closes[0].get("outcome") != row["outcome"],
                closes[0].get("amount") != row["winning_amount"],
                closes[0].get("leader_id") != row["winner_id"],
                closes[0].get("ends_at") != row["final_ends_at_ms"],
                closes[0].get("bids") != len(bids))):
            wrong_close += 1
    if wrong_stream:
        out.append(f"{wrong_stream} viewers did not see every bid once, in order")
    if wrong_close:
        out.append(f"{wrong_close} viewers did not see the one close PostgreSQL records")
    # 4. One order for the winner at the winning amount (none without a sale).
    orders = await db.fetch("SELECT user_id, amount FROM orders WHERE idempotency_key = $1",
                            f"auction:{auction_id}")
    want = 1 if row["outcome"] == "sold" else 0
    if len(orders) != want or (want and (orders[0]["user_id"], orders[0]["amount"])
                               != (row["winner_id"], row["winning_amount"])):
        out.append(f"{len(orders)} orders for the auction, {want} expected for the winner")
    return out


async def rehearse_auctions(cfg: AuctionConfig, target: Any = None) -> dict[str, Any]:
    """Run the auction rehearsal and write its JSON; returns the result."""
    from loadtest.target import LocalTarget, RemoteTarget

    stem = datetime.now(UTC).strftime("auctions-%Y%m%dT%H%M%SZ") + f"-{cfg.viewers}v"
    out_dir = Path(cfg.out_dir)
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    if target is None and cfg.target:
        from dropserver.settings import load_settings

        settings = load_settings({}, dev=True, jwt_secret=cfg.jwt_secret)
        target = RemoteTarget(cfg.target, settings, database_url=cfg.database_url)
    elif target is None:
        target = LocalTarget(
            workers=cfg.resolved_workers(),
            # Bids come from a few loopback addresses: lift the per-IP limit; a bidder
            # probing the close taps faster than a person, so the per-user one is wider.
            env={"DROPSERVER_BUY_RATE_IP": "0", "DROPSERVER_BUY_RATE_USER": "100",
                 "DROPSERVER_MAX_CONNECTIONS": str(max(18000, cfg.viewers)),
                 **cfg.server_env},
            log_path=out_dir / f"{stem}.server.log")
    rehearsal = AuctionRehearsal(cfg)
    started = await asyncio.to_thread(target.__enter__)
    try:
        rehearsal.say(f"target ready: {started.base_url}")
        result = await rehearsal.run(started)
    finally:
        await asyncio.to_thread(target.__exit__, None, None, None)
    path = out_dir / f"{stem}.json"
    await asyncio.to_thread(path.write_text, json.dumps(result, indent=1, default=str))
    result["report"] = str(path)
    if not cfg.quiet:
        print(format_result(result))
        print(f"report: {path}")
    return result


def format_result(result: dict[str, Any]) -> str:
    lines = [f"auction rehearsal: {result['viewers_joined']:,} viewers joined, "
             f"{'PASSED' if result['passed'] else 'FAILED'}"]
    for a in result["auctions"]:
        lines.append(
            f"  auction #{a['auction_id']}: {a['bids_answered']:,} bids answered "
            f"({a['bids_per_s']} /s), {a['bids_accepted']:,} accepted, "
            f"{a['extensions']} extensions, {a['outcome']} at {a['winning_amount']}; "
            f"reply p50/p99 {a['reply']['p50_ms']}/{a['reply']['p99_ms']} ms, "
            f"bid to viewer p50/p99 {a['bid_to_viewer']['p50_ms']}/"
            f"{a['bid_to_viewer']['p99_ms']} ms over {a['deliveries']:,} deliveries")
    lines += [f"  FAILURE: {f}" for f in result["failures"]]
    return "\n".join(lines)
