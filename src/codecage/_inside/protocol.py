"""Framing for the kernel channel: a 4-byte big-endian length, then one JSON object.

Shared by the host and the kernel. Everything the host reads is untrusted: frames are
size-capped and must decode to a JSON object, or the reader raises ProtocolError.
See docs/protocol.md.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME = 16 * 1024 * 1024
# JSON values in one frame, at most: parsing costs ~50-100 bytes of memory per value (a dict,
# a list, a float), far more than the bytes that spell it ("{}," is three), so a frame of
# millions of tiny values would cost the reader many times the bytes it was sent.
MAX_VALUES = 1 << 20
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_HEADER = struct.Struct(">I")

# A frame as decoded: whatever the peer sent. What each message holds is typed in
# messages.py; a frame read from a sandbox is checked field by field where it is used.
Message = dict[str, Any]


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def encode(message: Mapping[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Incremental decoder: feed bytes, take whole messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > self._max:
                raise ProtocolError(f"frame of {size} bytes exceeds {self._max}")
            if len(self._buf) < _HEADER.size + size:
                break
            body = bytes(self._buf[_HEADER.size : _HEADER.size + size])
            del self._buf[: _HEADER.size + size]
            out.append(decode(body))
        return out


def _values(body: bytes) -> int:
    """An upper bound of the JSON values in `body` (counted outside strings: each value but
    the first of a container follows a comma; containers count once more)."""
    bare = _STRINGS.sub(b"", body)
    return bare.count(b",") + bare.count(b"[") + bare.count(b"{") + 1


def decode(body: bytes) -> Message:
    # A body shorter than the bound holds fewer values than it: no need to count.
    if len(body) > MAX_VALUES and _values(body) > MAX_VALUES:
        raise ProtocolError(f"frame holds more than {MAX_VALUES} JSON values")
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not JSON: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message
