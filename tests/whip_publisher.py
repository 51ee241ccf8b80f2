"""FFmpeg's own WHIP muxer (through PyAV), publishing libx264 video and Opus audio in
real time: a WHIP client not written here.

It runs in a child process, never in a thread of the test: PyAV keeps the GIL while
``avformat_write_header`` does the WHIP handshake, so a publisher thread would stall
the very event loop that has to answer it.

    python -m tests.whip_publisher URL TOKEN [--seconds S] [--profile P] [--no-audio]
        [--size WxH] [--timestamps FILE]

``--timestamps`` writes one line per video frame, ``<index> <time.monotonic()>`` taken
when the frame was handed to the muxer's socket (benchmarks.ingest reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

FPS = 30


def dtls_identity() -> tuple[str, str]:
    """A P-256 DTLS certificate for FFmpeg (paths to PEM files).

    FFmpeg 8.1 generates a secp224r1 certificate of its own, and the OpenSSL 4 that
    aiortc's peer uses (cryptography >= 50) no longer offers P-224: the handshake
    then fails with ``illegal_parameter``. Browsers and OBS use P-256 (RFC 8827 6.5).
    """
    import datetime
    import tempfile

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
    folder = tempfile.mkdtemp(prefix="whip-publisher-")
    cert_path, key_path = f"{folder}/cert.pem", f"{folder}/key.pem"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def publish(url: str, token: str, *, seconds: float, profile: str, width: int,
            height: int, audio: bool, timestamps: str | None = None,
            bitrate: int = 0) -> None:
    """``bitrate`` (kbit/s): constant bitrate with filler, as OBS' CBR sends; 0 lets
    x264 pick (the flat test picture then needs only ~1 Mbit/s at 720p)."""
    import av
    import numpy as np

    cert, key = dtls_identity()
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
    for i in range(int(seconds * FPS)):
        img = np.full((height, width, 3), (i * 5) % 255, np.uint8)
        img[:, (i * 4) % width] = 255
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = i
        out.mux(v.encode(frame))
        sent_at.append(time.monotonic())
        if i == 0:  # the first mux did the WHIP handshake: the real-time clock starts now
            start = time.monotonic()
        if a is not None:
            while sent_audio < (i + 1) * 48000 // FPS:  # 20 ms Opus frames, paced by video
                pcm = np.zeros((1, 960 * 2), np.int16)
                af = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
                af.sample_rate, af.pts = 48000, sent_audio
                out.mux(a.encode(af))
                sent_audio += 960
        delay = start + (i + 1) / FPS - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    out.mux(v.encode(None))
    out.close()  # sends DELETE to the Location
    if timestamps:
        with open(timestamps, "w") as f:
            f.writelines(f"{i} {t:.6f}\n" for i, t in enumerate(sent_at))


class WhipPublisher:
    """The publisher as a child process, with a thread-like start/join/error."""

    def __init__(self, url: str, token: str, *, seconds: float = 3.0,
                 profile: str = "baseline", width: int = 320, height: int = 240,
                 audio: bool = True, timestamps: str | None = None,
                 bitrate: int = 0) -> None:
        self.argv = [sys.executable, "-m", "tests.whip_publisher", url, token,
                     "--seconds", str(seconds), "--profile", profile,
                     "--size", f"{width}x{height}", "--bitrate", str(bitrate)] + (
                         [] if audio else ["--no-audio"])
        if timestamps:
            self.argv += ["--timestamps", timestamps]
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

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
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("token")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--profile", default="baseline")
    p.add_argument("--size", default="320x240")
    p.add_argument("--no-audio", action="store_true")
    p.add_argument("--timestamps", default=None)
    p.add_argument("--bitrate", type=int, default=0, help="kbit/s, CBR; 0: x264 decides")
    args = p.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    publish(args.url, args.token, seconds=args.seconds, profile=args.profile,
            width=width, height=height, audio=not args.no_audio, timestamps=args.timestamps,
            bitrate=args.bitrate)


if __name__ == "__main__":
    main()
