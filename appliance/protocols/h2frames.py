"""HTTP/2 wire constants (RFC 9113 §6, §7, §11) and the error type of the HTTP/2 codec.

Everything the codec raises is :class:`H2Error` (a connection error: the connection sends
GOAWAY with ``code`` and ends). Stream errors never raise: the stream is reset and the
handler told (``on_stream_error``).
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
FRAME_NAMES = ("DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE",
               "PING", "GOAWAY", "WINDOW_UPDATE", "CONTINUATION")

# Flags.
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD

# Settings.
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6
ENABLE_CONNECT_PROTOCOL = 0x8

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = (1 << 31) - 1
MAX_FRAME_LIMIT = (1 << 24) - 1
MAX_STREAM_ID = (1 << 31) - 1

# A frame header: 24-bit length (as 16 + 8 bits), type, flags, stream id (with the R bit).
FRAME_HEADER = struct.Struct(">HBBBL")
pack_header = FRAME_HEADER.pack
unpack_header = FRAME_HEADER.unpack_from
U32 = struct.Struct(">L")
SETTING = struct.Struct(">HL")


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return pack_header(n >> 8, n & 255, ftype, flags, sid) + payload


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in values.items()))


def goaway_frame(last_sid: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, U32.pack(last_sid) + U32.pack(code) + debug)


def rst_frame(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, U32.pack(code))


def window_frame(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, U32.pack(increment))


class H2Error(Exception):
    """A connection error: GOAWAY ``code`` was queued and the connection is over.
    ``kind`` is the label under which the proxy counts it."""

    def __init__(self, code: int, reason: str, kind: str = "h2_protocol_error") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.kind = kind
