"""Auction rules: the spec a creator starts, what a bid must be, refusals, the audit.

Pure: no I/O. ``scripts/bid.lua`` and ``scripts/auction_close.lua`` apply these rules
atomically in Redis; :func:`replay` applies them again to a list of accepted bids
(PostgreSQL's ``auction_bids``), so the audit recomputes every auction's winner, its
end time and each extension from the bids alone and compares with what viewers saw.
Design: docs/topics/auctions.md.
"""

from __future__ import annotations

import enum
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dropserver.errors import ApiError, ValidationFailed

__all__ = [
    "AuctionSpec",
    "BidRefusal",
    "BidRefused",
    "Outcome",
    "ReplayResult",
    "bands_of",
    "decode_increments",
    "encode_increments",
    "min_next",
    "parse_spec",
    "replay",
    "step_at",
]

MAX_PRICE = 10**12          # minor units: 10 billion of a currency, far above any auction
MAX_BANDS = 20
MIN_DURATION_S, MAX_DURATION_S = 5, 3600
MAX_SNIPE_WINDOW_S = 300
DEFAULT_SNIPE_WINDOW_S = 10
_IDEM_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # as a buy's key: printable ASCII


class Outcome(enum.StrEnum):
    """How an auction ended (``auctions.outcome``)."""

    SOLD = "sold"                        # the winner holds the unit at the winning price
    RESERVE_NOT_MET = "reserve_not_met"  # the highest bid stayed under the reserve
    NO_BIDS = "no_bids"
    NO_STOCK = "no_stock"                # the unit was sold otherwise meanwhile


class BidRefusal(enum.StrEnum):
    """Why a bid was refused: the ``code`` of the error frame / HTTP body."""

    AUCTION_NOT_FOUND = "auction_not_found"
    AUCTION_CLOSED = "auction_closed"      # at or after the end by Redis' clock
    BID_TOO_LOW = "bid_too_low"            # under the next minimum (details.min_amount)
    ALREADY_LEADING = "already_leading"    # the leader may not outbid themselves
    BANNED = "banned"
    RATE_LIMITED = "rate_limited"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"

    @property
    def status(self) -> int:
        return _STATUS[self]

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_STATUS = {
    BidRefusal.AUCTION_NOT_FOUND: 404,
    BidRefusal.AUCTION_CLOSED: 409,
    BidRefusal.BID_TOO_LOW: 409,
    BidRefusal.ALREADY_LEADING: 409,
    BidRefusal.BANNED: 403,
    BidRefusal.RATE_LIMITED: 429,
    BidRefusal.IDEMPOTENCY_MISMATCH: 422,
}
_MESSAGES = {
    BidRefusal.AUCTION_NOT_FOUND: "no such auction running in this drop",
    BidRefusal.AUCTION_CLOSED: "the auction has ended",
    BidRefusal.BID_TOO_LOW: "a higher bid is needed",
    BidRefusal.ALREADY_LEADING: "you already lead this auction",
    BidRefusal.BANNED: "you are banned from this drop",
    BidRefusal.RATE_LIMITED: "too many bids, slow down",
    BidRefusal.IDEMPOTENCY_MISMATCH: "this idempotency key was used for a different bid",
}


class BidRefused(ApiError):
    """A refused bid; ``refusal`` is the reason. ``details`` carry ``min_amount`` (the
    lowest bid accepted now), ``ends_at`` and ``server_time`` (unix ms) so a client
    can correct its bid and its clock in one go."""

    def __init__(self, refusal: BidRefusal, *, min_amount: int = 0, ends_at: int = 0,
                 server_time: int = 0, detail: str = "") -> None:
        details: dict[str, Any] = {}
        if min_amount:
            details["min_amount"] = min_amount
        if ends_at:
            details["ends_at"] = ends_at
        if server_time:
            details["server_time"] = server_time
        if refusal is BidRefusal.RATE_LIMITED and detail:
            details["scope"] = detail
        headers = {"Retry-After": "2"} if refusal is BidRefusal.RATE_LIMITED else None
        super().__init__(refusal.message, code=refusal.value, status=refusal.status,
                         details=details, headers=headers)
        self.refusal = refusal


# -- increments ------------------------------------------------------------------------

Bands = tuple[tuple[int, int], ...]  # ((from_price, step), ...), ascending, first from 0


def encode_increments(bands: Bands) -> str:
    """The form the scripts read: ``"from:step,from:step"``."""
    return ",".join(f"{lo}:{step}" for lo, step in bands)


def decode_increments(text: str) -> Bands:
    return tuple((int(lo), int(step)) for lo, step in
                 (part.split(":") for part in text.split(",") if part))


def bands_of(value: Any) -> Bands:
    """``auctions.increments`` as read: a list (the app's pool decodes JSON) or its
    JSON text (a plain asyncpg connection)."""
    if isinstance(value, str):
        value = json.loads(value)
    return tuple((int(lo), int(step)) for lo, step in value)


def step_at(bands: Bands, price: int) -> int:
    """The minimum increment at ``price``: the last band whose ``from`` <= price."""
    step = 1
    for lo, s in bands:
        if price >= lo:
            step = s
    return step


def min_next(bands: Bands, start_price: int, leading: int | None) -> int:
    """The lowest acceptable bid: the start price before any bid, then the leading
    amount plus the increment at that amount (bid.lua's ``min_next``)."""
    if leading is None:
        return start_price
    return leading + step_at(bands, leading)


# -- the creator's spec ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AuctionSpec:
    product_id: int
    start_price: int
    increments: Bands
    duration_ms: int
    snipe_window_ms: int
    reserve_price: int | None = None


_SPEC_FIELDS = frozenset({"product_id", "start_price", "increment", "increments",
                          "duration_s", "snipe_window_s", "reserve_price"})


def _int(data: Mapping[str, Any], name: str, lo: int, hi: int,
         default: int | None = None) -> int:
    value = data.get(name, default)
    if value is None:
        raise ValidationFailed(f"{name} is required", details={"field": name})
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationFailed(f"{name} must be an integer from {lo} to {hi}",
                               details={"field": name})
    return value


def parse_spec(data: Mapping[str, Any]) -> AuctionSpec:
    """The creator's body (``POST /v1/drops/{id}/auctions``) as a spec, or 422."""
    unknown = sorted(set(data) - _SPEC_FIELDS)
    if unknown:
        raise ValidationFailed(f"unknown field {unknown[0]}", details={"field": unknown[0]})
    product_id = _int(data, "product_id", 1, 2**62)
    start = _int(data, "start_price", 1, MAX_PRICE)
    if "increment" in data and "increments" in data:
        raise ValidationFailed("give increment or increments, not both",
                               details={"field": "increments"})
    if "increments" in data:
        raw = data["increments"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_BANDS:
            raise ValidationFailed(f"increments must be a list of 1 to {MAX_BANDS} bands",
                                   details={"field": "increments"})
        bands = []
        for band in raw:
            if not isinstance(band, dict) or set(band) != {"from", "step"}:
                raise ValidationFailed('each band is {"from": price, "step": increment}',
                                       details={"field": "increments"})
            bands.append((_int(band, "from", 0, MAX_PRICE), _int(band, "step", 1, MAX_PRICE)))
        if bands[0][0] != 0 or any(b[0] >= c[0] for b, c in itertools.pairwise(bands)):
            raise ValidationFailed("bands must start from 0 and ascend",
                                   details={"field": "increments"})
        increments: Bands = tuple(bands)
    else:
        increments = ((0, _int(data, "increment", 1, MAX_PRICE, default=max(start // 20, 1))),)
    duration_s = _int(data, "duration_s", MIN_DURATION_S, MAX_DURATION_S)
    snipe_s = _int(data, "snipe_window_s", 0, MAX_SNIPE_WINDOW_S,
                   default=min(DEFAULT_SNIPE_WINDOW_S, duration_s))
    reserve = data.get("reserve_price")
    if reserve is not None:
        reserve = _int(data, "reserve_price", start, MAX_PRICE)
    return AuctionSpec(product_id, start, increments, duration_s * 1000, snipe_s * 1000,
                       reserve)


def check_idempotency_key(key: Any) -> str:
    if not isinstance(key, str) or not _IDEM_RE.match(key):
        raise ValidationFailed("idempotency_key must be 1-255 printable ASCII characters",
                               details={"field": "idempotency_key"})
    return key


# -- the audit -------------------------------------------------------------------------

@dataclass
class ReplayResult:
    """An auction recomputed from its accepted bids."""

    ends_at: int                                 # the end time the last bid left
    leader: str | None = None
    amount: int | None = None
    seq: int = 0
    outcome: Outcome = Outcome.NO_BIDS
    problems: list[str] = field(default_factory=list)


def replay(*, start_price: int, bands: Bands, snipe_window_ms: int, first_ends_at: int,
           reserve_price: int | None, bids: Sequence[Mapping[str, Any]],
           unit_left: bool = True) -> ReplayResult:
    """Apply the rules to the accepted bids in ``seq`` order: each must be 1, 2, 3...,
    at least the next minimum, from someone not leading, before the end as it stood,
    and carry the end time and extension flag the anti-snipe rule gives. Every
    deviation is listed in ``problems`` (empty: the auction is consistent)."""
    out = ReplayResult(ends_at=first_ends_at)
    for expected_seq, bid in enumerate(sorted(bids, key=lambda b: b["seq"]), start=1):
        seq, amount, at = int(bid["seq"]), int(bid["amount"]), int(bid["at_ms"])
        if seq != expected_seq:
            out.problems.append(f"bid seq {seq}: expected {expected_seq}")
        need = min_next(bands, start_price, out.amount)
        if amount < need:
            out.problems.append(f"bid seq {seq}: {amount} under the minimum {need}")
        if bid["user_id"] == out.leader:
            out.problems.append(f"bid seq {seq}: the leader outbid themselves")
        if at >= out.ends_at:
            out.problems.append(f"bid seq {seq}: accepted at {at}, after the end {out.ends_at}")
        extended = out.ends_at - at < snipe_window_ms
        ends_at = at + snipe_window_ms if extended else out.ends_at
        if bool(bid["extended"]) != extended or int(bid["ends_at_ms"]) != ends_at:
            out.problems.append(
                f"bid seq {seq}: extension {bool(bid['extended'])}/{bid['ends_at_ms']}, "
                f"the rule gives {extended}/{ends_at}")
        out.ends_at, out.leader, out.amount, out.seq = ends_at, bid["user_id"], amount, seq
    if out.seq == 0:
        out.outcome = Outcome.NO_BIDS
    elif reserve_price is not None and (out.amount or 0) < reserve_price:
        out.outcome = Outcome.RESERVE_NOT_MET
    elif not unit_left:
        out.outcome = Outcome.NO_STOCK
    else:
        out.outcome = Outcome.SOLD
    return out
