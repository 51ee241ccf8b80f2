"""The ``dropserver`` command: dev, serve, migrate, token, services."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import sys
import threading
import time
import urllib.request

from dropserver.settings import SettingsError, load_settings

__all__ = ["main"]


def _settings(args: argparse.Namespace, **overrides):
    for name in ("host", "port", "workers"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        print(f"dropserver: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class StartupError(Exception):
    """Why a command cannot start, told in one line instead of a traceback."""


def _where(url: str) -> str:
    """host:port of a service URL (never its password)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 'default port'}"


def _check_port(host: str, port: int) -> None:
    """Fail now, saying what to do, if ``host:port`` cannot be listened on.

    The probe binds without SO_REUSEPORT, so it also finds another dropserver whose
    workers share the port that way (this one's would silently join them)."""
    from dropserver.serve import bind_socket

    if port == 0:
        return
    try:
        bind_socket(host, port, reuse_port=False, listen=False).close()
    except OSError as exc:
        raise _listen_problem(host, port, exc) from None


def _listen_problem(host: str, port: int, exc: OSError) -> StartupError:
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            f"port {port} on {host} is already in use (another dropserver or another "
            f"program; `ss -ltnp 'sport = :{port}'` shows which). Stop it or pick "
            "another port: --port N or DROPSERVER_PORT=N (--port 0 takes a free one)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"cannot listen on {host}: not an address of this machine "
                            "(--host or DROPSERVER_HOST)")
    if exc.errno == errno.EACCES:
        return StartupError(f"not allowed to listen on port {port} (below 1024 needs "
                            "privileges); pick another: --port N or DROPSERVER_PORT=N")
    return StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def _check_redis(url: str) -> None:
    import redis

    from dropserver.redis_client import connect_sync

    client = connect_sync(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StartupError(f"cannot reach Redis at {_where(url)} ({exc}); check "
                           "REDIS_URL") from None
    finally:
        client.close()


async def _migrate(database_url: str) -> list[int]:
    from asyncpg import exceptions as pg

    from dropserver.db import migrate_database

    try:
        return await migrate_database(database_url)
    except (OSError, TimeoutError, pg.InvalidAuthorizationSpecificationError,
            pg.InvalidCatalogNameError, pg.CannotConnectNowError) as exc:
        raise StartupError(f"cannot reach PostgreSQL at {_where(database_url)} "
                           f"({type(exc).__name__}: {exc}); check DATABASE_URL") from None


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args, dev=True)  # migrate needs no auth settings
    if not settings.database_url:
        print("dropserver migrate: set DATABASE_URL", file=sys.stderr)
        return 2
    applied = asyncio.run(_migrate(settings.database_url))
    print(json.dumps({"applied": applied}))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from dropserver.auth import Role, issue_token

    settings = _settings(args, dev=not os.environ.get("DROPSERVER_JWT_SECRET"))
    print(issue_token(settings, args.sub, Role(args.role), ttl=args.ttl, name=args.name))
    return 0


def _wait_ready(url: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _announce(settings, port: int, started: float) -> None:
    from dropserver.auth import Role, issue_token

    base = f"http://{settings.host}:{port}"
    ready = _wait_ready(base)
    creator = issue_token(settings, "creator-dev", Role.CREATOR, name="Dev Creator")
    viewer = issue_token(settings, "viewer-dev", Role.VIEWER, name="Dev Viewer")
    lines = [
        "",
        f"  dropserver dev {'ready' if ready else 'NOT READY'} in "
        f"{time.monotonic() - started:.2f} s",
        f"  HTTP        {base}",
        f"  WebSocket   ws://{settings.host}:{port}/ws",
        f"  Viewer page {base}/",
        f"  Console     {base}/console",
        f"  Redis       {settings.redis_url}",
        f"  PostgreSQL  {settings.database_url}",
        f"  Creator token (sub=creator-dev):\n    {creator}",
        f"  Viewer token  (sub=viewer-dev):\n    {viewer}",
        "",
    ]
    print("\n".join(lines), flush=True)


def cmd_dev(args: argparse.Namespace) -> int:
    from dropserver.observability import configure_logging
    from dropserver.services import LocalServices

    started = time.monotonic()
    settings = _settings(args, dev=True)
    configure_logging(settings.log_level, settings.log_format)
    _check_port(settings.host, settings.port)  # before starting anything
    if settings.redis_url:
        _check_redis(settings.redis_url)
    services = LocalServices(want_redis=not settings.redis_url,
                             want_postgres=not settings.database_url,
                             redis_cluster=args.redis_cluster)
    with contextlib.ExitStack() as stack:
        if services.want_redis or services.want_postgres:
            stack.enter_context(services)
            settings = settings.replace(
                redis_url=settings.redis_url or services.redis_url,
                database_url=settings.database_url or services.database_url,
                # media of a throwaway database goes with it (drop ids restart at 1)
                media_dir=settings.media_dir or str(services.root / "media"),
            )
        asyncio.run(_migrate(settings.database_url))
        return _run(settings, started)


def _run(settings, started: float) -> int:
    from dropserver.serve import bind_socket, run_single, run_supervisor

    if settings.workers > 1:
        def on_ready(port: int) -> None:
            threading.Thread(target=_announce, args=(settings, port, started),
                             daemon=True).start()

        return run_supervisor(settings, on_ready=on_ready)
    try:
        sock = bind_socket(settings.host, settings.port, reuse_port=False)
    except OSError as exc:  # taken since _check_port
        raise _listen_problem(settings.host, settings.port, exc) from None
    port = sock.getsockname()[1]
    threading.Thread(target=_announce, args=(settings, port, started), daemon=True).start()
    run_single(settings, sock)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dropserver.observability import configure_logging

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    if settings.dev:
        print("dropserver serve: DROPSERVER_DEV is set; it is what `dropserver dev` runs "
              "with (tokens signed with a published secret, fake payments, /v1/dev/* "
              "routes), never `serve`. Unset it; a load test or benchmark that moves no "
              "money may set DROPSERVER_UNSAFE_FAKE_PAYMENTS=1 and DROPSERVER_JWT_SECRET "
              "instead", file=sys.stderr)
        return 2
    if not settings.redis_url or not settings.database_url:
        print("dropserver serve: set REDIS_URL and DATABASE_URL "
              "(use `dropserver dev` for local services)", file=sys.stderr)
        return 2
    _check_port(settings.host, settings.port)
    _check_redis(settings.redis_url)
    if args.migrate:
        asyncio.run(_migrate(settings.database_url))
    from dropserver.serve import run_supervisor

    return run_supervisor(settings)


def cmd_services(args: argparse.Namespace) -> int:
    """Start only Redis and PostgreSQL and print their URLs (benchmarks, debugging)."""
    import signal

    from dropserver.services import LocalServices

    with LocalServices(redis_cluster=args.redis_cluster) as services:
        asyncio.run(_migrate(services.database_url))
        print(json.dumps({"REDIS_URL": services.redis_url,
                          "DATABASE_URL": services.database_url}), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dropserver",
        description="dropserver: a WebSocket-first real-time server for live-commerce "
                    "product drops.",
        epilog="Start with 'dropserver dev' (a local Redis and PostgreSQL of its own), "
               "then open http://127.0.0.1:8000/; 'dropserver COMMAND --help' for a "
               "command's options. README.md has a 5-minute tour; docs/operations.md "
               "runs it in production.")
    sub = parser.add_subparsers(dest="command", required=True)

    def net(p: argparse.ArgumentParser, port_default: int | None) -> None:
        p.add_argument("--host", default=None, help="listen address (DROPSERVER_HOST)")
        p.add_argument("--port", type=int, default=port_default,
                       help="listen port (DROPSERVER_PORT)")
        p.add_argument("--workers", type=int, default=None,
                       help="worker processes (DROPSERVER_WORKERS)")

    dev = sub.add_parser("dev", help="run with local Redis and PostgreSQL of its own")
    net(dev, None)
    dev.set_defaults(func=cmd_dev)
    cluster_help = ("a local Redis Cluster (3 primaries, 3 replicas) instead of one Redis; "
                    "ignored when REDIS_URL is set")
    dev.add_argument("--redis-cluster", action="store_true", help=cluster_help)

    serve = sub.add_parser("serve", help="production: REDIS_URL and DATABASE_URL required")
    net(serve, None)
    serve.add_argument("--migrate", action="store_true", help="apply migrations first")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply schema migrations (idempotent)")
    migrate.set_defaults(func=cmd_migrate)

    token = sub.add_parser("token", help="issue an HS256 token (dev secret by default)")
    token.add_argument("--sub", required=True, help="user id")
    token.add_argument("--role", default="viewer",
                       choices=["viewer", "creator", "admin", "investor"])
    token.add_argument("--ttl", type=int, default=24 * 3600, help="seconds")
    token.add_argument("--name", default=None, help="display name")
    token.set_defaults(func=cmd_token)

    services = sub.add_parser("services", help="start only local Redis and PostgreSQL")
    services.add_argument("--redis-cluster", action="store_true", help=cluster_help)
    services.set_defaults(func=cmd_services)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dropserver.services import ServiceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StartupError as exc:
        print(f"dropserver {args.command}: {exc}", file=sys.stderr)
    except ServiceError as exc:  # dev, services: the local Redis or PostgreSQL
        print(f"dropserver {args.command}: cannot start the local Redis/PostgreSQL: {exc}",
              file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
