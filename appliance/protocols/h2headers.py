"""Validation of HTTP/2 request headers, done once where they enter the proxy.

RFC 9113 §8.2-8.3: a request with missing or repeated pseudo-headers, pseudo-headers after
regular ones, uppercase or invalid names, connection-specific headers, or CR/LF/NUL (or
surrounding whitespace) in a value is malformed, and a malformed request is a *stream*
error: that stream is reset with PROTOCOL_ERROR, the connection's other streams go on.
Responses from upstream and trailers follow the same field rules. The connection codec
(:mod:`appliance.protocols.h2conn`) calls these once per distinct header block.

Pure: headers in, the reason they are malformed (or None) out.
"""

from __future__ import annotations

import re

_CONNECTION_SPECIFIC = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
_NAME = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_BAD_VALUE = re.compile(rb"[\r\n\x00]|^[ \t]|[ \t]$")


def request_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why these request headers are malformed, or None if they are fine."""
    pseudo: dict[bytes, bytes] = {}
    regular_seen = False
    for name, value in headers:
        if name.startswith(b":"):
            if regular_seen:
                return f"pseudo-header {name!r} after regular headers"
            if name not in _REQUEST_PSEUDO:
                return f"unknown pseudo-header {name!r}"
            if name in pseudo:
                return f"repeated pseudo-header {name!r}"
            pseudo[name] = value
            continue
        regular_seen = True
        problem = _field_problem(name, value)
        if problem:
            return problem
    method = pseudo.get(b":method")
    if not method:
        return "missing :method"
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if b":authority" not in pseudo or b":scheme" in pseudo or b":path" in pseudo:
            return "CONNECT needs :authority and no :scheme or :path"
        return None
    if not pseudo.get(b":scheme"):
        return "missing :scheme"
    if not pseudo.get(b":path"):
        return "missing or empty :path"
    return None


def response_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why these response headers (from an upstream) are malformed, or None: exactly one
    ``:status`` of three digits, first; no other pseudo-header; the same field rules."""
    status_seen = False
    for i, (name, value) in enumerate(headers):
        if name == b":status":
            if i != 0:
                return ":status is repeated or not first"
            if len(value) != 3 or not value.isdigit():
                return f"invalid :status {value!r}"
            status_seen = True
            continue
        if name.startswith(b":"):
            return f"pseudo-header {name!r} in a response"
        problem = _field_problem(name, value)
        if problem:
            return problem
    return None if status_seen else "missing :status"


def trailers_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why these trailers are malformed, or None."""
    for name, value in headers:
        if name.startswith(b":"):
            return f"pseudo-header {name!r} in trailers"
        problem = _field_problem(name, value)
        if problem:
            return problem
    return None


def _field_problem(name: bytes, value: bytes) -> str | None:
    if not _NAME.match(name):
        return f"invalid header name {name!r} (names are lowercase tokens)"
    if name in _CONNECTION_SPECIFIC:
        return f"connection-specific header {name.decode()!r}"
    if name == b"te" and value.strip().lower() != b"trailers":
        return "te other than 'trailers'"
    if _BAD_VALUE.search(value):
        return f"invalid value for {name.decode()!r} (CR, LF, NUL or surrounding space)"
    if name == b"content-length" and not value.isdigit():
        return "content-length is not a number"
    return None


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None | str:
    """The content-length, None if absent, or the problem (a str) if it is invalid or
    its values disagree."""
    found = None
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit():
                return "content-length is not a number"
            if found is not None and found != int(value):
                return "conflicting content-length values"
            found = int(value)
    return found


def request_info(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, int | None]:
    """(problem or None, content-length or None) for a request head."""
    problem = request_problem(headers)
    if problem is not None:
        return problem, None
    clen = content_length(headers)
    return (clen, None) if isinstance(clen, str) else (None, clen)


def response_info(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, int, int | None]:
    """(problem or None, status, content-length or None) for a response head."""
    problem = response_problem(headers)
    if problem is not None:
        return problem, 0, None
    clen = content_length(headers)
    if isinstance(clen, str):
        return clen, 0, None
    return None, int(headers[0][1]), clen
