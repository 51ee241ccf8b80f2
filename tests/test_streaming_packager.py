"""streaming.packager + streaming.fmp4: synthetic H.264/Opus in, decodable fMP4 out."""

from __future__ import annotations

import fractions
import io
from pathlib import Path

import av
import numpy as np
import pytest

from streaming import fmp4
from streaming.packager import Packager, opus_packet_samples
from tests.streaming_support import playlist_uris

FPS = 30


def h264_frames(seconds: float, *, profile: str = "baseline", gop: int = FPS,
                width: int = 320, height: int = 240) -> list[tuple[bytes, int, bool]]:
    """(Annex B access unit, pts in 90 kHz, keyframe) from libx264, no B-frames."""
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
    enc.time_base = fractions.Fraction(1, FPS)
    enc.framerate = FPS
    enc.options = {"profile": profile, "tune": "zerolatency", "bf": "0", "g": str(gop),
                   "keyint_min": str(gop), "sc_threshold": "0",
                   "preset": "ultrafast" if profile == "baseline" else "veryfast"}
    out = []
    for i in range(int(seconds * FPS)):
        img = np.full((height, width, 3), (i * 7) % 255, np.uint8)
        img[:, (i * 4) % width] = 255
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        for pkt in enc.encode(frame):
            out.append((bytes(pkt), pkt.pts * 90000 // FPS, pkt.is_keyframe))
    for pkt in enc.encode(None):
        out.append((bytes(pkt), pkt.pts * 90000 // FPS, pkt.is_keyframe))
    return out


def opus_packets(seconds: float) -> list[tuple[bytes, int]]:
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate = 48000
    enc.layout = "stereo"
    enc.format = "s16"
    enc.time_base = fractions.Fraction(1, 48000)
    out = []
    t = np.arange(int(seconds * 48000)) / 48000
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    for start in range(0, len(tone) - 960, 960):
        chunk = np.repeat(tone[start:start + 960][None, :], 2, axis=0).T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.pts = start
        for pkt in enc.encode(frame):
            out.append((bytes(pkt), pkt.pts))
    return out


def feed(packager: Packager, seconds: float, **kw) -> None:
    video = h264_frames(seconds, **kw)
    audio = opus_packets(seconds)
    events = [(pts / 90000, "v", data, pts) for data, pts, _ in video]
    events += [(pts / 48000, "a", data, pts) for data, pts in audio]
    for _, kind, data, pts in sorted(events, key=lambda e: e[0]):
        if kind == "v":
            packager.add_video(data, pts)
        else:
            packager.add_audio(data, pts)


def decode(init: bytes, *media: bytes) -> dict:
    container = av.open(io.BytesIO(init + b"".join(media)), format="mp4")
    info = {}
    for stream in container.streams:
        info[stream.type] = {"codec": stream.codec_context.name, "frames": 0}
    for frame in container.decode(*container.streams):
        kind = "video" if isinstance(frame, av.VideoFrame) else "audio"
        info[kind]["frames"] += 1
        if kind == "video":
            info[kind]["size"] = (frame.width, frame.height)
    container.close()
    return info


def test_opus_toc_durations() -> None:
    assert opus_packet_samples(bytes([0b11111000])) == 960  # CELT 20 ms, one frame
    assert opus_packet_samples(bytes([0b11111001])) == 1920  # two frames
    assert opus_packet_samples(bytes([0b00001000])) == 960  # SILK 20 ms
    assert opus_packet_samples(bytes([0b11111011, 3])) == 2880  # code 3, three frames
    assert opus_packet_samples(b"") == 0


def test_split_annexb_handles_three_and_four_byte_start_codes() -> None:
    data = b"\x00\x00\x00\x01\x67\x42\x00\x00\x01\x68\xce\x00\x00\x00\x01\x65\x88"
    assert fmp4.split_annexb(data) == [b"\x67\x42", b"\x68\xce", b"\x65\x88"]


@pytest.mark.parametrize("profile", ["baseline", "main", "high"])
def test_segments_and_parts_decode(tmp_path: Path, profile: str) -> None:
    pk = Packager(tmp_path, segment_seconds=1.0, part_seconds=0.2)
    pk.start_session()
    feed(pk, 3.0, profile=profile)
    pk.finish()
    init = (tmp_path / "init1.mp4").read_bytes()
    segs = sorted(tmp_path.glob("s[0-9].m4s"))
    assert [s.name for s in segs] == ["s0.m4s", "s1.m4s", "s2.m4s"]
    total = 0
    for seg in segs:
        info = decode(init, seg.read_bytes())
        assert info["video"]["codec"] == "h264"
        assert info["audio"]["codec"] == "opus"
        assert info["video"]["size"] == (320, 240)
        total += info["video"]["frames"]
    assert total == 90
    playlist = pk.playlist
    assert [round(s.duration, 2) for s in playlist.segments] == [1.0, 1.0, 1.0]
    container = av.open(io.BytesIO(init + b"".join(s.read_bytes() for s in segs)))
    assert container.streams.video[0].codec_context.profile.lower().startswith(
        {"baseline": "constrained baseline", "main": "main", "high": "high"}[profile][:4])
    assert abs(float(container.duration / 1e6) - 3.0) < 0.1
    container.close()
    assert "#EXT-X-ENDLIST" in (tmp_path / "live.m3u8").read_text()
    replay = (tmp_path / "replay.m3u8").read_text()
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in replay and replay.count("#EXTINF") == 3


def test_a_session_without_audio_declares_no_audio_track(tmp_path: Path) -> None:
    """Players wait for every track the init segment declares: a video-only publisher
    must not announce an audio track it will never fill."""
    pk = Packager(tmp_path, segment_seconds=1.0, part_seconds=0.2)
    pk.start_session(audio=False)
    for data, pts, _ in h264_frames(2.0):
        pk.add_video(data, pts)
    pk.add_audio(opus_packets(0.1)[0][0], 0)  # stray audio is ignored, not declared
    pk.finish()
    init = (tmp_path / "init1.mp4").read_bytes()
    container = av.open(io.BytesIO(init + (tmp_path / "s0.m4s").read_bytes()))
    assert [s.type for s in container.streams] == ["video"]
    container.close()
    pk.start_session()  # the publisher reconnects with a microphone
    feed(pk, 1.0)
    pk.finish()
    init2 = (tmp_path / "init2.mp4").read_bytes()
    container = av.open(io.BytesIO(init2))
    assert sorted(s.type for s in container.streams) == ["audio", "video"]
    container.close()


def test_parts_are_about_200ms_and_decode_alone(tmp_path: Path) -> None:
    pk = Packager(tmp_path, segment_seconds=1.0, part_seconds=0.2)
    pk.start_session()
    feed(pk, 2.5)
    # Mid-stream: segment 0 and 1 complete, parts of segment 2 listed.
    live = (tmp_path / "live.m3u8").read_text()
    assert "#EXT-X-PART-INF:PART-TARGET=0.2" in live
    assert '#EXT-X-PRELOAD-HINT:TYPE=PART,URI="s2.' in live
    seg0 = pk.playlist.segments[0]
    assert len(seg0.parts) == 5
    assert all(abs(p.duration - 0.2) < 0.04 for p in seg0.parts)
    assert seg0.parts[0].independent and not seg0.parts[1].independent
    init = (tmp_path / "init1.mp4").read_bytes()
    first = decode(init, (tmp_path / seg0.parts[0].uri).read_bytes())
    assert first["video"]["frames"] == 6
    # The segment is exactly its parts, concatenated.
    joined = b"".join((tmp_path / p.uri).read_bytes() for p in seg0.parts)
    assert joined == (tmp_path / "s0.m4s").read_bytes()


def test_reconnect_continues_numbering_with_discontinuity(tmp_path: Path) -> None:
    pk = Packager(tmp_path)
    pk.start_session()
    feed(pk, 2.0)
    pk.end_session()
    # A new packager (another worker, say) continues the same stream on disk.
    pk2 = Packager(tmp_path)
    pk2.start_session()
    feed(pk2, 2.0, width=640, height=360)
    pk2.finish()
    replay = (tmp_path / "replay.m3u8").read_text()
    assert replay.count("#EXT-X-DISCONTINUITY\n") == 1
    assert 'URI="init1.mp4"' in replay and 'URI="init2.mp4"' in replay
    assert [s.msn for s in pk2.playlist.segments] == [0, 1, 2, 3]
    info = decode((tmp_path / "init2.mp4").read_bytes(), (tmp_path / "s3.m4s").read_bytes())
    assert info["video"]["size"] == (640, 360)
    assert abs(pk2.duration_ms - 4000) < 100


def test_waits_for_first_keyframe(tmp_path: Path) -> None:
    pk = Packager(tmp_path)
    pk.start_session()
    frames = h264_frames(1.5)
    assert pk.keyframe_due
    pk.keyframe_requested()
    for data, pts, _key in frames[1:31]:  # starts after the IDR: nothing until the next
        pk.add_video(data, pts)
        assert pk.has_media == (pts >= 90000)
    assert not list(tmp_path.glob("*.m4s"))


def test_keyframe_due_before_segment_boundary(tmp_path: Path) -> None:
    pk = Packager(tmp_path, segment_seconds=1.0)
    pk.start_session()
    due_at = []
    for data, pts, _ in h264_frames(1.0, gop=300):
        pk.add_video(data, pts)
        if pk.keyframe_due:
            due_at.append(pts / 90000)
            pk.keyframe_requested()
    assert due_at and 0.7 <= due_at[0] <= 0.8


def test_the_playlist_on_disk_never_lags_a_closed_segment(tmp_path: Path) -> None:
    """After every frame the live playlist on disk is current: a segment boundary is
    written at once, so a blocking reload for the next part is never answered with a
    playlist that still hints at a part of the segment just closed (it would reload
    in a loop until the next part)."""
    pk = Packager(tmp_path, segment_seconds=1.0, part_seconds=0.2)
    pk.start_session()
    boundaries = 0
    for data, pts, _ in h264_frames(3.0):
        before = pk.playlist.next_msn
        pk.add_video(data, pts)
        boundaries += pk.playlist.next_msn != before
        text = (tmp_path / "live.m3u8").read_text() if (tmp_path / "live.m3u8").exists() \
            else ""
        hint = [ln for ln in text.splitlines() if ln.startswith("#EXT-X-PRELOAD-HINT")]
        if hint:
            uri = hint[0].split('URI="')[1].split('"')[0]
            assert int(uri[1:].split(".")[0]) == pk.playlist.next_msn, (uri, before)
    assert boundaries >= 2



def test_plain_playlist_is_written_when_it_changes_not_every_part(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The plain playlist lists segments, not parts: rewriting it five times a
    second is wasted file creation. It is written when a segment lands, and what is
    on disk is always the current plain rendering."""
    from streaming.packager import LIVE_WINDOW
    from streaming.playlist import PlaylistKind

    pk = Packager(tmp_path, segment_seconds=1.0, part_seconds=0.2)
    writes: list[str] = []
    real_write = Packager._write

    def checked(self, name, data):
        writes.append(name)
        real_write(self, name, data)

    def publish_and_check(self):
        real_publish(self)
        on_disk = (tmp_path / "index.m3u8").read_text()
        assert on_disk == self.playlist.render(PlaylistKind.PLAIN, window=LIVE_WINDOW)

    real_publish = Packager._publish
    monkeypatch.setattr(Packager, "_write", checked)
    monkeypatch.setattr(Packager, "_publish", publish_and_check)
    pk.start_session()
    feed(pk, 3.0)
    assert len(pk.playlist.segments) == 2  # the third closes at finish()
    assert writes.count("live.m3u8") >= 10  # every part
    assert 2 <= writes.count("index.m3u8") <= 3  # start, then once per segment
    pk.finish()
    assert (tmp_path / "index.m3u8").read_text().count("#EXTINF") == 3


def test_every_published_playlist_names_only_files_that_exist(tmp_path: Path,
                                                                monkeypatch) -> None:
    """Whenever a playlist is written, every segment, part and init segment it lists
    is on disk, also at the end of the stream: the final live.m3u8 (cacheable for a
    minute) and the replay must not name deleted parts."""
    published: list[str] = []
    real_publish = Packager._publish

    def publish_and_check(self):
        real_publish(self)
        for name in ("live.m3u8", "index.m3u8"):
            text = (tmp_path / name).read_text()
            missing = [u for u in playlist_uris(text) if not (tmp_path / u).is_file()]
            assert missing == [], (name, missing, text)
        published.append((tmp_path / "live.m3u8").read_text())

    monkeypatch.setattr(Packager, "_publish", publish_and_check)
    pk = Packager(tmp_path, segment_seconds=1.0, part_seconds=0.2)
    pk.start_session()
    feed(pk, 4.0)
    before_end = published[-1]
    pk.finish()
    final = (tmp_path / "live.m3u8").read_text()
    assert "#EXT-X-ENDLIST" in final
    replay = (tmp_path / "replay.m3u8").read_text()
    for text in (final, replay):
        assert [u for u in playlist_uris(text) if not (tmp_path / u).is_file()] == []
    # A player that loaded the last live playlist still gets the parts it names
    # (they are deleted some time after they leave the playlist, not at once).
    assert [u for u in playlist_uris(before_end) if not (tmp_path / u).is_file()] == []
    pk.drop_lingering_parts()
    assert not list(tmp_path.glob("s*.*.m4s"))
    assert sorted(p.name for p in tmp_path.glob("s*.m4s")) == [
        f"s{i}.m4s" for i in range(4)]


def test_the_last_frames_reach_the_segment_and_the_replay(tmp_path: Path) -> None:
    """The newest frame is held back until the next one gives its duration; at the
    end of a session it is written with a frame's duration, and the audio queued
    after the last video frame goes into the last part (no later part takes it)."""
    pk = Packager(tmp_path, segment_seconds=1.0, part_seconds=0.2)
    pk.start_session()
    frames = h264_frames(2.0)
    audio = opus_packets(2.0)
    for _ in range(2):  # 20 and 40 ms past the last video frame's start
        audio.append((audio[-1][0], audio[-1][1] + 960))
    events = sorted([(pts / 90000, "v", data, pts) for data, pts, _ in frames]
                    + [(pts / 48000, "a", data, pts) for data, pts in audio])
    for _, kind, data, pts in events:
        (pk.add_video if kind == "v" else pk.add_audio)(data, pts)
    pk.finish()
    init = (tmp_path / "init1.mp4").read_bytes()
    media = [(tmp_path / s.uri).read_bytes() for s in pk.playlist.segments]
    info = decode(init, *media)
    assert info["video"]["frames"] == len(frames) == 60
    assert info["audio"]["frames"] == len(audio)
    assert abs(pk.duration_ms - 2000) <= 1
