"""Thrift messages on the wire: variants, headers, framing, seqid rewriting, exceptions.

Theory of operation: a Thrift connection carries one *variant* for its whole life: a
transport (``framed``: each message behind a 4-byte big-endian length; ``buffered``: messages
back to back with no length) and a protocol (``binary`` strict, with a ``0x8001`` version
word; ``binary-nonstrict``, starting with the method name's length; ``compact``, starting
with ``0x82``). :func:`sniff` names the variant from a client's first bytes.

A :class:`Decoder` splits one direction of a connection into :class:`Message` events. Only
the message header is decoded (method name, message type, seqid, and for a reply the id of
the result struct's first field, which tells a declared exception from a success). Framed
messages end where their frame ends, so their bodies are not read at all; a buffered
message's body is walked by :class:`~appliance.protocols.thrift_skip.Skipper`, which skips
values without building them and resumes where it stopped when more bytes arrive. Each
message keeps its exact wire bytes (``data``, the length prefix included when framed), so
the proxy forwards what it received, changing only the seqid (:func:`with_seqid`). The
proxy's own answers are ``TApplicationException`` messages (:func:`encode_exception`).

Every limit raises :class:`ThriftError`: a frame or message larger than ``max_frame_bytes``
(checked as soon as a length says so), a method name longer than :data:`MAX_NAME`, a
message type other than CALL, REPLY, EXCEPTION and ONEWAY, nesting deeper than 64.

Pure: bytes in, events out. No sockets, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from struct import pack, unpack_from
from typing import NamedTuple

from appliance.protocols.thrift_skip import (
    MALFORMED,
    TOO_LARGE,
    TRUNCATED,
    Skipper,
    ThriftError,
    read_varint,
)

__all__ = [
    "CALL", "DEFAULT_MAX_FRAME_BYTES", "EXCEPTION", "INTERNAL_ERROR", "MALFORMED", "MAX_NAME",
    "NEED_MORE_BYTES", "ONEWAY", "REPLY", "TOO_LARGE", "TRUNCATED", "UNKNOWN_METHOD",
    "Decoder", "Encoding", "Message", "ThriftError", "Transport", "Variant", "encode_exception",
    "sniff", "with_seqid",
]

# Message types and TApplicationException types, as thriftpy2's TMessageType and
# TApplicationException define them (the tests check they agree).
CALL, REPLY, EXCEPTION, ONEWAY = 1, 2, 3, 4
UNKNOWN_METHOD, INTERNAL_ERROR = 1, 6

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_NAME = 4096  # longest method name accepted, in bytes
_SNIFF_NAME = 256  # a non-strict binary start is only believed with a name this short
_TYPE_NAMES = {CALL: "CALL", REPLY: "REPLY", EXCEPTION: "EXCEPTION", ONEWAY: "ONEWAY"}


class Transport(enum.Enum):
    FRAMED = "framed"
    BUFFERED = "buffered"


class Encoding(enum.Enum):
    BINARY = "binary"
    BINARY_NONSTRICT = "binary-nonstrict"
    COMPACT = "compact"


@dataclass(frozen=True, slots=True)
class Variant:
    """How one connection's messages are written."""

    transport: Transport
    encoding: Encoding
    # Derived once: read per message, and the hash is part of every pool lookup.
    framed: bool = field(init=False, repr=False, compare=False)
    compact: bool = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "framed", self.transport is Transport.FRAMED)
        object.__setattr__(self, "compact", self.encoding is Encoding.COMPACT)
        object.__setattr__(self, "_hash", hash((self.transport.value, self.encoding.value)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.transport.value}/{self.encoding.value}"


class Message(NamedTuple):
    """One message: its header fields and its exact wire bytes (immutable; a tuple, as it
    is made for every message on the data path).

    ``seqid_at:seqid_end`` is where the seqid sits in ``data``. ``result_field`` is, for a
    REPLY, the id of the result struct's first field: 0 for a success (or a void method's
    empty result), a declared exception's id otherwise; -1 for other message types."""

    name: str
    type: int
    seqid: int
    data: bytes
    seqid_at: int
    seqid_end: int
    variant: Variant
    result_field: int = -1

    def __repr__(self) -> str:
        kind = _TYPE_NAMES.get(self.type, str(self.type))
        return f"<Message {kind} {self.name!r} seqid={self.seqid} {len(self.data)}B>"


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE_BYTES"


NEED_MORE_BYTES = _NeedMore()


# --- sniffing ----------------------------------------------------------------------------

def _sniff_message(buf: bytes) -> Encoding | _NeedMore | None:
    """The encoding of a client's first message (a CALL or ONEWAY) starting ``buf``."""
    if not buf:
        return NEED_MORE_BYTES
    first = buf[0]
    if first == 0x80:  # strict binary: 0x80 0x01 0x00 <type>
        for i, byte in enumerate(buf[:3]):
            if byte != (0x80, 0x01, 0x00)[i]:
                return None
        if len(buf) < 4:
            return NEED_MORE_BYTES
        return Encoding.BINARY if buf[3] in (CALL, ONEWAY) else None
    if first == 0x82:  # compact: 0x82, then type << 5 | version 1
        if len(buf) < 2:
            return NEED_MORE_BYTES
        return Encoding.COMPACT if buf[1] in (0x21, 0x81) else None
    # Non-strict binary: i32 name length, a printable ASCII name, the type byte.
    if len(buf) < 4:
        smallest = int.from_bytes(buf + b"\x00" * (4 - len(buf)), "big")
        return NEED_MORE_BYTES if smallest <= _SNIFF_NAME else None
    length = int.from_bytes(buf[:4], "big")
    if not 0 < length <= _SNIFF_NAME:
        return None
    if not all(0x21 <= c < 0x7F for c in buf[4:4 + length]):
        return None
    if len(buf) < 4 + length + 1:
        return NEED_MORE_BYTES
    return Encoding.BINARY_NONSTRICT if buf[4 + length] in (CALL, ONEWAY) else None


def sniff(buf: bytes) -> Variant | _NeedMore | None:
    """The variant of a client stream starting with ``buf``; :data:`NEED_MORE_BYTES` if
    the prefix could still be one; None if it cannot be Thrift (as this proxy knows it)."""
    unframed = _sniff_message(buf)
    if isinstance(unframed, Encoding):
        return Variant(Transport.BUFFERED, unframed)
    if unframed is not None:
        return unframed
    # Framed: a 4-byte length under 16 MiB (so a zero first byte), then a message.
    if buf[0] != 0:
        return None
    if len(buf) < 4:
        return NEED_MORE_BYTES
    if int.from_bytes(buf[:4], "big") == 0:
        return None
    framed = _sniff_message(buf[4:])
    if isinstance(framed, Encoding):
        return Variant(Transport.FRAMED, framed)
    return framed


# --- headers -----------------------------------------------------------------------------

class _Head(NamedTuple):
    name: str
    type: int
    seqid: int
    seqid_at: int  # offsets from the start of the message header
    seqid_end: int
    body: int


def _name(raw: bytes | bytearray) -> str:
    if not raw:
        raise ThriftError(MALFORMED, "empty method name")
    return raw.decode("utf-8", "backslashreplace")


def _check_type(mtype: int) -> None:
    if mtype not in _TYPE_NAMES:
        raise ThriftError(MALFORMED, f"unknown message type {mtype}")


def _check_length(length: int) -> None:
    if length < 0 or length > MAX_NAME:
        raise ThriftError(MALFORMED, f"method name length {length} is outside 1..{MAX_NAME}")


def _head_binary(buf: bytes | bytearray, pos: int, n: int) -> _Head | None:
    if pos + 8 > n:
        return None
    if buf[pos] != 0x80 or buf[pos + 1] != 0x01:
        raise ThriftError(MALFORMED, "not a strict binary message (no 0x8001 version)")
    mtype = buf[pos + 3]
    _check_type(mtype)
    (length,) = unpack_from(">i", buf, pos + 4)
    _check_length(length)
    at = pos + 8 + length
    if at + 4 > n:
        return None
    (seqid,) = unpack_from(">i", buf, at)
    return _Head(_name(buf[pos + 8:at]), mtype, seqid, at - pos, at + 4 - pos, at + 4 - pos)


def _head_nonstrict(buf: bytes | bytearray, pos: int, n: int) -> _Head | None:
    if pos + 4 > n:
        return None
    (length,) = unpack_from(">i", buf, pos)
    _check_length(length)
    at = pos + 4 + length
    if at + 5 > n:
        return None
    mtype = buf[at]
    _check_type(mtype)
    (seqid,) = unpack_from(">i", buf, at + 1)
    return _Head(_name(buf[pos + 4:at]), mtype, seqid, at + 1 - pos, at + 5 - pos,
                 at + 5 - pos)


def _head_compact(buf: bytes | bytearray, pos: int, n: int) -> _Head | None:
    if pos + 2 > n:
        return None
    if buf[pos] != 0x82 or buf[pos + 1] & 0x1F != 1:
        raise ThriftError(MALFORMED, "not a compact message (no 0x82, version 1)")
    mtype = buf[pos + 1] >> 5
    _check_type(mtype)
    if pos + 4 <= n and buf[pos + 2] < 0x80 and buf[pos + 3] < 0x80:  # the usual: short
        seqid, at_end, length, start = buf[pos + 2], pos + 3, buf[pos + 3], pos + 4
    else:
        seqid, at_end = read_varint(buf, pos + 2, n, 5)
        if seqid < 0:
            return None
        if seqid > 0xFFFFFFFF:
            raise ThriftError(MALFORMED, "seqid does not fit 32 bits")
        length, start = read_varint(buf, at_end, n, 5)
        if length < 0:
            return None
    _check_length(length)
    if start + length > n:
        return None
    seqid = seqid - (1 << 32) if seqid >= 1 << 31 else seqid
    return _Head(_name(buf[start:start + length]), mtype, seqid, 2, at_end - pos,
                 start + length - pos)


_HEADS = {Encoding.BINARY: _head_binary, Encoding.BINARY_NONSTRICT: _head_nonstrict,
          Encoding.COMPACT: _head_compact}


def _first_field(buf: bytes | bytearray, pos: int, n: int, compact: bool) -> int:
    """The id of the struct's first field at ``pos``: 0 if it is empty; -1 if unreadable."""
    if pos >= n:
        return -1
    b = buf[pos]
    if not compact:
        if b == 0:
            return 0
        return unpack_from(">h", buf, pos + 1)[0] if pos + 3 <= n else -1
    if b & 0x0F == 0:
        return 0
    if b >> 4:
        return b >> 4
    value, _ = read_varint(buf, pos + 1, n, 3)
    return -1 if value < 0 else (value >> 1) ^ -(value & 1)


# --- the decoder -------------------------------------------------------------------------

class Decoder:
    """Splits one direction of a connection into :class:`Message` events.

    ``feed(data)`` returns the messages completed by ``data`` (raises :class:`ThriftError`);
    ``eof()`` raises a TRUNCATED error if a message was cut short."""

    def __init__(self, variant: Variant, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_depth: int = 64) -> None:
        if max_frame_bytes < 16:
            raise ValueError(f"max_frame_bytes must be at least 16, not {max_frame_bytes!r}")
        self.variant = variant
        self.max_frame_bytes = max_frame_bytes
        self.max_depth = max_depth
        self._head_of = _HEADS[variant.encoding]
        self._buf = bytearray()
        self._head: _Head | None = None  # of a buffered message whose body is being walked
        self._skip: Skipper | None = None
        self._next = self._next_framed if variant.framed else self._next_buffered

    @property
    def buffered(self) -> int:
        """Bytes held of a message not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        out: list[Message] = []
        pos, n = 0, len(buf)
        while pos < n:
            msg = self._next(buf, pos, n)
            if msg is None:
                break
            out.append(msg)
            pos += len(msg.data)
        self._keep(buf, pos, n)
        return out

    def _keep(self, buf: bytes | bytearray, pos: int, n: int) -> None:
        if buf is self._buf:
            if pos:
                del self._buf[:pos]
        elif pos < n:
            self._buf = bytearray(buf[pos:])
        if pos and self._skip is not None:
            self._skip.shift(pos)

    def eof(self) -> None:
        if self._buf:
            raise ThriftError(TRUNCATED, f"connection ended inside a message "
                                         f"({len(self._buf)} bytes of it received)")

    def _next_framed(self, buf: bytes | bytearray, pos: int, n: int) -> Message | None:
        if pos + 4 > n:
            return None
        (size,) = unpack_from(">i", buf, pos)
        if size > self.max_frame_bytes:
            raise ThriftError(TOO_LARGE, f"frame of {size} bytes is over the limit of "
                                         f"{self.max_frame_bytes}")
        if size <= 0:
            raise ThriftError(MALFORMED, f"invalid frame length {size}")
        end = pos + 4 + size
        if end > n:
            return None
        head = self._head_of(buf, pos + 4, end)
        if head is None:
            raise ThriftError(MALFORMED, f"frame of {size} bytes is shorter than its "
                                         "message header")
        return self._message(buf, pos, end, head, 4)

    def _next_buffered(self, buf: bytes | bytearray, pos: int, n: int) -> Message | None:
        head, skip = self._head, self._skip
        if skip is None:
            head = self._head_of(buf, pos, n)
            if head is None:
                return None
            skip = Skipper(self.variant.compact, pos + head.body,
                           pos + self.max_frame_bytes, self.max_depth)
            self._head, self._skip = head, skip
        assert head is not None
        if not skip.run(buf):
            return None
        self._head = self._skip = None
        return self._message(buf, pos, skip.pos, head, 0)

    def _message(self, buf: bytes | bytearray, pos: int, end: int, head: _Head,
                 offset: int) -> Message:
        if pos == 0 and end == len(buf) and type(buf) is bytes:
            data = buf  # the usual case: one read, one whole message
        else:
            data = bytes(buf[pos:end])
        field = -1
        if head.type == REPLY:
            field = _first_field(data, head.body + offset, len(data), self.variant.compact)
        return Message(head.name, head.type, head.seqid, data, head.seqid_at + offset,
                       head.seqid_end + offset, self.variant, field)


# --- writing -----------------------------------------------------------------------------

_SMALL = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def with_seqid(msg: Message, seqid: int) -> bytes:
    """``msg``'s wire bytes with another seqid (a compact varint may change length, and the
    frame length with it)."""
    data = msg.data
    if not msg.variant.compact:
        return data[:msg.seqid_at] + pack(">i", seqid) + data[msg.seqid_end:]
    new = data[:msg.seqid_at] + _varint(seqid & 0xFFFFFFFF) + data[msg.seqid_end:]
    if msg.variant.framed and len(new) != len(data):
        new = pack(">i", len(new) - 4) + new[4:]
    return new


def encode_exception(variant: Variant, name: str, seqid: int, message: str,
                     kind: int = INTERNAL_ERROR) -> bytes:
    """A TApplicationException reply (EXCEPTION message) in ``variant``."""
    raw_name = name.encode("utf-8", "surrogateescape")[:MAX_NAME]
    text = message.encode("utf-8", "replace")
    if variant.compact:
        zigzag = (kind << 1) ^ (kind >> 31)
        body = (b"\x18" + _varint(len(text)) + text + b"\x15" + _varint(zigzag & 0xFFFFFFFF)
                + b"\x00")
        head = (b"\x82" + bytes([(EXCEPTION << 5) | 1]) + _varint(seqid & 0xFFFFFFFF)
                + _varint(len(raw_name)) + raw_name)
    else:
        body = b"\x0b\x00\x01" + pack(">i", len(text)) + text + b"\x08\x00\x02" \
            + pack(">i", kind) + b"\x00"
        if variant.encoding is Encoding.BINARY:
            head = pack(">HBBi", 0x8001, 0, EXCEPTION, len(raw_name)) + raw_name \
                + pack(">i", seqid)
        else:
            head = pack(">i", len(raw_name)) + raw_name + pack(">bi", EXCEPTION, seqid)
    payload = head + body
    return pack(">i", len(payload)) + payload if variant.framed else payload
