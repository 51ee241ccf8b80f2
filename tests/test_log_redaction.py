"""Secrets stay out of the logs: a real `dropserver serve`, a WebSocket with
``?token=<jwt>`` (the documented way for browsers), HTTP requests with ``?token=`` and
other secret-looking parameters, a broken handshake; then every line the processes
wrote (stdout and stderr, JSON and text formats, debug level) is searched."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import websockets.sync.client

from dropserver.auth import Role, issue_token
from dropserver.services import stop_process
from dropserver.settings import load_settings, unsafe_rig_env
from tests.conftest import free_port

SECRETS = {"api_key": "k3y-SHOULD-NOT-APPEAR", "password": "pw-SHOULD-NOT-APPEAR",
           "client_secret": "pi_123_secret_SHOULDNOTAPPEAR"}


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _broken_handshake(port: int, token: str) -> None:
    """An upgrade without Sec-WebSocket-Key: the server refuses it and may say why."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(f"GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        s.settimeout(5)
        try:
            s.recv(4096)
        except OSError:
            pass


@pytest.mark.slow  # a real server per format, ~25 s each; test_redact below is quick
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["json", "text"])
def test_tokens_and_secrets_in_urls_never_reach_the_logs(backends, tmp_path: Path, fmt):
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DROPSERVER_", "STRIPE_", "PROMETHEUS_"))}
    env.update({"REDIS_URL": backends.redis_url, "DATABASE_URL": backends.database_url,
                "DROPSERVER_LOG_LEVEL": "debug", "DROPSERVER_LOG_FORMAT": fmt,
                "DROPSERVER_SHUTDOWN_GRACE": "1", **unsafe_rig_env()})
    settings = load_settings({}, dev=True)  # the rig's secret signs the token
    token = issue_token(settings, "viewer-secret-test", Role.VIEWER)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dropserver.cli", "serve", "--workers", "1",
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 40
        while _get_ready(base) != 200:
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/ws?token={token}",
                                            subprotocols=["dropserver.json.v1"]) as ws:
            ws.send(json.dumps({"t": "ping", "id": 1}))
            ws.recv(timeout=5)
        query = "&".join(f"{k}={v}" for k, v in SECRETS.items())
        assert _get(f"{base}/v1/me?token={token}") == 200
        _get(f"{base}/v1/drops/1/hls/live.m3u8?token={token}&{query}")
        _get(f"{base}/no/such/path?{query}&token={token}")
        _get(f"{base}/v1/me?token=not-a-jwt-SHOULD-NOT-APPEAR")
        _broken_handshake(port, token)
        time.sleep(0.5)
    finally:
        stop_process(proc, signal.SIGTERM, 30)
    logs = log_path.read_text(errors="replace")
    assert "[accepted]" in logs, "the socket's handshake line is logged (redacted)"
    assert "token=" in logs  # ... with its parameter name, and no value
    leaked = [s for s in (token, token.split(".")[2], "not-a-jwt-SHOULD-NOT-APPEAR",
                          *SECRETS.values()) if s in logs]
    assert leaked == [], "\n".join(line for line in logs.splitlines()
                                   if any(s in line for s in leaked))[:4000]


def _get_ready(base: str) -> int:
    try:
        return _get(base + "/readyz")
    except OSError:
        return 0


@pytest.mark.parametrize("line, kept", [
    ('127.0.0.1:1 - "WebSocket /ws?token=eyJh.eyJz.sig" [accepted]', "/ws?token=[REDACTED]"),
    ("GET /x?a=1&api_key=zzz&b=2", "a=1&api_key=[REDACTED]&b=2"),
    ("GET /x?refresh_token=abc&id_token=def", "refresh_token=[REDACTED]&id_token=[REDACTED]"),
    ("Authorization: Bearer abcdefghijk", "Authorization: [REDACTED]"),
    ("key sk_live_123abc and whsec_abc", "key [REDACTED] and [REDACTED]"),
    ("GET /v1/drops?state=live&limit=2", "GET /v1/drops?state=live&limit=2"),
    ("keyboard=1&monkey=2", "keyboard=1&monkey=2"),
])
def test_redact(line: str, kept: str) -> None:
    from dropserver.observability import redact

    assert redact(line).endswith(kept) or kept in redact(line)
    assert "zzz" not in redact(line) and "abcdefghijk" not in redact(line)
