"""WebSocket frames built byte by byte (RFC 6455 5.2), for tests that speak the wire."""

from __future__ import annotations

from websockets.frames import apply_mask


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
             mask: bytes | None = None) -> bytes:
    """One frame: masked with ``mask`` (4 bytes) when given, as a client's must be."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2)
    else:
        head += bytes([bit | 127]) + n.to_bytes(8)
    if mask is None:
        return head + payload
    return head + mask + apply_mask(payload, mask)
