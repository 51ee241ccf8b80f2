"""The drops package's Redis scripts (giveaways), each its own file, called by SHA."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from dropserver.redis_client import ClusterAwareScript

__all__ = ["load"]

_DIR = Path(__file__).resolve().parent


@cache
def load(name: str) -> ClusterAwareScript:
    """The script ``name`` (e.g. ``"giveaway_enter"``); pass ``client=`` per call."""
    return ClusterAwareScript((_DIR / f"{name}.lua").read_bytes())
