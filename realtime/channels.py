"""Redis key and channel names of the gateway, and the pub/sub message format.

Pure: no I/O. Every key of one drop shares the hash tag ``{drop:<id>}`` so a drop's
history, its position and its channel live on one Redis Cluster slot.

A message on a drop or user channel is one of::

    b"D" + epoch + b":" + offset + b":" + body   durable event (history_add.lua)
    b"G" + epoch + b":" + offset + b":" + bodies  several durable events of one action,
                                                  offsets from ``offset`` on; ``bodies``
                                                  is a msgpack array of bodies
    b"V" + body                                   volatile event (coalescable)
    b"U" + body                                   private event for one user
    b"P" + conn_id + b":" + body                  the same, already delivered to the
                                                  user's connection ``conn_id``

where ``body`` is ``msgpack([event, data])``. The gateway decodes each message once
per process and encodes it once per wire protocol (see realtime.hub).
:func:`parse_publications` reads every kind; :func:`parse_message` the one-event ones.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "Kind",
    "Publication",
    "chat_key",
    "drop_channel",
    "history_key",
    "meta_key",
    "pack_body",
    "parse_message",
    "parse_publications",
    "unpack_map",
    "user_channel",
]


class Kind(enum.Enum):
    DURABLE = b"D"
    VOLATILE = b"V"
    USER = b"U"


def _tag(drop_id: int) -> str:
    return f"{{drop:{int(drop_id)}}}"


def meta_key(drop_id: int) -> str:
    """HASH {epoch, offset}: the drop's current stream position."""
    return f"{_tag(drop_id)}:meta"


def history_key(drop_id: int) -> str:
    """STREAM of durable events; entry id ``<offset>-0``, field ``d`` = body."""
    return f"{_tag(drop_id)}:history"


def drop_channel(drop_id: int) -> str:
    return f"{_tag(drop_id)}:events"


def chat_key(drop_id: int, suffix: str) -> str:
    """Chat keys of a drop (recent list, slow mode, moderation cache)."""
    return f"{_tag(drop_id)}:chat:{suffix}"


def user_channel(user_id: str) -> str:
    return f"{{user:{user_id}}}:events"


def unpack_map(raw: bytes | None) -> dict[str, Any] | None:
    """A msgpack map kept in Redis (a chat message), or None when absent or not one."""
    if raw is None:
        return None
    try:
        value = msgpack.unpackb(raw, raw=False)
    except Exception:
        return None
    return value if isinstance(value, dict) else None


def pack_body(event: str, data: dict[str, Any]) -> bytes:
    return msgpack.packb([event, data], use_bin_type=True)


@dataclass(frozen=True, slots=True)
class Publication:
    kind: Kind
    event: str
    data: dict[str, Any]
    epoch: str = ""
    offset: int = 0
    origin: str = ""  # a private event's connection that already has it


class MalformedMessage(ValueError):
    """A channel message that this module did not write."""


def _unpack_body(body: bytes) -> tuple[str, dict[str, Any]]:
    try:
        event, data = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MalformedMessage(f"bad body: {exc}") from None
    if not isinstance(event, str) or not isinstance(data, dict):
        raise MalformedMessage("body is not [event, data]")
    return event, data


def parse_message(raw: bytes) -> Publication:
    """Decode one pub/sub message (see the module docstring)."""
    if not raw:
        raise MalformedMessage("empty message")
    head = raw[:1]
    if head == b"D":
        try:
            epoch, offset, body = raw[1:].split(b":", 2)
            off = int(offset)
        except ValueError:
            raise MalformedMessage("bad durable header") from None
        event, data = _unpack_body(body)
        return Publication(Kind.DURABLE, event, data, epoch.decode(), off)
    if head == b"V":
        return Publication(Kind.VOLATILE, *_unpack_body(raw[1:]))
    if head == b"U":
        return Publication(Kind.USER, *_unpack_body(raw[1:]))
    if head == b"P":
        origin, sep, body = raw[1:].partition(b":")
        if not sep or not origin:
            raise MalformedMessage("bad private header")
        event, data = _unpack_body(body)
        return Publication(Kind.USER, event, data, origin=origin.decode(errors="replace"))
    raise MalformedMessage(f"unknown message kind {head!r}")


def parse_publications(raw: bytes) -> list[Publication]:
    """Decode one pub/sub message into its publications (several for ``G``)."""
    if raw[:1] != b"G":
        return [parse_message(raw)]
    try:
        epoch, offset, body = raw[1:].split(b":", 2)
        first = int(offset)
        items = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        raise MalformedMessage("bad group message") from None
    if not isinstance(items, list) or not items:
        raise MalformedMessage("a group is not a list of [event, data]")
    out = []
    for i, item in enumerate(items):
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], dict)):
            raise MalformedMessage("a group item is not [event, data]")
        out.append(Publication(Kind.DURABLE, item[0], item[1], epoch.decode(), first + i))
    return out


def parse_history_entry(entry_id: bytes, fields: dict[bytes, bytes], epoch: str) -> Publication:
    """A stream entry (``XRANGE``) as a durable publication."""
    offset = int(entry_id.split(b"-", 1)[0])
    event, data = _unpack_body(fields[b"d"])
    return Publication(Kind.DURABLE, event, data, epoch, offset)
