"""The HTTP API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

The paths come from the app's own routes: :func:`document` describes exactly the
routes an app mounts (``/v1/dev/*`` only where they exist), with what
:data:`OPERATIONS` says about each one. ``tests/test_openapi.py`` checks that every
route has an entry and every entry a route, and fuzzes a running server against the
document with schemathesis (no 500, every response as documented). The prose
reference is docs/http-api.md; the WebSocket ``/ws`` is docs/protocol.md (OpenAPI
does not describe socket frames).

Every error is the :data:`ERROR` body; a status range ``4XX`` stands for the
documented refusals of docs/http-api.md, ``503`` for an outage of PostgreSQL or Redis
(retry after ``Retry-After``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

from dropserver import __version__

__all__ = ["OPERATIONS", "REFUSALS", "document", "route_operations"]

# -- schemas ---------------------------------------------------------------------------

MAX_ID = 10**18 - 1  # the ``id`` path convertor: 18 digits at most
_TEXT = r"^[^\u0000]*$"  # storable text: no NUL (dropserver/text.py)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    typ = schema["type"]
    return {**schema, "type": [*([typ] if isinstance(typ, str) else typ), "null"]}


def _obj(required: Iterable[str] = (), closed: bool = False, **props: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    req = list(required)
    if req:
        out["required"] = req
    if closed:
        out["additionalProperties"] = False
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
ID = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
TIME = {"type": "string", "format": "date-time"}
MONEY = {"type": "integer", "minimum": 0}


def _text(max_len: int, *, min_len: int = 0, blank: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string", "maxLength": max_len, "pattern": _TEXT}
    if min_len:
        out["minLength"] = min_len
    if not blank:  # at least one character that is not white space
        out["pattern"] = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
    return out


ERROR = _obj(["error"], error=_obj(
    ["code", "message", "details"], code=STR, message=STR,
    details={"type": "object"}))

VARIANT = _obj(
    ["variant_id", "title", "options", "image_url", "price", "units", "per_buyer_limit"],
    variant_id=ID, title=STR, options={"type": "object", "additionalProperties": STR},
    image_url=STR, price=_nullable(MONEY), units=INT, per_buyer_limit=_nullable(INT),
    remaining=INT)

PRODUCT = _obj(
    ["product_id", "title", "description", "image_url", "position", "price", "units",
     "per_buyer_limit", "state", "selling_at", "variants"],
    product_id=ID, title=STR, description=STR, image_url=STR, position=INT,
    price=MONEY, units=INT, per_buyer_limit=INT, state=STR,
    selling_at=_nullable(TIME), remaining=INT, sold=INT, cogs=MONEY,
    variants={"type": "array", "items": VARIANT})

DROP = _obj(
    ["id", "creator_id", "title", "description", "kind", "state", "currency", "starts_at",
     "pinned_product_id", "selling_product_id", "max_holds_per_user", "campaign",
     "version", "created_at", "updated_at", "live_at", "ended_at", "products", "host"],
    id=ID, creator_id=STR, title=STR, description=STR,
    kind={"type": "string", "enum": ["standard", "campaign"]},
    state={"type": "string", "enum": ["draft", "scheduled", "live", "selling", "sold_out",
                                      "closed", "ended", "replay", "settled", "cancelled"]},
    currency=STR, starts_at=_nullable(TIME), pinned_product_id=_nullable(ID),
    selling_product_id=_nullable(ID), max_holds_per_user=INT,
    campaign={"oneOf": [{"type": "null"}, _obj(
        ["goal_orders", "deadline", "outcome"], goal_orders=INT,
        deadline=_nullable(TIME), outcome=_nullable(STR))]},
    version=INT, created_at=_nullable(TIME), updated_at=_nullable(TIME),
    live_at=_nullable(TIME), ended_at=_nullable(TIME),
    products={"type": "array", "items": _ref("Product")},
    allowed_actions={"type": "array", "items": STR},
    host=_obj(["id", "name", "avatar_url"], id=STR, name=STR, avatar_url=STR))

_PRODUCT_FIELDS = dict(
    title=_text(200, min_len=1, blank=False), description=_text(5000),
    image_url={"type": "string", "maxLength": 2000, "pattern": r"^(https?://|/)[^\u0000]*$"},
    price={"type": "integer", "minimum": 1, "maximum": 10**10},
    units={"type": "integer", "minimum": 1, "maximum": 1_000_000},
    per_buyer_limit={"type": "integer", "minimum": 1, "maximum": 100},
    cogs={"type": "integer", "minimum": 0, "maximum": 10**10})
_OPTIONS = {"type": "object", "minProperties": 1, "maxProperties": 4,
            "propertyNames": _text(100, min_len=1, blank=False),
            "additionalProperties": _text(100, min_len=1, blank=False)}
_VARIANT_FIELDS = dict(
    options=_OPTIONS, units=_PRODUCT_FIELDS["units"], title=_text(200),
    image_url=_PRODUCT_FIELDS["image_url"], price=_PRODUCT_FIELDS["price"],
    per_buyer_limit=_PRODUCT_FIELDS["per_buyer_limit"])
# units: with variants, the sum of theirs (or left out; see docs/http-api.md)
PRODUCT_INPUT = _obj(["title", "price", "units"], closed=True, **_PRODUCT_FIELDS,
                     variants={"type": "array", "minItems": 1, "maxItems": 50,
                               "items": _obj(["options", "units"], closed=True,
                                             **_VARIANT_FIELDS)})
PRODUCT_PATCH = _obj(["title", "price", "units"], closed=True, product_id=ID,
                     **_PRODUCT_FIELDS,
                     variants={"type": "array", "minItems": 1, "maxItems": 50,
                               "items": _obj(["options", "units"], closed=True,
                                             variant_id=ID, **_VARIANT_FIELDS)})
_CAMPAIGN = _obj(["goal_orders", "deadline"], closed=True,
                 goal_orders={"type": "integer", "minimum": 1, "maximum": 10_000_000},
                 deadline=TIME)
_DROP_FIELDS = dict(
    title=_text(200, min_len=1, blank=False), description=_text(5000),
    currency={"type": "string", "pattern": "^[A-Za-z]{3}$"},
    starts_at=_nullable(TIME),
    max_holds_per_user={"type": "integer", "minimum": 1, "maximum": 10},
    campaign=_CAMPAIGN)
DROP_CREATE = _obj(["title", "products"], closed=True,
                   kind={"type": "string", "enum": ["standard", "campaign"]},
                   products={"type": "array", "minItems": 1, "maxItems": 50,
                             "items": _ref("ProductInput")},
                   **_DROP_FIELDS)
DROP_PATCH = {**_obj(closed=True, products={"type": "array", "minItems": 1, "maxItems": 50,
                                            "items": _ref("ProductPatch")},
                     **_DROP_FIELDS), "minProperties": 1}

HOLD = _obj(
    ["hold_id", "drop_id", "product_id", "buyer_number", "expires_at", "amount", "currency",
     "remaining", "quantity", "unit_price", "state", "flow", "replay"],
    hold_id=STR, drop_id=ID, product_id=ID, buyer_number=INT, expires_at=INT,
    amount=MONEY, currency=STR, remaining=INT, quantity=INT, unit_price=MONEY, state=STR,
    flow=STR, replay=BOOL, variant_id=ID, variant_remaining=INT)

GIVEAWAY = _obj(
    ["id", "drop_id", "state", "prize", "product_id", "winners", "must_be_present",
     "must_have_bought", "commitment", "opened_at", "closes_at", "entries", "seed",
     "drawn_at", "results"],
    id=ID, drop_id=ID, state={"type": "string", "enum": ["open", "drawn"]}, prize=STR,
    product_id=_nullable(ID), winners=INT, must_be_present=BOOL, must_have_bought=BOOL,
    commitment=STR, opened_at=INT, closes_at=INT,
    entries=_nullable(INT), seed=_nullable(STR), drawn_at=_nullable(INT),
    results={"type": ["array", "null"], "items": _obj(
        ["rank", "ticket", "name"], rank=INT, ticket=STR, name=STR)},
    entrants_url=STR)
GIVEAWAY_OPEN = _obj(
    closed=True, product_id=ID, prize=_text(200, min_len=1, blank=False),
    winners={"type": "integer", "minimum": 1, "maximum": 100},
    duration_s={"type": "integer", "minimum": 2, "maximum": 3600},
    must_be_present=BOOL, must_have_bought=BOOL)

_REMINDER = _obj(["drop_id", "reminded"], drop_id=ID, reminded=BOOL)
_MODERATOR = _obj(["user_id", "appointed_by", "appointed_at"], user_id=STR,
                  appointed_by=STR, appointed_at=TIME)
_MODERATION_ACTION = _obj(
    ["id", "action", "user_id", "moderator_id", "message_id", "reason", "seconds",
     "expires_at", "lifted_at", "drop_id", "at"],
    id=ID, action={"type": "string", "enum": ["mute", "ban", "delete", "unban", "slow",
                                              "pin", "unpin", "appoint", "dismiss"]},
    user_id=STR, moderator_id=STR, message_id=_nullable(STR), reason=STR,
    seconds=_nullable(INT), expires_at=_nullable(TIME), lifted_at=_nullable(TIME),
    drop_id=_nullable(ID), at=TIME)

_RECEIPT_ITEM = _obj(
    ["product_id", "variant_id", "title", "variant_title", "options", "image_url",
     "quantity", "unit_price", "amount"], product_id=_nullable(ID), variant_id=_nullable(ID),
    title=STR, variant_title=_nullable(STR),
    options={"type": "object", "additionalProperties": STR}, image_url=STR, quantity=INT,
    unit_price=MONEY, amount=MONEY)
_RECEIPT_FIELDS = dict(
    kind={"type": "string", "enum": ["order", "tip"]}, id=STR, drop_id=ID, drop_title=STR,
    seller=_obj(["id", "name"], id=STR, name=STR),
    state={"type": "string", "enum": ["held", "payment_pending", "authorized", "paid",
                                      "failed", "expired", "cancelled", "refunded",
                                      "disputed"]},
    items={"type": "array", "items": _RECEIPT_ITEM}, total=MONEY, currency=STR,
    amount_paid=MONEY, amount_refunded=MONEY, message=_nullable(STR),
    buyer_number=_nullable(INT), released=_nullable(STR), flow=STR,
    payment={"oneOf": [{"type": "null"}, _obj(
        ["gateway", "reference", "status", "error"], gateway=STR, reference=STR,
        status=STR, error=_nullable(STR))]},
    created_at=TIME, paid_at=_nullable(TIME), refunded_at=_nullable(TIME),
    hold_expires_at=_nullable(TIME))
RECEIPT = _obj(list(_RECEIPT_FIELDS), **_RECEIPT_FIELDS)

SCHEMAS = {
    "Receipt": RECEIPT,
    "Error": ERROR, "Product": PRODUCT, "Drop": DROP, "ProductInput": PRODUCT_INPUT,
    "ProductPatch": PRODUCT_PATCH, "DropCreate": DROP_CREATE, "DropPatch": DROP_PATCH,
    "Hold": HOLD, "Giveaway": GIVEAWAY, "GiveawayOpen": GIVEAWAY_OPEN,
    "GiveawayEntry": _obj(["giveaway_id", "entered", "new", "entries"], giveaway_id=ID,
                          entered={"const": True}, new=BOOL, entries=INT),
}

# -- operations --------------------------------------------------------------------------

_ERRORS = {"4XX": {"description": "refused: see the code (docs/http-api.md)",
                   "content": {"application/json": {"schema": _ref("Error")}}},
           "503": {"description": "PostgreSQL or Redis unavailable: retry after "
                                  "Retry-After",
                   "content": {"application/json": {"schema": _ref("Error")}}}}
AUTH = [{"bearerAuth": []}]
OPTIONAL_AUTH = [{}, {"bearerAuth": []}]
PUBLIC: list[dict[str, list[str]]] = []


def _json(schema: dict[str, Any], description: str = "OK",
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, security: list, responses: dict[str, Any], *, tag: str,
        body: dict[str, Any] | None = None, params: list[dict[str, Any]] | None = None,
        errors: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "security": security,
                          "responses": {**responses, **(_ERRORS if errors else {})}}
    if body is not None:
        op["requestBody"] = body
    if params:
        op["parameters"] = params
    return op


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


_LOCATION = {"Location": {"required": True, "schema": STR}}
_ETAG = {"ETag": {"required": True, "schema": STR}}
_EMPTY = _obj(closed=True)
_PRODUCT_ID_BODY = _obj(["product_id"], closed=True, product_id=ID)
_NULLABLE_PRODUCT_ID = _obj(["product_id"], closed=True, product_id=_nullable(ID))
_STAKES = _obj(["drop_id", "stakes"], drop_id=ID, stakes={"type": "array", "items": _obj(
    ["investor_id", "amount", "currency", "stripe_account_id"], investor_id=STR,
    amount=MONEY, currency=STR, stripe_account_id=_nullable(STR))})
_REPORT = _obj(["drop_id", "state", "currency", "orders", "split", "totals", "investors",
                "ledger", "payouts"],
               drop_id=ID, state=STR, currency=STR, orders=INT,
               split={"type": "object"}, totals={"type": "object"},
               investors={"type": "array", "items": {"type": "object"}},
               ledger={"type": "array", "items": {"type": "object"}},
               payouts={"type": "array", "items": {"type": "object"}},
               open_orders_at_settlement=INT)
_STREAM = _obj(["drop_id", "status", "hls", "hls_plain", "replay"], drop_id=ID,
               status={"type": "string", "enum": ["live", "reconnecting", "offline"]},
               hls=STR, hls_plain=STR, replay=_nullable(STR))
_REPLAY = _obj(["drop_id", "playlist", "duration_ms", "finalized_at", "moments"],
               drop_id=ID, playlist=STR, duration_ms=_nullable(INT), finalized_at=STR,
               moments={"type": "array", "items": _obj(
                   ["kind", "product_id", "media_ms", "at"], kind=STR,
                   product_id=_nullable(INT), media_ms=INT, at=STR)})
_PRICE = {"type": "integer", "minimum": 1, "maximum": 10**12}
_AUCTION = _obj(
    ["id", "drop_id", "product_id", "state", "currency", "start_price", "increments",
     "has_reserve", "duration_ms", "snipe_window_ms", "started_at", "ends_at", "bids",
     "leading", "next_min", "outcome", "closed_at", "server_time"],
    id=ID, drop_id=ID, product_id=ID, state={"type": "string", "enum": ["running", "closed"]},
    currency=STR, start_price=MONEY, increments={"type": "array", "items": _obj(
        ["from", "step"], **{"from": MONEY}, step=MONEY)},
    has_reserve=BOOL, duration_ms=INT, snipe_window_ms=INT, started_at=INT, ends_at=INT,
    bids=INT, leading=_nullable(_obj(["amount", "bidder_id", "seq"], amount=MONEY,
                                     bidder=_nullable(STR), bidder_id=STR, seq=INT)),
    next_min=MONEY, outcome=_nullable(STR), closed_at=_nullable(INT), server_time=INT,
    reserve_price=_nullable(MONEY), hold_id=_nullable(STR),
    offer=_nullable(_obj(["user_id", "amount", "hold_id"], user_id=STR, amount=MONEY,
                         hold_id=STR)))
_BID = _obj(["auction_id", "seq", "amount", "ends_at", "server_time", "extended",
             "next_min", "leading", "replay"], auction_id=ID, seq=INT, amount=MONEY,
            ends_at=INT, server_time=INT, extended=BOOL, next_min=MONEY, leading=BOOL,
            replay=BOOL)
_OFFER = _obj(["auction_id", "user_id", "bidder", "amount", "hold_id", "expires_at", "flow",
               "replay"], auction_id=ID, user_id=STR, bidder=STR, amount=MONEY,
              hold_id=STR, expires_at=INT, flow=STR, replay=BOOL)
_IDEM_HEADER = {"name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"},
                "description": "or the body's idempotency_key (one of them is needed)"}
_HTML = {"description": "the page", "content": {"text/html": {"schema": STR}}}
_SDP = "application/sdp"

# (method, path as the route spells it) -> operation. Every route has one entry.
_EVENT_TYPES = {"type": "string", "enum": ["drop.scheduled", "drop.live", "drop.reminder",
                                             "order.paid", "order.refunded", "tip.paid",
                                             "payout.sent"]}
_EVENTS = {"type": "array", "minItems": 1, "maxItems": 14, "items": _EVENT_TYPES}
_HOOK_URL = {"type": "string", "minLength": 8, "maxLength": 2048, "pattern": _TEXT}
_ENDPOINT_FIELDS = dict(
    id=ID, owner_id=STR, scope={"type": "string", "enum": ["creator", "platform"]},
    url=STR, description=STR, events={"type": "array", "items": STR}, enabled=BOOL,
    created_at=TIME, updated_at=TIME, previous_secret_expires_at=_nullable(TIME))
_ENDPOINT = _obj(list(_ENDPOINT_FIELDS), **_ENDPOINT_FIELDS)
_ENDPOINT_SECRET = _obj([*_ENDPOINT_FIELDS, "secret"], **_ENDPOINT_FIELDS, secret=STR)
_DELIVERY_FIELDS = dict(
    id=ID, event_id=STR, event_type=STR, endpoint_id=ID,
    state={"type": "string", "enum": ["pending", "delivered", "failed"]}, attempts=INT,
    next_attempt_at=_nullable(TIME), last_status=_nullable(INT), last_error=_nullable(STR),
    last_attempt_at=_nullable(TIME), delivered_at=_nullable(TIME), created_at=TIME)
_DELIVERY = _obj(list(_DELIVERY_FIELDS), **_DELIVERY_FIELDS)
_DELIVERY_DETAIL = _obj([*_DELIVERY_FIELDS, "payload", "attempt_log"], **_DELIVERY_FIELDS,
                        payload={"type": "object"}, attempt_log={"type": "array", "items": _obj(
                            ["attempt", "status", "error", "duration_ms", "at"], attempt=INT,
                            status=_nullable(INT), error=_nullable(STR), duration_ms=INT,
                            at=TIME)})
_HOOK_DESCRIPTION = {"type": "string", "maxLength": 500, "pattern": _TEXT}

_TIP_FIELDS = dict(tip_id=STR, drop_id=ID, display_name=STR, amount=MONEY, currency=STR,
                   message=STR, state={"type": "string", "enum": [
                       "payment_pending", "paid", "failed", "cancelled", "refunded"]},
                   created_at=TIME, paid_at=_nullable(TIME))
_TIP = _obj(list(_TIP_FIELDS), **_TIP_FIELDS)
_TIP_PRIVATE = _obj([*_TIP_FIELDS, "user_id", "amount_refunded", "error"], **_TIP_FIELDS,
                    user_id=STR, amount_refunded=MONEY, error=_nullable(STR))
_TIP_SENT = _obj([*_TIP_FIELDS, "user_id", "amount_refunded", "error", "intent_id"],
                 **_TIP_FIELDS, user_id=STR, amount_refunded=MONEY, error=_nullable(STR),
                 intent_id=_nullable(STR), client_secret=STR)
_TIP_AMOUNTS = _obj(["drop_id", "currency", "amounts"], drop_id=ID, currency=STR,
                    amounts={"type": "array", "items": MONEY})
_TIPS = _obj(["drop_id", "currency", "amounts", "recent"], drop_id=ID, currency=STR,
             amounts={"type": "array", "items": MONEY},
             recent={"type": "array", "items": _TIP},
             totals=_obj(["count", "gross", "refunded", "net", "pending", "top"], count=INT,
                         gross=MONEY, refunded=MONEY, net=INT, pending=INT,
                         top={"type": "array", "items": _obj(
                             ["user_id", "name", "amount"], user_id=STR, name=STR,
                             amount=INT)}))

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    # platform
    ("GET", "/healthz"): _op("The process is up", PUBLIC, {"200": _json(_obj(
        ["status", "node", "version"], status={"const": "ok"}, node=STR, version=STR))},
        tag="platform"),
    ("GET", "/readyz"): _op("Redis and PostgreSQL answer, the worker is not draining", PUBLIC, {
        "200": _json(_ref("Ready")), "503": _json(_ref("Ready"), "not ready")},
        tag="platform", errors=False),
    ("GET", "/metrics"): _op("Prometheus text", PUBLIC, {"200": {
        "description": "metrics", "content": {"text/plain": {"schema": STR}}}},
        tag="platform"),
    ("GET", "/openapi.json"): _op("This document", PUBLIC, {"200": _json(
        {"type": "object"})}, tag="platform"),
    ("GET", "/v1/me"): _op("Who the token says the caller is", OPTIONAL_AUTH, {
        "200": _json(_obj(["guest", "user_id", "role"], guest=BOOL,
                          user_id=_nullable(STR), role=_nullable(STR), name=STR,
                          avatar_url=STR, moderator_of={"type": "array", "items": STR}))},
        tag="platform"),
    ("PATCH", "/v1/me"): _op("Set the name and avatar pages show for the caller", AUTH, {
        "200": _json(_obj(["user_id", "display_name", "avatar_url"], user_id=STR,
                          display_name=STR, avatar_url=STR))}, tag="platform",
        body=_body({**_obj(closed=True, display_name=_text(80, min_len=1, blank=False),
                           avatar_url={"type": "string", "maxLength": 2000,
                                       "pattern": r"^((https?://|/)[^\u0000]*)?$"}),
                    "minProperties": 1})),
    # drops
    ("POST", "/v1/drops"): _op("Create a draft", AUTH, {"201": _json(
        _ref("Drop"), "created", {**_LOCATION, **_ETAG})}, tag="drops",
        body=_body(_ref("DropCreate"))),
    ("GET", "/v1/drops"): _op("List drops, newest first", OPTIONAL_AUTH, {"200": _json(
        _obj(["drops", "next_before"], drops={"type": "array", "items": _ref("Drop")},
             next_before=_nullable(ID)))}, tag="drops", params=[
        _query("creator", {"type": "string", "maxLength": 128}, "a creator's id"),
        _query("state", STR, "comma-separated states"),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "page size"),
        _query("before", ID, "ids below this one (the previous next_before)")]),
    ("GET", "/v1/drops/{drop_id:id}"): _op("One drop", OPTIONAL_AUTH, {"200": _json(
        _ref("Drop"), headers=_ETAG)}, tag="drops"),
    ("PATCH", "/v1/drops/{drop_id:id}"): _op("Edit a draft or scheduled drop", AUTH, {
        "200": _json(_ref("Drop"), headers=_ETAG)}, tag="drops",
        body=_body(_ref("DropPatch")), params=[{
            "name": "If-Match", "in": "header", "required": False,
            "schema": {"type": "string", "pattern": r'^(W/)?"?[0-9]{1,19}"?$'},
            "description": "the ETag this edit is based on"}]),
    ("POST", "/v1/drops/{drop_id:id}/schedule"): _op("draft -> scheduled", AUTH, {
        "200": _json(_ref("Drop"), headers=_ETAG)}, tag="drops",
        body=_body(_obj(closed=True, starts_at=_nullable(TIME)), required=False)),
    ("POST", "/v1/drops/{drop_id:id}/live"): _op("scheduled -> live", AUTH, {
        "200": _json(_ref("Drop"), headers=_ETAG)}, tag="drops",
        body=_body(_EMPTY, required=False)),
    ("POST", "/v1/drops/{drop_id:id}/go-live"): _op("Alias of /live", AUTH, {
        "200": _json(_ref("Drop"), headers=_ETAG)}, tag="drops",
        body=_body(_EMPTY, required=False)),
    ("POST", "/v1/drops/{drop_id:id}/pin"): _op("Pin or unpin a product", AUTH, {
        "200": _json(_ref("Drop"), headers=_ETAG)}, tag="drops",
        body=_body(_NULLABLE_PRODUCT_ID)),
    ("POST", "/v1/drops/{drop_id:id}/buy-now"): _op("BUY NOW: -> selling", AUTH, {
        "200": _json(_ref("Drop"), headers=_ETAG)}, tag="drops",
        body=_body(_PRODUCT_ID_BODY)),
    ("POST", "/v1/drops/{drop_id:id}/close"): _op("selling / sold_out -> closed", AUTH, {
        "200": _json(_ref("Drop"), headers=_ETAG)}, tag="drops",
        body=_body(_obj(closed=True, product_id=_nullable(ID)), required=False)),
    ("POST", "/v1/drops/{drop_id:id}/end"): _op("-> ended", AUTH, {
        "200": _json(_ref("Drop"), headers=_ETAG)}, tag="drops",
        body=_body(_EMPTY, required=False)),
    ("POST", "/v1/drops/{drop_id:id}/replay-sales"): _op(
        "ended -> replay: sell what is left on the replay", AUTH, {
            "200": _json(_ref("Drop"), headers=_ETAG)}, tag="drops",
        body=_body(_EMPTY, required=False)),
    ("GET", "/v1/drops/{drop_id:id}/transitions"): _op("Audit trail", AUTH, {
        "200": _json(_obj(["transitions"], transitions={"type": "array", "items": _obj(
            ["from", "to", "actor_id", "at"], **{"from": _nullable(STR)}, to=STR,
            actor_id=_nullable(STR), at=_nullable(STR))}))}, tag="drops"),
    # moderators and the moderation audit
    ("GET", "/v1/creators/{creator_id}/moderators"): _op(
        "The creator's moderators (the creator, an admin)", AUTH, {
            "200": _json(_obj(["moderators"], moderators={
                "type": "array", "items": _MODERATOR}))}, tag="moderation"),
    ("PUT", "/v1/creators/{creator_id}/moderators/{user_id}"): _op(
        "Appoint a moderator of all the creator's drops", AUTH, {
            "201": _json(_MODERATOR, "appointed"),
            "200": _json(_MODERATOR, "already a moderator")}, tag="moderation",
        body=_body(_EMPTY, required=False)),
    ("DELETE", "/v1/creators/{creator_id}/moderators/{user_id}"): _op(
        "Dismiss a moderator", AUTH, {"204": {"description": "dismissed"}},
        tag="moderation"),
    ("GET", "/v1/drops/{drop_id:id}/moderation"): _op(
        "The drop's moderation audit, newest first (creator, moderators, admins)", AUTH, {
            "200": _json(_obj(["actions", "next_before"], actions={
                "type": "array", "items": _MODERATION_ACTION},
                next_before=_nullable(ID)))}, tag="moderation", params=[
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 200},
                   "at most this many (default 50)"),
            _query("before", {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                   "actions older than this id (the previous page's next_before)")]),
    # reminders
    ("GET", "/v1/drops/{drop_id:id}/reminder"): _op(
        "Whether the caller asked to be reminded of the drop", AUTH, {
            "200": _json(_REMINDER)}, tag="reminders"),
    ("POST", "/v1/drops/{drop_id:id}/reminder"): _op(
        "Remind me (a scheduled drop)", AUTH, {
            "201": _json(_REMINDER, "reminded"),
            "200": _json(_REMINDER, "already asked")}, tag="reminders",
        body=_body(_EMPTY, required=False)),
    ("DELETE", "/v1/drops/{drop_id:id}/reminder"): _op(
        "Do not remind me", AUTH, {"204": {"description": "not reminded"}},
        tag="reminders"),
    ("GET", "/v1/drops/{drop_id:id}/reminders"): _op(
        "How many asked, and the reminders handed off (the creator)", AUTH, {
            "200": _json(_obj(["drop_id", "reminded", "sent"], drop_id=ID, reminded=INT,
                              sent={"type": "array", "items": _obj(
                                  ["kind", "for", "users", "at"],
                                  kind={"type": "string",
                                        "enum": ["starting_soon", "live"]},
                                  **{"for": TIME}, users=INT, at=TIME)}))},
        tag="reminders"),
    ("GET", "/v1/drops/{drop_id:id}/stats"): _op("The console's live numbers", AUTH, {
        "200": _json(_obj(["drop_id", "state", "currency", "sold", "orders", "revenue",
                           "open_holds", "remaining"], drop_id=ID, state=STR,
                          currency=STR, sold=INT, orders=INT, revenue=MONEY,
                          open_holds=INT, remaining={
                              "type": "object", "additionalProperties": INT}))},
        tag="drops"),
    # settlement
    ("POST", "/v1/drops/{drop_id:id}/stakes"): _op("Record an investor's stake", AUTH, {
        "201": _json(_STAKES, "all stakes")}, tag="settlement", body=_body(_obj(
            ["investor_id", "amount"], closed=True,
            investor_id=_text(128, min_len=1),
            amount={"type": "integer", "minimum": 1, "maximum": 10**13},
            stripe_account_id=_nullable({"type": "string", "maxLength": 255,
                                         "pattern": r"^acct_[^\u0000]*$"})))),
    ("GET", "/v1/drops/{drop_id:id}/stakes"): _op("The drop's stakes", AUTH, {
        "200": _json(_STAKES)}, tag="settlement"),
    ("POST", "/v1/drops/{drop_id:id}/settle"): _op("Post the ledger, pay out", AUTH, {
        "200": _json(_REPORT)}, tag="settlement", body=_body(_EMPTY, required=False)),
    ("GET", "/v1/drops/{drop_id:id}/settlement"): _op("The settlement report", AUTH, {
        "200": _json(_REPORT)}, tag="settlement"),
    # giveaways
    ("POST", "/v1/drops/{drop_id:id}/giveaways"): _op(
        "Open a giveaway (publishes its commitment)", AUTH, {
            "201": _json(_ref("Giveaway"), "opened", _LOCATION)},
        tag="giveaways", body=_body(_ref("GiveawayOpen"))),
    ("GET", "/v1/drops/{drop_id:id}/giveaways"): _op("The drop's giveaways", PUBLIC, {
        "200": _json(_obj(["giveaways"], giveaways={
            "type": "array", "items": _ref("Giveaway")}))}, tag="giveaways"),
    ("GET", "/v1/drops/{drop_id:id}/giveaways/{giveaway_id:id}"): _op(
        "One giveaway (the seed and winners once drawn)", PUBLIC, {
            "200": _json(_ref("Giveaway"))}, tag="giveaways"),
    ("GET", "/v1/drops/{drop_id:id}/giveaways/{giveaway_id:id}/entrants"): _op(
        "The drawn giveaway's sorted tickets, to verify the draw", PUBLIC, {
            "200": _json(_obj(["giveaway_id", "winners", "commitment", "seed", "tickets"],
                              giveaway_id=ID, winners=INT, commitment=STR, seed=STR,
                              tickets={"type": "array", "items": STR}))},
        tag="giveaways"),
    ("POST", "/v1/drops/{drop_id:id}/giveaways/{giveaway_id:id}/entries"): _op(
        "Enter (the HTTP twin of `giveaway.enter`)", AUTH, {
            "201": _json(_ref("GiveawayEntry"), "entered"),
            "200": _json(_ref("GiveawayEntry"), "already entered: nothing changed")},
        tag="giveaways", body=_body(_EMPTY, required=False)),
    # checkout
    ("POST", "/v1/drops/{drop_id:id}/buy"): _op("Reserve (the HTTP twin of `buy`)", AUTH, {
        "201": _json(_ref("Hold"), "a new hold", _LOCATION),
        "200": _json(_ref("Hold"), "an idempotent retry: the first answer", _LOCATION)},
        tag="checkout", body=_body(_obj(
            ["product_id"], closed=True,
            product_id={"type": "integer", "minimum": 1, "maximum": 2**62},
            variant_id={"type": "integer", "minimum": 1, "maximum": 2**62},
            quantity={"type": "integer", "minimum": 1, "maximum": 100},
            idempotency_key={"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"},
            flow={"type": "string", "enum": ["client_confirm", "off_session"]},
            proof={})), params=[{
                "name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"},
                "description": "or the body's idempotency_key (one of them is needed)"}]),
    ("GET", "/v1/holds/{hold_id}"): _op("The caller's hold", AUTH, {"200": _json(_obj(
        ["hold_id", "drop_id", "product_id", "user_id", "quantity", "state"],
        hold_id=STR, drop_id=ID, product_id=ID, user_id=STR, quantity=INT,
        buyer_number=INT, unit_price=MONEY, amount=MONEY, currency=STR,
        idempotency_key=STR, expires_at=INT, created_at=INT, released_at=INT, flow=STR,
        state=STR, remaining_after=INT, variant_id=ID,
        variant_remaining_after=INT))}, tag="checkout"),
    ("DELETE", "/v1/holds/{hold_id}"): _op("Cancel the caller's hold", AUTH, {
        "200": _json(_obj(["hold_id", "state", "remaining"], hold_id=STR,
                          state={"const": "cancelled"}, remaining=INT))},
        tag="checkout"),
    # auctions
    ("POST", "/v1/drops/{drop_id:id}/auctions"): _op("Start an auction of one unit", AUTH, {
        "201": _json(_AUCTION, "started", _LOCATION)}, tag="auctions", body=_body(_obj(
            ["product_id", "start_price", "duration_s"], closed=True,
            product_id={"type": "integer", "minimum": 1, "maximum": 2**62},
            start_price=_PRICE, increment=_PRICE,
            increments={"type": "array", "minItems": 1, "maxItems": 20, "items": _obj(
                ["from", "step"], closed=True, **{"from": {
                    "type": "integer", "minimum": 0, "maximum": 10**12}}, step=_PRICE)},
            duration_s={"type": "integer", "minimum": 5, "maximum": 3600},
            snipe_window_s={"type": "integer", "minimum": 0, "maximum": 300},
            reserve_price=_nullable(_PRICE)))),
    ("GET", "/v1/drops/{drop_id:id}/auctions"): _op("The drop's auctions", OPTIONAL_AUTH, {
        "200": _json(_obj(["auctions", "server_time"], auctions={
            "type": "array", "items": _AUCTION}, server_time=INT))}, tag="auctions"),
    ("GET", "/v1/drops/{drop_id:id}/auctions/{auction_id:id}"): _op(
        "One auction, live while it runs", OPTIONAL_AUTH, {"200": _json(_AUCTION)},
        tag="auctions"),
    ("GET", "/v1/drops/{drop_id:id}/auctions/{auction_id:id}/bids"): _op(
        "Every accepted bid, as PostgreSQL recorded it", PUBLIC, {"200": _json(_obj(
            ["auction_id", "bids"], auction_id=ID, bids={"type": "array", "items": _obj(
                ["seq", "amount", "bidder", "bidder_id", "at", "ends_at", "extended"],
                seq=INT, amount=MONEY, bidder=STR, bidder_id=STR, at=INT, ends_at=INT,
                extended=BOOL)}))}, tag="auctions"),
    ("POST", "/v1/drops/{drop_id:id}/auctions/{auction_id:id}/bids"): _op(
        "Bid (the HTTP twin of `bid`)", AUTH, {
            "201": _json(_BID, "an accepted bid"),
            "200": _json(_BID, "an idempotent retry: the first answer")}, tag="auctions",
        body=_body(_obj(["amount"], closed=True, amount=_PRICE,
                        idempotency_key={"type": "string",
                                         "pattern": r"^[\x21-\x7e]{1,255}$"})),
        params=[_IDEM_HEADER]),
    ("POST", "/v1/drops/{drop_id:id}/auctions/{auction_id:id}/second-chance"): _op(
        "Offer the unit to the runner-up", AUTH, {
            "201": _json(_OFFER, "the offer's hold"),
            "200": _json(_OFFER, "made before: the same offer")}, tag="auctions",
        body=_body(_EMPTY, required=False)),
    # payments
    ("POST", "/v1/webhooks/stripe"): _op("Stripe's event endpoint", PUBLIC, {
        "200": _json(_obj(["received", "id", "result"], received={"const": True}, id=STR,
                          result={"type": "string",
                                  "enum": ["processed", "duplicate", "ignored"]}))},
        tag="payments", body=_body({"type": "object"}), params=[{
            "name": "Stripe-Signature", "in": "header", "required": True,
            "schema": STR}]),
    ("GET", "/v1/orders/{order_id}"): _op(
        "An order as PostgreSQL has it, or its hold before the row is written "
        "(the buyer, the drop's creator, an admin)", AUTH,
        {"200": _json(_obj(
            ["order_id", "drop_id", "product_id", "state", "released", "quantity",
             "buyer_number", "amount", "currency", "flow", "hold_expires_at", "payment"],
            order_id=STR, drop_id=ID, product_id=ID, state=STR, released=_nullable(STR),
            quantity=INT, buyer_number=INT, amount=MONEY, currency=STR, flow=STR,
            hold_expires_at=INT, payment={"type": ["object", "null"], "properties": {
                "status": STR, "intent_id": STR, "amount_received": MONEY,
                "amount_refunded": MONEY, "client_secret": STR}}))}, tag="payments"),
    ("GET", "/v1/orders/{order_id}/receipt"): _op(
        "An order's receipt (the buyer, the drop's creator, an admin)", AUTH,
        {"200": _json(_ref("Receipt"))}, tag="payments"),
    ("GET", "/v1/me/orders"): _op(
        "The caller's own orders and tips as receipts, newest first", AUTH,
        {"200": _json(_obj(["orders", "next_cursor"], orders={
            "type": "array", "items": _ref("Receipt")}, next_cursor=_nullable(STR)))},
        tag="payments", params=[
            _query("drop_id", ID, "one drop's only"),
            _query("kind", {"type": "string", "enum": ["order", "tip"]}, "one kind only"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 100},
                   "page size (default 20)"),
            _query("cursor", {"type": "string", "maxLength": 80},
                   "the previous page's next_cursor")]),
    ("POST", "/v1/orders/{order_id}/refund"): _op(
        "Refund a paid order in full (an admin or the drop's creator)", AUTH,
        {"200": _json(_obj(["order_id", "state", "amount_refunded", "currency"],
                           order_id=STR, state={"const": "refunded"},
                           amount_refunded=MONEY, currency=STR))}, tag="payments"),
    ("POST", "/v1/dev/orders/{order_id}/confirm"): _op(
        "Fake gateway only (dropserver dev, DROPSERVER_UNSAFE_FAKE_PAYMENTS): confirm as "
        "Stripe.js would", AUTH, {"200": _json(_obj(
            ["order_id", "state", "status", "error"], order_id=STR, state=STR,
            status=STR, error=_nullable(STR)))}, tag="payments",
        body=_body(_obj(closed=True, payment_method={"type": "string", "maxLength": 64,
                                                     "pattern": _TEXT}), required=False)),
    # tips
    ("POST", "/v1/drops/{drop_id:id}/tip-amounts"): _op(
        "Set the amounts viewers may tip ([]: tips off); the drop's creator", AUTH,
        {"200": _json(_TIP_AMOUNTS)}, tag="tips", body=_body(_obj(
            ["amounts"], closed=True, amounts={"type": "array", "maxItems": 6, "items": {
                "type": "integer", "minimum": 1, "maximum": 10**8}}))),
    ("GET", "/v1/drops/{drop_id:id}/tips"): _op(
        "The tip amounts and the latest paid tips (the creator also gets the totals)",
        OPTIONAL_AUTH, {"200": _json(_TIPS)}, tag="tips"),
    ("POST", "/v1/drops/{drop_id:id}/tips"): _op(
        "Tip the creator while the drop is on air", AUTH,
        {"201": _json(_TIP_SENT, "the tip; confirm client_secret with Stripe.js")},
        tag="tips", body=_body(_obj(
            ["amount"], closed=True, amount={"type": "integer", "minimum": 1,
                                             "maximum": 10**8},
            message={"type": "string", "maxLength": 200, "pattern": _TEXT},
            idempotency_key={"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"}))),
    ("GET", "/v1/tips/{tip_id}"): _op(
        "A tip (the tipper, the drop's creator, an admin)", AUTH,
        {"200": _json(_TIP_PRIVATE)}, tag="tips"),
    ("POST", "/v1/tips/{tip_id}/refund"): _op(
        "Refund a paid tip in full (the drop's creator or an admin)", AUTH,
        {"200": _json(_TIP_PRIVATE)}, tag="tips", body=_body(_EMPTY, required=False)),
    ("POST", "/v1/dev/tips/{tip_id}/confirm"): _op(
        "Fake gateway only (dropserver dev, DROPSERVER_UNSAFE_FAKE_PAYMENTS): confirm a "
        "tip as Stripe.js would", AUTH, {"200": _json(_obj(
            ["tip_id", "state", "status", "error"], tip_id=STR, state=STR, status=STR,
            error=_nullable(STR)))}, tag="tips",
        body=_body(_obj(closed=True, payment_method={"type": "string", "maxLength": 64,
                                                     "pattern": _TEXT}), required=False)),
    # outbound webhooks
    ("POST", "/v1/webhooks/endpoints"): _op(
        "Register an outbound webhook endpoint (a creator: their events; an admin: "
        "every creator's)", AUTH, {"201": _json(_ENDPOINT_SECRET, "registered; the secret "
                                                "is shown once", _LOCATION)},
        tag="webhooks", body=_body(_obj(["url", "events"], closed=True, url=_HOOK_URL,
                                        events=_EVENTS, description=_HOOK_DESCRIPTION))),
    ("GET", "/v1/webhooks/endpoints"): _op(
        "The caller's endpoints (an admin: all)", AUTH, {"200": _json(_obj(
            ["endpoints"], endpoints={"type": "array", "items": _ENDPOINT}))},
        tag="webhooks"),
    ("GET", "/v1/webhooks/endpoints/{endpoint_id:id}"): _op(
        "One endpoint", AUTH, {"200": _json(_ENDPOINT)}, tag="webhooks"),
    ("PATCH", "/v1/webhooks/endpoints/{endpoint_id:id}"): _op(
        "Change an endpoint", AUTH, {"200": _json(_ENDPOINT)}, tag="webhooks",
        body=_body(_obj(closed=True, url=_HOOK_URL, events=_EVENTS,
                        description=_HOOK_DESCRIPTION, enabled=BOOL))),
    ("DELETE", "/v1/webhooks/endpoints/{endpoint_id:id}"): _op(
        "Remove an endpoint and its delivery log", AUTH, {"204": {"description": "removed"}},
        tag="webhooks"),
    ("POST", "/v1/webhooks/endpoints/{endpoint_id:id}/rotate-secret"): _op(
        "A new signing secret; the old one signs beside it for a while", AUTH,
        {"200": _json(_ENDPOINT_SECRET)}, tag="webhooks", body=_body(_obj(
            closed=True, previous_valid_for_s={"type": "integer", "minimum": 0,
                                               "maximum": 604800}), required=False)),
    ("GET", "/v1/webhooks/endpoints/{endpoint_id:id}/deliveries"): _op(
        "The endpoint's delivery log, newest first", AUTH, {"200": _json(_obj(
            ["deliveries", "next_before"], deliveries={"type": "array", "items": _DELIVERY},
            next_before=_nullable(ID)))}, tag="webhooks", params=[
            _query("state", {"type": "string", "enum": ["pending", "delivered", "failed"]},
                   "only deliveries in this state"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 200},
                   "page size (default 50)"),
            _query("before", {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                   "deliveries with a smaller id (the next page)")]),
    ("GET", "/v1/webhooks/deliveries/{delivery_id:id}"): _op(
        "One delivery, its attempts and the body sent", AUTH,
        {"200": _json(_DELIVERY_DETAIL)}, tag="webhooks"),
    ("POST", "/v1/webhooks/deliveries/{delivery_id:id}/replay"): _op(
        "Send a delivery again now, with a fresh retry schedule", AUTH, {"202": _json(_obj(
            ["id", "state", "replayed"], id=ID, state={"const": "pending"},
            replayed=BOOL))}, tag="webhooks", body=_body(_EMPTY, required=False)),
    # streaming
    ("POST", "/v1/drops/{drop_id:id}/whip"): _op("WHIP publish (RFC 9725)", AUTH, {
        "201": {"description": "the SDP answer", "headers": {**_LOCATION, **_ETAG},
                "content": {_SDP: {"schema": STR}}}}, tag="streaming",
        body={"required": True, "content": {_SDP: {"schema": STR}}}),
    ("OPTIONS", "/v1/drops/{drop_id:id}/whip"): _op("WHIP capabilities", PUBLIC, {
        "204": {"description": "no content", "headers": {
            "Accept-Post": {"required": True, "schema": STR}}}}, tag="streaming"),
    ("DELETE", "/v1/drops/{drop_id:id}/whip/{session_id}"): _op(
        "End the WHIP session", AUTH, {"200": {"description": "ended"}}, tag="streaming"),
    ("GET", "/v1/drops/{drop_id:id}/hls/{name}"): _op(
        "LL-HLS playlists, init segments, segments and parts", PUBLIC, {"200": {
            "description": "the file", "content": {
                "application/vnd.apple.mpegurl": {"schema": STR},
                "video/mp4": {"schema": STR}, "video/iso.segment": {"schema": STR}}}},
        tag="streaming", params=[
            _query("_HLS_msn", {"type": "integer", "minimum": 0}, "blocking reload"),
            _query("_HLS_part", {"type": "integer", "minimum": 0}, "blocking reload")]),
    ("GET", "/v1/drops/{drop_id:id}/stream"): _op("Stream status and playlists", PUBLIC, {
        "200": _json(_STREAM)}, tag="streaming"),
    ("GET", "/v1/drops/{drop_id:id}/replay"): _op("The replay and its moments", PUBLIC, {
        "200": _json(_REPLAY)}, tag="streaming"),
    # web
    ("GET", "/"): _op("The viewer's live page", PUBLIC, {"200": _HTML}, tag="web"),
    ("GET", "/d/{drop_id:id}"): _op("The live page of a drop", PUBLIC, {"200": _HTML},
                                     tag="web"),
    ("GET", "/console"): _op("The creator's console", PUBLIC, {"200": _HTML}, tag="web"),
    ("GET", "/favicon.ico"): _op("The site's icon", PUBLIC, {"200": {
        "description": "the icon", "content": {"image/x-icon": {"schema": STR}}}},
        tag="web"),
    ("GET", "/v1/web/config"): _op("What the pages need (no secrets)", PUBLIC, {
        "200": _json(_obj(["dev", "ws_path", "hls_url_template", "whip_url_template",
                           "payment_gateway", "stripe_publishable_key",
                           "reconnect_min_ms", "reconnect_max_ms", "hold_ttl"],
                          dev=BOOL, ws_path=STR, hls_url_template=STR,
                          whip_url_template=STR, payment_gateway=STR,
                          stripe_publishable_key=STR, reconnect_min_ms=INT,
                          reconnect_max_ms=INT, hold_ttl=INT))}, tag="web"),
    ("GET", "/v1/dev/token"): _op("Dev mode only: a viewer token", PUBLIC, {
        "200": _json(_obj(["token", "user_id", "role", "name", "expires_in"], token=STR,
                          user_id=STR, role={"const": "viewer"}, name=STR,
                          expires_in=INT))}, tag="web", params=[
        _query("role", {"type": "string", "enum": ["viewer"]}, "viewer only"),
        _query("name", {"type": "string", "pattern": r"^([\w .'-]{1,40})?$"},
               "shown name (empty: one is made up)")]),
    ("GET", "/static/{path:path}"): _op("The pages' scripts and styles", PUBLIC, {
        "200": {"description": "the file", "content": {"*/*": {"schema": STR}}}},
        tag="web"),
}

_READY = _obj(["status", "checks", "draining"],
              status={"type": "string", "enum": ["ready", "unavailable"]},
              checks=_obj(["redis", "postgres"], redis=STR, postgres=STR), draining=BOOL,
              error=ERROR["properties"]["error"])
SCHEMAS["Ready"] = _READY

_CONVERTED = re.compile(r"{(\w+):(\w+)}")


# Routes that exist only to refuse (RFC 9725 4.3.1: no trickle ICE, so PATCH on a WHIP
# session is 405, ``Allow: DELETE``): not operations, so not in the document;
# docs/http-api.md lists them.
REFUSALS = frozenset({("PATCH", "/v1/drops/{drop_id:id}/whip/{session_id}"),
                      ("OPTIONS", "/v1/drops/{drop_id:id}/whip/{session_id}")})


def route_operations(routes: Iterable[Any]) -> set[tuple[str, str]]:
    """(method, path) of every HTTP route but :data:`REFUSALS` (HEAD goes with GET;
    the WebSocket route is docs/protocol.md's)."""
    out = set()
    for route in routes:
        methods = getattr(route, "methods", None)
        if not methods:
            continue  # the WebSocket route: docs/protocol.md
        for method in methods:
            if method != "HEAD" and (method, route.path) not in REFUSALS:
                out.add((method, route.path))
    return out


def _parameters(path: str) -> tuple[str, list[dict[str, Any]]]:
    params = []
    for name, kind in _CONVERTED.findall(path):
        schema = {"type": "integer", "minimum": 1, "maximum": MAX_ID} if kind == "id" \
            else STR
        params.append({"name": name, "in": "path", "required": True, "schema": schema,
                       **({"examples": [1]} if kind == "id" else {})})
    for name in re.findall(r"{(\w+)}", path):
        params.append({"name": name, "in": "path", "required": True,
                       "schema": {"type": "string", "minLength": 1}})
    return _CONVERTED.sub(r"{\1}", path), params


def operation_id(method: str, path: str) -> str:
    """``post_v1_drops_drop_id_buy``: stable, from the method and the path."""
    words = re.findall(r"[A-Za-z0-9]+", _CONVERTED.sub(r"\1", path))
    return "_".join([method.lower(), *words]) if words else f"{method.lower()}_root"


# Where an answer names what other operations act on (OpenAPI links): schemathesis'
# stateful phase follows them, e.g. a drop it created, then BUY NOW on it.
_LINKS = {
    ("POST", "/v1/drops"): ("201", "$response.body#/id", "drop_id",
                            lambda m, p: p.startswith("/v1/drops/{drop_id:id}")),
    ("POST", "/v1/drops/{drop_id:id}/buy"): ("201", "$response.body#/hold_id", "hold_id",
                                            lambda m, p: p == "/v1/holds/{hold_id}"),
}


def _links(ops: set[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for source, (status, expression, name, wanted) in _LINKS.items():
        if source not in ops:
            continue
        links = {operation_id(m, p): {"operationId": operation_id(m, p),
                                      "parameters": {name: expression}}
                 for m, p in sorted(ops) if wanted(m, p) and m != "OPTIONS"}
        out[source] = {status: links}
    return out


def document(routes: Iterable[Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes an app mounts."""
    paths: dict[str, dict[str, Any]] = {}
    ops = {op for op in route_operations(routes) if op in OPERATIONS}
    links = _links(ops)
    for method, path in sorted(ops, key=lambda mp: (mp[1], mp[0])):
        spec_path, params = _parameters(path)
        entry = paths.setdefault(spec_path, {})
        if params:
            entry["parameters"] = params
        op = copy.deepcopy(OPERATIONS[(method, path)])
        op["operationId"] = operation_id(method, path)
        for status, named in links.get((method, path), {}).items():
            op["responses"][status]["links"] = named
        entry[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "dropserver", "version": __version__,
                 "description": "Live-commerce product drops: the HTTP API "
                                "(docs/http-api.md). The WebSocket /ws is described in "
                                "docs/protocol.md."},
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "bearerFormat": "JWT"}},
        },
    }
