"""HTTP/1.1 <-> HTTP/2 message heads (RFC 9113 §8.2.2, §8.3; RFC 9110 §7.6.1), pure.

Theory of operation: a proxy that joins an HTTP/1.1 peer to an HTTP/2 peer rewrites each
head, and nothing else: bodies pass as they are, re-framed by the connection that sends
them. Going to HTTP/2, the connection-specific fields (``Connection`` and every field it
names, ``Keep-Alive``, ``Proxy-Connection``, ``Transfer-Encoding``, ``Upgrade``, and
``TE`` unless it is ``trailers``) are dropped, names are lowercased, and the request line
and ``Host`` become ``:method``, ``:scheme``, ``:authority`` and ``:path`` (the authority of
an absolute-form target wins over ``Host``). Going to HTTP/1.1, the pseudo-header fields
become the request or status line and ``Host``, split ``cookie`` fields are joined with
``"; "`` (RFC 9113 §8.2.3), and the framing (``Content-Length``, chunked, or the end of
the connection) is chosen by the caller from what it knows of the body.

Functions take and give header lists of (name, value) bytes; a problem is raised as
:class:`TranslateError` with the status to answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Headers = list[tuple[bytes, bytes]]

CONNECTION_SPECIFIC = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
})
_NOT_TO_H2 = CONNECTION_SPECIFIC | {b"host", b"te"}
_NOT_TO_H1 = CONNECTION_SPECIFIC | {b"host", b"te", b"cookie"}
REASONS = {
    100: b"Continue", 103: b"Early Hints", 200: b"OK", 201: b"Created", 202: b"Accepted",
    204: b"No Content", 206: b"Partial Content", 301: b"Moved Permanently", 302: b"Found",
    304: b"Not Modified", 307: b"Temporary Redirect", 308: b"Permanent Redirect",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict",
    413: b"Content Too Large", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


class TranslateError(Exception):
    """A message that cannot be expressed in the other version; ``status`` to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The field names a ``Connection`` header names (lowercased)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(named)


def _end_to_end(headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes]) -> Headers:
    """Lowercased fields, minus ``drop`` and whatever ``Connection`` named."""
    named = connection_tokens(headers)
    out = []
    for name, value in headers:
        low = name.lower()
        if low not in drop and low not in named:
            out.append((low, value))
    return out


def split_target(target: bytes) -> tuple[bytes | None, bytes | None, bytes]:
    """(scheme, authority, path) of a request target; absolute form gives all three,
    origin form (``/x``) and asterisk form (``*``) only the path."""
    if target.startswith(b"/") or target == b"*":
        return None, None, target
    scheme, sep, rest = target.partition(b"://")
    if not sep or not scheme.isalpha():
        raise TranslateError(400, f"request target {target[:80]!r} is neither origin nor "
                                  "absolute form")
    authority, slash, path = rest.partition(b"/")
    if not authority:
        raise TranslateError(400, "absolute-form target without an authority")
    return scheme.lower(), authority, slash + path if slash else b"/"


def request_to_h2(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]],
                  *, te_trailers: bool = False) -> Headers:
    """An HTTP/1.1 request head as an HTTP/2 header list (``via`` is the caller's)."""
    headers = list(headers)
    if method == b"CONNECT":
        raise TranslateError(502, "CONNECT cannot be translated to HTTP/2")
    scheme, authority, path = split_target(target)
    if authority is None:
        for name, value in headers:
            if name.lower() == b"host":
                authority = value
                break
    out = [(b":method", method), (b":scheme", scheme or b"http")]
    if authority:
        out.append((b":authority", authority))
    out.append((b":path", path))
    out += _end_to_end(headers, _NOT_TO_H2)
    if te_trailers:
        out.append((b"te", b"trailers"))
    return out


def response_to_h2(status: int, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """An HTTP/1.1 response head (or 1xx) as an HTTP/2 header list. A 1xx or 204 has no
    content (RFC 9110 §8.6): a ``content-length`` on one is dropped."""
    fields = _end_to_end(headers, _NOT_TO_H2)
    if status < 200 or status == 204:
        fields = [(n, v) for n, v in fields if n != b"content-length"]
    return [(b":status", b"%d" % status), *fields]


def trailers_to_h2(trailers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """HTTP/1.1 chunked trailers as HTTP/2 trailers (no pseudo or hop-by-hop fields)."""
    return [(n, v) for n, v in _end_to_end(trailers, _NOT_TO_H2) if not n.startswith(b":")]


def request_to_h1(headers: Sequence[tuple[bytes, bytes]], *, chunked: bool) -> bytes:
    """An HTTP/2 request as an HTTP/1.1 head, ``transfer-encoding: chunked`` if asked."""
    method = path = authority = b""
    fields: list[bytes] = []
    cookies: list[bytes] = []
    host = b""
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            host = value
        elif name not in _NOT_TO_H1:
            fields.append(name + b": " + value + b"\r\n")
    if not method or not path:
        raise TranslateError(400, "an HTTP/2 request without :method or :path")
    authority = authority or host
    head = [method, b" ", path, b" HTTP/1.1\r\n"]
    if authority:
        head.append(b"host: " + authority + b"\r\n")
    head += fields
    if cookies:
        head.append(b"cookie: " + b"; ".join(cookies) + b"\r\n")
    if chunked:
        head.append(b"transfer-encoding: chunked\r\n")
    head.append(b"\r\n")
    return b"".join(head)


def response_to_h1(headers: Sequence[tuple[bytes, bytes]], *, extra: Sequence[bytes] = ()
                   ) -> tuple[int, bytes]:
    """(status, head) of an HTTP/2 response as HTTP/1.1; ``extra`` lines (framing and
    ``connection``, each ending CRLF) are added by the caller."""
    status = int(headers[0][1])
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, REASONS.get(status, b"Status"))]
    for name, value in headers[1:]:
        if name[:1] != b":" and name not in CONNECTION_SPECIFIC:
            lines.append(name + b": " + value + b"\r\n")
    lines += extra
    lines.append(b"\r\n")
    return status, b"".join(lines)


def trailers_to_h1(trailers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The last chunk with HTTP/2 trailers as chunked trailer fields."""
    fields = [n + b": " + v + b"\r\n" for n, v in trailers
              if n[:1] != b":" and n not in _NOT_TO_H1]
    return b"0\r\n" + b"".join(fields) + b"\r\n"


def has_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bool:
    return any(n == name for n, _ in headers)
