"""FFmpeg's own WHIP muxer (through PyAV), publishing libx264 video and Opus audio in
real time: a WHIP client not written here.

It runs in a child process, never in a thread of the test: PyAV keeps the GIL while
``avformat_write_header`` does the WHIP handshake, so a publisher thread would stall
the very event loop that has to answer it.

    python -m tests.whip_publisher URL TOKEN [--seconds S] [--profile P] [--no-audio]
        [--size WxH] [--timestamps FILE] [--counts FILE]

``--timestamps`` writes one line per video frame, ``<index> <time.monotonic()>`` taken
when the frame was handed to the muxer's socket (benchmarks.ingest reads it).
``--counts`` writes ``{"video": packets, "audio": packets}``: what was sent in all.

    python -m tests.whip_publisher ffmpeg SECONDS ARG...

runs an ``ffmpeg ... -f whip URL`` command line (its arguments after ``ffmpeg``) with
the same FFmpeg libraries, through PyAV, for SECONDS: the recipe docs/streaming.md
gives, where no ffmpeg 8 program is installed (:func:`run_ffmpeg_command`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

FPS = 30


def dtls_identity(folder: str) -> tuple[str, str]:
    """A P-256 DTLS certificate for FFmpeg (paths to PEM files written in ``folder``).

    FFmpeg 8.1 generates a secp224r1 certificate of its own, and the OpenSSL 4 that
    aiortc's peer uses (cryptography >= 50) no longer offers P-224: the handshake
    then fails with ``illegal_parameter``. Browsers and OBS use P-256 (RFC 8827 6.5).
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whip-publisher")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = f"{folder}/cert.pem", f"{folder}/key.pem"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def publish(url: str, token: str, **options) -> None:
    """:func:`_publish` with a DTLS identity in a folder of its own, removed after."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="whip-publisher-") as folder:
        _publish(url, token, identity=dtls_identity(folder), **options)


def _publish(url: str, token: str, *, identity: tuple[str, str], seconds: float,
             profile: str, width: int, height: int, audio: bool,
             timestamps: str | None = None, bitrate: int = 0,
             counts: str | None = None) -> None:
    """``bitrate`` (kbit/s): constant bitrate with filler, as OBS' CBR sends; 0 lets
    x264 pick (the flat test picture then needs only ~1 Mbit/s at 720p)."""
    import av
    import numpy as np

    cert, key = identity
    out = av.open(url, mode="w", format="whip",
                  options={"authorization": token, "handshake_timeout": "10000",
                           "cert_file": cert, "key_file": key})
    v = out.add_stream("libx264", rate=FPS)
    v.width, v.height, v.pix_fmt = width, height, "yuv420p"
    options = {
        "profile": profile, "tune": "zerolatency", "bf": "0", "g": str(FPS),
        "keyint_min": str(FPS), "sc_threshold": "0",
        "preset": "ultrafast" if profile == "baseline" else "veryfast"}
    if bitrate:
        options["x264-params"] = (f"nal-hrd=cbr:bitrate={bitrate}:vbv-maxrate={bitrate}"
                                  f":vbv-bufsize={bitrate}")
    v.codec_context.options = options
    a = None
    if audio:
        a = out.add_stream("libopus", rate=48000)
        a.layout = "stereo"
        a.format = "s16"
    start = time.monotonic()
    sent_audio = 0  # samples
    sent_at: list[float] = []  # per video frame, after its packets went out
    packets = {"video": 0, "audio": 0}

    def mux(kind: str, out_packets: list) -> None:
        out.mux(out_packets)
        packets[kind] += len(out_packets)
    for i in range(int(seconds * FPS)):
        img = np.full((height, width, 3), (i * 5) % 255, np.uint8)
        img[:, (i * 4) % width] = 255
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = i
        mux("video", v.encode(frame))
        sent_at.append(time.monotonic())
        if i == 0:  # the first mux did the WHIP handshake: the real-time clock starts now
            start = time.monotonic()
        if a is not None:
            while sent_audio < (i + 1) * 48000 // FPS:  # 20 ms Opus frames, paced by video
                pcm = np.zeros((1, 960 * 2), np.int16)
                af = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
                af.sample_rate, af.pts = 48000, sent_audio
                mux("audio", a.encode(af))
                sent_audio += 960
        delay = start + (i + 1) / FPS - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    mux("video", v.encode(None))
    out.close()  # sends DELETE to the Location
    if timestamps:
        with open(timestamps, "w") as f:
            f.writelines(f"{i} {t:.6f}\n" for i, t in enumerate(sent_at))
    if counts:
        with open(counts, "w") as f:
            json.dump(packets, f)


# ffmpeg options that set a codec option of the video or audio stream
_VIDEO_OPTIONS = {"-profile:v": "profile", "-tune": "tune", "-tune:v": "tune", "-bf": "bf",
                  "-bf:v": "bf", "-g": "g", "-g:v": "g", "-keyint_min": "keyint_min",
                  "-sc_threshold": "sc_threshold", "-preset": "preset",
                  "-preset:v": "preset", "-b:v": "b", "-x264-params": "x264-params"}


def run_ffmpeg_command(args: list[str], seconds: float) -> None:
    """What ``ffmpeg ARGS`` does for an ``-f lavfi`` input or two and one ``-f whip``
    output, for ``seconds``: the same libraries (PyAV bundles FFmpeg 8.1 with its
    ``whip`` muxer), driven as the ffmpeg program drives them. Options it does not
    know are an error, so a recipe cannot pass by having them ignored."""
    import av

    last_input = len(args) - 1 - args[::-1].index("-i")
    inputs: list[dict] = []
    pending: dict = {}
    i = 0
    while i <= last_input:  # per input: its options, then -i URL
        if args[i] == "-i":
            inputs.append({**pending, "url": args[i + 1]})
            pending = {}
            i += 2
        elif args[i] == "-re":
            pending["re"] = True
            i += 1
        elif args[i] == "-f":
            pending["format"] = args[i + 1]
            i += 2
        else:
            raise ValueError(f"input option {args[i]!r} is not supported here")
    url = args[-1]
    out_opts = args[i:-1]
    video_codec = audio_codec = fmt = pix_fmt = None
    rate = channels = None
    video_options: dict[str, str] = {}
    muxer_options: dict[str, str] = {}
    k = 0
    while k < len(out_opts):
        name, value = out_opts[k], out_opts[k + 1]
        k += 2
        if name == "-c:v":
            video_codec = value
        elif name == "-c:a":
            audio_codec = value
        elif name == "-f":
            fmt = value
        elif name == "-pix_fmt":
            pix_fmt = value
        elif name == "-ar":
            rate = int(value)
        elif name == "-ac":
            channels = int(value)
        elif name in _VIDEO_OPTIONS:
            video_options[_VIDEO_OPTIONS[name]] = value
        elif name in ("-authorization", "-cert_file", "-key_file", "-handshake_timeout",
                      "-pkt_size", "-whip_flags", "-rtp_history", "-ts_buffer_size"):
            muxer_options[name[1:]] = value
        else:
            raise ValueError(f"output option {name!r} is not supported here")
    if fmt != "whip" or not video_codec:
        raise ValueError("expected -c:v ... -f whip URL")
    sources = [av.open(inp["url"], format=inp.get("format")) for inp in inputs]
    out = av.open(url, mode="w", format=fmt, options=muxer_options)
    video_in = next(s.streams.video[0] for s in sources if s.streams.video)
    v = out.add_stream(video_codec, rate=video_in.average_rate)
    v.width = video_in.codec_context.width
    v.height = video_in.codec_context.height
    v.pix_fmt = pix_fmt or "yuv420p"
    v.codec_context.options = video_options
    audio_in = next((s.streams.audio[0] for s in sources if s.streams.audio), None)
    a = None
    if audio_in is not None and audio_codec:
        a = out.add_stream(audio_codec, rate=rate or audio_in.codec_context.sample_rate)
        a.layout = "stereo" if (channels or 1) == 2 else "mono"
    video_frames = sources[[bool(s.streams.video) for s in sources].index(True)].decode(
        video=0)
    audio_frames = (next(s for s in sources if s.streams.audio).decode(audio=0)
                    if a is not None else iter(()))
    realtime = any(inp.get("re") for inp in inputs)
    start = None
    audio_time = 0.0
    for frame in video_frames:
        t = float(frame.pts * frame.time_base)
        if t >= seconds:
            break
        frame.pict_type = av.video.frame.PictureType.NONE
        out.mux(v.encode(frame))
        if start is None:
            start = time.monotonic() - t  # the first mux did the WHIP handshake
        while a is not None and audio_time <= t:
            af = next(audio_frames)
            audio_time = float(af.pts * af.time_base)
            out.mux(a.encode(af))
        if realtime:
            delay = start + t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    out.mux(v.encode(None))
    out.close()  # the DELETE, as ffmpeg's end (q, Ctrl-C, end of input) sends it
    for source in sources:
        source.close()


class WhipPublisher:
    """The publisher as a child process, with a thread-like start/join/error."""

    def __init__(self, url: str, token: str, *, seconds: float = 3.0,
                 profile: str = "baseline", width: int = 320, height: int = 240,
                 audio: bool = True, timestamps: str | None = None,
                 bitrate: int = 0, counts: str | None = None,
                 tmp: str | None = None) -> None:
        """``tmp``: the child's ``TMPDIR`` (where its DTLS identity goes)."""
        self.env = None if tmp is None else {**os.environ, "TMPDIR": tmp}
        self.argv = [sys.executable, "-m", "tests.whip_publisher", url, token,
                     "--seconds", str(seconds), "--profile", profile,
                     "--size", f"{width}x{height}", "--bitrate", str(bitrate)] + (
                         [] if audio else ["--no-audio"])
        if timestamps:
            self.argv += ["--timestamps", timestamps]
        if counts:
            self.argv += ["--counts", counts]
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=self.env)

    def join(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            self.error = f"publisher still running after {timeout} s"
            return
        if self.proc.returncode != 0:
            self.error = f"publisher exited {self.proc.returncode}: {err.decode()[-2000:]}"

    async def wait(self, limit: float = 20) -> None:
        await asyncio.to_thread(self.join, limit)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    if sys.argv[1:2] == ["ffmpeg"]:
        run_ffmpeg_command(sys.argv[3:], float(sys.argv[2]))
        return
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("token")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--profile", default="baseline")
    p.add_argument("--size", default="320x240")
    p.add_argument("--no-audio", action="store_true")
    p.add_argument("--timestamps", default=None)
    p.add_argument("--bitrate", type=int, default=0, help="kbit/s, CBR; 0: x264 decides")
    p.add_argument("--counts", default=None)
    args = p.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    publish(args.url, args.token, seconds=args.seconds, profile=args.profile,
            width=width, height=height, audio=not args.no_audio, timestamps=args.timestamps,
            bitrate=args.bitrate, counts=args.counts)


if __name__ == "__main__":
    main()
