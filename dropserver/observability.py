"""Structured JSON logs with request/connection context, and Prometheus metrics.

Secrets never reach a log line: every line (ours, uvicorn's, websockets', tracebacks)
goes through :func:`redact` as the handler formats it, which replaces the values of
secret-looking query parameters (``?token=``, ``api_key``, ``client_secret``...) and
credentials wherever they appear (JWTs, ``Bearer ...``, Stripe keys).

Context travels in :mod:`contextvars`: :func:`bind` sets ``request_id``,
``conn_id``, ``drop_id`` or ``user_id`` for the current task and every log line it
writes carries them. Metrics use prometheus-client; with several worker processes
``PROMETHEUS_MULTIPROC_DIR`` is set by ``dropserver serve`` so ``/metrics`` on any
worker reports the sum of all of them.
"""

from __future__ import annotations

import bisect
import collections
import contextvars
import json
import logging
import os
import re
import secrets
import sys
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "RequestContextMiddleware",
    "bind",
    "configure_logging",
    "flush_tallies",
    "metrics_endpoint",
    "new_id",
    "redact",
    "tally",
    "tally_label",
    "tally_observe",
]

_CONTEXT_KEYS = ("request_id", "conn_id", "drop_id", "user_id", "node_id")
_context: dict[str, contextvars.ContextVar[Any]] = {
    key: contextvars.ContextVar(key, default=None) for key in _CONTEXT_KEYS
}
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def new_id(prefix: str = "") -> str:
    return prefix + secrets.token_hex(6)


def bind(**values: Any) -> None:
    """Attach values (request_id, conn_id, drop_id, user_id, node_id) to this task."""
    for key, value in values.items():
        _context[key].set(value)


# Query parameters whose values are secrets (``?token=`` is how browsers authenticate
# a WebSocket and HLS; the rest are the usual suspects of OAuth, Stripe and API keys).
_SECRET_PARAMS = ("token", "access_token", "id_token", "refresh_token", "jwt", "auth",
                  "authorization", "api_key", "apikey", "key", "secret", "client_secret",
                  "password", "passwd", "pwd", "signature", "sig", "code", "session")
_SECRET_QUERY = re.compile(
    r"(?i)([?&;](?:[\w.-]*_)?(?:" + "|".join(_SECRET_PARAMS) + r")=)[^&;#\s\"'\\]*")
# Secrets however they appear: a JWT, a bearer credential, Stripe keys and secrets.
_SECRET_TEXT = re.compile(
    r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"            # JWT (header.payload.signature)
    r"|(?i:bearer)\s+[\w.~+/=-]{8,}"                   # Authorization: Bearer ...
    r"|\b(?:sk|rk)_(?:live|test)_\w+|\bwhsec_\w+"      # Stripe secret keys, webhook secrets
    r"|\bpi_\w+_secret_\w+")                          # PaymentIntent client secrets
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    """``text`` with secret-looking query values and credentials replaced."""
    if "=" in text:
        text = _SECRET_QUERY.sub(lambda m: m.group(1) + REDACTED, text)
    return _SECRET_TEXT.sub(REDACTED, text)


class RedactingFormatter(logging.Formatter):
    """Text lines, redacted (:func:`redact`) after formatting, tracebacks included."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, redacted (:func:`redact`) as a whole: message,
    extra fields and the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._format(record))

    def _format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in _context.items():
            value = var.get()
            if value is not None:
                out[key] = value
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RedactingFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log duplicates ours; its error log goes through root.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class RequestContextMiddleware:
    """Gives each HTTP request and WebSocket an id (``X-Request-ID`` is honoured)
    and logs one line per HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logging.getLogger("dropserver.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")[:64]
                break
        request_id = incoming or new_id("r-")
        bind(request_id=request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append(
                    (b"x-request-id", request_id.encode("latin-1"))
                )
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.log.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )


# Hot-path counts not yet added to their Prometheus counters. In multi-process mode
# every ``inc()`` is a locked write to a memory-mapped file after a getpid() check:
# several per buy were ~4% of a worker's time in the buy benchmark. The counts are
# added once a second (the app's lifespan), at shutdown, and before /metrics answers.
_tallies: collections.Counter[Any] = collections.Counter()


# Hot-path observations not yet added to their histograms: per histogram, the sum
# and a count per bucket. In multi-process mode ``observe()`` is two of those locked
# writes (the sum and a bucket): with the labelled error count, three per refused
# bid, the most common answer of a bidding war (docs/benchmarks.md, "Auctions").
_observed: dict[Any, tuple[list[float], list[int], Any]] = {}


def tally(counter: Any, amount: int = 1) -> None:
    """``counter.inc(amount)``, batched: for counters on the hot path."""
    _tallies[counter] += amount


_children: dict[tuple[Any, str], Any] = {}  # (counter, label value) -> its child


def tally_label(counter: Any, value: str, amount: int = 1) -> None:
    """``counter.labels(value).inc(amount)``, batched, the child looked up once (for a
    counter with one label of a few values: refusal codes, outcomes)."""
    key = (counter, value)
    child = _children.get(key)
    if child is None:
        child = _children[key] = counter.labels(value)
    _tallies[child] += amount


def tally_observe(histogram: Any, amount: float) -> None:
    """``histogram.observe(amount)``, batched as :func:`tally` (same buckets, same sum
    once flushed). A histogram whose internals are not prometheus_client's known
    ones (``_upper_bounds``, ``_buckets``, ``_sum``) is observed at once instead."""
    acc = _observed.get(histogram)
    if acc is None:
        bounds = getattr(histogram, "_upper_bounds", None)
        buckets = getattr(histogram, "_buckets", None)
        if (not bounds or buckets is None or len(buckets) != len(bounds)
                or not hasattr(histogram, "_sum") or bounds[-1] != float("inf")):
            histogram.observe(amount)
            return
        acc = _observed[histogram] = ([0.0], [0] * len(bounds), bounds)
    acc[0][0] += amount
    # observe() counts the first bucket whose upper bound is >= the amount.
    acc[1][bisect.bisect_left(acc[2], amount)] += 1


def flush_tallies() -> None:
    """Add every pending :func:`tally` to its counter and every pending
    :func:`tally_observe` to its histogram."""
    pending = dict(_tallies)
    _tallies.clear()
    for counter, amount in pending.items():
        counter.inc(amount)
    observed = list(_observed.items())
    _observed.clear()
    for histogram, (total, counts, _bounds) in observed:
        if not any(counts):
            continue
        histogram._sum.inc(total[0])
        for bucket, n in zip(histogram._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text exposition; sums all workers in multi-process mode."""
    flush_tallies()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        data = generate_latest(registry)
    else:
        data = generate_latest()
    return Response(data, media_type=CONTENT_TYPE_LATEST)
