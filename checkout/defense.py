"""Bot defence for the buy path: attempt limits, velocity, and a verifier hook.

Where each check runs, and why:

* **Per-user and per-IP attempt limits** (``DROPSERVER_BUY_RATE_USER`` /
  ``DROPSERVER_BUY_RATE_IP`` per 10 s) and the **velocity check** run *inside*
  ``reserve.lua``, before its first stock write. One script means one Redis round trip
  per buy (the budget of the hot path), and the limit and the stock decision see the
  same instant. The counters are keyed per drop (``{drop:D}:rl:u:<user>``,
  ``{drop:D}:rl:ip:<ip>``) so they share the drop's cluster slot; a bot is limited
  drop by drop, which is where it does harm. The window is a sliding-window
  approximation (two fixed buckets, the previous one weighted by its overlap): O(1)
  memory per subject, never lets a burst through at a bucket edge by more than the
  weighting error. Refused attempts count too, so hammering keeps a client refused.
* **Velocity**: during the first ``DROPSERVER_BUY_VELOCITY_WINDOW_MS`` after BUY NOW
  a user may make at most ``DROPSERVER_BUY_VELOCITY_MAX`` attempts (a human taps a
  few times; a script fires dozens), code ``velocity_exceeded``.
* **One open hold per user per product** unless the drop allows more
  (``drops.max_holds_per_user``): in ``reserve.lua``, code ``hold_exists``.
* **Verifier** (captcha, device attestation): a pluggable :class:`Verifier` awaited
  in Python *before* the script, because it may call out to a provider. The default
  accepts; ``DROPSERVER_BUY_VERIFIER=module:attr`` names another (``RejectAll`` is
  the test verifier). A refusal is ``captcha_required`` (403).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from dropserver.errors import ApiError
from dropserver.settings import Settings

__all__ = ["AcceptAll", "BuyAttempt", "BuyLimits", "RejectAll", "Verifier", "load_verifier"]

RATE_WINDOW_MS = 10_000  # the buy_rate_* settings are "per 10 s"


@dataclass(frozen=True, slots=True)
class BuyLimits:
    """The limits reserve.lua enforces (0 turns one off)."""

    window_ms: int = RATE_WINDOW_MS
    per_user: int = 10
    per_ip: int = 100
    velocity_window_ms: int = 2000
    velocity_max: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> BuyLimits:
        return cls(
            per_user=settings.buy_rate_per_user,
            per_ip=settings.buy_rate_per_ip,
            velocity_window_ms=settings.buy_velocity_window_ms,
            velocity_max=settings.buy_velocity_max,
        )

    def script_args(self) -> list[int]:
        return [self.window_ms, self.per_user, self.per_ip, self.velocity_window_ms,
                self.velocity_max]


@dataclass(frozen=True, slots=True)
class BuyAttempt:
    """What a verifier sees of one buy attempt."""

    user_id: str
    drop_id: int
    product_id: int
    ip: str
    # Whatever the client sent for the check (captcha token, attestation blob).
    proof: Any = None


@runtime_checkable
class Verifier(Protocol):
    async def verify(self, attempt: BuyAttempt) -> bool:
        """True lets the attempt through; False refuses it with ``captcha_required``."""
        ...


class AcceptAll:
    """The default: no captcha, no attestation."""

    async def verify(self, attempt: BuyAttempt) -> bool:
        return True


class RejectAll:
    """Refuses every attempt (tests, or an emergency switch during an attack)."""

    async def verify(self, attempt: BuyAttempt) -> bool:
        return False


def load_verifier(path: str) -> Verifier:
    """``""`` -> :class:`AcceptAll`; ``"module:attr"`` -> that class (instantiated) or
    object."""
    if not path:
        return AcceptAll()
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"DROPSERVER_BUY_VERIFIER must look like module:attr, got {path!r}")
    obj = getattr(importlib.import_module(module_name), attr)
    verifier = obj() if isinstance(obj, type) else obj
    if not isinstance(verifier, Verifier):
        raise ValueError(f"{path} has no async verify(attempt) method")
    return verifier


async def check(verifier: Verifier, attempt: BuyAttempt) -> None:
    """Raise ``captcha_required`` unless the verifier lets the attempt through."""
    if not await verifier.verify(attempt):
        raise ApiError("complete the verification challenge, then retry",
                       code="captcha_required", status=403)
