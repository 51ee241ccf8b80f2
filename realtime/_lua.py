"""The gateway's Redis scripts, each its own file in ``realtime/scripts/``."""

from __future__ import annotations

from pathlib import Path

from redis.commands.core import AsyncScript

_DIR = Path(__file__).parent / "scripts"


def load(name: str) -> AsyncScript:
    """A script called by SHA (loaded on first NOSCRIPT); pass ``client=`` per call."""
    return AsyncScript(None, (_DIR / f"{name}.lua").read_bytes())  # type: ignore[arg-type]
