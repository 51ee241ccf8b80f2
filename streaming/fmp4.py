"""Fragmented MP4 (CMAF) boxes, pure: an init segment and ``moof``+``mdat`` fragments.

ISO/IEC 14496-12 (ISOBMFF) for the boxes, ISO/IEC 14496-15 5.3.3 for ``avcC`` and
the Opus-in-ISOBMFF mapping (https://opus-codec.org/docs/opus_in_isobmff.html) for
``Opus``/``dOps``. Hand-written rather than FFmpeg's mp4 muxer because LL-HLS needs
a fragment cut exactly at each ~200 ms part and each keyframe, under our control;
the boxes are few and fixed. One fragment may carry a video and an audio track
(two ``traf``), so a part keeps its audio next to its video.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "AudioTrack",
    "Sample",
    "VideoTrack",
    "annexb_to_avcc",
    "fragment",
    "init_segment",
    "split_annexb",
]

VIDEO_TIMESCALE = 90_000  # RTP clock of H.264 (RFC 6184 8.2.1)
AUDIO_TIMESCALE = 48_000  # RTP clock of Opus (RFC 7587 4.1)

# 8.8.3.1 sample flags: sample_depends_on=2 (I-frame) vs =1 plus is_non_sync_sample.
SYNC_SAMPLE_FLAGS = 0x02000000
NON_SYNC_SAMPLE_FLAGS = 0x01010000

_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
NAL_SPS, NAL_PPS, NAL_IDR, NAL_AUD = 7, 8, 5, 9


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


@dataclass(frozen=True, slots=True)
class VideoTrack:
    track_id: int
    width: int
    height: int
    sps: bytes
    pps: bytes

    @property
    def codec(self) -> str:
        """RFC 6381 codecs string, e.g. ``avc1.42e01f``."""
        return "avc1." + self.sps[1:4].hex()


@dataclass(frozen=True, slots=True)
class AudioTrack:
    track_id: int
    channels: int = 2
    pre_skip: int = 312  # samples at 48 kHz; libopus' usual encoder delay

    @property
    def codec(self) -> str:
        return "opus"


@dataclass(frozen=True, slots=True)
class Sample:
    data: bytes  # AVCC (length-prefixed) for H.264, a raw packet for Opus
    duration: int  # in the track's timescale
    sync: bool = True


def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex B byte stream (ITU-T H.264 B.1), start codes removed."""
    # bytes.find, not a loop over bytes: a 720p30 stream is ~300 KB/s of Annex B, and
    # a Python loop over it cost ~5% of a core on its own.
    units: list[bytes] = []
    start = -1
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        if start >= 0:
            units.append(data[start:i].rstrip(b"\x00"))
        start = i + 3
        i = data.find(b"\x00\x00\x01", start)
    if start >= 0:
        units.append(data[start:])
    elif data:
        units.append(data)
    return [u for u in units if u]


def annexb_to_avcc(nals: Iterable[bytes]) -> bytes:
    """4-byte length prefixes (``lengthSizeMinusOne`` = 3 in our ``avcC``)."""
    return b"".join(struct.pack(">I", len(u)) + u for u in nals)


def _avcc_box(v: VideoTrack) -> bytes:
    # 14496-15 5.3.3.1.2 AVCDecoderConfigurationRecord
    profile, compat, level = v.sps[1], v.sps[2], v.sps[3]
    record = struct.pack(">BBBBBB", 1, profile, compat, level, 0xFF, 0xE1)
    record += struct.pack(">H", len(v.sps)) + v.sps
    record += b"\x01" + struct.pack(">H", len(v.pps)) + v.pps
    if profile in (100, 110, 122, 144):
        # chroma_format 4:2:0, 8-bit luma and chroma, no SPS extensions
        record += bytes([0xFC | 1, 0xF8, 0xF8, 0])
    return box(b"avcC", record)


def _tkhd(track_id: int, volume: int, width: int, height: int) -> bytes:
    return full_box(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, track_id, 0, 0),
                    bytes(8), struct.pack(">hhhH", 0, 0, volume, 0), _MATRIX,
                    struct.pack(">II", width << 16, height << 16))


def _mdhd(timescale: int) -> bytes:
    # language "und" packed as 3 x 5 bits (8.4.2.3)
    return full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0))


def _hdlr(handler: bytes, name: bytes) -> bytes:
    return full_box(b"hdlr", 0, 0, struct.pack(">I4s", 0, handler), bytes(12), name + b"\x00")


def _stbl(sample_entry: bytes) -> bytes:
    empty = struct.pack(">I", 0)
    return box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), sample_entry),
               full_box(b"stts", 0, 0, empty), full_box(b"stsc", 0, 0, empty),
               full_box(b"stsz", 0, 0, empty, empty), full_box(b"stco", 0, 0, empty))


def _dinf() -> bytes:
    return box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1),
                                 full_box(b"url ", 0, 1)))


def _video_trak(v: VideoTrack) -> bytes:
    avc1 = box(b"avc1", bytes(6), struct.pack(">H", 1), bytes(16),
               struct.pack(">HHIIIH", v.width, v.height, 0x480000, 0x480000, 0, 1),
               bytes(32), struct.pack(">Hh", 0x18, -1), _avcc_box(v))
    minf = box(b"minf", full_box(b"vmhd", 0, 1, bytes(8)), _dinf(), _stbl(avc1))
    mdia = box(b"mdia", _mdhd(VIDEO_TIMESCALE), _hdlr(b"vide", b"VideoHandler"), minf)
    return box(b"trak", _tkhd(v.track_id, 0, v.width, v.height), mdia)


def _audio_trak(a: AudioTrack) -> bytes:
    # Opus in ISOBMFF 4.3.2: dOps, big-endian, channel mapping family 0 (mono/stereo).
    dops = box(b"dOps", struct.pack(">BBHIhB", 0, a.channels, a.pre_skip, AUDIO_TIMESCALE, 0, 0))
    opus = box(b"Opus", bytes(6), struct.pack(">H", 1), bytes(8),
               struct.pack(">HHHHI", a.channels, 16, 0, 0, AUDIO_TIMESCALE << 16), dops)
    minf = box(b"minf", full_box(b"smhd", 0, 0, bytes(4)), _dinf(), _stbl(opus))
    mdia = box(b"mdia", _mdhd(AUDIO_TIMESCALE), _hdlr(b"soun", b"SoundHandler"), minf)
    return box(b"trak", _tkhd(a.track_id, 0x0100, 0, 0), mdia)


def init_segment(video: VideoTrack | None, audio: AudioTrack | None) -> bytes:
    """``ftyp`` + ``moov`` with one ``trak`` per track and ``mvex`` (8.8.1)."""
    tracks = [t for t in (video, audio) if t is not None]
    if not tracks:
        raise ValueError("an init segment needs at least one track")
    ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 0), b"iso6", b"cmfc", b"mp41")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0),
                    struct.pack(">IH", 0x10000, 0x100), bytes(10), _MATRIX, bytes(24),
                    struct.pack(">I", max(t.track_id for t in tracks) + 1))
    traks = [_video_trak(video)] if video else []
    traks += [_audio_trak(audio)] if audio else []
    trex = [full_box(b"trex", 0, 0, struct.pack(">IIIII", t.track_id, 1, 0, 0, 0))
            for t in tracks]
    return ftyp + box(b"moov", mvhd, *traks, box(b"mvex", *trex))


def fragment(sequence: int, runs: Sequence[tuple[int, int, Sequence[Sample]]]) -> bytes:
    """One ``moof`` + ``mdat`` (8.8.4). ``runs``: (track_id, base decode time, samples).

    ``tfhd`` sets default-base-is-moof (CMAF 7.5.16) so ``trun`` data offsets count
    from the start of the ``moof``.
    """
    runs = [r for r in runs if r[2]]
    if not runs:
        raise ValueError("a fragment needs at least one sample")
    # trun flags: data-offset, sample-duration, sample-size, sample-flags present
    trun_flags = 0x000001 | 0x000100 | 0x000200 | 0x000400

    def build(offsets: list[int]) -> bytes:
        trafs = []
        for (track_id, base_time, samples), offset in zip(runs, offsets, strict=True):
            entries = b"".join(
                struct.pack(">III", s.duration, len(s.data),
                            SYNC_SAMPLE_FLAGS if s.sync else NON_SYNC_SAMPLE_FLAGS)
                for s in samples)
            trafs.append(box(
                b"traf",
                full_box(b"tfhd", 0, 0x020000, struct.pack(">I", track_id)),
                full_box(b"tfdt", 1, 0, struct.pack(">Q", base_time)),
                full_box(b"trun", 0, trun_flags, struct.pack(">Ii", len(samples), offset),
                         entries)))
        return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)

    sizes = [sum(len(s.data) for s in samples) for _, _, samples in runs]
    moof_len = len(build([0] * len(runs)))
    offsets, pos = [], moof_len + 8
    for size in sizes:
        offsets.append(pos)
        pos += size
    mdat = box(b"mdat", *(s.data for _, _, samples in runs for s in samples))
    return build(offsets) + mdat
