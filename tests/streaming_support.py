"""Helpers the streaming tests share."""

from __future__ import annotations

__all__ = ["playlist_uris"]


def playlist_uris(text: str) -> list[str]:
    """Every URI an HLS playlist names (segments, parts, init segments), not the
    preload hint: that one names a part still to come."""
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            out.append(line)
        elif 'URI="' in line and not line.startswith("#EXT-X-PRELOAD-HINT"):
            out.append(line.split('URI="')[1].split('"')[0])
    return out
