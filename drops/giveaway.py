"""A giveaway's provably fair draw, and the rules of its input. Pure: no I/O.

The draw (docs/topics/giveaways.md has the same text and a script that checks it):

1. When the giveaway opens the server picks a secret ``seed`` of 32 random bytes and
   publishes ``commitment = SHA-256(seed)`` (lowercase hex) at once; the seed is
   published at the draw, so anyone can check it is the one committed to.
2. Each distinct entrant gets the ticket ``HMAC-SHA256(key=seed, msg=user id as
   UTF-8)`` (lowercase hex). The published entrant list is the tickets: a viewer who
   knows their own user id finds their ticket in it; nobody learns others' ids.
3. The tickets are sorted (as ASCII strings, which for hex is byte order).
4. A partial Fisher-Yates shuffle of that list, driven by the random stream
   ``block(c) = HMAC-SHA256(key=seed, msg=b"draw" || c as 8 bytes big-endian)`` for
   c = 0, 1, 2, ...: for i = 0 .. k-1 (k = min(winners, entrants)), take
   ``j = i + uniform(n - i)`` and swap positions i and j. The first k tickets, in
   order, are the winners (rank 1 first).
5. ``uniform(bound)`` takes the next block's first 8 bytes as a big-endian integer x
   and returns ``x mod bound`` if ``x < 2^64 - (2^64 mod bound)``, else it takes the
   next block (rejection sampling: no modulo bias).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "GiveawayState",
    "Refusal",
    "commitment",
    "draw",
    "new_seed",
    "ticket",
    "verify",
]

SEED_BYTES = 32
_TWO_64 = 1 << 64


class GiveawayState(enum.StrEnum):
    OPEN = "open"       # taking entries until closes_at (Redis' clock)
    DRAWN = "drawn"     # the window closed, the winners drawn, the seed published


class Refusal(enum.StrEnum):
    """Why an entry is refused (an ``error`` frame's code, an HTTP error's code)."""

    NOT_FOUND = "giveaway_not_found"      # no such giveaway in this drop (404)
    CLOSED = "giveaway_closed"            # the entry window has ended (409)
    NOT_PRESENT = "not_present"           # present viewers only, and not present (403)
    NOT_BOUGHT = "not_a_buyer"            # buyers of this drop only (403)
    NOT_ELIGIBLE = "not_eligible"         # the drop's creator or an admin (403)


def new_seed() -> bytes:
    return secrets.token_bytes(SEED_BYTES)


def commitment(seed: bytes) -> str:
    """``SHA-256(seed)``, lowercase hex: published when the giveaway opens."""
    return hashlib.sha256(seed).hexdigest()


def ticket(seed: bytes, user_id: str) -> str:
    """An entrant's ticket: ``HMAC-SHA256(seed, user_id)``, lowercase hex."""
    return hmac.new(seed, user_id.encode(), hashlib.sha256).hexdigest()


class _Stream:
    """The draw's random numbers: HMAC-SHA256 in counter mode, unbiased bounds."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self.counter = 0

    def _next64(self) -> int:
        block = hmac.new(self.seed, b"draw" + self.counter.to_bytes(8, "big"),
                         hashlib.sha256).digest()
        self.counter += 1
        return int.from_bytes(block[:8], "big")

    def uniform(self, bound: int) -> int:
        """A uniform integer in ``[0, bound)``."""
        if bound < 1:
            raise ValueError("bound must be >= 1")
        limit = _TWO_64 - (_TWO_64 % bound)
        while True:
            x = self._next64()
            if x < limit:
                return x % bound


def draw(seed: bytes, tickets: Iterable[str], winners: int) -> list[str]:
    """The winning tickets in rank order (see the module docstring)."""
    if winners < 1:
        raise ValueError("winners must be >= 1")
    pool = sorted(set(tickets))
    n = len(pool)
    stream = _Stream(seed)
    for i in range(min(winners, n)):
        j = i + stream.uniform(n - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:min(winners, n)]


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of :func:`verify`."""

    ok: bool
    problem: str = ""


def verify(seed_hex: str, commitment_hex: str, tickets: Iterable[str], winners: int,
           announced: list[str]) -> Check:
    """Whether a published draw follows from its seed: the commitment matches the
    seed and the announced winning tickets are what :func:`draw` gives."""
    seed = bytes.fromhex(seed_hex)
    if commitment(seed) != commitment_hex:
        return Check(False, "the seed does not match the commitment")
    expected = draw(seed, tickets, winners)
    if expected != list(announced):
        return Check(False, f"the winners should be {expected}")
    return Check(True)
