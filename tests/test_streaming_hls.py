"""The URLs streaming gives out (``/stream``, ``/replay``, ``stream.status``, the
pages' config): path-only by default, absolute under ``DROPSERVER_PUBLIC_URL``, and
the documented examples say so."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from tests.conftest import running

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _json_after(doc: str, marker: str) -> dict:
    """The first ```json block after ``marker`` in ``doc``."""
    text = doc[doc.index(marker):]
    block = re.search(r"```json\n(.*?)```", text, re.S)
    assert block, marker
    return json.loads(block.group(1))


async def test_stream_urls_are_paths_unless_a_public_url_is_set(settings) -> None:
    """Without DROPSERVER_PUBLIC_URL the server cannot know the address viewers
    used (a proxy, a CDN, another host name): it gives path-only URLs, resolved by
    the client against the address it used. With it, absolute URLs on that base."""
    for public_url, base in (("", ""), ("https://cdn.example.com/", "https://cdn.example.com")):
        async with running(settings, public_url=public_url) as server:
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                body = (await http.get("/v1/drops/42/stream")).json()
                assert body["hls"] == f"{base}/v1/drops/42/hls/live.m3u8"
                assert body["hls_plain"] == f"{base}/v1/drops/42/hls/index.m3u8"
                config = (await http.get("/v1/web/config")).json()
                assert config["hls_url_template"] == f"{base}/v1/drops/{{drop_id}}/hls/live.m3u8"
                # the console publishes to its own origin, never through a CDN
                assert config["whip_url_template"] == "/v1/drops/{drop_id}/whip"


async def test_the_documented_stream_answer_is_the_real_one(http: httpx.AsyncClient) -> None:
    """docs/streaming.md's /stream example, with the default settings it describes."""
    doc = (DOCS / "streaming.md").read_text()
    documented = _json_after(doc, "`GET /v1/drops/{id}/stream`")
    real = (await http.get(f"/v1/drops/{documented['drop_id']}/stream")).json()
    assert set(real) == set(documented)
    for key in ("hls", "hls_plain"):
        assert real[key] == documented[key]
    replay = _json_after(doc, "`GET /v1/drops/{id}/replay`")
    assert replay["playlist"] == f"/v1/drops/{replay['drop_id']}/hls/replay.m3u8"
