"""streaming.playlist: pure LL-HLS / HLS rendering (RFC 8216 and rfc8216bis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from streaming.playlist import (
    BlockingRequest,
    DateRange,
    MediaPlaylist,
    Part,
    PlaylistKind,
    Segment,
    parse_blocking_request,
)

T0 = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)


def seg(msn: int, *, disc: bool = False, map_uri: str = "init1.mp4",
        duration: float = 1.0) -> Segment:
    parts = [Part(0.2, f"s{msn}.{i}.m4s", independent=i == 0) for i in range(5)]
    return Segment(msn=msn, uri=f"s{msn}.m4s", duration=duration,
                   program_date_time=T0 + timedelta(seconds=msn), map_uri=map_uri,
                   discontinuity=disc, parts=parts)


def live(n: int = 3) -> MediaPlaylist:
    pl = MediaPlaylist(target_duration=1.0, part_target=0.2,
                       segments=[seg(i) for i in range(n)], next_msn=n,
                       next_map_uri="init1.mp4")
    pl.parts = [Part(0.2, f"s{n}.0.m4s", True), Part(0.2, f"s{n}.1.m4s")]
    pl.preload_uri = f"s{n}.2.m4s"
    return pl


def test_low_latency_header_and_tail() -> None:
    text = live().render(PlaylistKind.LOW_LATENCY)
    lines = text.splitlines()
    assert lines[:3] == ["#EXTM3U", "#EXT-X-VERSION:9", "#EXT-X-TARGETDURATION:1"]
    assert "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=0.6" in lines
    assert "#EXT-X-PART-INF:PART-TARGET=0.2" in lines
    assert "#EXT-X-MEDIA-SEQUENCE:0" in lines
    assert lines.count('#EXT-X-MAP:URI="init1.mp4"') == 1
    assert lines[-3:] == ['#EXT-X-PART:DURATION=0.20000,URI="s3.0.m4s",INDEPENDENT=YES',
                          '#EXT-X-PART:DURATION=0.20000,URI="s3.1.m4s"',
                          '#EXT-X-PRELOAD-HINT:TYPE=PART,URI="s3.2.m4s"']
    assert "#EXT-X-PROGRAM-DATE-TIME:2026-11-23T10:00:00.000Z" in lines
    assert "#EXT-X-ENDLIST" not in lines


def test_plain_playlist_has_no_ll_tags() -> None:
    text = live().render(PlaylistKind.PLAIN)
    for tag in ("EXT-X-PART", "PRELOAD-HINT", "SERVER-CONTROL", "PART-INF"):
        assert tag not in text
    assert text.count("#EXTINF:1.00000,") == 3


def test_part_window_only_lists_recent_parts() -> None:
    text = live(6).render(PlaylistKind.LOW_LATENCY, part_window=3)
    assert 's0.0.m4s' not in text and 's2.4.m4s' not in text
    assert 's3.0.m4s' in text and 's5.4.m4s' in text


def test_sliding_window_moves_media_and_discontinuity_sequence() -> None:
    pl = live(6)
    pl.segments[1].discontinuity = True
    pl.segments[1].map_uri = pl.segments[2].map_uri = "init2.mp4"
    for s in pl.segments[3:]:
        s.map_uri = "init2.mp4"
    pl.next_map_uri = "init2.mp4"
    text = pl.render(PlaylistKind.LOW_LATENCY, window=4)
    assert "#EXT-X-MEDIA-SEQUENCE:2" in text
    assert "#EXT-X-DISCONTINUITY-SEQUENCE:1" in text
    assert "#EXT-X-DISCONTINUITY\n" not in text  # it fell out of the window
    assert text.count("#EXT-X-MAP") == 1 and 'init2.mp4' in text


def test_discontinuity_and_new_map_inside_window() -> None:
    pl = live(3)
    pl.segments[2].discontinuity = True
    pl.segments[2].map_uri = "init2.mp4"
    text = pl.render(PlaylistKind.VOD)
    lines = text.splitlines()
    i = lines.index("#EXT-X-DISCONTINUITY")
    assert lines[i + 1] == '#EXT-X-MAP:URI="init2.mp4"'
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in lines


def test_ended_vod_with_dateranges() -> None:
    pl = live(2)
    pl.ended = True
    pl.dateranges = [DateRange("m1", T0 + timedelta(seconds=1.5),
                               attributes=(("X-KIND", "buy_now"), ("X-PRODUCT-ID", "7")))]
    text = pl.render(PlaylistKind.VOD)
    assert text.endswith("#EXT-X-ENDLIST\n")
    assert ('#EXT-X-DATERANGE:ID="m1",CLASS="com.dropserver.moment",'
            'START-DATE="2026-11-23T10:00:01.500Z",X-KIND="buy_now",X-PRODUCT-ID="7"') in text
    assert "PRELOAD-HINT" not in text and "s2.0.m4s" not in text


def test_target_duration_rounds_up_long_segments() -> None:
    pl = live(2)
    pl.segments[0].duration = 2.4
    assert "#EXT-X-TARGETDURATION:3" in pl.render()


def test_has_for_blocking_reload() -> None:
    pl = live(3)  # segments 0-2 done, parts 0 and 1 of segment 3
    assert pl.has(2, None) and pl.has(2, 4)
    assert pl.has(3, 1) and not pl.has(3, 2)
    assert not pl.has(3, None) and not pl.has(4, 0)
    pl.ended = True
    assert pl.has(9, 0)


@pytest.mark.parametrize(("query", "expected"), [
    ({}, None),
    ({"_HLS_msn": "4"}, BlockingRequest(4, None)),
    ({"_HLS_msn": "4", "_HLS_part": "2"}, BlockingRequest(4, 2)),
])
def test_parse_blocking_request(query: dict, expected: BlockingRequest | None) -> None:
    assert parse_blocking_request(query) == expected


@pytest.mark.parametrize("query", [{"_HLS_part": "1"}, {"_HLS_msn": "-1"},
                                   {"_HLS_msn": "x"}, {"_HLS_msn": "1", "_HLS_part": "1.5"}])
def test_parse_blocking_request_rejects(query: dict) -> None:
    with pytest.raises(ValueError):
        parse_blocking_request(query)
