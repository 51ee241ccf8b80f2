"""The checkout Lua scripts, loaded once per process and called by SHA.

Each ``<name>.lua`` beside this file opens by naming its KEYS and ARGV as locals and
does every check before its first write (a script is atomic but has no rollback).
:func:`script` wraps one in redis-py's :class:`~redis.commands.core.AsyncScript`, which
calls EVALSHA and, on NOSCRIPT (a restarted or failed-over Redis, SCRIPT FLUSH),
loads the source again and retries.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from redis.commands.core import AsyncScript

__all__ = ["script", "source"]

_DIR = Path(__file__).resolve().parent


@cache
def source(name: str) -> bytes:
    return (_DIR / f"{name}.lua").read_bytes()


@cache
def script(name: str) -> AsyncScript:
    """The script ``name`` (e.g. ``"reserve"``); call it with ``client=`` a Redis."""
    # Bytes source: the SHA is computed here, no client is needed until the call.
    return AsyncScript(None, source(name))  # type: ignore[arg-type]
