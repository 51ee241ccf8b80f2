"""Payments: the gateway ``DROPSERVER_PAYMENT_GATEWAY`` names, and the names callers use.

Everything that moves money goes through a :class:`Gateway`
(:mod:`checkout.payment_types`): :class:`StripeGateway` (:mod:`checkout.stripe_gateway`)
in production, :class:`FakeGateway` (:mod:`checkout.fake_gateway`) in ``dropserver
dev`` and load tests. Both return plain :class:`Intent` values; callers never see SDK
objects. This module only chooses (:func:`create_gateway`) and re-exports the types
so callers import them from one place.
"""

from __future__ import annotations

from typing import Any

from checkout.fake_gateway import FakeGateway, MemoryStore, RedisStore
from checkout.payment_types import (
    AUTHORIZATION_WINDOW_SECONDS,
    Charge,
    Dispute,
    Flow,
    Gateway,
    GatewayError,
    Intent,
    IntentStatus,
    Refund,
    Transfer,
)
from checkout.stripe_gateway import StripeGateway
from dropserver.settings import Settings

__all__ = [
    "AUTHORIZATION_WINDOW_SECONDS",
    "Charge",
    "Dispute",
    "FakeGateway",
    "Flow",
    "Gateway",
    "GatewayError",
    "Intent",
    "IntentStatus",
    "MemoryStore",
    "RedisStore",
    "Refund",
    "StripeGateway",
    "Transfer",
    "create_gateway",
]


def create_gateway(settings: Settings, redis: Any = None) -> Gateway:
    """The gateway ``DROPSERVER_PAYMENT_GATEWAY`` names; the fake one keeps its objects
    in ``redis`` when given (shared by the worker processes)."""
    if settings.payment_gateway == "stripe":
        return StripeGateway(settings.stripe_api_key, api_base=settings.stripe_api_base)
    return FakeGateway(store=RedisStore(redis) if redis is not None else None)
