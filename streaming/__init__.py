"""Streaming: WHIP ingest, HLS packaging, replays."""
