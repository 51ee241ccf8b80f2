"""Streaming: the creator's video in over WHIP, out to viewers as LL-HLS and replays.

Owns the WHIP endpoint (RFC 9725) a creator's browser or OBS publishes to, the
receiving side of WebRTC (aiortc), the packaging of the H.264 and Opus it receives,
undecoded where it can, into fMP4 LL-HLS parts and segments on disk, serving them from
any worker, the stream's status, and shoppable replays with the drop's moments. The
guide for publishers and players is docs/streaming.md.

Modules, in the order to read them:

* ``playlist``: HLS media playlists, pure: segments and parts in, text out.
* ``fmp4``: fragmented MP4 boxes, pure: init segments and fragments.
* ``packager``: timed H.264 access units and Opus packets cut into parts and segments.
* ``transcode``: re-encoding to H.264 when the ingest cannot be passed through.
* ``ingest``: aiortc as the WHIP receiver, media handed to the packager.
* ``live``: one drop's stream in this process: sessions, status, moments.
* ``whip``: the WHIP endpoint ``/v1/drops/{id}/whip``.
* ``hls``: serving the playlists and media, blocking reloads included, with the
  cache headers a CDN in front goes by.
* ``replay``: shoppable replays: moments stored with their place in the video.
* ``component``: the package as :mod:`dropserver.app` mounts it.
"""
