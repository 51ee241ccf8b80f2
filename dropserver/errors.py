"""HTTP errors: every 4xx/5xx answers ``{"error": {"code", "message", "details"}}``.

Domain code raises :class:`ApiError` (or a subclass) with a stable machine-readable
``code``; the handlers installed by :func:`install` turn it, Starlette's own
``HTTPException`` and any unexpected exception into that JSON body.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

__all__ = [
    "ApiError",
    "Conflict",
    "Forbidden",
    "NotFound",
    "Unauthorized",
    "ValidationFailed",
    "error_body",
    "exception_handlers",
    "is_outage",
]

log = logging.getLogger("dropserver.http")


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details or {}
        self.headers = headers


class ValidationFailed(ApiError):
    status = 422
    code = "validation_failed"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _json_error(status: int, code: str, message: str, details=None, headers=None):
    return JSONResponse(error_body(code, message, details), status_code=status,
                        headers=headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    headers = dict(exc.headers or {})
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="dropserver"')
    return _json_error(exc.status, exc.code, exc.message, exc.details, headers)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code, "error")
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed(request)}
    return _json_error(exc.status_code, code, str(exc.detail), None, headers)


def _allowed(request: Request) -> str:
    """Every method the path supports (RFC 9110 15.5.6), across all the routes that
    share it: Starlette's own 405 names only the route that matched first."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


# PostgreSQL SQLSTATE classes of an outage: 08 connection exception, 53 insufficient
# resources (too many connections, disk full, out of memory), 57 operator intervention
# (admin shutdown, crash shutdown, cannot connect now, query cancelled by a timeout),
# 58 system error (I/O), 40 transaction rollback (serialization failure, deadlock).
_PG_OUTAGE_CLASSES = ("08", "53", "57", "58", "40")


def is_outage(exc: BaseException) -> bool:
    """``exc`` says the infrastructure is away, not that the work is wrong: PostgreSQL
    or Redis refused, reset or dropped the connection, is shutting down or starting up,
    has too many connections, timed out, is loading or read-only after a failover. The
    same request may succeed if retried: HTTP answers 503, the order pipeline
    (:mod:`checkout.retry`) waits it out. An exception with a ``retryable`` attribute
    (a payment gateway's error; ``checkout.retry.NotYet``) says so itself."""
    import socket

    import asyncpg
    from redis import exceptions as redis_errors

    retryable = getattr(exc, "retryable", None)
    if retryable is not None:
        return bool(retryable)
    if type(exc) is OSError:  # asyncpg's "Multiple exceptions: [Errno 111] ...", unreachable
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return (getattr(exc, "sqlstate", None) or "")[:2] in _PG_OUTAGE_CLASSES
    return isinstance(exc, (
        ConnectionError,  # refused, reset, aborted, broken pipe
        TimeoutError,  # pool acquire, connect
        socket.gaierror,  # a name that does not resolve right now
        asyncpg.InterfaceError,  # "connection is closed", pool closing
        asyncpg.exceptions.InternalClientError,  # a connection lost mid-query
        redis_errors.ConnectionError,  # includes BusyLoadingError
        redis_errors.TimeoutError,
        redis_errors.ReadOnlyError,  # a replica promoted late after a failover
        redis_errors.TryAgainError,
        redis_errors.ClusterDownError,
        redis_errors.OutOfMemoryError,
    ))


def _bad_value(exc: BaseException) -> bool:
    """PostgreSQL refused a value (out of range, not valid text): input a validator
    should have caught. The client still gets a 422, and the log says which path."""
    import asyncpg

    return isinstance(exc, (asyncpg.DataError, UnicodeEncodeError))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if is_outage(exc):
        log.warning("backing service unavailable", extra={
            "path": request.url.path, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return _json_error(503, "unavailable", "a backing service is unavailable; retry "
                           "shortly", None, {"Retry-After": "1"})
    if _bad_value(exc):
        log.warning("a value the validators let through was refused", extra={
            "path": request.url.path, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return _json_error(422, "validation_failed", "a value is out of range or is not "
                           "valid text")
    log.exception("unhandled error", extra={"path": request.url.path})
    return _json_error(500, "internal_error", "internal server error")


def exception_handlers() -> dict[Any, Any]:
    return {ApiError: _api_error, HTTPException: _http_exception, Exception: _unexpected}
