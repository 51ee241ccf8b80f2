"""Helpers shared by the payments tests: rows in PostgreSQL, entries in the order stream.

The order stream entries are written in the documented format of reserve.lua /
release.lua (docs/topics/checkout.md) so the worker sees exactly what production feeds it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest

from checkout import inventory, keys
from tests.stripe_stub import StripeStub


@dataclass
class Recorder:
    """A notify callable that records (user, event, data) for assertions."""

    events: list[tuple[str, str, dict]] = field(default_factory=list)

    async def __call__(self, redis: Any, user_id: str, event: str, data: dict) -> None:
        self.events.append((user_id, event, data))

    def of(self, event: str) -> list[dict]:
        return [d for _, e, d in self.events if e == event]


async def make_drop(db: asyncpg.Pool | asyncpg.Connection, *, kind: str = "standard",
                    price: int = 2500, units: int = 100, cogs: int = 0,
                    state: str = "selling", creator: str = "creator-1",
                    goal: int | None = None, deadline_s: float | None = None,
                    currency: str = "usd") -> tuple[int, int]:
    """A drop with one product; returns (drop_id, product_id)."""
    await db.execute("INSERT INTO users (id, role) VALUES ($1, 'creator') "
                     "ON CONFLICT DO NOTHING", creator)
    product_id = await db.fetchval(
        "INSERT INTO products (creator_id, title) VALUES ($1, 'Tee') RETURNING id", creator)
    drop_id = await db.fetchval(
        """INSERT INTO drops (creator_id, title, kind, state, currency,
               campaign_goal_orders, campaign_deadline, campaign_outcome)
           VALUES ($1, 'Drop', $2, $3, $4, $5,
                   CASE WHEN $6::float8 IS NULL THEN NULL
                        ELSE now() + make_interval(secs => $6::float8) END,
                   CASE WHEN $2 = 'campaign' THEN 'pending' END)
           RETURNING id""",
        creator, kind, state, currency, goal, deadline_s)
    await db.execute(
        "INSERT INTO drop_products (drop_id, product_id, price, units, cogs) "
        "VALUES ($1, $2, $3, $4, $5)", drop_id, product_id, price, units, cogs)
    return drop_id, product_id


async def save_card(db: Any, user_id: str, pm: str = "pm_card_visa") -> None:
    await db.execute(
        """INSERT INTO users (id, default_payment_method, stripe_customer_id)
           VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE
           SET default_payment_method = $2, stripe_customer_id = $3""",
        user_id, pm, f"cus_{user_id}")


_buyer_numbers: dict[tuple[int, int], int] = {}


async def add_reserve(redis: Any, drop_id: int, product_id: int, user_id: str, *,
                      price: int = 2500, quantity: int = 1, flow: str = "client_confirm",
                      ttl_s: float = 600, currency: str = "usd",
                      hold_id: str | None = None) -> str:
    """Append a reserve entry as reserve.lua does; register the drop; return hold id."""
    hold_id = hold_id or keys.new_hold_id(drop_id, product_id)
    n = _buyer_numbers.get((drop_id, product_id), 0) + 1
    _buyer_numbers[(drop_id, product_id)] = n
    # loaded as go-live does, so recovery sees a prewarmed drop and leaves it alone
    await inventory.prewarm(redis, {"id": drop_id, "currency": currency},
                            [{"product_id": product_id, "price": price, "units": 1000}])
    await redis.xadd(keys.orders(drop_id), {
        "type": "reserve", "hold_id": hold_id, "drop_id": drop_id,
        "product_id": product_id, "user_id": user_id, "quantity": quantity,
        "buyer_number": n, "unit_price": price, "amount": price * quantity,
        "currency": currency, "idempotency_key": secrets.token_hex(8),
        "expires_at": int((time.time() + ttl_s) * 1000), "flow": flow})
    return hold_id


async def add_release(redis: Any, drop_id: int, hold_id: str, reason: str = "expired"
                      ) -> None:
    ref = keys.parse_hold_id(hold_id)
    await redis.xadd(keys.orders(drop_id), {
        "type": "release", "hold_id": hold_id, "drop_id": drop_id,
        "product_id": ref.product_id if ref else 0, "user_id": "", "quantity": 1,
        "reason": reason})


async def order_row(db: Any, hold_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT o.*, p.intent_id, p.status AS payment_status, p.fee, p.amount_received "
        "FROM orders o LEFT JOIN payments p ON p.order_id = o.id WHERE o.public_id = $1",
        hold_id)


# -- a real server wired to the Stripe stub ----------------------------------------

@pytest.fixture(scope="module")
def stub() -> Iterator[StripeStub]:
    with StripeStub() as s:
        yield s


@pytest.fixture
async def stripe_server(settings, stub) -> AsyncIterator[Any]:
    """The real app under uvicorn with the Stripe gateway pointed at the stub."""
    from tests.conftest import start_server

    s = settings.replace(payment_gateway="stripe", stripe_api_key="sk_test_x",
                         stripe_api_base=stub.url,
                         stripe_webhook_secret=stub.webhook_secret,
                         order_claim_idle_ms=500, campaign_check_interval=0.2)
    running, stop = await start_server(s)
    try:
        yield running
    finally:
        await stop()


@pytest.fixture
async def client(stripe_server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stripe_server.base_url, timeout=10) as c:
        yield c


async def wait_for(check, within: float = 10.0, interval: float = 0.05):
    """Await ``check()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; last value {value!r}")
        await asyncio.sleep(interval)


async def wait_state(db: Any, hold_id: str, state: str, within: float = 10.0):
    async def check():
        row = await order_row(db, hold_id)
        return row if row is not None and row["state"] == state else None
    return await wait_for(check, within)
