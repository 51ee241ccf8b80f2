"""aiortc as a WHIP receiver: H.264 and Opus passed through to the packager, undecoded.

aiortc has no public way to receive encoded frames (aiortc issues #55, #449): each
``RTCRtpReceiver`` runs a decoder thread that calls ``aiortc.rtcrtpreceiver.get_decoder``.
:func:`install` swaps that function for one that returns a pass-through "decoder" for
H.264 and Opus, so the track yields :class:`EncodedFrame` (the reassembled Annex B
access unit or Opus packet) instead of pictures. Copying bytes needs no thread, and
the hop to the decoder thread and back (a ``queue.Queue`` put, a thread wake-up, a
``run_coroutine_threadsafe`` per frame, 80 a second with audio) cost more than the
copy, so :func:`install` also wraps ``RTCRtpReceiver.receive`` to hand pass-through
frames to the track on the event loop (:class:`_InlineDecoderQueue`); anything else,
and the end of the track, still goes through aiortc's thread. That touches aiortc
internals, hence the exact pin (``aiortc==1.16.0`` in pyproject) checked here and by
``tests/test_streaming_ingest.py``.

aiortc's jitter buffer hands a frame on only when the first packet of the next one
arrives (audio: four frames later), so a session's last frames never leave it. At
the end of a session :meth:`Publisher.close` lets the tracks' loops read what is
queued, then takes the complete frames still in the jitter buffers
(:func:`_leftover_frames`: a video frame is complete when its last packet carries the
RTP marker bit, RFC 6184 5.1; each Opus packet is a frame) and hands them to the
packager: the last frame published reaches the last segment and the replay.

A publisher is alive while its media arrives (:attr:`Publisher.read_timeout`, as
MediaMTX's ``readTimeout``), not while it answers ICE consent checks: aioice closes
the connection after 6 unanswered checks (RFC 7675, ~30 s), and FFmpeg's WHIP muxer
answers none, so every FFmpeg publish was cut after ~30 s. :func:`install` makes
consent failures never close the connection (``aioice.ice.CONSENT_FAILURES``); the
server sends nothing but RTCP, which is what consent protects.

Other video codecs (VP8 from a browser), or every codec when
``DROPSERVER_HLS_TRANSCODE=always``, are decoded by aiortc and re-encoded to H.264 by
:mod:`streaming.transcode`.

aiortc registers only constrained baseline/baseline H.264 (42e01f, 42001f); Main,
High and Constrained High entries are added so OBS and FFmpeg offers with those
profiles match (aiortc compares profiles, not levels: RFC 6184 8.2.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiortc
from aioice import ice as aioice_ice
from aiortc import (
    RTCPeerConnection,
    RTCRtpCodecParameters,
    RTCSessionDescription,
    rtcrtpreceiver,
    sdp,
)
from aiortc.codecs import CODECS, get_capabilities
from aiortc.codecs.base import Decoder
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtcpFeedback

from streaming.fmp4 import AUDIO_TIMESCALE, VIDEO_TIMESCALE

__all__ = ["AIORTC_VERSION", "BadOffer", "EncodedFrame", "Publisher", "install"]

log = logging.getLogger("dropserver.streaming")

AIORTC_VERSION = "1.16.0"
EXTRA_H264_PROFILES = ("4d001f", "64001f", "640c1f")  # Main, High, Constrained High
# Chrome starts WebRTC video at ~300 kbps and climbs slowly against aiortc's REMB;
# these fmtp hints give 720p from the first frame (measured, notes/streaming.md).
BITRATE_HINT = "x-google-start-bitrate=2500;x-google-min-bitrate=1500"

FIRST_MEDIA_TIMEOUT = 10.0  # seconds from the answer to the first frame, at least
DRAIN_TIMEOUT = 2.0  # seconds a closing session's loops get to read queued frames
CONSENT_NEVER_EXPIRES = 2**62  # unanswered consent checks before aioice gives up

_installed = {"done": False, "transcode_all": False}
_original_get_decoder = rtcrtpreceiver.get_decoder


class BadOffer(ValueError):
    """The SDP offer cannot be answered; ``code`` is the API error code."""

    def __init__(self, message: str, code: str = "bad_offer") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """What the pass-through decoder hands to the track instead of a picture."""

    data: bytes  # H.264 access unit (Annex B) or one Opus packet
    timestamp: int  # RTP timestamp, unwrapped, 0 at the track's first frame
    arrival: float  # time.monotonic() when the frame was complete


class _Passthrough(Decoder):
    def decode(self, encoded_frame: Any) -> list:  # aiortc JitterFrame
        return [EncodedFrame(bytes(encoded_frame.data), encoded_frame.timestamp,
                             time.monotonic())]


def _get_decoder(codec: RTCRtpCodecParameters) -> Decoder:
    mime = codec.mimeType.lower()
    if mime == "audio/opus" or (mime == "video/h264" and not _installed["transcode_all"]):
        return _Passthrough()
    return _original_get_decoder(codec)


class _InlineDecoderQueue:
    """Stands in for a receiver's decoder queue: pass-through frames go straight to
    the track's queue (the caller is the event loop); other codecs, and ``None`` (the
    end of the track, queued behind them), go on to aiortc's decoder thread."""

    __slots__ = ("_passthrough", "_thread_queue", "_track_queue")

    def __init__(self, thread_queue: Any, track_queue: asyncio.Queue) -> None:
        self._thread_queue = thread_queue
        self._track_queue = track_queue
        self._passthrough: dict[str, bool] = {}

    def put(self, task: tuple[RTCRtpCodecParameters, Any] | None) -> None:
        if task is not None:
            codec, encoded_frame = task
            inline = self._passthrough.get(codec.mimeType)
            if inline is None:
                inline = self._passthrough[codec.mimeType] = isinstance(
                    _get_decoder(codec), _Passthrough)
            if inline:
                for frame in _PASSTHROUGH.decode(encoded_frame):
                    self._track_queue.put_nowait(frame)
                return
        self._thread_queue.put(task)


_PASSTHROUGH = _Passthrough()
_original_receive = rtcrtpreceiver.RTCRtpReceiver.receive


def _leftover_frames(receiver: rtcrtpreceiver.RTCRtpReceiver) -> list[EncodedFrame]:
    """The complete pass-through frames still in ``receiver``'s jitter buffer, oldest
    first, timestamps mapped as aiortc maps them (see the module docstring)."""
    jitter = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
    codecs = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
    mapper = receiver._RTCRtpReceiver__timestamp_mapper  # type: ignore[attr-defined]
    if jitter._origin is None:
        return []
    groups: list[list[Any]] = []
    for count in range(jitter.capacity):  # contiguous packets from the oldest
        packet = jitter._packets[(jitter._origin + count) % jitter.capacity]
        if packet is None:
            break
        if groups and groups[-1][0].timestamp == packet.timestamp:
            groups[-1].append(packet)
        else:
            groups.append([packet])
    frames = []
    for packets in groups:
        codec = codecs.get(packets[0].payload_type)
        if codec is None or not isinstance(_get_decoder(codec), _Passthrough):
            break  # a decoded codec (VP8): its decoder thread is gone
        if codec.mimeType.lower().startswith("video/") and not packets[-1].marker:
            break  # the frame's last packet never came
        data = b"".join(getattr(p, "_data", b"") for p in packets)
        frames.append(EncodedFrame(data, mapper.map(packets[0].timestamp),
                                   time.monotonic()))
    jitter.remove(sum(len(g) for g in groups[:len(frames)]))
    return frames


async def _receive(self: rtcrtpreceiver.RTCRtpReceiver, parameters: Any) -> None:
    await _original_receive(self, parameters)
    queue = self._RTCRtpReceiver__decoder_queue  # type: ignore[attr-defined]
    if not isinstance(queue, _InlineDecoderQueue):
        self._RTCRtpReceiver__decoder_queue = _InlineDecoderQueue(  # type: ignore[attr-defined]
            queue, self._track._queue)


def install(*, transcode_all: bool = False) -> None:
    """Patch aiortc once per process (see module docstring). Idempotent."""
    if aiortc.__version__ != AIORTC_VERSION:
        raise RuntimeError(f"streaming.ingest relies on aiortc=={AIORTC_VERSION} internals, "
                           f"found {aiortc.__version__}")
    if not isinstance(getattr(aioice_ice, "CONSENT_FAILURES", None), int):
        raise RuntimeError("streaming.ingest expects aioice.ice.CONSENT_FAILURES")
    _installed["transcode_all"] = transcode_all
    if _installed["done"]:
        return
    aioice_ice.CONSENT_FAILURES = CONSENT_NEVER_EXPIRES
    rtcrtpreceiver.get_decoder = _get_decoder
    rtcrtpreceiver.RTCRtpReceiver.receive = _receive
    known = {c.parameters.get("profile-level-id") for c in CODECS["video"]}
    pt = max(c.payloadType for c in CODECS["video"]) + 1
    for profile in EXTRA_H264_PROFILES:
        if profile in known:
            continue
        CODECS["video"] += [
            RTCRtpCodecParameters(
                mimeType="video/H264", clockRate=VIDEO_TIMESCALE, payloadType=pt,
                rtcpFeedback=[RTCRtcpFeedback(type="nack"),
                              RTCRtcpFeedback(type="nack", parameter="pli"),
                              RTCRtcpFeedback(type="goog-remb")],
                parameters={"level-asymmetry-allowed": "1", "packetization-mode": "1",
                            "profile-level-id": profile}),
            RTCRtpCodecParameters(mimeType="video/rtx", clockRate=VIDEO_TIMESCALE,
                                  payloadType=pt + 1, parameters={"apt": pt}),
        ]
        pt += 2
    _installed["done"] = True


def _offer_codecs(offer: str) -> tuple[set[str], set[str]]:
    """Video and audio codec names in an offer, or :class:`BadOffer`."""
    if not offer.lstrip().startswith("v=0"):
        raise BadOffer("the body must be an SDP offer (it starts with v=0)")
    try:
        desc = sdp.SessionDescription.parse(offer)
    except Exception as exc:  # aiortc raises assorted errors on garbage
        raise BadOffer(f"malformed SDP: {type(exc).__name__}: {exc}") from None
    video: set[str] = set()
    audio: set[str] = set()
    for media in desc.media:
        if media.direction not in (None, "sendonly", "sendrecv"):
            raise BadOffer(f"the {media.kind} section must be sendonly (RFC 9725 4.2)")
        names = {c.mimeType.split("/")[-1].lower() for c in media.rtp.codecs}
        (video if media.kind == "video" else audio if media.kind == "audio" else set()).update(
            names)
        if media.kind in ("video", "audio") and (not media.ice.usernameFragment
                                                  or not media.dtls):
            raise BadOffer("the offer lacks ICE credentials or a DTLS fingerprint")
    if not video:
        raise BadOffer("the offer has no video", code="offer_no_video")
    return video, audio


def _add_bitrate_hints(answer: str) -> str:
    """Append the start-bitrate hints to every video fmtp line of H.264/VP8."""
    out, in_video, pts = [], False, set()
    for line in answer.split("\r\n"):
        if line.startswith("m="):
            in_video = line.startswith("m=video")
        if in_video:
            m = re.match(r"a=rtpmap:(\d+) (H264|VP8)/", line)
            if m:
                pts.add(m.group(1))
            m = re.match(r"a=fmtp:(\d+) (.*)", line)
            if m and m.group(1) in pts:
                line = f"{line};{BITRATE_HINT}"
        out.append(line)
    return "\r\n".join(out)


VideoSink = Callable[[bytes, int], None]
AudioSink = Callable[[bytes, int], None]


class Publisher:
    """One WHIP session: the peer connection and the tasks that read its tracks.

    ``sink`` receives media on a shared clock that starts with the session's first
    frame (not with the offer: ICE and DTLS take a while): each track's first frame
    is placed at its arrival time on that clock, later ones by RTP timestamp
    (audio and video in sync within the arrival jitter, a few ms on loopback).
    """

    def __init__(self, session_id: str, *, sink: Any,
                 on_closed: Callable[[Publisher, bool], Awaitable[None]],
                 read_timeout: float = 10.0) -> None:
        self.id = session_id
        self.read_timeout = read_timeout  # seconds without media: lost
        self.sink = sink  # has add_video(annexb, pts90k), add_audio(packet, pts48k),
        # keyframe_due, keyframe_requested(), transcoder(): see streaming.live
        self.on_closed = on_closed
        self.pc = RTCPeerConnection()
        self.video_codec: str | None = None
        self.audio_codec: str | None = None
        self.started = time.monotonic()
        self._clock_start: float | None = None  # arrival of the first frame
        self._offsets: dict[str, int] = {}
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._closing: asyncio.Task | None = None  # the one close, every caller awaits it
        self.frames = 0
        self.last_media: float | None = None  # time.monotonic() of the newest frame

    async def accept(self, offer: str) -> str:
        """The SDP answer for ``offer`` (ICE candidates included, no trickle)."""
        video, audio = _offer_codecs(offer)
        if "h264" in video:
            want = [c for c in get_capabilities("video").codecs
                    if c.mimeType.lower() in ("video/h264", "video/rtx")]
            # constrained baseline first: every browser decodes it
            want.sort(key=lambda c: (c.mimeType.lower() == "video/rtx",
                                     c.parameters.get("profile-level-id") != "42e01f"))
        elif "vp8" in video:
            want = [c for c in get_capabilities("video").codecs
                    if c.mimeType.lower() in ("video/vp8", "video/rtx")]
        else:
            raise BadOffer("no supported video codec: offer H.264 or VP8",
                           code="offer_unsupported_codec")
        vt = self.pc.addTransceiver("video", direction="recvonly")
        vt.setCodecPreferences(want)
        if audio:
            if "opus" not in audio:
                raise BadOffer("no supported audio codec: offer Opus",
                               code="offer_unsupported_codec")
            at = self.pc.addTransceiver("audio", direction="recvonly")
            at.setCodecPreferences([c for c in get_capabilities("audio").codecs
                                    if c.mimeType.lower() == "audio/opus"])

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            loop = self._video_loop if track.kind == "video" else self._audio_loop
            self._tasks.append(asyncio.get_running_loop().create_task(
                loop(track), name=f"whip-media-{track.kind}-{self.id}"))

        @self.pc.on("connectionstatechange")
        async def on_state() -> None:
            state = self.pc.connectionState
            log.info("whip connection", extra={"session": self.id, "state": state})
            if state in ("failed", "closed"):
                await self.close(lost=state == "failed")

        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except BadOffer:
            raise
        except Exception as exc:  # aiortc: ValueError, OperationError, InvalidState...
            await self.pc.close()
            raise BadOffer(f"cannot answer the offer: {exc}") from None
        self._tasks.append(asyncio.ensure_future(self._watch_media()))
        for t in self.pc.getTransceivers():
            if t.kind == "video" and t._codecs:
                self.video_codec = t._codecs[0].name
            if t.kind == "audio" and t._codecs:
                self.audio_codec = t._codecs[0].name
        return _add_bitrate_hints(self.pc.localDescription.sdp)

    def _pts(self, kind: str, timestamp: int, arrival: float, clock: int) -> int:
        if kind not in self._offsets:
            if self._clock_start is None:
                self._clock_start = arrival
            since = arrival - self._clock_start
            self._offsets[kind] = max(0, round(since * clock)) - timestamp
        return timestamp + self._offsets[kind]

    def _add_video(self, frame: EncodedFrame) -> None:
        self.sink.add_video(frame.data, self._pts("video", frame.timestamp, frame.arrival,
                                                  VIDEO_TIMESCALE))

    def _add_audio(self, frame: EncodedFrame) -> None:
        self.sink.add_audio(frame.data, self._pts("audio", frame.timestamp, frame.arrival,
                                                  AUDIO_TIMESCALE))

    async def _video_loop(self, track: Any) -> None:
        transcoder = None
        try:
            while True:
                frame = await track.recv()
                self.last_media = time.monotonic()
                if isinstance(frame, EncodedFrame):
                    self._add_video(frame)
                else:  # a decoded picture: re-encode (streaming.transcode)
                    if transcoder is None:
                        transcoder = self.sink.transcoder()
                    arrival = time.monotonic()
                    force = self.sink.keyframe_due
                    if force:
                        self.sink.keyframe_requested()
                    for data, ts in await asyncio.to_thread(transcoder.encode, frame, force):
                        self.sink.add_video(data, self._pts("video", ts, arrival,
                                                            VIDEO_TIMESCALE))
                self.frames += 1
                if transcoder is None and self.sink.keyframe_due:
                    self.sink.keyframe_requested()
                    await self.request_keyframe()
        except MediaStreamError:
            pass
        except Exception:
            log.exception("video ingest failed", extra={"session": self.id})
            self.start_close(lost=True)  # not awaited: the close waits for this loop

    async def _audio_loop(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                self.last_media = time.monotonic()
                if isinstance(frame, EncodedFrame):
                    self._add_audio(frame)
        except MediaStreamError:
            pass
        except Exception:
            log.exception("audio ingest failed", extra={"session": self.id})

    async def _watch_media(self) -> None:
        """Close as lost once no frame (audio or video) came for ``read_timeout``:
        a publisher that vanished without a DELETE. The first frame may take up to
        :data:`FIRST_MEDIA_TIMEOUT` (ICE, DTLS and the first keyframe come first)."""
        accepted = time.monotonic()
        while not self._closed:
            if self.last_media is None:
                silent, limit = time.monotonic() - accepted, max(self.read_timeout,
                                                                 FIRST_MEDIA_TIMEOUT)
            else:
                silent, limit = time.monotonic() - self.last_media, self.read_timeout
            if silent >= limit:
                log.warning("whip publisher silent", extra={
                    "session": self.id, "seconds": round(silent, 1)})
                self.start_close(lost=True)  # not awaited: the close cancels this task
                return
            await asyncio.sleep(min(1.0, limit - silent))

    async def request_keyframe(self) -> None:
        """RTCP PLI (RFC 4585 6.3.1) to every video source of the session."""
        for t in self.pc.getTransceivers():
            if t.kind != "video":
                continue
            receiver = t.receiver
            for source in receiver.getSynchronizationSources():
                with contextlib.suppress(Exception):  # transport closing
                    await receiver._send_rtcp_pli(source.source)

    def start_close(self, *, lost: bool = False) -> asyncio.Task:
        """Begin closing (once; a later call gets the same close) and return it."""
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.get_running_loop().create_task(
                self._close(lost), name=f"whip-close-{self.id}")
        return self._closing

    async def close(self, *, lost: bool = False) -> None:
        """Tear down; ``lost`` when the connection failed rather than ended. Returns
        when the session is closed, also when another caller started the close (a
        server shutting down waits for a close the connection itself began)."""
        await asyncio.shield(self.start_close(lost=lost))

    async def _close(self, lost: bool) -> None:
        """Every frame received reaches the sink: closing the peer connection ends the
        tracks behind the frames they still queue, the loops read those (at most
        :data:`DRAIN_TIMEOUT`), then the complete frames left in the jitter buffers
        follow (:func:`_leftover_frames`). A session that never got media has
        nothing to drain: its loops are cancelled at once."""
        receivers = [(t.kind, t.receiver) for t in self.pc.getTransceivers()]
        with contextlib.suppress(Exception):
            await self.pc.close()
        others = list(self._tasks)
        loops = [t for t in others if t.get_name().startswith("whip-media")]
        if loops and self.last_media is not None:
            await asyncio.wait(loops, timeout=DRAIN_TIMEOUT)
        for task in others:
            task.cancel()
        # gather, not a suppressed await per task: a cancellation of this close
        # itself must not be swallowed.
        await asyncio.gather(*others, return_exceptions=True)
        if self.last_media is not None:
            for kind, receiver in receivers:
                try:
                    leftover = _leftover_frames(receiver)
                except Exception:  # aiortc internals moved: lose the tail, not the session
                    log.exception("whip: cannot read the jitter buffer",
                                  extra={"session": self.id})
                    continue
                add = self._add_video if kind == "video" else self._add_audio
                for frame in leftover:
                    add(frame)
        await self.on_closed(self, lost)
