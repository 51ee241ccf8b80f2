"""realtime.protocol: pure encode/decode/validation, no I/O."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from realtime import protocol
from realtime.protocol import (
    ClientType,
    CloseCode,
    ErrorCode,
    Format,
    ProtocolError,
    decode,
    encode,
    negotiate,
)

MP = Format.MSGPACK


def mp(obj) -> bytes:
    return msgpack.packb(obj)


def test_negotiate():
    assert negotiate([]) == (Format.MSGPACK, None)
    assert negotiate(["other"]) == (Format.MSGPACK, None)
    assert negotiate(["x", "dropserver.json.v1"]) == (Format.JSON, "dropserver.json.v1")
    assert negotiate(["dropserver.msgpack.v1", "dropserver.json.v1"]) == (
        Format.MSGPACK, "dropserver.msgpack.v1")


def test_join_frame():
    f = decode(mp({"t": "join", "id": 7, "drop_id": 42,
                   "since": {"epoch": "ab", "offset": 3}}), MP)
    assert f.type is ClientType.JOIN and f.id == "7"
    assert f.data == {"drop_id": 42, "token": None, "since": ("ab", 3)}


def test_json_text_and_binary():
    f = decode('{"t": "ping", "id": "a"}', Format.JSON)
    assert f.type is ClientType.PING and f.id == "a"
    f = decode(b'{"t": "pong"}', Format.JSON)
    assert f.type is ClientType.PONG
    # A text frame is JSON even on a msgpack connection.
    assert decode('{"t": "ping"}', MP).type is ClientType.PING


@pytest.mark.parametrize("obj, code", [
    ({"t": "join"}, ErrorCode.INVALID_FIELD),
    ({"t": "join", "drop_id": True}, ErrorCode.INVALID_FIELD),
    ({"t": "join", "drop_id": 0}, ErrorCode.INVALID_FIELD),
    ({"t": "join", "drop_id": 2**64}, ErrorCode.BAD_FRAME),  # msgpack cannot even hold it
    ({"t": "join", "drop_id": 1, "since": 5}, ErrorCode.INVALID_FIELD),
    ({"t": "join", "drop_id": 1, "since": {"epoch": "e", "offset": -1}},
     ErrorCode.INVALID_FIELD),
    ({"t": "chat.send"}, ErrorCode.INVALID_FIELD),
    ({"t": "chat.send", "text": 5}, ErrorCode.INVALID_FIELD),
    ({"t": "chat.send", "text": "x" * 5000}, ErrorCode.INVALID_FIELD),
    ({"t": "chat.slow", "seconds": 99999}, ErrorCode.INVALID_FIELD),
    ({"t": "chat.mute", "user_id": "u", "seconds": 0}, ErrorCode.INVALID_FIELD),
    ({"t": "nope"}, ErrorCode.UNKNOWN_TYPE),
    ({"t": "command"}, ErrorCode.UNKNOWN_TYPE),
    ({"t": 5}, ErrorCode.BAD_FRAME),
    ({"t": "ping", "id": [1]}, ErrorCode.INVALID_FIELD),
    ({"t": "ping", "id": "x" * 65}, ErrorCode.INVALID_FIELD),
])
def test_invalid_frames(obj, code):
    raw = json.dumps(obj).encode() if isinstance(obj.get("t"), int) else None
    with pytest.raises(ProtocolError) as info:
        decode(raw or _pack(obj), MP)
    assert info.value.code == code


@pytest.mark.parametrize("request_id", [[1], {"a": 1}, 1.5, True, "x" * 65])
def test_a_bad_id_is_named_in_details_field(request_id):
    """docs/protocol.md: ``invalid_field`` names the field in ``details.field``; a
    client that sent a 65-character id got ``invalid_field`` with no details at all."""
    with pytest.raises(ProtocolError) as info:
        decode(_pack({"t": "ping", "id": request_id}), MP)
    assert info.value.code == ErrorCode.INVALID_FIELD
    assert info.value.details == {"field": "id"}


def _pack(obj):
    try:
        return mp(obj)
    except OverflowError:
        return b"\xcf" + b"\xff" * 9  # a truncated uint64: not decodable


def test_request_id_kept_on_errors():
    with pytest.raises(ProtocolError) as info:
        decode(mp({"t": "join", "id": "r9"}), MP)
    assert info.value.request_id == "r9"


def test_bad_bytes_and_non_maps():
    for raw in (b"", b"\xc1", mp([1, 2]), mp("str"), "[]", "nan", '{"t": NaN}'):
        with pytest.raises(ProtocolError) as info:
            decode(raw, MP)
        assert info.value.code == ErrorCode.BAD_FRAME


def test_nesting_and_size_limits():
    deep = "[" * 100000 + "]" * 100000
    with pytest.raises(ProtocolError):
        decode(deep, MP)
    with pytest.raises(ProtocolError):
        decode(mp({"t": "ping", "x": list(range(5000))}), MP)


def test_registered_commands_pass_fields_through():
    f = decode(mp({"t": "buy", "id": 1, "product_id": 3, "qty": 1}), MP, {"buy"})
    assert f.type is ClientType.COMMAND and f.command == "buy"
    assert f.data == {"product_id": 3, "qty": 1}
    with pytest.raises(ProtocolError):
        decode(mp({"t": "buy"}), MP, set())


def test_encode_both_formats():
    frame = protocol.event_frame("stock", {"products": {7: 3}}, "ep", 5)
    packed = encode(frame, MP)
    assert isinstance(packed, bytes)
    assert msgpack.unpackb(packed, strict_map_key=False)["data"]["products"] == {7: 3}
    text = encode(frame, Format.JSON)
    assert isinstance(text, str)
    assert json.loads(text) == {"t": "event", "event": "stock",
                                "data": {"products": {"7": 3}},
                                "pos": {"epoch": "ep", "offset": 5}}
    # Text is never escaped into HTML entities: it is data.
    assert "<b>" in encode({"t": "x", "text": "<b>"}, Format.JSON)


def test_error_and_going_away_frames():
    assert protocol.error_frame(ErrorCode.BANNED, "no", "1") == {
        "t": "error", "code": "banned", "message": "no", "id": "1"}
    assert protocol.going_away_frame("restart", 1500) == {
        "t": "going_away", "reason": "restart", "reconnect_after_ms": 1500}


def test_close_codes_are_documented():
    doc = open("docs/protocol.md").read()
    for code in CloseCode:
        assert f"| {int(code)} |" in doc, code
    for code in ErrorCode:
        assert f"`{code.value}`" in doc, code


@given(st.binary(max_size=200))
def test_decode_never_raises_anything_but_protocol_error(raw):
    try:
        decode(raw, MP, {"buy"})
    except ProtocolError:
        pass


@given(st.text(max_size=200))
def test_decode_text_never_raises_anything_but_protocol_error(raw):
    try:
        decode(raw, Format.JSON)
    except ProtocolError:
        pass
