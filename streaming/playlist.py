"""HLS media playlists, pure: a model of segments and parts in, playlist text out.

Implements RFC 8216 (HTTP Live Streaming) and the Low-Latency extensions of its
second edition (draft-pantos-hls-rfc8216bis, "rfc8216bis" below): partial segments,
blocking playlist reload and preload hints. No I/O here; :mod:`streaming.packager`
feeds it and writes the text to disk.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

__all__ = [
    "BlockingRequest",
    "DateRange",
    "MediaPlaylist",
    "Part",
    "PlaylistKind",
    "Segment",
    "parse_blocking_request",
]


class PlaylistKind(enum.StrEnum):
    LOW_LATENCY = "low_latency"  # EXT-X-PART, EXT-X-PRELOAD-HINT, CAN-BLOCK-RELOAD
    PLAIN = "plain"  # RFC 8216 only, for players without LL-HLS
    VOD = "vod"  # every segment, EXT-X-PLAYLIST-TYPE:VOD, for replays


@dataclass(frozen=True, slots=True)
class Part:
    """A partial segment (rfc8216bis 4.4.4.9 EXT-X-PART)."""

    duration: float
    uri: str
    independent: bool = False  # starts with an IDR frame


@dataclass(slots=True)
class Segment:
    msn: int  # media sequence number
    uri: str
    duration: float
    program_date_time: datetime
    map_uri: str  # EXT-X-MAP (init segment) this segment needs
    discontinuity: bool = False  # first segment after a publisher reconnect
    parts: list[Part] = field(default_factory=list)
    gap: bool = False  # 4.4.4.7 EXT-X-GAP: no media (a segment its worker never closed)


@dataclass(frozen=True, slots=True)
class DateRange:
    """rfc8216bis 4.4.5.1 EXT-X-DATERANGE: a moment on the program timeline."""

    id: str
    start: datetime
    class_: str = "com.dropserver.moment"
    attributes: tuple[tuple[str, str], ...] = ()  # ("X-KIND", "buy_now"), quoted strings


def _date(value: datetime) -> str:
    # 4.3.2.6: ISO 8601 with milliseconds and a time zone.
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _num(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.1f}"


def _quoted(value: str) -> str:
    # 4.2: a quoted-string cannot contain CR, LF or a double quote.
    return '"' + value.replace('"', "'").replace("\r", " ").replace("\n", " ") + '"'


@dataclass(slots=True)
class MediaPlaylist:
    """The state one playlist is rendered from.

    ``segments`` are the complete segments (oldest first); ``parts`` the parts of the
    segment being written (msn ``next_msn``); ``preload_uri`` the part the packager
    will write next (rfc8216bis 4.4.5.3 EXT-X-PRELOAD-HINT).
    """

    target_duration: float
    part_target: float
    segments: list[Segment] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    next_msn: int = 0
    preload_uri: str | None = None
    ended: bool = False
    discontinuity_sequence: int = 0  # discontinuities before segments[0]
    dateranges: list[DateRange] = field(default_factory=list)
    next_map_uri: str = ""
    next_discontinuity: bool = False

    @property
    def last_part_index(self) -> int:
        """Index of the newest part of segment ``next_msn`` (-1 when none yet)."""
        return len(self.parts) - 1

    def has(self, msn: int, part: int | None) -> bool:
        """Whether the playlist already holds segment ``msn`` (and its ``part``).

        rfc8216bis 6.2.5.2: a blocking request is answered once the playlist
        contains that part, or any later segment.
        """
        if self.ended or msn < self.next_msn:
            return True
        if msn > self.next_msn:
            return False
        if part is None:
            return False
        return part <= self.last_part_index

    def render(self, kind: PlaylistKind = PlaylistKind.LOW_LATENCY, *,
               window: int | None = None, part_window: int = 3) -> str:
        """The playlist text.

        ``window`` keeps only the newest segments (live); ``part_window`` lists
        parts for only the newest few segments (4.4.4.9: parts of segments more
        than three target durations old should be removed).
        """
        low = kind is PlaylistKind.LOW_LATENCY
        segments = self.segments
        dropped = segments[: max(0, len(segments) - window)] if window else []
        segments = segments[len(dropped):]
        disc_seq = self.discontinuity_sequence + sum(1 for s in dropped if s.discontinuity)
        first_msn = segments[0].msn if segments else self.next_msn

        longest = max([s.duration for s in segments] + [self.target_duration])
        target = max(1, math.ceil(longest - 0.001))  # 4.4.3.1 rounded to integer
        lines = ["#EXTM3U", f"#EXT-X-VERSION:{9 if low else 7}",
                 f"#EXT-X-TARGETDURATION:{target}"]
        if low:
            # 4.4.3.8: PART-HOLD-BACK at least twice (recommended 3x) the part target.
            lines.append("#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,"
                         f"PART-HOLD-BACK={_num(3 * self.part_target)}")
            lines.append(f"#EXT-X-PART-INF:PART-TARGET={_num(self.part_target)}")
        if kind is PlaylistKind.VOD:
            lines.append("#EXT-X-PLAYLIST-TYPE:VOD")
        lines.append(f"#EXT-X-MEDIA-SEQUENCE:{first_msn}")
        if disc_seq:
            lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{disc_seq}")
        lines.append("#EXT-X-INDEPENDENT-SEGMENTS")

        for dr in self.dateranges:
            attrs = [f"ID={_quoted(dr.id)}", f"CLASS={_quoted(dr.class_)}",
                     f"START-DATE={_quoted(_date(dr.start))}"]
            attrs += [f"{name}={_quoted(value)}" for name, value in dr.attributes]
            lines.append("#EXT-X-DATERANGE:" + ",".join(attrs))

        current_map = ""
        with_parts = {s.msn for s in segments[-part_window:]} if low else set()
        for seg in segments:
            if seg.discontinuity and seg is not segments[0]:
                lines.append("#EXT-X-DISCONTINUITY")
            if seg.map_uri != current_map:
                lines.append(f"#EXT-X-MAP:URI={_quoted(seg.map_uri)}")
                current_map = seg.map_uri
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date(seg.program_date_time)}")
            if seg.msn in with_parts:
                lines.extend(_part_line(p) for p in seg.parts)
            if seg.gap:
                lines.append("#EXT-X-GAP")
            lines.append(f"#EXTINF:{seg.duration:.5f},")
            lines.append(seg.uri)

        if low and not self.ended and (self.parts or self.preload_uri):
            if self.next_discontinuity and segments:
                lines.append("#EXT-X-DISCONTINUITY")
            if self.next_map_uri and self.next_map_uri != current_map:
                lines.append(f"#EXT-X-MAP:URI={_quoted(self.next_map_uri)}")
            lines.extend(_part_line(p) for p in self.parts)
            if self.preload_uri:
                lines.append(f"#EXT-X-PRELOAD-HINT:TYPE=PART,URI={_quoted(self.preload_uri)}")
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        return "\n".join(lines) + "\n"


def _part_line(p: Part) -> str:
    line = f"#EXT-X-PART:DURATION={p.duration:.5f},URI={_quoted(p.uri)}"
    return line + (",INDEPENDENT=YES" if p.independent else "")


@dataclass(frozen=True, slots=True)
class BlockingRequest:
    msn: int
    part: int | None


def parse_blocking_request(query: dict[str, str]) -> BlockingRequest | None:
    """``_HLS_msn``/``_HLS_part`` of a playlist request (rfc8216bis 6.2.5.2).

    None when the request does not block. Raises ValueError for a malformed one
    (``_HLS_part`` without ``_HLS_msn``, negatives, non-integers): answer 400.
    """
    raw_msn = query.get("_HLS_msn")
    raw_part = query.get("_HLS_part")
    if raw_msn is None:
        if raw_part is not None:
            raise ValueError("_HLS_part requires _HLS_msn")
        return None
    if not raw_msn.isdigit() or (raw_part is not None and not raw_part.isdigit()):
        raise ValueError("_HLS_msn and _HLS_part must be non-negative integers")
    return BlockingRequest(int(raw_msn), int(raw_part) if raw_part is not None else None)
