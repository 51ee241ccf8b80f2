"""One typed settings object, read from environment variables.

Every field names its variable; `docs/configuration.md` lists them all. An invalid
value raises :class:`SettingsError` naming the variable, and start-up stops there.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Settings", "SettingsError", "load_settings", "unsafe_rig_env"]

DEV_JWT_SECRET = "dropserver-dev-secret-not-for-production"


class SettingsError(ValueError):
    """A configuration value is missing or malformed."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


def _env(name: str, default: Any, doc: str, *, choices: tuple[str, ...] = ()) -> Any:
    return field(
        default=default,
        metadata={"env": name, "doc": doc, "choices": choices},
    )


@dataclass(frozen=True, slots=True)
class Settings:
    # --- process -------------------------------------------------------------
    host: str = _env("DROPSERVER_HOST", "127.0.0.1", "Address to listen on.")
    port: int = _env("DROPSERVER_PORT", 8000, "TCP port (0 picks a free one).")
    workers: int = _env("DROPSERVER_WORKERS", 1, "Worker processes sharing the port.")
    event_loop: str = _env("DROPSERVER_EVENT_LOOP", "asyncio", "Event loop of the server "
                           "workers. `uvloop` connected a 50,000-viewer rehearsal ~3x "
                           "slower here (docs/benchmarks.md).",
                           choices=("asyncio", "uvloop"))
    gc_threshold: tuple[str, ...] = _env("DROPSERVER_GC_THRESHOLD", ("700", "10", "100"),
                                         "The server workers' gc.set_threshold (three "
                                         "integers). A full collection of a worker with "
                                         "12,500 sockets takes ~1 s; 700,10,100 ran 3 in a "
                                         "50,000-viewer ramp where Python's 700,10,10 ran 16 "
                                         "(docs/benchmarks.md). A much higher third number "
                                         "keeps closed sockets' memory.")
    node_id: str = _env("DROPSERVER_NODE_ID", "", "Name of this process in presence "
                        "and logs; empty derives hostname:pid.")
    log_level: str = _env("DROPSERVER_LOG_LEVEL", "info", "Log level.",
                          choices=("debug", "info", "warning", "error"))
    log_format: str = _env("DROPSERVER_LOG_FORMAT", "json", "Log line format.",
                           choices=("json", "text"))
    public_url: str = _env("DROPSERVER_PUBLIC_URL", "", "Base of the HLS and replay URLs "
                           "given out (/stream, /replay, stream.status, the pages' config), "
                           "e.g. a CDN in front of /v1/drops/*/hls/; empty gives path-only "
                           "URLs (/v1/drops/7/hls/live.m3u8) that clients resolve against "
                           "the address they used.")
    cors_origins: tuple[str, ...] = _env("DROPSERVER_CORS_ORIGINS", (), "Comma-separated "
                                         "origins allowed by CORS (HLS and API).")

    # --- backing services ----------------------------------------------------
    redis_url: str = _env("REDIS_URL", "", "Redis URL. Empty under `dropserver dev` "
                          "starts a local one. `redis+cluster://host:port[,host:port...]` "
                          "(`rediss+cluster://` with TLS) is a Redis/Valkey Cluster.")
    database_url: str = _env("DATABASE_URL", "", "PostgreSQL URL. Empty under "
                             "`dropserver dev` starts a local one.")
    db_pool_min: int = _env("DROPSERVER_DB_POOL_MIN", 1, "asyncpg pool minimum size.")
    db_pool_max: int = _env("DROPSERVER_DB_POOL_MAX", 10, "asyncpg pool maximum size.")
    db_control_pool: int = _env("DROPSERVER_DB_CONTROL_POOL", 2, "PostgreSQL connections "
                                "per worker kept for drop lifecycle actions (the "
                                "creator's BUY NOW, close, end, ...; sold out), apart "
                                "from the shared pool that order workers can fill "
                                "during a sell-out.")

    # --- auth ----------------------------------------------------------------
    jwt_secret: str = _env("DROPSERVER_JWT_SECRET", "", "HS256 secret. `dropserver dev` "
                           "uses a fixed dev secret when empty.")
    jwks_url: str = _env("DROPSERVER_JWKS_URL", "", "JWKS URL for RS256/ES256 tokens "
                         "(Clerk, Auth0, Better Auth). Takes precedence over the secret.")
    jwt_audience: str = _env("DROPSERVER_JWT_AUDIENCE", "dropserver", "Required `aud`.")
    jwt_issuer: str = _env("DROPSERVER_JWT_ISSUER", "", "Required `iss`; empty skips it.")
    jwt_role_claim: str = _env("DROPSERVER_JWT_ROLE_CLAIM", "role", "Claim holding the "
                               "role (viewer, creator, admin, investor).")

    # --- real-time -----------------------------------------------------------
    ws_max_message_bytes: int = _env("DROPSERVER_WS_MAX_MESSAGE_BYTES", 16384,
                                     "Largest frame a client may send.")
    ws_send_queue_bytes: int = _env("DROPSERVER_WS_SEND_QUEUE_BYTES", 262144,
                                    "Per-connection outgoing buffer before a slow close.")
    ws_ping_interval: float = _env("DROPSERVER_WS_PING_INTERVAL", 25.0,
                                   "Seconds between server pings.")
    ws_pong_timeout: float = _env("DROPSERVER_WS_PONG_TIMEOUT", 10.0,
                                  "Seconds to wait for a pong before closing.")
    history_size: int = _env("DROPSERVER_HISTORY_SIZE", 1000,
                             "Events kept per drop for recovery.")
    history_ttl: int = _env("DROPSERVER_HISTORY_TTL", 86400,
                            "Seconds a drop's history is kept after its last event.")
    stock_coalesce_ms: int = _env("DROPSERVER_STOCK_COALESCE_MS", 100,
                                  "Minimum interval between stock updates per drop.")
    viewers_coalesce_ms: int = _env("DROPSERVER_VIEWERS_COALESCE_MS", 1000,
                                    "Minimum interval between viewer-count updates.")
    coalesce_budget: int = _env("DROPSERVER_COALESCE_BUDGET", 5000,
                                "Frames per second one process spends on each coalesced "
                                "event (stock, viewers) of a drop: with more local "
                                "viewers than this times the interval, the interval "
                                "grows (viewers / budget seconds). 0: fixed intervals.")
    viewers_budget: int = _env("DROPSERVER_VIEWERS_BUDGET", 1000,
                               "Frames per second one process spends on a drop's viewer "
                               "count: a process with N local viewers sends it at most "
                               "every N / budget seconds (12,500: 12.5 s). 0: the "
                               "coalescing budget applies.")
    presence_ttl: int = _env("DROPSERVER_PRESENCE_TTL", 10,
                             "Seconds before a silent node's viewers leave the count.")
    reconnect_min_ms: int = _env("DROPSERVER_RECONNECT_MIN_MS", 500,
                                 "Lower bound of the jittered reconnect delay on drain.")
    reconnect_max_ms: int = _env("DROPSERVER_RECONNECT_MAX_MS", 5000,
                                 "Upper bound of the jittered reconnect delay on drain.")
    shutdown_grace: float = _env("DROPSERVER_SHUTDOWN_GRACE", 10.0,
                                 "Seconds a draining worker waits before it stops.")
    max_connections: int = _env("DROPSERVER_MAX_CONNECTIONS", 18000,
                                "Sockets per worker before new ones are told to retry.")

    # --- chat ----------------------------------------------------------------
    chat_max_chars: int = _env("DROPSERVER_CHAT_MAX_CHARS", 300, "Longest chat message.")
    chat_rate_per_10s: int = _env("DROPSERVER_CHAT_RATE", 5,
                                  "Chat messages a user may send per 10 s.")
    chat_history: int = _env("DROPSERVER_CHAT_HISTORY", 50, "Chat messages sent on join.")
    chat_batch_viewers: int = _env("DROPSERVER_CHAT_BATCH_VIEWERS", 500,
                                   "Local viewers of a drop (in one process) from which "
                                   "its chat goes out in batches instead of one write "
                                   "per message per socket.")
    chat_batch_ms: int = _env("DROPSERVER_CHAT_BATCH_MS", 250,
                              "Shortest interval between two chat batches to a socket.")
    chat_budget: int = _env("DROPSERVER_CHAT_BUDGET", 10000,
                            "Socket writes per second one process spends on a big "
                            "room's chat: the batch interval grows to local viewers / "
                            "budget seconds. 0: the interval alone.")
    chat_read_rate: float = _env("DROPSERVER_CHAT_READ_RATE", 20.0,
                                 "Chat messages per second a viewer can read: a batch "
                                 "carries at most this times its interval, a fair "
                                 "sample; the creator's, moderators' and the viewer's "
                                 "own messages always.")
    chat_quiet_ms: int = _env("DROPSERVER_CHAT_QUIET_MS", 1000,
                              "In a big room, the chat in front of a drop event goes "
                              "out thinned (the creator's, moderators' and the viewer's "
                              "own messages; a skipped count for the rest) and the next "
                              "chat batch waits this long after the drop event reached "
                              "every socket. 0: neither.")

    # --- checkout ------------------------------------------------------------
    hold_ttl: int = _env("DROPSERVER_HOLD_TTL", 600, "Seconds a reservation is held.")
    buy_rate_per_user: int = _env("DROPSERVER_BUY_RATE_USER", 10,
                                  "Buy attempts per user per 10 s.")
    buy_rate_per_ip: int = _env("DROPSERVER_BUY_RATE_IP", 100,
                                "Buy attempts per IP address per 10 s.")
    buy_velocity_window_ms: int = _env("DROPSERVER_BUY_VELOCITY_WINDOW_MS", 2000,
                                       "Window after BUY NOW with a stricter per-user "
                                       "attempt cap (0 disables).")
    buy_velocity_max: int = _env("DROPSERVER_BUY_VELOCITY_MAX", 5,
                                 "Buy attempts per user inside that window.")
    buy_verifier: str = _env("DROPSERVER_BUY_VERIFIER", "", "Captcha/attestation hook "
                             "as module:attr; empty accepts every buy attempt.")
    hold_sweep_interval: float = _env("DROPSERVER_HOLD_SWEEP_INTERVAL", 1.0,
                                      "Seconds between expired-hold sweeps (in the node's "
                                      "chore worker).")
    recovery_interval: float = _env("DROPSERVER_RECOVERY_INTERVAL", 2.0,
                                    "Seconds between checks for live drops missing "
                                    "from Redis (rebuilt from PostgreSQL).")
    recovery_grace_ms: int = _env("DROPSERVER_RECOVERY_GRACE_MS", 1000,
                                  "Wait before reading PostgreSQL in a rebuild, so "
                                  "order writes in flight land first.")
    hold_replicas: int = _env("DROPSERVER_HOLD_REPLICAS", -1,
                              "Replicas that must have a new hold before its buyer is "
                              "told (Redis WAIT after each batch of buys), so a "
                              "failover cannot lose it; -1: 1 on a Redis Cluster "
                              "(redis+cluster://), 0 on one Redis. A batch no replica "
                              "confirmed in time is answered 503 `unavailable` (the "
                              "retry, same idempotency key, gets the hold).")
    hold_replica_timeout_ms: int = _env("DROPSERVER_HOLD_REPLICA_TIMEOUT_MS", 200,
                                        "How long a batch of buys waits for those "
                                        "replicas.")
    reconcile_interval: float = _env("DROPSERVER_RECONCILE_INTERVAL", 10.0,
                                     "Seconds between comparisons of Redis' holds and "
                                     "counters with PostgreSQL, repairing what differs "
                                     "(0 disables).")
    payment_gateway: str = _env("DROPSERVER_PAYMENT_GATEWAY", "", "Payment gateway: "
                                "`stripe` or `fake`. Empty: `fake` under `dropserver dev` "
                                "(or with DROPSERVER_UNSAFE_FAKE_PAYMENTS=1), else `stripe`.",
                                choices=("fake", "stripe"))
    unsafe_fake_payments: bool = _env("DROPSERVER_UNSAFE_FAKE_PAYMENTS", False, "Outside "
                                      "`dropserver dev`, run the fake gateway and its "
                                      "`/v1/dev/orders/{id}/confirm` route: no money moves "
                                      "and any buyer can mark their own order paid. For "
                                      "load tests and benchmarks, never production.")
    stripe_api_key: str = _env("STRIPE_API_KEY", "", "Stripe secret key.")
    stripe_api_base: str = _env("STRIPE_API_BASE", "", "Override of Stripe's API address "
                                "(tests point it at a local server).")
    stripe_webhook_secret: str = _env("STRIPE_WEBHOOK_SECRET", "", "Webhook signing secret.")
    stripe_publishable_key: str = _env("STRIPE_PUBLISHABLE_KEY", "", "Given to Stripe.js.")
    platform_fee_bps: int = _env("DROPSERVER_PLATFORM_FEE_BPS", 1000,
                                 "Platform fee in basis points (1000 = 10%).")
    order_workers: int = _env("DROPSERVER_ORDER_WORKERS", 1,
                              "Order-queue consumers per process (0 disables).")
    order_claim_idle_ms: int = _env("DROPSERVER_ORDER_CLAIM_IDLE_MS", 15000,
                                    "Pending order entries idle this long are re-claimed "
                                    "from a consumer that died.")
    order_max_attempts: int = _env("DROPSERVER_ORDER_MAX_ATTEMPTS", 5,
                                   "Tries of an order entry failing with an error that is "
                                   "not an outage before it goes to the dead-letter "
                                   "stream orders:dead (outages are waited out).")
    campaign_check_interval: float = _env("DROPSERVER_CAMPAIGN_CHECK_INTERVAL", 5.0,
                                          "Seconds between checks for campaign deadlines.")

    # --- outbound webhooks ----------------------------------------------------
    webhook_concurrency: int = _env("DROPSERVER_WEBHOOK_CONCURRENCY", 16,
                                    "Outbound webhook requests in flight per process "
                                    "(0: this process sends none; others still do).")
    webhook_timeout: float = _env("DROPSERVER_WEBHOOK_TIMEOUT", 10.0,
                                  "Seconds a receiver has to answer one webhook attempt.")
    webhook_retry_schedule: tuple[str, ...] = _env(
        "DROPSERVER_WEBHOOK_RETRY_SCHEDULE", ("5", "300", "1800", "7200", "18000", "36000",
                                              "36000"),
        "Seconds to wait after each failed webhook attempt (comma-separated; the "
        "default is Standard Webhooks': 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, so 8 "
        "attempts over ~27 h); then the delivery is failed until replayed.")
    webhook_poll_interval: float = _env("DROPSERVER_WEBHOOK_POLL_INTERVAL", 0.5,
                                        "Seconds between looks for new or due webhook "
                                        "deliveries while the dispatcher cannot listen "
                                        "for PostgreSQL's notifications (its listening "
                                        "connection lost).")
    webhook_fallback_poll: float = _env(
        "DROPSERVER_WEBHOOK_FALLBACK_POLL", 10.0,
        "Seconds between looks for webhook deliveries while the dispatcher listens: a "
        "new event, a replay or an endpoint enabled wakes it at once (PostgreSQL "
        "NOTIFY), a retry at its due time; this look catches anything else.")
    webhook_retention_days: int = _env("DROPSERVER_WEBHOOK_RETENTION_DAYS", 30,
                                       "Days the delivery log keeps events whose "
                                       "deliveries all ended (0: forever).")
    webhook_allow_http_loopback: bool = _env(
        "DROPSERVER_WEBHOOK_ALLOW_HTTP_LOOPBACK", False, "Accept plain http:// webhook "
        "endpoints on a loopback host (127.0.0.0/8, ::1, localhost): tests and local "
        "receivers. Always on under `dropserver dev`; production endpoints are https://.")

    # --- streaming -----------------------------------------------------------
    media_dir: str = _env("DROPSERVER_MEDIA_DIR", "", "Where HLS segments and replays "
                          "are written (shared by all workers); empty uses "
                          "<tmp>/dropserver-media, or under dropserver dev with its "
                          "own databases, a folder deleted with them.")
    hls_segment_seconds: float = _env("DROPSERVER_HLS_SEGMENT_SECONDS", 1.0,
                                      "Target HLS segment duration.")
    hls_part_seconds: float = _env("DROPSERVER_HLS_PART_SECONDS", 0.2,
                                   "Target LL-HLS part duration.")
    hls_transcode: str = _env("DROPSERVER_HLS_TRANSCODE", "auto", "auto: pass H.264 "
                              "through, re-encode other codecs; always: re-encode every "
                              "stream to H.264.", choices=("auto", "always"))
    whip_read_timeout: float = _env("DROPSERVER_WHIP_READ_TIMEOUT", 10.0,
                                    "Seconds without media after which a WHIP publisher "
                                    "is lost (then the reconnect grace applies).")
    stream_reconnect_grace: float = _env("DROPSERVER_STREAM_RECONNECT_GRACE", 15.0,
                                         "Seconds a lost publisher may reconnect into the "
                                         "same stream before it is finalized as a replay.")

    # --- mode ----------------------------------------------------------------
    dev: bool = _env("DROPSERVER_DEV", False, "Development mode, set by `dropserver dev` "
                     "for its workers: the published dev token secret, fake payments, "
                     "`/v1/dev/*` routes. `dropserver serve` refuses it.")

    def __post_init__(self) -> None:
        if not self.payment_gateway:  # the safe default: fake only where allowed
            object.__setattr__(self, "payment_gateway", "fake" if self.fake_payments_allowed
                               else "stripe")

    @property
    def fake_payments_allowed(self) -> bool:
        """The fake gateway and ``/v1/dev/orders/{id}/confirm`` may run: under
        ``dropserver dev``, or where ``DROPSERVER_UNSAFE_FAKE_PAYMENTS`` says so."""
        return self.dev or self.unsafe_fake_payments

    @property
    def effective_node_id(self) -> str:
        if self.node_id:
            return self.node_id
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"

    @property
    def effective_jwt_secret(self) -> str:
        if self.jwt_secret:
            return self.jwt_secret
        return DEV_JWT_SECRET if self.dev else ""

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def effective_hold_replicas(self) -> int:
        """:attr:`hold_replicas`, with -1 resolved by the kind of ``REDIS_URL``."""
        if self.hold_replicas >= 0:
            return self.hold_replicas
        return 1 if self.redis_url.split("://", 1)[0].endswith("+cluster") else 0

    def validate(self) -> None:
        """Cross-field checks; single-field checks happen while parsing."""
        if not self.dev and not (self.jwks_url or self.jwt_secret):
            raise SettingsError(
                "DROPSERVER_JWKS_URL", "production needs DROPSERVER_JWKS_URL or "
                "DROPSERVER_JWT_SECRET (the dev secret is only used by `dropserver dev`)"
            )
        if self.reconnect_min_ms > self.reconnect_max_ms:
            raise SettingsError("DROPSERVER_RECONNECT_MIN_MS",
                                "must not exceed DROPSERVER_RECONNECT_MAX_MS")
        if self.payment_gateway == "fake" and not self.fake_payments_allowed:
            raise SettingsError(
                "DROPSERVER_PAYMENT_GATEWAY", "the fake gateway moves no money and lets any "
                "buyer mark their own order paid. Outside `dropserver dev` use "
                "DROPSERVER_PAYMENT_GATEWAY=stripe with STRIPE_API_KEY and "
                "STRIPE_WEBHOOK_SECRET, or, for a load test or benchmark only, set "
                "DROPSERVER_UNSAFE_FAKE_PAYMENTS=1")
        if self.unsafe_fake_payments and self.payment_gateway == "stripe":
            raise SettingsError("DROPSERVER_UNSAFE_FAKE_PAYMENTS", "set together with "
                                "DROPSERVER_PAYMENT_GATEWAY=stripe: choose one")
        if self.payment_gateway == "stripe" and not self.stripe_api_key:
            raise SettingsError(
                "STRIPE_API_KEY", "required by the Stripe gateway, the default outside "
                "`dropserver dev` (a load test or benchmark that moves no money may set "
                "DROPSERVER_UNSAFE_FAKE_PAYMENTS=1 instead)")
        if (self.payment_gateway == "stripe" and not self.dev
                and not self.stripe_webhook_secret):
            raise SettingsError(
                "STRIPE_WEBHOOK_SECRET", "required by the Stripe gateway outside "
                "`dropserver dev`: Stripe's webhook is what marks a card payment paid")
        if len(self.gc_threshold) != 3 or not all(x.isdigit() and int(x) > 0
                                                  for x in self.gc_threshold):
            raise SettingsError("DROPSERVER_GC_THRESHOLD",
                                "expected three positive integers, like 700,10,100")
        if self.db_control_pool < 1:
            raise SettingsError("DROPSERVER_DB_CONTROL_POOL", "must be at least 1")
        try:
            schedule = [float(x) for x in self.webhook_retry_schedule]
        except ValueError:
            schedule = [-1.0]
        if any(x < 0 or x != x for x in schedule):
            raise SettingsError("DROPSERVER_WEBHOOK_RETRY_SCHEDULE",
                                "expected non-negative seconds, like 5,300,1800")
        if self.db_pool_min > self.db_pool_max:
            raise SettingsError("DROPSERVER_DB_POOL_MIN", "must not exceed "
                                "DROPSERVER_DB_POOL_MAX")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(name: str, raw: str, typ: Any, choices: tuple[str, ...]) -> Any:
    raw = raw.strip()
    if typ is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise SettingsError(name, f"expected true or false, got {raw!r}")
    if typ is int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(name, f"expected an integer, got {raw!r}") from None
        if value < 0:
            raise SettingsError(name, f"must not be negative, got {value}")
        return value
    if typ is float:
        try:
            fvalue = float(raw)
        except ValueError:
            raise SettingsError(name, f"expected a number, got {raw!r}") from None
        if fvalue < 0:
            raise SettingsError(name, f"must not be negative, got {fvalue}")
        return fvalue
    if typing.get_origin(typ) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if choices and raw not in choices:
        raise SettingsError(name, f"expected one of {', '.join(choices)}, got {raw!r}")
    return raw


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(Settings)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        name = f.metadata["env"]
        if name in env:
            typ = hints[f.name]
            if isinstance(typ, types.UnionType):  # pragma: no cover - none today
                typ = typing.get_args(typ)[0]
            values[f.name] = _parse(name, env[name], typ, f.metadata["choices"])
    values.update(overrides)
    settings = Settings(**values)
    settings.validate()
    return settings


def unsafe_rig_env() -> dict[str, str]:
    """What ``dropserver serve`` runs with as a load-test or benchmark target: the fake
    gateway (no money moves) and the published dev secret the load kit signs its tokens
    with. Never production."""
    return {"DROPSERVER_UNSAFE_FAKE_PAYMENTS": "1", "DROPSERVER_JWT_SECRET": DEV_JWT_SECRET}


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting: the docs table."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        rows.append((f.metadata["env"], repr(default), f.metadata["doc"]))
    return rows
