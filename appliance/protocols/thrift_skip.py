"""Skip one Thrift struct in a byte stream that arrives in pieces, building no values.

Theory of operation: an unframed (buffered-transport) Thrift message has no length; its end
is where its body struct ends, so the proxy walks the body's field headers and skips their
values. The walk keeps an explicit stack of frames (struct, list/set, map) instead of
recursing, so it can stop anywhere and resume when more bytes arrive: each step (a field
header, a primitive value, a string, a container header) is taken only once all of its
bytes are in the buffer, so running short leaves the walk at a step boundary and the next
:meth:`Skipper.run` continues from there. Work is therefore linear in the message however
it is split, which matters when a client sends a large message a byte at a time. Runs of
fixed-width list elements are jumped over in one step.

A composite value (struct, list, map) is counted as consumed in its parent when its frame
is pushed; the stack order guarantees the parent resumes only once the child is done.

Limits: nesting deeper than ``max_depth`` (64, as thriftpy2) is malformed; any read past
``limit`` (the message start plus the frame size limit) is :data:`TOO_LARGE`, as soon as
a length or size says it will happen (without waiting for the bytes), and whether or not
the bytes are already there. Type ids follow Apache Thrift (thriftpy2's ``TType`` for
the binary protocol, plus UUID = 16; the compact protocol's own ids, as thriftpy2's
``CompactType``).

Pure: bytes in, a position out. No sockets, no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from struct import unpack_from

MALFORMED = "malformed"
TOO_LARGE = "too_large"
TRUNCATED = "truncated"


class ThriftError(ValueError):
    """Bytes that are not a Thrift message this proxy can carry; ``kind`` is
    :data:`MALFORMED`, :data:`TOO_LARGE` or :data:`TRUNCATED` (a metric label)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class TType:
    """Binary-protocol type ids (the values of thriftpy2's ``TType``, which the tests
    check; written out so the proxy does not import thriftpy2's IDL parser at start)."""

    STOP, BOOL, BYTE, DOUBLE, I16, I32, I64 = 0, 2, 3, 4, 6, 8, 10
    STRING, STRUCT, MAP, SET, LIST = 11, 12, 13, 14, 15


UUID = 16  # Apache Thrift 0.19+
_B_WIDTH = {TType.BOOL: 1, TType.BYTE: 1, TType.DOUBLE: 8, TType.I16: 2, TType.I32: 4,
            TType.I64: 8, UUID: 16}
_B_TYPES = frozenset({*_B_WIDTH, TType.STRING, TType.STRUCT, TType.MAP, TType.SET,
                      TType.LIST})

# Compact protocol type ids.
C_TRUE, C_FALSE, C_BYTE, C_I16, C_I32, C_I64, C_DOUBLE = 1, 2, 3, 4, 5, 6, 7
C_BINARY, C_LIST, C_SET, C_MAP, C_STRUCT, C_UUID = 8, 9, 10, 11, 12, 13
_C_WIDTH = {C_TRUE: 1, C_FALSE: 1, C_BYTE: 1, C_DOUBLE: 8, C_UUID: 16}
_C_VARINT = {C_I16: 3, C_I32: 5, C_I64: 10}  # most bytes of each zig-zag varint
_MAX_SIZE = (1 << 31) - 1

_NO_VARINTS: dict[int, int] = {}  # the binary protocol has fixed-width integers

# Frame kinds; a frame is [kind, remaining, type1, type2]. A struct frame keeps the type
# of the field whose header was read and whose value is next in type1 (-1: none).
_STRUCT, _LIST, _MAP = 0, 1, 2
_Value = Callable[[bytes | bytearray, int, int], bool]  # skips one value of a type


def _short(end: int, limit: int) -> bool:
    """Not enough bytes yet (False to the caller), unless they could never fit."""
    if end > limit:
        raise ThriftError(TOO_LARGE, f"message larger than the frame size limit "
                                     f"({limit} bytes from its start)")
    return False


def read_varint(buf: bytes | bytearray, pos: int, n: int, most: int) -> tuple[int, int]:
    """An unsigned LEB128 varint of at most ``most`` bytes at ``pos``: (value, end), or
    (-1, pos) when the buffer ends first. Longer is malformed."""
    result = shift = 0
    end = pos + most
    while pos < n:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        if pos == end:
            raise ThriftError(MALFORMED, f"varint longer than {most} bytes")
        shift += 7
    return -1, pos


class Skipper:
    """Walks one struct starting at ``pos``; :meth:`run` until it returns True, then
    ``pos`` is the offset just past the struct."""

    __slots__ = ("compact", "pos", "limit", "stack", "max_depth")

    def __init__(self, compact: bool, pos: int, limit: int, max_depth: int = 64) -> None:
        self.compact = compact
        self.pos = pos
        self.limit = limit
        self.max_depth = max_depth
        self.stack: list[list[int]] = [[_STRUCT, 0, -1, 0]]

    def shift(self, offset: int) -> None:
        """The caller dropped ``offset`` bytes from the front of its buffer."""
        self.pos -= offset
        self.limit -= offset

    def run(self, buf: bytes | bytearray) -> bool:
        """Advance as far as ``buf`` allows; True once the struct is complete."""
        n = min(len(buf), self.limit)  # bytes past the limit count as never coming
        if self.compact:
            value, fields, widths, varints = (self._value_compact, self._fields_compact,
                                              _C_WIDTH, _C_VARINT)
        else:
            value, fields, widths, varints = (self._value_binary, self._fields_binary,
                                              _B_WIDTH, _NO_VARINTS)
        stack = self.stack
        while stack:
            frame = stack[-1]
            if frame[0] != _STRUCT:
                done = self._element(buf, n, frame, value, widths, varints)
            elif frame[2] < 0:
                done = fields(buf, n, frame)
            elif value(buf, n, frame[2]):
                frame[2] = -1
                done = True
            else:
                done = False
            if not done:
                return False
        return True

    def _element(self, buf: bytes | bytearray, n: int, frame: list[int], value: _Value,
                 widths: dict[int, int], varints: dict[int, int]) -> bool:
        """The next element of a list, set or map frame; a run of fixed-width (or, compact,
        varint) list elements is skipped in one step."""
        remaining = frame[1]
        if remaining == 0:
            self.stack.pop()
            return True
        kind = frame[0]
        t = frame[2] if kind == _LIST or remaining % 2 == 0 else frame[3]
        if kind == _LIST:
            width = widths.get(t)
            if width is not None:
                pos = self.pos
                k = min(remaining, (n - pos) // width)
                if k == 0:
                    return _short(pos + width, self.limit)
                self.pos = pos + k * width
                frame[1] = remaining - k
                return True
            most = varints.get(t)
            if most is not None:
                return self._varint_run(buf, n, frame, most)
        if value(buf, n, t):
            frame[1] = remaining - 1
            return True
        return False

    def _push(self, frame: list[int]) -> None:
        if len(self.stack) >= self.max_depth:
            raise ThriftError(MALFORMED, f"nesting deeper than {self.max_depth}")
        self.stack.append(frame)

    # --- binary protocol ---------------------------------------------------------------
    def _fields_binary(self, buf: bytes | bytearray, n: int, frame: list[int]) -> bool:
        """A struct's fields, one after another while each is whole in the buffer: the
        common flat case costs one call, not two per field. A composite value, or one
        not all there yet, is left to the generic steps (its header is taken)."""
        pos = self.pos
        while True:
            if pos >= n:
                self.pos = pos
                return _short(pos + 1, self.limit)
            t = buf[pos]
            if t == TType.STOP:
                self.pos = pos + 1
                self.stack.pop()
                return True
            if t not in _B_TYPES:
                raise ThriftError(MALFORMED, f"unknown field type {t} at offset {pos}")
            if pos + 3 > n:
                self.pos = pos
                return _short(pos + 3, self.limit)
            width = _B_WIDTH.get(t)
            if width is not None:
                end = pos + 3 + width
            elif t == TType.STRING and pos + 7 <= n:
                (length,) = unpack_from(">i", buf, pos + 3)
                if length < 0:
                    raise ThriftError(MALFORMED, f"negative string length {length}")
                end = pos + 7 + length
            else:
                end = n + 1  # composite, or the length is not here: generic steps
            if end > n:
                self.pos = pos + 3
                frame[2] = t
                return True
            pos = end

    def _value_binary(self, buf: bytes | bytearray, n: int, t: int) -> bool:
        pos = self.pos
        width = _B_WIDTH.get(t)
        if width is not None:
            end = pos + width
        elif t == TType.STRING:
            if pos + 4 > n:
                return _short(pos + 4, self.limit)
            (length,) = unpack_from(">i", buf, pos)
            if length < 0:
                raise ThriftError(MALFORMED, f"negative string length {length}")
            end = pos + 4 + length
        elif t == TType.STRUCT:
            self._push([_STRUCT, 0, -1, 0])
            return True
        elif t == TType.LIST or t == TType.SET:
            if pos + 5 > n:
                return _short(pos + 5, self.limit)
            (size,) = unpack_from(">i", buf, pos + 1)
            self._container(buf[pos], -1, size, pos + 5, _B_TYPES)
            self._push([_LIST, size, buf[pos], 0])
            return True
        elif t == TType.MAP:
            if pos + 6 > n:
                return _short(pos + 6, self.limit)
            (size,) = unpack_from(">i", buf, pos + 2)
            self._container(buf[pos], buf[pos + 1], size, pos + 6, _B_TYPES)
            self._push([_MAP, 2 * size, buf[pos], buf[pos + 1]])
            return True
        else:
            raise ThriftError(MALFORMED, f"unknown value type {t} at offset {pos}")
        if end > n:
            return _short(end, self.limit)
        self.pos = end
        return True

    def _container(self, t1: int, t2: int, size: int, end: int, valid: frozenset[int]) -> None:
        """Check a container header; ``end`` is where its elements start."""
        if size < 0 or size > _MAX_SIZE:
            raise ThriftError(MALFORMED, f"invalid container size {size}")
        if size and (t1 not in valid or (t2 >= 0 and t2 not in valid)):
            bad = t1 if t1 not in valid else t2
            raise ThriftError(MALFORMED, f"unknown element type {bad}")
        if end + size > self.limit:  # every element takes at least one byte
            _short(end + size, self.limit)
        self.pos = end

    # --- compact protocol --------------------------------------------------------------
    def _fields_compact(self, buf: bytes | bytearray, n: int, frame: list[int]) -> bool:
        """As :meth:`_fields_binary`, for the compact protocol."""
        pos = self.pos
        while True:
            if pos >= n:
                self.pos = pos
                return _short(pos + 1, self.limit)
            b = buf[pos]
            t = b & 0x0F
            if t == 0:  # STOP
                self.pos = pos + 1
                self.stack.pop()
                return True
            if t > C_UUID:
                raise ThriftError(MALFORMED, f"unknown compact field type {t} at offset {pos}")
            start = pos + 1
            if b < 0x10:  # no delta: the field id follows as a zig-zag varint
                value, start = read_varint(buf, start, n, 3)
                if value < 0:
                    self.pos = pos
                    return _short(start + 1, self.limit)
            if t == C_TRUE or t == C_FALSE:  # a bool field's value is its type
                pos = start
                continue
            width = _C_WIDTH.get(t)
            if width is not None:
                end = start + width
            elif t in _C_VARINT:
                value, end = read_varint(buf, start, n, _C_VARINT[t])
                if value < 0:
                    end = n + 1
            elif t == C_BINARY:
                length, end = read_varint(buf, start, n, 5)
                end = n + 1 if length < 0 or length > _MAX_SIZE else end + length
            else:
                end = n + 1  # composite: generic steps
            if end > n:
                self.pos = start
                frame[2] = t
                return True
            pos = end

    def _varint_run(self, buf: bytes | bytearray, n: int, frame: list[int], most: int) -> bool:
        """Skip as many varint list elements as the buffer holds."""
        pos = self.pos
        remaining = frame[1]
        while remaining:
            value, end = read_varint(buf, pos, n, most)
            if value < 0:
                break
            pos = end
            remaining -= 1
        progressed = pos != self.pos
        self.pos = pos
        frame[1] = remaining
        if not progressed:
            return _short(pos + 1, self.limit)
        return True

    def _value_compact(self, buf: bytes | bytearray, n: int, t: int) -> bool:
        pos = self.pos
        width = _C_WIDTH.get(t)
        if width is not None:
            end = pos + width
        elif t in _C_VARINT:
            value, end = read_varint(buf, pos, n, _C_VARINT[t])
            if value < 0:
                return _short(end + 1, self.limit)
        elif t == C_BINARY:
            length, start = read_varint(buf, pos, n, 5)
            if length < 0:
                return _short(start + 1, self.limit)
            if length > _MAX_SIZE:
                raise ThriftError(MALFORMED, f"invalid binary length {length}")
            end = start + length
        elif t == C_STRUCT:
            self._push([_STRUCT, 0, -1, 0])
            return True
        elif t == C_LIST or t == C_SET:
            return self._list_compact(buf, n, pos)
        elif t == C_MAP:
            return self._map_compact(buf, n, pos)
        else:
            raise ThriftError(MALFORMED, f"unknown compact value type {t} at offset {pos}")
        if end > n:
            return _short(end, self.limit)
        self.pos = end
        return True

    def _list_compact(self, buf: bytes | bytearray, n: int, pos: int) -> bool:
        if pos >= n:
            return _short(pos + 1, self.limit)
        b = buf[pos]
        size, end = b >> 4, pos + 1
        if size == 15:
            size, end = read_varint(buf, end, n, 5)
            if size < 0:
                return _short(end + 1, self.limit)
        self._container(b & 0x0F, -1, size, end, _C_TYPES)
        self._push([_LIST, size, b & 0x0F, 0])
        return True

    def _map_compact(self, buf: bytes | bytearray, n: int, pos: int) -> bool:
        size, end = read_varint(buf, pos, n, 5)
        if size < 0:
            return _short(end + 1, self.limit)
        if size == 0:
            self.pos = end
            return True
        if end >= n:
            return _short(end + 1, self.limit)
        kv = buf[end]
        self._container(kv >> 4, kv & 0x0F, size, end + 1, _C_TYPES)
        self._push([_MAP, 2 * size, kv >> 4, kv & 0x0F])
        return True


_C_TYPES = frozenset(range(1, C_UUID + 1))
