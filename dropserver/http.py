"""Small helpers every HTTP endpoint uses: JSON bodies and typed field access."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from dropserver.errors import ApiError, ValidationFailed

__all__ = ["MAX_JSON_BODY", "field", "read_body", "read_json"]

MAX_JSON_BODY = 256 * 1024


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
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object")
    return data


_MISSING = object()


def field(data: dict[str, Any], name: str, typ: type | tuple[type, ...], *,
          default: Any = _MISSING, min_value: int | None = None,
          max_value: int | None = None, max_len: int | None = None) -> Any:
    """``data[name]`` checked against ``typ`` and bounds; a 422 names the field."""
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
    if min_value is not None and value < min_value:
        raise ValidationFailed(f"{name} must be >= {min_value}", details={"field": name})
    if max_value is not None and value > max_value:
        raise ValidationFailed(f"{name} must be <= {max_value}", details={"field": name})
    if max_len is not None and len(value) > max_len:
        raise ValidationFailed(f"{name} must be at most {max_len} long",
                               details={"field": name})
    return value
