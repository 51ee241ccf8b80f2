"""Validation of creator input: JSON bodies -> typed drop and product specs (pure).

Every error is a 422 ``validation_failed`` whose ``details.field`` names the field,
nested ones with their path (``products[1].price``). Money is integer minor units
(cents) beside the drop's ISO 4217 currency; nothing here accepts a float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dropserver.errors import ValidationFailed
from dropserver.http import field as _field
from dropserver.http import reject_unknown

__all__ = [
    "LIMITS",
    "CampaignSpec",
    "DropPatch",
    "DropSpec",
    "ProductSpec",
    "VariantSpec",
    "parse_create",
    "parse_patch",
    "parse_product_id",
    "parse_time",
]


@dataclass(frozen=True)
class _Limits:
    title: int = 200               # schema: CHECK (length(title) BETWEEN 1 AND 200)
    description: int = 5000
    image_url: int = 2000
    products: int = 50             # products in one drop
    price: int = 10**10            # minor units: 100 million in a 2-decimal currency
    units: int = 1_000_000
    per_buyer_limit: int = 100
    max_holds_per_user: int = 10
    goal_orders: int = 10_000_000
    variants: int = 50             # variants of one product
    options: int = 4               # option names of a variant (size, colour, ...)
    option_text: int = 100


LIMITS = _Limits()

_CURRENCY = re.compile(r"^[A-Za-z]{3}$")  # ISO 4217 alphabetic code
_DROP_FIELDS = {"title", "description", "kind", "currency", "starts_at",
                "max_holds_per_user", "campaign", "products"}
_PRODUCT_FIELDS = {"product_id", "title", "description", "image_url", "price", "units",
                   "per_buyer_limit", "cogs", "variants"}
_VARIANT_FIELDS = {"variant_id", "title", "options", "image_url", "price", "units",
                   "per_buyer_limit"}
_CAMPAIGN_FIELDS = {"goal_orders", "deadline"}
KINDS = ("standard", "campaign")


@dataclass(frozen=True)
class VariantSpec:
    """One variant of a product (a size, a colour): its own stock, and optionally its
    own per-buyer limit and price (None: the product's)."""

    options: dict[str, str]
    units: int
    title: str = ""
    image_url: str = ""
    price: int | None = None
    per_buyer_limit: int | None = None
    variant_id: int | None = None   # set when a PATCH updates a variant already there


@dataclass(frozen=True)
class ProductSpec:
    title: str
    price: int
    units: int
    per_buyer_limit: int = 1
    cogs: int = 0
    description: str = ""
    image_url: str = ""
    product_id: int | None = None   # set when a PATCH updates a product already in the drop
    variants: tuple[VariantSpec, ...] = ()  # none: one implicit variant (the product)


@dataclass(frozen=True)
class CampaignSpec:
    goal_orders: int
    deadline: datetime


@dataclass(frozen=True)
class DropSpec:
    title: str
    products: list[ProductSpec]
    description: str = ""
    kind: str = "standard"
    currency: str = "usd"
    starts_at: datetime | None = None
    max_holds_per_user: int = 1
    campaign: CampaignSpec | None = None


@dataclass(frozen=True)
class DropPatch:
    """Only the fields the client sent; ``products`` replaces the whole list."""

    values: dict[str, Any] = field(default_factory=dict)
    products: list[ProductSpec] | None = None
    campaign: CampaignSpec | None = None


def _fail(path: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{path} {message}", details={"field": path})


def _at(prefix: str, data: dict[str, Any], name: str, typ: Any, **kw: Any) -> Any:
    """:func:`dropserver.http.field` with the field named by its full path."""
    try:
        return _field(data, name, typ, **kw)
    except ValidationFailed as exc:
        path = f"{prefix}{name}"
        raise ValidationFailed(exc.message.replace(name, path, 1),
                               details={"field": path}) from None


def _object(path: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, "must be an object")
    return value


def parse_time(value: Any, path: str, *, now: datetime, future: bool = True) -> datetime:
    """An ISO 8601 timestamp with a UTC offset (``2026-11-23T18:00:00Z``)."""
    if not isinstance(value, str):
        raise _fail(path, "must be an ISO 8601 timestamp string")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise _fail(path, "must be an ISO 8601 timestamp") from None
    if when.tzinfo is None:
        raise _fail(path, "must carry a UTC offset (e.g. 'Z' or '+00:00')")
    try:
        when = when.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is past the year 9999 in UTC
        raise _fail(path, "must be between the years 1 and 9999 in UTC") from None
    if future and when <= now:
        raise _fail(path, "must be in the future")
    return when


def _text(prefix: str, data: dict[str, Any], name: str, max_len: int, *,
          required: bool = False, default: str = "") -> str:
    if required:
        value = _at(prefix, data, name, str, max_len=max_len)
        if not value.strip():
            raise _fail(f"{prefix}{name}", "must not be empty")
        return value.strip()
    return _at(prefix, data, name, str, default=default, max_len=max_len)


def _currency(data: dict[str, Any], default: str | None) -> str | None:
    if "currency" not in data or data["currency"] is None:
        return default
    value = data["currency"]
    if not isinstance(value, str) or not _CURRENCY.match(value):
        raise _fail("currency", "must be a 3-letter ISO 4217 code such as 'usd'")
    return value.lower()


def _image_url(prefix: str, data: dict[str, Any]) -> str:
    url = _text(prefix, data, "image_url", LIMITS.image_url)
    if url and not url.startswith(("https://", "http://", "/")):
        raise _fail(f"{prefix}image_url", "must be an http(s) URL or a path")
    return url


def _options(path: str, raw: Any) -> dict[str, str]:
    data = _object(path, raw)
    if not 1 <= len(data) <= LIMITS.options:
        raise _fail(path, f"must name 1 to {LIMITS.options} options, e.g. {{\"size\": \"M\"}}")
    out: dict[str, str] = {}
    for name, value in data.items():
        if not name.strip() or len(name) > LIMITS.option_text:
            raise _fail(path, f"option names must be 1-{LIMITS.option_text} characters")
        if not isinstance(value, str) or not value.strip() or len(value) > LIMITS.option_text:
            raise _fail(f"{path}.{name}", f"must be a string of 1-{LIMITS.option_text} "
                        "characters")
        out[name.strip()] = value.strip()
    return out


def _variant(prefix: str, raw: Any, *, allow_id: bool, product_limit: int) -> VariantSpec:
    data = _object(prefix.rstrip("."), raw)
    reject_unknown(data, _VARIANT_FIELDS if allow_id else _VARIANT_FIELDS - {"variant_id"},
                   prefix)
    if "options" not in data:
        raise _fail(f"{prefix}options", "is required")
    options = _options(f"{prefix}options", data["options"])
    units = _at(prefix, data, "units", int, min_value=1, max_value=LIMITS.units)
    limit = _at(prefix, data, "per_buyer_limit", int, default=None, min_value=1,
                max_value=LIMITS.per_buyer_limit)
    if limit is not None and limit > product_limit:
        raise _fail(f"{prefix}per_buyer_limit", "must not exceed the product's "
                    "per_buyer_limit (it counts every variant of the product)")
    return VariantSpec(
        options=options, units=units,
        title=_text(prefix, data, "title", LIMITS.title) or " / ".join(options.values()),
        image_url=_image_url(prefix, data),
        price=_at(prefix, data, "price", int, default=None, min_value=1,
                  max_value=LIMITS.price),
        per_buyer_limit=limit,
        variant_id=_at(prefix, data, "variant_id", int, default=None, min_value=1)
        if allow_id else None,
    )


def _variants(prefix: str, raw: Any, *, allow_id: bool,
              product_limit: int) -> tuple[VariantSpec, ...]:
    path = f"{prefix}variants"
    if not isinstance(raw, list) or not 1 <= len(raw) <= LIMITS.variants:
        raise _fail(path, f"must be a list of 1 to {LIMITS.variants} variants")
    specs = [_variant(f"{path}[{i}].", item, allow_id=allow_id, product_limit=product_limit)
             for i, item in enumerate(raw)]
    names = set(specs[0].options)
    seen: dict[tuple, int] = {}
    for i, v in enumerate(specs):
        if set(v.options) != names:
            raise _fail(f"{path}[{i}].options", "must name the same options as "
                        f"{path}[0] ({', '.join(sorted(names))})")
        combo = tuple(sorted((k, val.casefold()) for k, val in v.options.items()))
        if combo in seen:
            raise _fail(f"{path}[{i}].options",
                        f"repeats the options of {path}[{seen[combo]}]")
        seen[combo] = i
    ids = [v.variant_id for v in specs if v.variant_id is not None]
    if len(ids) != len(set(ids)):
        raise _fail(path, "names a variant_id twice")
    return tuple(specs)


def _product(index: int, raw: Any, *, allow_id: bool) -> ProductSpec:
    prefix = f"products[{index}]."
    data = _object(f"products[{index}]", raw)
    reject_unknown(data, _PRODUCT_FIELDS if allow_id else _PRODUCT_FIELDS - {"product_id"},
                   prefix)
    price = _at(prefix, data, "price", int, min_value=1, max_value=LIMITS.price)
    limit = _at(prefix, data, "per_buyer_limit", int, default=1, min_value=1,
                max_value=LIMITS.per_buyer_limit)
    variants: tuple[VariantSpec, ...] = ()
    if data.get("variants") is not None:
        variants = _variants(prefix, data["variants"], allow_id=allow_id,
                             product_limit=limit)
        total = sum(v.units for v in variants)
        units = _at(prefix, data, "units", int, default=total, min_value=1,
                    max_value=LIMITS.units * LIMITS.variants)
        if units != total:
            raise _fail(f"{prefix}units", f"must be the sum of its variants' units ({total})"
                        " or left out")
    else:
        units = _at(prefix, data, "units", int, min_value=1, max_value=LIMITS.units)
    if limit > units:
        raise _fail(f"{prefix}per_buyer_limit", "must not exceed units")
    return ProductSpec(
        title=_text(prefix, data, "title", LIMITS.title, required=True),
        description=_text(prefix, data, "description", LIMITS.description),
        image_url=_image_url(prefix, data),
        price=price,
        units=units,
        per_buyer_limit=limit,
        cogs=_at(prefix, data, "cogs", int, default=0, min_value=0, max_value=LIMITS.price),
        product_id=_at(prefix, data, "product_id", int, default=None, min_value=1)
        if allow_id else None,
        variants=variants,
    )


def _products(raw: Any, *, allow_id: bool) -> list[ProductSpec]:
    if not isinstance(raw, list):
        raise _fail("products", "must be a list of products")
    if not 1 <= len(raw) <= LIMITS.products:
        raise _fail("products", f"must hold 1 to {LIMITS.products} products")
    specs = [_product(i, item, allow_id=allow_id) for i, item in enumerate(raw)]
    ids = [p.product_id for p in specs if p.product_id is not None]
    if len(ids) != len(set(ids)):
        raise _fail("products", "names a product_id twice")
    return specs


def _campaign(raw: Any, *, now: datetime) -> CampaignSpec:
    data = _object("campaign", raw)
    reject_unknown(data, _CAMPAIGN_FIELDS, "campaign.")
    goal = _at("campaign.", data, "goal_orders", int, min_value=1,
               max_value=LIMITS.goal_orders)
    if "deadline" not in data:
        raise _fail("campaign.deadline", "is required")
    return CampaignSpec(goal, parse_time(data["deadline"], "campaign.deadline", now=now))


def parse_create(data: dict[str, Any], *, now: datetime) -> DropSpec:
    """The body of ``POST /v1/drops``."""
    reject_unknown(data, _DROP_FIELDS)
    kind = _at("", data, "kind", str, default="standard")
    if kind not in KINDS:
        raise _fail("kind", f"must be one of {', '.join(KINDS)}")
    campaign = None
    if kind == "campaign":
        if data.get("campaign") is None:
            raise _fail("campaign", "is required for a campaign drop (goal_orders, deadline)")
        campaign = _campaign(data["campaign"], now=now)
    elif data.get("campaign") is not None:
        raise _fail("campaign", "is only allowed when kind is 'campaign'")
    if "products" not in data:
        raise _fail("products", "is required")
    starts_at = None
    if data.get("starts_at") is not None:
        starts_at = parse_time(data["starts_at"], "starts_at", now=now)
    return DropSpec(
        title=_text("", data, "title", LIMITS.title, required=True),
        description=_text("", data, "description", LIMITS.description),
        kind=kind,
        currency=_currency(data, "usd") or "usd",
        starts_at=starts_at,
        max_holds_per_user=_at("", data, "max_holds_per_user", int, default=1, min_value=1,
                               max_value=LIMITS.max_holds_per_user),
        campaign=campaign,
        products=_products(data["products"], allow_id=False),
    )


def parse_patch(data: dict[str, Any], *, now: datetime, kind: str) -> DropPatch:
    """The body of ``PATCH /v1/drops/{id}``: any subset of the create fields but kind."""
    if "kind" in data:
        raise _fail("kind", "cannot be changed; create a new drop")
    reject_unknown(data, _DROP_FIELDS - {"kind"})
    if not data:
        raise ValidationFailed("nothing to update", details={"field": None})
    values: dict[str, Any] = {}
    if "title" in data:
        values["title"] = _text("", data, "title", LIMITS.title, required=True)
    if "description" in data:
        values["description"] = _text("", data, "description", LIMITS.description)
    if "currency" in data:
        values["currency"] = _currency(data, None)
        if values["currency"] is None:
            raise _fail("currency", "must not be null")
    if "max_holds_per_user" in data:
        values["max_holds_per_user"] = _at("", data, "max_holds_per_user", int, min_value=1,
                                           max_value=LIMITS.max_holds_per_user)
    if "starts_at" in data:
        values["starts_at"] = (None if data["starts_at"] is None
                               else parse_time(data["starts_at"], "starts_at", now=now))
    campaign = None
    if "campaign" in data:
        if kind != "campaign":
            raise _fail("campaign", "is only allowed when kind is 'campaign'")
        campaign = _campaign(data["campaign"], now=now)
    products = _products(data["products"], allow_id=True) if "products" in data else None
    return DropPatch(values=values, products=products, campaign=campaign)


def parse_product_id(data: dict[str, Any], *, required: bool = True) -> int | None:
    """``{"product_id": 7}`` of pin, buy-now and close."""
    reject_unknown(data, {"product_id"})
    if required:
        return _at("", data, "product_id", int, min_value=1)
    return _at("", data, "product_id", int, default=None, min_value=1)
