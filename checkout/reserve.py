"""Reserve stock: the buy decision (``reserve.lua``) and what it answers.

The pure part maps the script's reply to a :class:`Hold` or a :class:`Refusal` with
its HTTP status; the adapter :func:`reserve` makes the one Redis round trip. Callers
(the WebSocket ``buy`` command, ``POST /v1/drops/{id}/buy``) live in
:mod:`checkout.reservations_api`.
"""

from __future__ import annotations

import asyncio
import enum
import os
import re
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.exceptions import NoScriptError

from checkout import keys
from checkout.cluster_pipe import ClusterAutoPipeline
from checkout.defense import BuyLimits
from checkout.redis_pipe import AutoPipeline
from checkout.scripts import script
from dropserver.errors import ApiError
from dropserver.redis_client import connect, is_cluster

__all__ = [
    "BuyRefused",
    "BuyRequest",
    "Flow",
    "Hold",
    "Refusal",
    "ReserveBatcher",
    "auto_pipeline",
    "hot_path_client",
    "parse_reply",
    "reserve",
]

MAX_IDEMPOTENCY_KEY = 255  # as Stripe's Idempotency-Key
_IDEM_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces


class Refusal(enum.StrEnum):
    """Why a buy was refused: the ``code`` of the error frame / HTTP body."""

    NOT_READY = "not_ready"              # the drop is being rebuilt: retry shortly
    NOT_SELLING = "not_selling"
    SOLD_OUT = "sold_out"
    NOT_ENOUGH_STOCK = "not_enough_stock"
    LIMIT_REACHED = "limit_reached"      # per-buyer unit limit of the product
    HOLD_EXISTS = "hold_exists"          # max open holds per user per product
    RATE_LIMITED = "rate_limited"
    VELOCITY_EXCEEDED = "velocity_exceeded"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"
    IDEMPOTENCY_KEY_EXPIRED = "idempotency_key_expired"
    VARIANT_REQUIRED = "variant_required"    # the product has variants: name one
    UNKNOWN_VARIANT = "unknown_variant"      # not a variant of this product

    @property
    def status(self) -> int:
        return _STATUS[self]

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_STATUS = {
    Refusal.NOT_READY: 503,
    Refusal.NOT_SELLING: 409,
    Refusal.SOLD_OUT: 409,
    Refusal.NOT_ENOUGH_STOCK: 409,
    Refusal.LIMIT_REACHED: 409,
    Refusal.HOLD_EXISTS: 409,
    Refusal.RATE_LIMITED: 429,
    Refusal.VELOCITY_EXCEEDED: 429,
    Refusal.IDEMPOTENCY_MISMATCH: 422,
    Refusal.IDEMPOTENCY_KEY_EXPIRED: 422,
    Refusal.VARIANT_REQUIRED: 422,
    Refusal.UNKNOWN_VARIANT: 422,
}
_MESSAGES = {
    Refusal.NOT_READY: "sales are resuming, retry in a moment",
    Refusal.NOT_SELLING: "this product is not on sale",
    Refusal.SOLD_OUT: "sold out",
    Refusal.NOT_ENOUGH_STOCK: "fewer units left than requested",
    Refusal.LIMIT_REACHED: "you reached the per-buyer limit for this product",
    Refusal.HOLD_EXISTS: "you already hold this product; pay or cancel that hold first",
    Refusal.RATE_LIMITED: "too many buy attempts, slow down",
    Refusal.VELOCITY_EXCEEDED: "too many buy attempts right after BUY NOW",
    Refusal.IDEMPOTENCY_MISMATCH: "this idempotency key was used for a different buy",
    Refusal.IDEMPOTENCY_KEY_EXPIRED: "this idempotency key's hold is gone; use a new key",
    Refusal.VARIANT_REQUIRED: "this product comes in variants: name one (variant_id)",
    Refusal.UNKNOWN_VARIANT: "variant_id is not a variant of this product",
}


class Flow(enum.StrEnum):
    """How the order will be paid (``orders.payment_flow``)."""

    CLIENT_CONFIRM = "client_confirm"    # Stripe.js confirms with the client secret
    OFF_SESSION = "off_session"          # one-tap with the saved card
    MANUAL_CAPTURE = "manual_capture"    # campaign drops: authorize now, capture later


class BuyRefused(ApiError):
    """A refused buy; ``refusal`` is the reason, ``code`` its string."""

    def __init__(self, refusal: Refusal, detail: str = "") -> None:
        headers = None
        if refusal is Refusal.SOLD_OUT or refusal is Refusal.NOT_ENOUGH_STOCK:
            # Most of a rush's answers: the units left, looked at first.
            details: dict[str, Any] = ({"remaining": int(detail)} if detail.isdigit()
                                       else {"detail": detail} if detail else {})
        elif refusal is Refusal.VARIANT_REQUIRED:
            details = {"field": "variant_id",
                       "variant_ids": [int(v) for v in detail.split(",") if v.isdigit()]}
        elif refusal is Refusal.UNKNOWN_VARIANT:
            details = {"field": "variant_id"}
        elif refusal is Refusal.RATE_LIMITED:
            details = {"scope": detail}
            headers = {"Retry-After": "2"}
        elif refusal is Refusal.VELOCITY_EXCEEDED:
            details = {}
            headers = {"Retry-After": "2"}
        else:
            details = {"detail": detail} if detail else {}
            if refusal is Refusal.NOT_READY:
                headers = {"Retry-After": "1"}
        message, code, status = _FACE[refusal]
        super().__init__(message, code=code, status=status, details=details,
                         headers=headers)
        self.refusal = refusal


# What a refusal shows: message, code, status (looked up once per refusal, not through
# the enum's properties); and the refusal a script's reply names, by its bytes or str.
_FACE = {r: (_MESSAGES[r], r.value, _STATUS[r]) for r in Refusal}
_BY_CODE: dict[bytes | str, Refusal] = {
    **{r.value: r for r in Refusal}, **{r.value.encode(): r for r in Refusal}}


@dataclass(frozen=True, slots=True)
class BuyRequest:
    drop_id: int
    product_id: int
    user_id: str
    idempotency_key: str
    quantity: int = 1
    ip: str = ""
    flow: str = ""  # "" = the drop's default
    variant_id: int | None = None  # None: a product without variants

    def validate(self) -> None:
        from dropserver.errors import ValidationFailed

        if not isinstance(self.idempotency_key, str) or not _IDEM_RE.match(
                self.idempotency_key):
            raise ValidationFailed("idempotency_key must be 1-255 printable ASCII characters",
                                   details={"field": "idempotency_key"})
        if not 1 <= self.quantity <= 100:
            raise ValidationFailed("quantity must be between 1 and 100",
                                   details={"field": "quantity"})
        if self.flow and self.flow not in (Flow.CLIENT_CONFIRM, Flow.OFF_SESSION):
            raise ValidationFailed("flow must be client_confirm or off_session",
                                   details={"field": "flow"})
        if "\n" in self.user_id:
            raise ValidationFailed("bad user id")


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation as the buyer sees it."""

    hold_id: str
    drop_id: int
    product_id: int
    buyer_number: int
    expires_at: int          # unix ms
    amount: int              # minor units
    currency: str
    remaining: int           # units left of the product right after this buy
    quantity: int
    unit_price: int
    state: str               # held, paid, expired, cancelled, failed
    flow: str
    replay: bool = False     # an idempotent retry: the first result, nothing changed
    variant_id: int | None = None
    variant_remaining: int | None = None  # units left of the variant after this buy

    def reply(self) -> dict[str, Any]:
        """The payload of the ``buy`` reply and of the HTTP 201/200 body (a buy of a
        variant adds ``variant_id`` and ``variant_remaining``)."""
        out = {"hold_id": self.hold_id, "drop_id": self.drop_id,
               "product_id": self.product_id, "buyer_number": self.buyer_number,
               "expires_at": self.expires_at, "amount": self.amount,
               "currency": self.currency, "remaining": self.remaining,
               "quantity": self.quantity, "unit_price": self.unit_price,
               "state": self.state, "flow": self.flow, "replay": self.replay}
        if self.variant_id is not None:
            out["variant_id"] = self.variant_id
            out["variant_remaining"] = self.variant_remaining
        return out


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_reply(req: BuyRequest, reply: list[Any]) -> Hold:
    """reserve.lua's reply -> :class:`Hold`, or raise :class:`BuyRefused`."""
    head = reply[0]
    if head != b"ok" and head != "ok":
        code = reply[1]
        refusal = _BY_CODE.get(code) if isinstance(code, bytes | str) else None
        if refusal is None:
            refusal = Refusal(_s(code))  # ValueError: a code this process does not know
        raise BuyRefused(refusal, _s(reply[2]) if len(reply) > 2 else "")
    return Hold(
        hold_id=_s(reply[1]), drop_id=req.drop_id, product_id=req.product_id,
        buyer_number=int(reply[2]), expires_at=int(reply[3]), amount=int(reply[4]),
        currency=_s(reply[5]), remaining=int(reply[6]), replay=bool(int(reply[7])),
        state=_s(reply[8]), quantity=int(reply[9]), unit_price=int(reply[10]),
        flow=_s(reply[11]), variant_id=req.variant_id,
        variant_remaining=int(reply[12]) if req.variant_id is not None else None,
    )


# The keys of reserve.lua's call that depend on the drop and product (and variant) only,
# per product: every buy of a rush names the same few. A bounded cache: cleared whole
# when full (a process sells a handful of products at a time).
_PRODUCT_KEYS: dict[tuple[int, int, int | None], tuple[str, ...]] = {}
_PRODUCT_KEYS_MAX = 1024


def _product_keys(d: int, p: int, v: int | None) -> tuple[str, ...]:
    """hold id prefix, then KEYS 1-5, the hold key's prefix, KEYS 7-8, the rate keys'
    prefixes, then the variant's two keys (none without a variant)."""
    k = (d, p, v)
    got = _PRODUCT_KEYS.get(k)
    if got is None:
        if len(_PRODUCT_KEYS) >= _PRODUCT_KEYS_MAX:
            _PRODUCT_KEYS.clear()
        got = _PRODUCT_KEYS[k] = (
            keys.hold_id_prefix(d, p, v), keys.meta(d), keys.product(d, p),
            keys.units(d, p), keys.open_holds(d, p), keys.idem(d), keys.hold(d, ""),
            keys.expiry(d), keys.orders(d), keys.rate_user(d, ""), keys.rate_ip(d, ""),
            *((keys.variant(d, p, v), keys.variant_units(d, p, v)) if v is not None
              else ()))
    return got


def script_call(req: BuyRequest, hold_ttl_ms: int, limits: BuyLimits,
                ) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of reserve.lua for one request (see the script's header)."""
    d, p, v = req.drop_id, req.product_id, req.variant_id
    pk = _product_keys(d, p, v)
    hold_id = pk[0] + os.urandom(8).hex()  # as keys.new_hold_id
    key_list = [pk[1], pk[2], pk[3], pk[4], pk[5], pk[6] + hold_id, pk[7], pk[8],
                pk[9] + req.user_id, pk[10] + (req.ip or "-")]
    args = [req.user_id, req.quantity, req.idempotency_key, hold_id, hold_ttl_ms,
            req.flow, d, p, *limits.script_args()]
    if v is not None:
        key_list += [pk[11], pk[12]]
        args.append(v)
    return key_list, args


async def reserve(redis: Redis, req: BuyRequest, *, hold_ttl_ms: int,
                  limits: BuyLimits) -> Hold:
    """One EVALSHA of reserve.lua. Raises :class:`BuyRefused` with the reason."""
    key_list, args = script_call(req, hold_ttl_ms, limits)
    reply = await script("reserve")(keys=key_list, args=args, client=redis)
    return parse_reply(req, reply)


class ReserveBatcher:
    """Sends the reserve calls that arrive together in one write.

    Under a rush thousands of buys wait on Redis at once. The calls go through an
    :class:`~checkout.redis_pipe.AutoPipeline`: those made in one event-loop turn
    leave in one write on one connection (at most ``max_batch`` per write), and each
    caller gets its own reply. Redis runs each script atomically and in order, so
    nothing about the decision changes. On NOSCRIPT (a restarted Redis) the script is
    loaded, once however many calls hit it, and the call is sent again.
    """

    def __init__(self, redis: Redis, *, max_batch: int = 256, wait_replicas: int = 0,
                 wait_timeout_ms: int = 200) -> None:
        self.redis = redis
        # On a cluster, one auto-pipeline per primary (checkout.cluster_pipe). With
        # wait_replicas, a batch's replies wait for that many replicas (WAIT).
        self.pipe = auto_pipeline(redis, max_batch=max_batch, wait_replicas=wait_replicas,
                                  wait_timeout_ms=wait_timeout_ms)
        self._loading: asyncio.Future | None = None

    async def call(self, key_list: list[str], args: list[Any]) -> Any:
        lua = script("reserve")
        try:
            return await self.pipe.execute("EVALSHA", lua.sha, len(key_list), *key_list,
                                           *args)
        except NoScriptError:
            await self._load(lua.script)
        return await self.pipe.execute("EVALSHA", lua.sha, len(key_list), *key_list, *args)

    async def _load(self, source: str) -> None:
        if self._loading is None or self._loading.done():
            self._loading = self.pipe.execute("SCRIPT", "LOAD", source)
        await asyncio.shield(self._loading)

    async def aclose(self) -> None:
        await self.pipe.aclose()


async def reserve_batched(batcher: ReserveBatcher, req: BuyRequest, *, hold_ttl_ms: int,
                          limits: BuyLimits) -> Hold:
    """:func:`reserve` through a :class:`ReserveBatcher` (same reply, same refusals)."""
    key_list, args = script_call(req, hold_ttl_ms, limits)
    return parse_reply(req, await batcher.call(key_list, args))


class PackedConnection(Connection):
    """A redis-py connection that serializes commands with hiredis' C packer.

    redis-py's asyncio connection packs every argument in Python; a reserve call has
    23 of them, and under a rush that packing was the largest single cost of the buy
    path in the profile. ``hiredis.pack_command`` produces the same RESP bytes."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "CONFIG GET" style names
            return super().pack_command(*args)
        return [hiredis.pack_command(args)]


def auto_pipeline(redis: Any, **opts: Any) -> AutoPipeline | ClusterAutoPipeline:
    """An auto-pipeline over ``redis`` (a :func:`hot_path_client`): one per primary on a
    cluster. ``opts``: :class:`~checkout.redis_pipe.AutoPipeline`'s (``wait_replicas``...)."""
    return (ClusterAutoPipeline(redis, node_client=_node_client, **opts)
            if is_cluster(redis) else AutoPipeline(redis, **opts))


def hot_path_client(url: str, *, max_connections: int = 64) -> Any:
    """The Redis client of the buy path (bytes replies, C packing and parsing); a
    RedisCluster for a ``redis+cluster://`` URL."""
    return connect(url, decode_responses=False, connection_class=PackedConnection,
                   max_connections=max_connections, socket_keepalive=True,
                   health_check_interval=15)


def _node_client(**kwargs: Any) -> Redis:
    """The client of one cluster primary on the buy path (as :func:`hot_path_client`)."""
    return Redis(connection_pool=ConnectionPool(
        connection_class=PackedConnection, decode_responses=False, socket_keepalive=True,
        **kwargs))
