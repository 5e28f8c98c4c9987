"""Protocol detection from the first bytes a client sends.

Theory of operation: a connection's first bytes are held (at most ``max_bytes``) and
passed to :func:`detect` after every read. Each check in ``_CHECKS`` looks at the prefix and
answers a protocol, ``NEED_MORE`` (the prefix could still become this protocol) or ``None``
(it cannot). The first protocol answer wins; if no check answers and none needs more, the
stream is opaque. The caller turns ``NEED_MORE`` into opaque when the buffer is full, the
client half-closes, or the detection timeout fires: detection never stalls a connection.

Pure: bytes in, a verdict out. No sockets, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from appliance.protocols.thrift import NEED_MORE_BYTES, sniff


class Protocol(enum.Enum):
    HTTP1 = "http/1"
    HTTP2 = "h2"
    TLS = "tls"
    THRIFT = "thrift"
    OPAQUE = "opaque"


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = _NeedMore()
Verdict = Protocol | _NeedMore

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Methods a request line may start with (RFC 9110, WebDAV, PATCH). Anything else is not
# treated as HTTP/1: a mistaken HTTP guess would break an opaque protocol.
HTTP_METHODS = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"SEARCH",
    b"REPORT", b"MKCALENDAR", b"ACL", b"PURGE",
)
_MAX_METHOD = max(len(m) for m in HTTP_METHODS)
_MAX_REQUEST_LINE = 8192 + 64


def _check_h2(buf: bytes) -> Verdict | None:
    n = min(len(buf), len(H2_PREFACE))
    if buf[:n] != H2_PREFACE[:n]:
        return None
    return Protocol.HTTP2 if n == len(H2_PREFACE) else NEED_MORE


def _check_http1(buf: bytes) -> Verdict | None:
    space = buf.find(b" ", 0, _MAX_METHOD + 1)
    if space < 0:
        if len(buf) > _MAX_METHOD:
            return None
        return NEED_MORE if any(m.startswith(buf) for m in HTTP_METHODS) else None
    if buf[:space] not in HTTP_METHODS:
        return None
    eol = buf.find(b"\r\n")
    if eol < 0:
        # "PRI * HTTP/2.0" is an h2 preface, not an HTTP/1 request; the h2 check runs first.
        if len(buf) >= _MAX_REQUEST_LINE:
            return None
        return NEED_MORE
    line = buf[:eol]
    version = line.rsplit(b" ", 1)[-1]
    if line.count(b" ") >= 2 and version in (b"HTTP/1.1", b"HTTP/1.0"):
        return Protocol.HTTP1
    return None


def _check_tls(buf: bytes) -> Verdict | None:
    # A TLS record carrying a handshake (22), version 3.x, whose first message is a
    # ClientHello (1).
    want = (0x16, 0x03)
    for i, byte in enumerate(buf[:2]):
        if byte != want[i]:
            return None
    if len(buf) >= 3 and buf[2] > 0x04:
        return None
    if len(buf) < 6:
        return NEED_MORE
    return Protocol.TLS if buf[5] == 0x01 else None


def _check_thrift(buf: bytes) -> Verdict | None:
    # Framed or buffered; strict binary, non-strict binary or compact; a CALL or ONEWAY
    # first (appliance.protocols.thrift.sniff). Other variants (THeader, for one) are opaque.
    variant = sniff(buf)
    if variant is NEED_MORE_BYTES:
        return NEED_MORE
    return None if variant is None else Protocol.THRIFT


_CHECKS: tuple[Callable[[bytes], Verdict | None], ...] = (
    _check_h2,
    _check_http1,
    _check_tls,
    _check_thrift,
)


def detect(buf: bytes) -> Verdict:
    """The protocol of a stream that starts with ``buf``, or ``NEED_MORE``."""
    if not buf:
        return NEED_MORE
    need_more = False
    for check in _CHECKS:
        verdict = check(buf)
        if verdict is NEED_MORE:
            need_more = True
        elif verdict is not None:
            return verdict
    return NEED_MORE if need_more else Protocol.OPAQUE


def finish(buf: bytes) -> Protocol:
    """Final verdict when no more bytes will be waited for (full, EOF or timeout)."""
    verdict = detect(buf)
    return verdict if isinstance(verdict, Protocol) else Protocol.OPAQUE
