"""streaming.ingest's patches of aiortc: the version pin, and pass-through frames
handed to the track on the event loop instead of through the decoder thread."""

from __future__ import annotations

import asyncio
import queue
from types import SimpleNamespace

import aiortc
import pytest
from aiortc import RTCRtpCodecParameters, rtcrtpreceiver

from streaming import ingest
from streaming.ingest import EncodedFrame

H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102,
                             parameters={"packetization-mode": "1",
                                         "profile-level-id": "42e01f"})
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2,
                             payloadType=111)
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)


def jitter_frame(data: bytes, timestamp: int):
    return SimpleNamespace(data=data, timestamp=timestamp)  # aiortc's JitterFrame fields


def test_install_refuses_another_aiortc(monkeypatch) -> None:
    monkeypatch.setattr(aiortc, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match=r"aiortc==1\.16\.0"):
        ingest.install()


def test_install_patches_the_receiver() -> None:
    ingest.install()
    assert rtcrtpreceiver.get_decoder is ingest._get_decoder
    assert rtcrtpreceiver.RTCRtpReceiver.receive is ingest._receive


async def test_passthrough_frames_reach_the_track_without_the_thread() -> None:
    ingest.install()
    thread_q: queue.Queue = queue.Queue()
    track_q: asyncio.Queue = asyncio.Queue()
    inline = ingest._InlineDecoderQueue(thread_q, track_q)
    inline.put((H264, jitter_frame(b"\x00\x00\x00\x01\x65abc", 3000)))
    inline.put((OPUS, jitter_frame(b"\xfc\x01", 960)))
    assert thread_q.empty()
    video, audio = track_q.get_nowait(), track_q.get_nowait()
    assert isinstance(video, EncodedFrame) and isinstance(audio, EncodedFrame)
    assert (video.data, video.timestamp) == (b"\x00\x00\x00\x01\x65abc", 3000)
    assert (audio.data, audio.timestamp) == (b"\xfc\x01", 960)
    assert video.arrival <= audio.arrival


async def test_other_codecs_and_the_end_go_to_the_decoder_thread() -> None:
    ingest.install()
    thread_q: queue.Queue = queue.Queue()
    track_q: asyncio.Queue = asyncio.Queue()
    inline = ingest._InlineDecoderQueue(thread_q, track_q)
    vp8 = jitter_frame(b"vp8 frame", 0)
    inline.put((VP8, vp8))
    inline.put(None)
    assert track_q.empty()
    assert thread_q.get_nowait() == (VP8, vp8)
    assert thread_q.get_nowait() is None


async def test_transcode_all_sends_h264_to_the_decoder_thread() -> None:
    ingest.install(transcode_all=True)
    try:
        thread_q: queue.Queue = queue.Queue()
        inline = ingest._InlineDecoderQueue(thread_q, asyncio.Queue())
        inline.put((H264, jitter_frame(b"\x00\x00\x01\x65", 0)))
        assert thread_q.qsize() == 1
    finally:
        ingest.install()
