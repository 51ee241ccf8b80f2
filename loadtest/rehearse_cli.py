"""``python -m loadtest rehearse``: its options, and the run they ask for.

:func:`add_arguments` declares the options (their defaults are
:class:`loadtest.rehearse.RehearsalConfig`'s); :func:`main` turns them into a config,
runs :func:`loadtest.rehearse.rehearse` within ``--max-duration`` and answers 0 when
the rehearsal passed, 1 when it failed. docs/loadtest.md explains each option.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys

from loadtest.auction_rehearsal import AuctionConfig, rehearse_auctions
from loadtest.rehearse import FLOORS, RehearsalConfig, rehearse

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RehearsalConfig()
    p.add_argument("--viewers", type=int, default=d.viewers)
    p.add_argument("--stock", type=int, default=d.stock, help="units of the one product")
    p.add_argument("--variants", type=int, default=d.variants,
                   help="the product comes in this many variants sharing its stock; each "
                        "buyer picks one (0: no variants)")
    p.add_argument("--target", default="", help="base URL of a running deployment; "
                   "default: start a local server on 127.0.0.1")
    p.add_argument("--server-workers", type=int, default=0,
                   help="local server worker processes (default: 1 per 14,000 viewers)")
    p.add_argument("--swarm-processes", type=int, default=0,
                   help="viewer processes (default: 1 per 14,000 viewers, at least 2)")
    p.add_argument("--connect-rate", type=float, default=d.connect_rate,
                   help="new connections per second, all swarm processes together")
    p.add_argument("--buy-probability", type=float, default=d.buy_probability)
    p.add_argument("--buy-delay-ms", type=float, nargs=2, default=list(d.buy_delay_ms),
                   metavar=("MIN", "MAX"), help="reaction time of a buyer, uniform")
    p.add_argument("--chat-messages", type=int, default=d.chat_messages,
                   help="chat messages sent during the countdown (a burst)")
    p.add_argument("--chat-rate", type=float, default=d.chat_rate,
                   help="chat messages per second from random viewers, from the countdown "
                   "through the rush (a chat storm)")
    p.add_argument("--probe-interval", type=float, default=d.probe_interval_s,
                   dest="probe_interval_s", help="seconds between the creator's control-"
                   "path probes (BUY NOW / close on a drop without viewers); 0: none")
    p.add_argument("--floor", choices=FLOORS, default=d.floor,
                   help="the floors measured after the drop with the same swarm: bare (a "
                   "bare websockets broadcast, what issue 16 judges against), rush (the "
                   "same, its viewers buying as the drop's did), both, none")
    p.add_argument("--no-floor", action="store_const", const="none", dest="floor",
                   help="skip the floors (--floor none)")
    p.add_argument("--floor-events", type=int, default=d.floor_events)
    p.add_argument("--floor-interval", type=float, default=d.floor_interval_s,
                   dest="floor_interval_s")
    p.add_argument("--chat-floor-intervals", type=_intervals, default=d.chat_floor_intervals,
                   metavar="MS[,MS...]", help="measure the chat floor after the drop: bare "
                   "websockets servers relaying the same --chat-rate storm through Redis, "
                   "every message to every viewer, in one batch per MS (0: unbatched), "
                   "each interval in turn on the same sockets, longest first; e.g. "
                   "1000,500,250")
    p.add_argument("--chat-floor-duration", type=float, default=d.chat_floor_s,
                   dest="chat_floor_s", metavar="S",
                   help="seconds of the chat floor's storm per interval")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of the local server (repeat), e.g. to run another "
                   "checkout: --server-env PYTHONPATH=/path/to/it")
    p.add_argument("--encoding", choices=["msgpack", "json"], default=d.encoding)
    p.add_argument("--countdown", type=float, default=d.countdown_s, dest="countdown_s")
    p.add_argument("--countdown-jitter", type=float, default=d.countdown_jitter_s,
                   dest="countdown_jitter_s", metavar="S",
                   help="BUY NOW up to S seconds (uniform) later than --countdown: not "
                   "on the beat of a big room's chat batches")
    p.add_argument("--rush-timeout", type=float, default=d.rush_timeout_s,
                   dest="rush_timeout_s")
    p.add_argument("--max-duration", type=float, default=d.max_duration_s,
                   dest="max_duration_s", help="hard limit of the whole run, seconds")
    p.add_argument("--p99-budget-ms", type=float, default=d.p99_budget_ms)
    p.add_argument("--source-address", action="append", default=[], dest="source_addresses",
                   help="local address to connect from (repeat); default on loopback: "
                   "127.0.0.2, 127.0.0.3, ...")
    p.add_argument("--jwt-secret", default=os.environ.get("DROPSERVER_JWT_SECRET", ""),
                   help="remote targets: the HS256 secret viewer tokens are signed with")
    p.add_argument("--database-url", default="", help="remote targets: PostgreSQL URL "
                   "for the oversell audit (read only)")
    p.add_argument("--fault", default="", dest="fault_command", metavar="COMMAND",
                   help="shell command run in the rush, --fault-after seconds after BUY NOW "
                   "(e.g. 'python -m loadtest cluster kill node2'); the run then waits for "
                   "every viewer it cost a socket to rejoin, and reports how long they took")
    p.add_argument("--fault-after", type=float, default=0.5, dest="fault_after_s",
                   help="seconds after the creator's BUY NOW request was answered")
    p.add_argument("--recovery-budget", type=float, default=10.0, dest="recovery_budget_s",
                   help="every viewer lost to the fault back within this many seconds")
    p.add_argument("--giveaway", action="store_true",
                   help="the giveaway scenario: between going live and BUY NOW the "
                   "creator opens a giveaway and the viewers enter (loadtest.giveaway)")
    p.add_argument("--giveaway-window", type=float, default=d.giveaway_window_s,
                   dest="giveaway_window_s", help="the entry window, seconds (entries "
                   "are spread over its first 80 %%)")
    p.add_argument("--giveaway-winners", type=int, default=d.giveaway_winners)
    p.add_argument("--enter-probability", type=float, default=d.enter_probability,
                   help="the share of viewers who enter the giveaway")
    p.add_argument("--out", default=d.out_dir, dest="out_dir")
    p.add_argument("--quiet", action="store_true")
    a = AuctionConfig()
    g = p.add_argument_group("auctions (--scenario auction)")
    g.add_argument("--scenario", choices=["drop", "auction"], default="drop",
                   help="drop: BUY NOW and a rush (default); auction: bidding wars, audited "
                   "(loadtest.auction_rehearsal)")
    g.add_argument("--bidders", type=int, default=a.bidders,
                   help="viewers that bid (the first N, signed in)")
    g.add_argument("--auctions", type=int, default=a.auctions, help="auctions, one after "
                   "another, each of a single-unit product")
    g.add_argument("--auction-duration", type=int, default=a.duration_s, dest="duration_s")
    g.add_argument("--snipe-window", type=int, default=a.snipe_window_s,
                   dest="snipe_window_s", help="seconds: a bid with less left resets the "
                   "clock to this")
    g.add_argument("--war-seconds", type=float, default=a.war_s, dest="war_s",
                   help="bidders raise from this long before the end, for this long")
    g.add_argument("--bid-interval", type=float, default=a.bid_interval_s,
                   dest="bid_interval_s", help="mean seconds between one bidder's bids")


def _intervals(text: str) -> tuple[int, ...]:
    """``250,500,1000`` -> ``(250, 500, 1000)``: ms, 0 or more each."""
    try:
        found = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of ms: {text!r}") from None
    if not found or any(ms < 0 for ms in found):
        raise argparse.ArgumentTypeError(f"not a list of ms (0 or more each): {text!r}")
    return found


def _server_env(args: argparse.Namespace) -> dict[str, str]:
    env = {}
    for item in getattr(args, "server_env", None) or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--server-env wants NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def main(args: argparse.Namespace) -> int:
    if getattr(args, "scenario", "drop") == "auction":
        return auction_main(args)
    fields = {f: getattr(args, f) for f in RehearsalConfig.__dataclass_fields__
              if hasattr(args, f)}
    fields["buy_delay_ms"] = tuple(fields["buy_delay_ms"])
    fields["server_env"] = _server_env(args)
    fields["command"] = "python -m loadtest " + shlex.join(sys.argv[1:])
    if getattr(args, "fault_command", ""):
        from loadtest.fault import Fault

        fields["fault"] = Fault(after_s=args.fault_after_s, command=args.fault_command,
                                budget_s=args.recovery_budget_s)
    try:
        cfg = RehearsalConfig(**fields)
    except ValueError as exc:  # e.g. a chat floor without a chat storm
        raise SystemExit(f"rehearse: {exc}") from None
    result = asyncio.run(asyncio.wait_for(rehearse(cfg), cfg.max_duration_s + 120))
    return 0 if result.get("passed") else 1


def auction_main(args: argparse.Namespace) -> int:
    if getattr(args, "giveaway", False):
        raise SystemExit("--giveaway is a step of the drop scenario; --scenario auction "
                         "runs auctions only")
    fields = {f: getattr(args, f) for f in AuctionConfig.__dataclass_fields__
              if hasattr(args, f) and f not in ("server_env", "command")}
    cfg = AuctionConfig(**fields, server_env=_server_env(args),
                        command="python -m loadtest " + shlex.join(sys.argv[1:]))
    if cfg.bidders > cfg.viewers:
        raise SystemExit("--bidders cannot exceed --viewers")
    result = asyncio.run(asyncio.wait_for(rehearse_auctions(cfg), cfg.max_duration_s + 120))
    return 0 if result.get("passed") else 1
