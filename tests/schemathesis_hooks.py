"""schemathesis hooks for tests/test_openapi.py (``SCHEMATHESIS_HOOKS``): WHIP offers.

schemathesis cannot build an ``application/sdp`` body by itself; these are offers
from well-formed to garbage, so the WHIP endpoint is fuzzed too."""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

_OFFER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\n"
    "a=rtpmap:96 H264/90000\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n")

_LINES = st.lists(st.sampled_from(_OFFER.split("\r\n")) | st.text(max_size=40), max_size=20)

schemathesis.openapi.media_type("application/sdp", st.one_of(
    st.just(_OFFER.encode()),
    _LINES.map(lambda lines: "\r\n".join(lines).encode("utf-8", "surrogatepass")),
    st.binary(max_size=512),
))
