"""Cuts timed H.264 access units and Opus packets into LL-HLS parts and segments.

The cutting rules (rfc8216bis 4.4.4.9 and 6.2.1; MediaMTX uses the same ones):

* a segment starts on a keyframe and is closed at the first keyframe once it holds
  about ``segment_seconds`` of media (the ingest requests that keyframe, see
  :attr:`Packager.keyframe_due`);
* a part is closed when it holds ``part_seconds`` of media or a segment ends;
* a video sample's duration is known when the next frame arrives, so the newest
  frame is held back (one frame, ~33 ms);
* audio samples go into the part being closed when they start before its end.

One directory per drop holds everything (shared disk, so any worker serves it):
``init<n>.mp4`` per publishing session, ``s<msn>.m4s`` segments, ``s<msn>.<i>.m4s``
parts (deleted once out of the playlist), ``live.m3u8`` (LL-HLS), ``index.m3u8``
(plain HLS), ``replay.m3u8`` (VOD, written when the stream ends), ``segments.jsonl``
(the segment list, so a reconnect on another worker continues the numbering) and
``live.json`` (the newest msn/part, for blocking reloads served by other workers).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import av

from streaming import fmp4
from streaming.fmp4 import AUDIO_TIMESCALE, VIDEO_TIMESCALE, Sample
from streaming.playlist import DateRange, MediaPlaylist, Part, PlaylistKind, Segment

__all__ = ["Packager", "opus_packet_samples"]

log = logging.getLogger("dropserver.streaming")

LIVE_WINDOW = 30  # segments in live.m3u8 / index.m3u8
PART_FILES_KEPT = 8  # segments whose part files stay on disk after leaving the part window
KEYFRAME_LEAD = 0.25  # seconds before a segment boundary to ask for a keyframe
KEYFRAME_RETRY = 0.5  # ask again when the keyframe has not come after this long


def opus_packet_samples(packet: bytes) -> int:
    """Samples at 48 kHz in one Opus packet, from its TOC byte (RFC 6716 3.1)."""
    if not packet:
        return 0
    toc = packet[0]
    config = toc >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        per_frame = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:  # hybrid: 10, 20 ms
        per_frame = (480, 960)[config & 1]
    else:  # CELT: 2.5, 5, 10, 20 ms
        per_frame = (120, 240, 480, 960)[config & 3]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        frames = packet[1] & 0x3F if len(packet) > 1 else 0
    return per_frame * frames


def _nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F


def _dimensions(annexb: bytes) -> tuple[int, int]:
    """Width and height from the SPS, through FFmpeg's H.264 parser (no decoding)."""
    ctx = av.CodecContext.create("h264", "r")
    ctx.parse(annexb)
    ctx.parse(b"")
    return ctx.width or 0, ctx.height or 0


@dataclass(slots=True)
class _Frame:
    pts: int
    nals: list[bytes]
    keyframe: bool


@dataclass(slots=True)
class _OpenPart:
    video: list[Sample] = field(default_factory=list)
    video_start: int = 0
    audio: list[Sample] = field(default_factory=list)
    audio_start: int = 0
    audio_end: int = 0


class Packager:
    """Writes one drop's HLS files. Not thread-safe; one instance per live drop."""

    def __init__(self, directory: Path, *, segment_seconds: float = 1.0,
                 part_seconds: float = 0.2,
                 on_update: Callable[[], None] | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_ticks = int(segment_seconds * VIDEO_TIMESCALE)
        self.part_ticks = int(part_seconds * VIDEO_TIMESCALE)
        self.on_update = on_update
        self.playlist = MediaPlaylist(target_duration=segment_seconds,
                                      part_target=part_seconds)
        self.session = 0
        self._base = 0  # global timeline offset of this session, 90 kHz
        self._end = 0  # end of the newest video sample written, 90 kHz (global)
        self._fragment_seq = 0
        self._plain_written = ""  # index.m3u8 as last written
        self._video_track: fmp4.VideoTrack | None = None
        self._audio_track: fmp4.AudioTrack | None = fmp4.AudioTrack(track_id=2)
        self._pending: _Frame | None = None
        self._part: _OpenPart | None = None
        self._part_start = 0
        self._segment_start = 0
        self._segment_pdt = datetime.now(UTC)
        self._segment_file: Path | None = None
        self._keyframe_asked_at: int | None = None
        self._audio_queue: list[tuple[int, bytes]] = []
        self._audio_next: int | None = None
        self._lingering: list[str] = []  # part files of an ended stream, see finish()
        self._load()

    # ------------------------------------------------------------------ state
    def _load(self) -> None:
        """Continue a stream already on disk (a reconnect, maybe on another worker).

        No file name already written is written again with other bytes: a CDN keeps
        media it has served (immutable, see streaming.hls). A worker lost mid-segment
        left parts of a segment it never closed: that segment is listed as a gap
        (rfc8216bis 4.4.4.7) and numbering goes on after it; an init segment no closed
        segment names still counts in the session numbers."""
        index = self.dir / "segments.jsonl"
        if index.exists():
            for line in index.read_text().splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                self.playlist.segments.append(Segment(
                    msn=row["msn"], uri=row["uri"], duration=row["duration"],
                    program_date_time=datetime.fromisoformat(row["pdt"]),
                    map_uri=row["map"], discontinuity=row["disc"],
                    gap=row.get("gap", False)))
                self._end = max(self._end, row["end"])
                self.session = max(self.session, row["session"])
        if self.playlist.segments:
            self.playlist.next_msn = self.playlist.segments[-1].msn + 1
        inits = [int(p.name[4:-4]) for p in self.dir.glob("init*.mp4")
                 if p.name[4:-4].isdigit()]
        self.session = max([self.session, *inits])
        msn = self.playlist.next_msn
        unfinished = self.dir / f"s{msn}.m4s.tmp"
        if unfinished.exists() or any(self.dir.glob(f"s{msn}.*.m4s")):
            last = self.playlist.segments[-1] if self.playlist.segments else None
            self._append_segment(Segment(
                msn=msn, uri=f"s{msn}.m4s", duration=self.playlist.target_duration,
                program_date_time=datetime.now(UTC),
                map_uri=last.map_uri if last else f"init{self.session}.mp4", gap=True))
            unfinished.unlink(missing_ok=True)
        path = self.dir / "live.json"
        if path.exists():
            self._fragment_seq = json.loads(path.read_text()).get("fragments", 0)

    @property
    def has_media(self) -> bool:
        return bool(self.playlist.segments) or self._part is not None

    def start_session(self, *, audio: bool = True) -> None:
        """A publisher (re)connected: new init segment, discontinuity if not first.

        ``audio=False`` (an offer without audio) leaves the audio track out of the
        init segment: players wait for every declared track before they start."""
        self.session += 1
        self._audio_track = fmp4.AudioTrack(track_id=2) if audio else None
        self._base = self._end + (VIDEO_TIMESCALE // 30 if self.playlist.segments else 0)
        self._video_track = None
        self._pending = None
        self._part = None
        self._audio_queue.clear()
        self._audio_next = None
        self._keyframe_asked_at = None
        self.playlist.ended = False
        self.playlist.next_discontinuity = bool(self.playlist.segments)
        self.playlist.parts = []

    # ----------------------------------------------------------------- input
    @property
    def keyframe_due(self) -> bool:
        """Whether the ingest should request a keyframe (RTCP PLI) now.

        True ``KEYFRAME_LEAD`` before the segment boundary, once, then again every
        ``KEYFRAME_RETRY`` until it arrives; always while waiting for the first one.
        """
        if self._pending is None and self._part is None:
            return self._keyframe_asked_at is None
        newest = self._pending.pts if self._pending else self._end
        due = self._segment_start + self.segment_ticks - int(KEYFRAME_LEAD * VIDEO_TIMESCALE)
        if newest < due:
            return False
        asked = self._keyframe_asked_at
        return asked is None or asked < due or newest - asked >= KEYFRAME_RETRY * VIDEO_TIMESCALE

    def keyframe_requested(self) -> None:
        self._keyframe_asked_at = self._pending.pts if self._pending else self._end

    def add_video(self, annexb: bytes, pts: int) -> None:
        """One H.264 access unit (Annex B) at ``pts`` (90 kHz, session clock)."""
        pts = max(0, pts) + self._base
        nals = [n for n in fmp4.split_annexb(annexb) if _nal_type(n) != fmp4.NAL_AUD]
        if not nals:
            return
        keyframe = any(_nal_type(n) == fmp4.NAL_IDR for n in nals)
        if keyframe:
            self._update_track(annexb, nals)
        if self._video_track is None:
            return  # wait for the first keyframe with SPS/PPS
        if self._pending is not None and pts <= self._pending.pts:
            pts = self._pending.pts + 1  # keep decode order monotonic on bad timestamps
        frame = _Frame(pts, nals, keyframe)
        prev = self._pending
        self._pending = frame
        if prev is None:
            if self._part is None:
                if not keyframe:
                    self._pending = None
                    return
                self._open_segment(pts)
            return
        assert self._part is not None
        duration = pts - prev.pts
        if not self._part.video:
            self._part.video_start = prev.pts
        self._part.video.append(Sample(fmp4.annexb_to_avcc(prev.nals), duration, prev.keyframe))
        self._end = pts
        if keyframe and pts - self._segment_start >= self.segment_ticks - self.part_ticks // 2:
            # One playlist write for the last part, the closed segment and the new hint:
            # in between, a blocking reload for the next part of the old segment would
            # be answered (6.2.5.2: a later segment exists) with a stale playlist.
            self._close_part(pts, publish=False)
            self._close_segment()
            self._open_segment(pts)
            self._publish()
        elif pts - self._part_start >= self.part_ticks:
            self._close_part(pts)
            self._open_part(pts)

    def add_audio(self, packet: bytes, pts: int) -> None:
        """One Opus packet at ``pts`` (48 kHz, session clock)."""
        if not packet or self._audio_track is None:
            return
        pts = max(0, pts) + self._base * AUDIO_TIMESCALE // VIDEO_TIMESCALE
        if self._audio_next is not None and pts < self._audio_next:
            pts = self._audio_next  # overlapping timestamps: keep samples in order
        samples = opus_packet_samples(packet) or 960
        self._audio_next = pts + samples
        self._audio_queue.append((pts, packet))

    def _update_track(self, annexb: bytes, nals: list[bytes]) -> None:
        sps = next((n for n in nals if _nal_type(n) == fmp4.NAL_SPS), None)
        pps = next((n for n in nals if _nal_type(n) == fmp4.NAL_PPS), None)
        if sps is None or pps is None:
            return
        track = self._video_track
        if track is not None and track.sps == sps and track.pps == pps:
            return
        width, height = _dimensions(annexb)
        new = fmp4.VideoTrack(track_id=1, width=width, height=height, sps=sps, pps=pps)
        if track is not None:
            # New parameters mid-session (resolution change): new init, discontinuity.
            self.session += 1
            if self._part is not None:
                self._pending_flush_for_new_track()
            self.playlist.next_discontinuity = bool(self.playlist.segments)
        self._video_track = new
        self._write(f"init{self.session}.mp4", fmp4.init_segment(new, self._audio_track))
        self.playlist.next_map_uri = self._map_uri
        log.info("video track", extra={"codec": new.codec, "width": width, "height": height,
                                       "dir": str(self.dir)})

    def _pending_flush_for_new_track(self) -> None:
        # Close what was written with the old parameters; the keyframe starts over.
        prev = self._pending
        if prev is not None and self._part is not None:
            if not self._part.video:
                self._part.video_start = prev.pts
            self._part.video.append(Sample(fmp4.annexb_to_avcc(prev.nals),
                                           VIDEO_TIMESCALE // 30, prev.keyframe))
            self._end = prev.pts + VIDEO_TIMESCALE // 30
        self._close_part(self._end, publish=False)
        self._close_segment()
        self._part = None
        self._pending = None
        self.playlist.preload_uri = None  # the next part needs the new init: no hint yet
        self._publish()

    @property
    def _map_uri(self) -> str:
        return f"init{self.session}.mp4"

    # ---------------------------------------------------------------- output
    def _open_segment(self, pts: int) -> None:
        self._segment_start = pts
        self._segment_pdt = datetime.now(UTC)
        self._segment_file = self.dir / f"s{self.playlist.next_msn}.m4s.tmp"
        self._segment_file.write_bytes(b"")
        self._open_part(pts)

    def _open_part(self, pts: int) -> None:
        self._part_start = pts
        self._part = _OpenPart()
        self.playlist.preload_uri = self._part_uri(len(self.playlist.parts))

    def _part_uri(self, index: int) -> str:
        return f"s{self.playlist.next_msn}.{index}.m4s"

    def _close_part(self, end: int, *, publish: bool = True, last: bool = False) -> None:
        """``last``: the session's last part, which takes all the audio queued (no
        later part would)."""
        part = self._part
        if part is None or not part.video:
            return
        end_audio = end * AUDIO_TIMESCALE // VIDEO_TIMESCALE
        audio = [a for a in self._audio_queue if last or a[0] < end_audio]
        self._audio_queue = self._audio_queue[len(audio):]
        audio_samples = []
        for i, (apts, packet) in enumerate(audio):
            nxt = audio[i + 1][0] if i + 1 < len(audio) else apts + (
                opus_packet_samples(packet) or 960)
            audio_samples.append(Sample(packet, max(1, nxt - apts), True))
        runs = [(1, part.video_start, part.video)]
        if audio_samples:
            runs.append((2, audio[0][0], audio_samples))
        self._fragment_seq += 1
        data = fmp4.fragment(self._fragment_seq, runs)
        index = len(self.playlist.parts)
        uri = self._part_uri(index)
        self._write(uri, data)
        assert self._segment_file is not None
        with self._segment_file.open("ab") as f:
            f.write(data)
        self.playlist.parts.append(Part(duration=(end - part.video_start) / VIDEO_TIMESCALE,
                                        uri=uri, independent=part.video[0].sync))
        self._part = None
        self.playlist.preload_uri = self._part_uri(index + 1)
        if publish:
            self._publish()

    def _close_segment(self) -> None:
        pl = self.playlist
        if not pl.parts or self._segment_file is None:
            return
        msn = pl.next_msn
        uri = f"s{msn}.m4s"
        os.replace(self._segment_file, self.dir / uri)
        seg = Segment(msn=msn, uri=uri, duration=sum(p.duration for p in pl.parts),
                      program_date_time=self._segment_pdt, map_uri=self._map_uri,
                      discontinuity=pl.next_discontinuity and bool(pl.segments),
                      parts=pl.parts)
        self._append_segment(seg)
        pl.parts = []
        pl.next_discontinuity = False
        self._prune_parts()
        self._segment_file = None

    def _append_segment(self, seg: Segment) -> None:
        """A closed segment (or a gap) onto the playlist and into ``segments.jsonl``."""
        self.playlist.segments.append(seg)
        self.playlist.next_msn = seg.msn + 1
        row = {"msn": seg.msn, "uri": seg.uri, "duration": seg.duration, "map": seg.map_uri,
               "pdt": seg.program_date_time.isoformat(), "disc": seg.discontinuity,
               "end": self._end, "session": self.session}
        if seg.gap:
            row["gap"] = True
        with (self.dir / "segments.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _prune_parts(self) -> None:
        old = len(self.playlist.segments) - 3 - PART_FILES_KEPT
        if old < 0:
            return
        seg = self.playlist.segments[old]
        for part in seg.parts:
            (self.dir / part.uri).unlink(missing_ok=True)
        seg.parts = []

    def _write(self, name: str, data: bytes | str) -> None:
        tmp = self.dir / f".{name}.tmp"
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, self.dir / name)

    def _publish(self) -> None:
        pl = self.playlist
        self._write("live.m3u8", pl.render(PlaylistKind.LOW_LATENCY, window=LIVE_WINDOW))
        plain = pl.render(PlaylistKind.PLAIN, window=LIVE_WINDOW)
        if plain != self._plain_written:  # it lists no parts: it changes once a segment
            self._write("index.m3u8", plain)
            self._plain_written = plain
        self._write("live.json", json.dumps({
            "msn": pl.next_msn, "part": pl.last_part_index, "ended": pl.ended,
            "fragments": self._fragment_seq}))
        if self.on_update is not None:
            self.on_update()

    # ------------------------------------------------------------------- end
    def _close_session(self) -> None:
        """Write out the held-back frame and the open segment, without publishing."""
        prev = self._pending
        if prev is not None and self._part is not None:
            if not self._part.video:
                self._part.video_start = prev.pts
            duration = VIDEO_TIMESCALE // 30
            self._part.video.append(Sample(fmp4.annexb_to_avcc(prev.nals), duration,
                                           prev.keyframe))
            self._end = prev.pts + duration
            self._close_part(self._end, publish=False, last=True)
        self._close_segment()
        self._pending = None
        self._part = None
        self._audio_queue.clear()
        self.playlist.parts = []
        self.playlist.preload_uri = None

    def end_session(self) -> None:
        """The publisher went away: write out the held-back frame and the open segment."""
        self._close_session()
        # Written now, not at the next part: until then blocking reloads would be
        # answered at once (the segment is closed) with the old playlist, in a loop.
        self._publish()

    def finish(self, dateranges: list[DateRange] | None = None) -> None:
        """End of the stream: ENDLIST on the live playlists and a VOD ``replay.m3u8``.

        One playlist write: the ended live playlist lists whole segments only (every
        one is complete; rfc8216bis 4.4.4.9 lets parts go once their segment is
        there). The part files stay on disk for players still holding the previous
        playlist, until :meth:`drop_lingering_parts` (the caller runs it a few
        segment durations later, as parts are deleted some segments after they leave
        a live playlist)."""
        self._close_session()
        pl = self.playlist
        pl.ended = True
        for seg in pl.segments:
            self._lingering.extend(part.uri for part in seg.parts)
            seg.parts = []
        pl.dateranges = list(dateranges or [])
        self._write("replay.m3u8", pl.render(PlaylistKind.VOD))
        pl.dateranges = []
        self._publish()

    def drop_lingering_parts(self) -> None:
        """Delete the part files the ended playlist no longer lists (see finish)."""
        lingering, self._lingering = self._lingering, []
        for uri in lingering:
            (self.dir / uri).unlink(missing_ok=True)

    @property
    def duration_ms(self) -> int:
        return round(sum(s.duration for s in self.playlist.segments) * 1000)

    @property
    def replay_seconds(self) -> float:
        """Where the newest frame sits in the replay (sum of segment durations before)."""
        done = sum(s.duration for s in self.playlist.segments)
        if self._part is None and self._pending is None:
            return done
        newest = self._pending.pts if self._pending else self._end
        return done + max(0, newest - self._segment_start) / VIDEO_TIMESCALE
