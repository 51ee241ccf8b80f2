"""The gateway's Redis scripts, each its own file in ``realtime/scripts/``."""

from __future__ import annotations

from pathlib import Path

from dropserver.redis_client import ClusterAwareScript

_DIR = Path(__file__).parent / "scripts"


def load(name: str) -> ClusterAwareScript:
    """A script called by SHA (loaded on first NOSCRIPT); pass ``client=`` per call.
    On a cluster its publications are sharded (SPUBLISH)."""
    return ClusterAwareScript((_DIR / f"{name}.lua").read_bytes())
