"""The gateway's wire protocol: frame types, codes, encoding and validation. No I/O.

Every frame is a map with a type ``t``. Binary msgpack frames are the default; JSON
text frames are negotiated with the ``Sec-WebSocket-Protocol`` header (RFC 6455
section 1.9). ``docs/protocol.md`` is the reference for every frame, field and code.

Client frames are validated here into :class:`ClientFrame`; anything malformed raises
:class:`ProtocolError` carrying an :class:`ErrorCode` and the request ``id`` when one
could be read, so the gateway can answer with an ``error`` frame and keep the
connection.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dropserver.text import text_problem

__all__ = [
    "DEFAULT_FORMAT",
    "ClientFrame",
    "ClientType",
    "CloseCode",
    "ErrorCode",
    "Format",
    "ProtocolError",
    "ServerType",
    "decode",
    "encode",
    "error_frame",
    "negotiate",
]

MAX_ID_LEN = 64
MAX_TOKEN_LEN = 8192
MAX_USER_ID_LEN = 128
MAX_COMMAND_FIELDS = 32


class Format(enum.Enum):
    """Wire format, chosen by subprotocol."""

    MSGPACK = "dropserver.msgpack.v1"
    JSON = "dropserver.json.v1"


DEFAULT_FORMAT = Format.MSGPACK


def negotiate(offered: list[str]) -> tuple[Format, str | None]:
    """The format for the client's offered subprotocols (first match wins) and the
    subprotocol to echo in the handshake; no known offer means msgpack, unnamed."""
    for name in offered:
        for fmt in Format:
            if name == fmt.value:
                return fmt, name
    return DEFAULT_FORMAT, None


class ClientType(enum.StrEnum):
    JOIN = "join"
    PING = "ping"
    PONG = "pong"
    CHAT_SEND = "chat.send"
    CHAT_DELETE = "chat.delete"
    CHAT_MUTE = "chat.mute"
    CHAT_BAN = "chat.ban"
    CHAT_UNBAN = "chat.unban"
    CHAT_SLOW = "chat.slow"
    CHAT_PIN = "chat.pin"
    CHAT_UNPIN = "chat.unpin"
    REFRESH = "refresh"          # a new token for the socket's user (realtime/tokens.py)
    # Any other type registered in app.state.commands (e.g. "buy") is a COMMAND.
    COMMAND = "command"


_CLIENT_TYPES = {t.value: t for t in ClientType}


class ServerType(enum.StrEnum):
    JOINED = "joined"            # answer to join: snapshot or recovered events
    EVENT = "event"              # durable drop event with its position
    VOLATILE = "volatile"        # coalescable drop event (stock, viewers)
    PRIVATE = "private"          # event for this user only (order.*)
    REPLY = "reply"              # answer to a request with an id
    ERROR = "error"
    PING = "ping"
    PONG = "pong"
    GOING_AWAY = "going_away"    # server drain or overload: reconnect after N ms
    SKIPPED = "skipped"          # chat messages up to pos were left out of this stream
    TOKEN_EXPIRED = "token_expired"  # the socket's token expired: it is a guest's now


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server sends (RFC 6455 section 7.4, IANA registry,
    and 4000-4999 for this application)."""

    NORMAL = 1000
    MESSAGE_TOO_BIG = 1009       # a frame over DROPSERVER_WS_MAX_MESSAGE_BYTES
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012       # drain: reconnect after going_away.reconnect_after_ms
    TRY_AGAIN_LATER = 1013       # overload: same
    BAD_FRAMES = 4000            # too many malformed frames in a row
    HEARTBEAT_TIMEOUT = 4001     # nothing received for ping interval + pong timeout
    SLOW = 4008                  # could not keep up (cf. centrifuge 3008); resume
    RESYNC = 4010                # server lost track of the drop; rejoin with since


class ErrorCode(enum.StrEnum):
    BAD_FRAME = "bad_frame"              # not msgpack/JSON, or not a map with a type
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    NOT_JOINED = "not_joined"
    ALREADY_JOINED = "already_joined"
    DROP_NOT_FOUND = "drop_not_found"
    TOKEN_MISSING = "token_missing"      # signing in is required
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_USER_MISMATCH = "token_user_mismatch"  # refresh with another user's token
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    SLOW_MODE = "slow_mode"
    MUTED = "muted"
    BANNED = "banned"
    MESSAGE_NOT_FOUND = "message_not_found"
    STAFF_TARGET = "target_is_staff"     # a moderator muting/banning the creator or a moderator
    INTERNAL_ERROR = "internal_error"


class ProtocolError(Exception):
    """A client frame the gateway answers with an ``error`` frame."""

    def __init__(self, code: ErrorCode | str, message: str, request_id: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.request_id = request_id
        self.details = details or {}


@dataclass(frozen=True, slots=True)
class ClientFrame:
    type: ClientType
    id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    command: str = ""  # the registered command name when type is COMMAND


# -- encoding -----------------------------------------------------------------

def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def encode(frame: dict[str, Any], fmt: Format) -> bytes | str:
    """One server frame: msgpack bytes (binary frame) or JSON text (text frame).

    JSON turns integer map keys (product ids in ``stock``) into strings; msgpack
    keeps them as integers. Clients must accept both.
    """
    if fmt is Format.MSGPACK:
        return msgpack.packb(frame, use_bin_type=True)
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default)


def error_frame(code: ErrorCode | str, message: str, request_id: str | None = None,
                details: dict[str, Any] | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": ServerType.ERROR.value, "code": str(code),
                             "message": message}
    if request_id is not None:
        frame["id"] = request_id
    if details:
        frame["details"] = details
    return frame


def event_frame(event: str, data: dict[str, Any], epoch: str, offset: int) -> dict[str, Any]:
    return {"t": ServerType.EVENT.value, "event": event, "data": data,
            "pos": {"epoch": epoch, "offset": offset}}


def skipped_frame(count: int, epoch: str, offset: int) -> dict[str, Any]:
    """``count`` chat messages up to ``(epoch, offset)`` were left out of this socket's
    stream (a big room's chat is sampled, or the socket could not keep up); they are
    in history. docs/protocol.md, "Chat in big rooms"."""
    return {"t": ServerType.SKIPPED.value, "count": int(count),
            "pos": {"epoch": epoch, "offset": offset}}


def volatile_frame(event: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"t": ServerType.VOLATILE.value, "event": event, "data": data}


def private_frame(event: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"t": ServerType.PRIVATE.value, "event": event, "data": data}


def going_away_frame(reason: str, reconnect_after_ms: int) -> dict[str, Any]:
    return {"t": ServerType.GOING_AWAY.value, "reason": reason,
            "reconnect_after_ms": int(reconnect_after_ms)}


def reply_frame(request_id: str | None, data: dict[str, Any]) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": ServerType.REPLY.value, "data": data}
    if request_id is not None:
        frame["id"] = request_id
    return frame


# -- decoding and validation ----------------------------------------------------

def _load(raw: bytes | str, fmt: Format) -> Any:
    if isinstance(raw, str):
        # A text frame is JSON whatever was negotiated (handy for debugging tools).
        return json.loads(raw, parse_constant=_reject_constant)
    if fmt is Format.JSON:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    # A binary frame is msgpack; limits keep a small frame from expanding hugely.
    return msgpack.unpackb(raw, raw=False, strict_map_key=True,
                           max_array_len=1024, max_map_len=256, max_str_len=1 << 16,
                           max_bin_len=1 << 16, max_ext_len=0)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode(raw: bytes | str, fmt: Format, commands: frozenset[str] | set[str] = frozenset(),
           ) -> ClientFrame:
    """Parse and validate one client frame or raise :class:`ProtocolError`.

    ``commands`` are the extra types delegated to other packages (``buy``).
    """
    try:
        obj = _load(raw, fmt)
    except (ValueError, TypeError, UnicodeDecodeError, msgpack.UnpackException,
            RecursionError) as exc:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"cannot decode frame: {exc}"[:200]) from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame must be a map")
    request_id = obj.get("id")
    if request_id is not None:
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "id must be a string or integer",
                                details={"field": "id"})
        request_id = str(request_id)
        if len(request_id) > MAX_ID_LEN:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"id longer than {MAX_ID_LEN}",
                                details={"field": "id"})
    kind = obj.get("t")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "t (the frame type) must be a string",
                            request_id)
    ctype = _CLIENT_TYPES.get(kind)
    if ctype is None:  # not a built-in type (a dict lookup: "buy" is the hot one)
        if kind in commands:
            return _command(obj, kind, request_id)
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:40]!r}",
                            request_id)
    if ctype is ClientType.COMMAND:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "unknown frame type 'command'", request_id)
    data = _VALIDATORS[ctype](obj, request_id)
    return ClientFrame(ctype, request_id, data)


def _command(obj: dict[str, Any], name: str, request_id: str | None) -> ClientFrame:
    data = {k: v for k, v in obj.items() if k not in ("t", "id")}
    if len(data) > MAX_COMMAND_FIELDS:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "too many fields", request_id)
    return ClientFrame(ClientType.COMMAND, request_id, data, command=name)


_MISSING = object()


def _field(obj: dict[str, Any], name: str, typ: type | tuple[type, ...], request_id: str | None,
           *, default: Any = _MISSING, min_value: float | None = None,
           max_value: float | None = None, max_len: int | None = None) -> Any:
    value = obj.get(name)
    if value is None:
        if default is _MISSING:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} is required", request_id,
                                {"field": name})
        return default
    types = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(value, bool) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} must be {names}", request_id,
                            {"field": name})
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} must be finite", request_id,
                            {"field": name})
    if min_value is not None and value < min_value:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} must be >= {min_value}",
                            request_id, {"field": name})
    if max_value is not None and value > max_value:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} must be <= {max_value}",
                            request_id, {"field": name})
    if max_len is not None and len(value) > max_len:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} longer than {max_len}",
                            request_id, {"field": name})
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:  # PostgreSQL and Redis could not store it
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} {problem}", request_id,
                                {"field": name})
    return value


_MAX_ID = 2**63 - 1
_ENVELOPE = ("t", "id")


def _only(obj: dict[str, Any], fields: tuple[str, ...], rid: str | None,
          prefix: str = "") -> None:
    """Unknown fields are refused, as in every HTTP body (docs/protocol.md)."""
    for name in obj:
        if name not in fields and (prefix or name not in _ENVELOPE):
            path = f"{prefix}{str(name)[:64]}"
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"{path} is not a known field", rid,
                                {"field": path})


def _join(obj: dict[str, Any], rid: str | None) -> dict[str, Any]:
    _only(obj, ("drop_id", "token", "since"), rid)
    out: dict[str, Any] = {
        "drop_id": _field(obj, "drop_id", int, rid, min_value=1, max_value=_MAX_ID),
        "token": _field(obj, "token", str, rid, default=None, max_len=MAX_TOKEN_LEN),
    }
    since = obj.get("since")
    if since is not None:
        if not isinstance(since, dict):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "since must be a map", rid,
                                {"field": "since"})
        _only(since, ("epoch", "offset"), rid, "since.")
        out["since"] = (_field(since, "epoch", str, rid, max_len=64),
                        _field(since, "offset", int, rid, min_value=0, max_value=_MAX_ID))
    return out


def _empty(obj: dict[str, Any], rid: str | None) -> dict[str, Any]:
    _only(obj, (), rid)
    return {}


def _chat_send(obj: dict[str, Any], rid: str | None) -> dict[str, Any]:
    # The length limit is a setting, checked by realtime.chat; this only bounds
    # the frame. Text is never interpreted: clients render it as text.
    _only(obj, ("text",), rid)
    return {"text": _field(obj, "text", str, rid, max_len=4096)}


def _chat_delete(obj: dict[str, Any], rid: str | None) -> dict[str, Any]:
    _only(obj, ("message_id",), rid)
    return {"message_id": _field(obj, "message_id", str, rid, max_len=64)}


def _chat_moderate(obj: dict[str, Any], rid: str | None) -> dict[str, Any]:
    _only(obj, ("user_id", "seconds", "reason"), rid)
    return {
        "user_id": _field(obj, "user_id", str, rid, max_len=MAX_USER_ID_LEN),
        "seconds": _field(obj, "seconds", int, rid, default=None, min_value=1,
                          max_value=30 * 86400),
        "reason": _field(obj, "reason", str, rid, default="", max_len=500),
    }


def _refresh(obj: dict[str, Any], rid: str | None) -> dict[str, Any]:
    _only(obj, ("token",), rid)
    return {"token": _field(obj, "token", str, rid, max_len=MAX_TOKEN_LEN)}


def _chat_slow(obj: dict[str, Any], rid: str | None) -> dict[str, Any]:
    _only(obj, ("seconds",), rid)
    return {"seconds": _field(obj, "seconds", int, rid, min_value=0, max_value=3600)}


_VALIDATORS = {
    ClientType.JOIN: _join,
    ClientType.PING: _empty,
    ClientType.PONG: _empty,
    ClientType.CHAT_SEND: _chat_send,
    ClientType.CHAT_DELETE: _chat_delete,
    ClientType.CHAT_MUTE: _chat_moderate,
    ClientType.CHAT_BAN: _chat_moderate,
    ClientType.CHAT_UNBAN: _chat_moderate,
    ClientType.CHAT_SLOW: _chat_slow,
    ClientType.CHAT_PIN: _chat_delete,      # the same one field: message_id
    ClientType.CHAT_UNPIN: _empty,
    ClientType.REFRESH: _refresh,
}
