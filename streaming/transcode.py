"""Re-encoding to H.264 when the ingest cannot be passed through.

Used for VP8 from a browser, or for every stream with ``DROPSERVER_HLS_TRANSCODE=always``.
libx264 (bundled in PyAV's FFmpeg) with ``ultrafast``/``zerolatency`` and no B-frames:
~17-23% of a core per 720p30 stream on the dev VM against ~5-6% for pass-through,
one LL-HLS viewer served in both (docs/benchmarks.md). Keyframes come where the
packager asks for them (segment boundaries), never on a fixed GOP, so segments stay
~1 s.
"""

from __future__ import annotations

import fractions

import av

from streaming.fmp4 import VIDEO_TIMESCALE

__all__ = ["H264Transcoder"]


class H264Transcoder:
    """Decoded pictures in, Annex B access units with 90 kHz timestamps out."""

    def __init__(self, *, preset: str = "ultrafast", crf: int = 23) -> None:
        self.preset = preset
        self.crf = crf
        self._enc: av.VideoCodecContext | None = None

    def _open(self, frame: av.VideoFrame) -> av.VideoCodecContext:
        enc = av.CodecContext.create("libx264", "w")
        enc.width = frame.width - frame.width % 2
        enc.height = frame.height - frame.height % 2
        enc.pix_fmt = "yuv420p"
        enc.time_base = fractions.Fraction(1, VIDEO_TIMESCALE)
        enc.options = {"preset": self.preset, "tune": "zerolatency", "bf": "0",
                       "crf": str(self.crf), "g": "600", "keyint_min": "600",
                       "sc_threshold": "0", "profile": "high"}
        enc.open()
        return enc

    def encode(self, frame: av.VideoFrame, keyframe: bool) -> list[tuple[bytes, int]]:
        """Encode one picture (``frame.pts`` in 90 kHz); runs in a worker thread."""
        if self._enc is None or (self._enc.width, self._enc.height) != (
                frame.width - frame.width % 2, frame.height - frame.height % 2):
            self._enc = self._open(frame)
            keyframe = True
        pts = frame.pts or 0
        picture = frame.reformat(width=self._enc.width, height=self._enc.height,
                                 format="yuv420p")
        picture.pts = pts
        picture.time_base = fractions.Fraction(1, VIDEO_TIMESCALE)
        picture.pict_type = av.video.frame.PictureType.I if keyframe else (
            av.video.frame.PictureType.NONE)
        return [(bytes(p), p.pts) for p in self._enc.encode(picture)]
