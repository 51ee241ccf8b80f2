"""Small helpers every HTTP endpoint uses: JSON bodies, typed field access, ids.

Input rules that hold for every endpoint live here, so no handler can miss them:

* ids in paths use the ``id`` convertor (``/v1/drops/{drop_id:id}``): 1-18 ASCII digits,
  no leading zero, so every id fits PostgreSQL's ``bigint``; anything else matches no
  route (404);
* a JSON body holds only the fields its endpoint defines: :func:`reject_unknown`
  answers anything else with 422 naming it (a typo is an error, never a default);
* integers in query strings and headers go through :func:`parse_int` (ASCII digits
  only: ``str.isdigit()`` also says yes to ``"\u00b2"``, which ``int()`` refuses);
* every string in a JSON body is text PostgreSQL and Redis can store: no NUL, no
  unpaired surrogate (422 naming the field); a body nested too deeply is 400;
* an integer field is at most 2^63 - 1 unless a handler says less;
* a URL with a NUL anywhere (``%00`` in the path or the query) is 400
  (:class:`NulGuard`): no name here contains one, and file systems and PostgreSQL
  refuse it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from dropserver.errors import ApiError, ValidationFailed, error_body
from dropserver.text import find_bad_text

__all__ = ["MAX_ID", "MAX_JSON_BODY", "NulGuard", "field", "parse_int", "read_body",
           "read_json", "reject_unknown"]

MAX_JSON_BODY = 256 * 1024
MAX_ID = 2**63 - 1  # PostgreSQL bigint: every id column, every integer column


class IdConvertor(Convertor[int]):
    """``{name:id}``: a positive database id written canonically, 18 digits at most, so
    it is always below 2^63 (0, ``007``, a longer or a non-ASCII one matches no route:
    404, never a database error)."""

    regex = "[1-9][0-9]{0,17}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(int(value))


register_url_convertor("id", IdConvertor())

class NulGuard:
    """400 ``bad_request`` for an HTTP request whose decoded path or query has a NUL."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"]
                                        or b"%00" in scope.get("query_string", b"")):
            response = JSONResponse(error_body("bad_request", "the URL contains a NUL "
                                               "character (%00)"), status_code=400)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


_ASCII_INT = re.compile(r"[0-9]{1,19}")


def parse_int(raw: str, name: str, *, low: int = 0, high: int = MAX_ID) -> int:
    """An integer written in ASCII digits within ``low..high``, else a 422 naming it."""
    if not _ASCII_INT.fullmatch(raw) or not low <= int(raw) <= high:
        raise ValidationFailed(f"{name} must be an integer from {low} to {high}",
                               details={"field": name})
    return int(raw)


async def read_body(request: Request, max_bytes: int, what: str = "body") -> bytes:
    """The request body, or ``413 payload_too_large`` as soon as it passes ``max_bytes``
    (read as it streams in: an oversized body is never held whole)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(f"{what} larger than {max_bytes} bytes",
                           code="payload_too_large", status=413)
    return bytes(body)


async def read_json(request: Request, *, max_bytes: int = MAX_JSON_BODY) -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx :class:`ApiError`."""
    ctype = request.headers.get("content-type", "")
    if ctype and "json" not in ctype:
        raise ApiError("expected Content-Type: application/json",
                       code="unsupported_media_type", status=415)
    body = await read_body(request, max_bytes)
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"malformed JSON: {exc}", code="malformed_json") from None
    except RecursionError:
        raise ApiError("malformed JSON: nested too deeply", code="malformed_json") from None
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object")
    # NUL only arrives escaped (\u0000); a surrogate escaped, or as UTF-8-encoded
    # surrogate bytes (0xED 0xA0-0xBF), which json.loads lets through: look only then.
    if b"\\u" in body or b"\xed" in body:
        bad = find_bad_text(data)
        if bad is not None:
            raise ValidationFailed(f"{bad[0]} {bad[1]}", details={"field": bad[0]})
    return data


_MISSING = object()


def field(data: dict[str, Any], name: str, typ: type | tuple[type, ...], *,
          default: Any = _MISSING, min_value: int | None = None,
          max_value: int | None = None, max_len: int | None = None) -> Any:
    """``data[name]`` checked against ``typ`` and bounds; a 422 names the field. An
    integer fits a bigint (+-2^63) unless the bounds say less."""
    if name not in data or data[name] is None:
        if default is _MISSING:
            raise ValidationFailed(f"{name} is required", details={"field": name})
        return default
    value = data[name]
    types = typ if isinstance(typ, tuple) else (typ,)
    if bool in types:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, types) and not isinstance(value, bool)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise ValidationFailed(f"{name} must be {names}", details={"field": name})
    if isinstance(value, int) and not isinstance(value, bool):
        min_value = -MAX_ID - 1 if min_value is None else min_value
        max_value = MAX_ID if max_value is None else max_value
    if min_value is not None and value < min_value:
        raise ValidationFailed(f"{name} must be >= {min_value}", details={"field": name})
    if max_value is not None and value > max_value:
        raise ValidationFailed(f"{name} must be <= {max_value}", details={"field": name})
    if max_len is not None and len(value) > max_len:
        raise ValidationFailed(f"{name} must be at most {max_len} long",
                               details={"field": name})
    return value


def reject_unknown(data: dict[str, Any], known: Collection[str], prefix: str = "") -> None:
    """422 naming the first field of ``data`` that is not in ``known`` (``prefix``: the
    path of a nested object, e.g. ``"products[0]."``)."""
    for name in data:
        if name not in known:
            path = f"{prefix}{name[:64]}"
            raise ValidationFailed(f"{path} is not a known field", details={"field": path})
