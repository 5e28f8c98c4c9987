"""HTTP/1.1 requests on httptools (llhttp), without I/O; shared HTTP/1 pieces.

Theory of operation: the proxy never buffers a whole message. The request parser takes
bytes and calls a handler as parts of requests complete: ``on_head(head)``,
``on_body(bytes)`` and ``on_end(trailers)``. Heads are rewritten for the next hop
(:func:`serialize_request`): hop-by-hop headers are dropped, ``Via`` is added, and a chunked
body is re-chunked as it streams through. Responses are parsed by
:mod:`appliance.protocols.http1_response`. llhttp rejects request-smuggling shapes
(Content-Length with Transfer-Encoding, duplicate lengths, bad chunk sizes); every rejection
becomes a :class:`HttpError` carrying the status code to answer with.

Limits (head size, target length) are enforced here, while bytes arrive, so an oversized head
is refused before it is held in memory.
"""

from __future__ import annotations

from typing import Any, Protocol

import httptools

# Headers that describe one connection, not the message (RFC 9110 7.6.1). Transfer-Encoding
# is re-derived for each hop; Upgrade is re-added when a tunnel is being negotiated.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
    b"upgrade",
})

STATUS_REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 204: b"No Content",
    400: b"Bad Request", 404: b"Not Found", 408: b"Request Timeout",
    413: b"Content Too Large", 414: b"URI Too Long",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}


class HttpError(Exception):
    """Input the proxy refuses; ``status`` is the response to send, ``reason`` the cause."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class Handler(Protocol):
    def on_head(self, head: Any) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None: ...


class RequestHead:
    """A request head as parsed. Header names keep their case; hop-by-hop headers are noted
    in the fields below, not kept in ``headers``."""

    __slots__ = (
        "method", "target", "version", "headers", "keep_alive", "chunked", "content_length",
        "connection_tokens", "upgrade", "via", "expect_continue", "host", "has_deadline",
        "has_trace",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.chunked = False
        self.content_length: int | None = None
        self.connection_tokens: list[bytes] = []
        self.upgrade: bytes | None = None
        self.via: list[bytes] = []
        self.expect_continue = False
        self.host: bytes | None = None
        self.has_deadline = False  # an l5d-ctx-deadline header came (noted while parsing)
        self.has_trace = False  # a trace-propagation header came (W3C, B3)

    def __repr__(self) -> str:
        return f"<RequestHead {self.method!r} {self.target!r} HTTP/{self.version.decode()}>"

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def end_to_end(self) -> list[tuple[bytes, bytes]]:
        """Headers minus any named by Connection, in order."""
        drop = self.connection_tokens
        if not drop:
            return self.headers
        return [(n, v) for n, v in self.headers if n.lower() not in drop]


# Trace-propagation headers (as appliance.telemetry.propagation reads them), noted while
# parsing so a request without any skips the tracer's header scan.
TRACE_HEADERS = frozenset({
    b"traceparent", b"tracestate", b"b3", b"x-b3-traceid", b"x-b3-spanid",
    b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags",
})


def _note_header(head: RequestHead, lname: bytes, value: bytes) -> bool:
    """Record what a special header says; True if it is hop-by-hop (not forwarded)."""
    if lname == b"content-length":
        head.content_length = int(value)  # llhttp has validated it
        return False
    if lname == b"transfer-encoding":
        head.chunked = value.strip().lower().endswith(b"chunked")
        return True
    if lname == b"connection":
        head.connection_tokens.extend(
            t.strip().lower() for t in value.split(b",") if t.strip()
        )
        return True
    if lname == b"upgrade":
        head.upgrade = value
        return True
    if lname == b"via":
        head.via.append(value)
        return False
    if lname == b"l5d-ctx-deadline":
        head.has_deadline = True
        return False
    if lname in TRACE_HEADERS:
        head.has_trace = True
        return False
    return lname in HOP_BY_HOP


_SPECIAL = frozenset({
    b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
    b"proxy-connection", b"te", b"upgrade", b"via", b"l5d-ctx-deadline",
}) | TRACE_HEADERS
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}


class RequestParser:
    """Parses a stream of requests from a client (pipelining included)."""

    def __init__(self, handler: Handler, *, max_header_bytes: int = 65536,
                 max_uri_bytes: int = 8192) -> None:
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.max_uri_bytes = max_uri_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._head = RequestHead()
        self.in_head = False  # a request head has started and is not complete
        self._head_bytes = 0  # size of the header lines of this head so far
        self._raw_head_bytes = 0  # bytes read while this head was incomplete
        self._url: list[bytes] = []
        self._url_len = 0
        self._trailers: list[tuple[bytes, bytes]] | None = None

    def feed(self, data: bytes) -> int | None:
        """Parse ``data``; returns the offset where tunnel bytes start after an upgrade or
        CONNECT request, else None. Raises :class:`HttpError` on bad input.

        This is the one place where httptools errors enter: they leave as HttpError."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return int(exc.args[0])
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HttpError):
                raise exc.__context__ from None
            raise
        except httptools.HttpParserError as exc:
            raise HttpError(400, "malformed request: " + _describe(exc)) from None
        if self.in_head:
            # httptools holds a partial header line itself: bound what it may hold.
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.max_header_bytes:
                raise HttpError(431, "request header fields too large")
        return None

    # --- httptools callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head = True
        self._head_bytes = 0
        self._raw_head_bytes = 0
        self._head = RequestHead()
        self._url = []
        self._url_len = 0

    def on_url(self, url: bytes) -> None:
        self._url_len += len(url)
        if self._url_len > self.max_uri_bytes:
            raise HttpError(414, "request target too long")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:  # after the head: chunked trailers
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_header_bytes:
            raise HttpError(431, "request header fields too large")
        lname = name.lower()
        if lname in _SPECIAL and _note_header(self._head, lname, value):
            return
        if lname == b"host":
            self._head.host = value
        self._head.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        head = self._head
        p = self._parser
        head.method = p.get_method()
        head.target = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        head.version = _VERSIONS.get(p.get_http_version(), b"1.1")
        head.keep_alive = p.should_keep_alive()
        if head.version == b"1.1" and head.has_body:
            head.expect_continue = any(
                n.lower() == b"expect" and v.strip().lower() == b"100-continue"
                for n, v in head.headers)
        if head.method == b"CONNECT":
            head.upgrade = None
        elif head.upgrade is not None and b"upgrade" not in head.connection_tokens:
            head.upgrade = None  # Upgrade only counts when Connection names it
        self.handler.on_head(head)

    def on_body(self, body: bytes) -> None:
        self.handler.on_body(body)

    def on_message_complete(self) -> None:
        trailers, self._trailers = self._trailers, None
        self.handler.on_end(trailers)


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.replace("\r", " ").replace("\n", " ")


# --- serialization -------------------------------------------------------------------

def _header_block(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    out = []
    for name, value in headers:
        out.append(name + b": " + value + b"\r\n")
    return out


def serialize_request(head: RequestHead, via: bytes, *, upgrade: bool = False) -> bytes:
    """The request head as sent upstream (always HTTP/1.1, keep-alive)."""
    parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
    parts += _header_block(head.end_to_end())
    if head.chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if upgrade and head.upgrade is not None:
        parts.append(b"connection: upgrade\r\nupgrade: " + head.upgrade + b"\r\n")
    parts.append(b"via: " + via + b"\r\n\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: list[tuple[bytes, bytes]] | None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(_header_block(trailers)) + b"\r\n"


def body_piece(data: bytes, end: bool, chunked: bool) -> bytes:
    """A piece of a body as sent: ``data`` itself, or when ``chunked`` its chunk (none
    for no data) followed at ``end`` by the last chunk."""
    if not chunked:
        return data
    piece = chunk(data) if data else b""
    return piece + b"0\r\n\r\n" if end else piece


def error_response(status: int, cause: str, via: bytes, *, close: bool) -> bytes:
    """A proxy-generated response: a one-line body and ``l5d-proxy-error`` naming the cause."""
    body = cause.encode("ascii", "replace") + b"\n"
    reason = STATUS_REASONS.get(status, b"Error")
    return b"".join([
        b"HTTP/1.1 %d %b\r\n" % (status, reason),
        b"content-type: text/plain\r\n",
        b"content-length: %d\r\n" % len(body),
        b"l5d-proxy-error: " + cause.encode("ascii", "replace") + b"\r\n",
        b"connection: close\r\n" if close else b"",
        b"via: " + via + b"\r\n\r\n",
        body,
    ])


def response_has_body(status: int, request_method: bytes) -> bool:
    return not (request_method == b"HEAD" or status in (204, 304) or 100 <= status < 200)


def proxy_target(head: RequestHead) -> tuple[str, int, bytes]:
    """For a request sent to the proxy on purpose (``http_proxy``): the host and port it is
    for, and the origin-form target to send there. ``CONNECT host:port`` gives its
    authority (and an empty target); other methods need an absolute ``http://`` URI.
    Raises HttpError(400) for anything else."""
    if head.method == b"CONNECT":
        host, port = _authority(head.target, None)
        return host, port, b""
    target = head.target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() != b"http":
        if sep and scheme.lower() == b"https":
            raise HttpError(400, "explicit proxy: send https:// URLs through CONNECT "
                                 "(https_proxy), not as absolute-form requests")
        raise HttpError(400, "explicit proxy: the request target must be an absolute "
                             "http:// URI (or use CONNECT)")
    slash = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=-1)
    authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    if path.startswith(b"?"):
        path = b"/" + path
    if b"@" in authority:
        raise HttpError(400, "explicit proxy: userinfo in the URI is not allowed")
    host, port = _authority(authority, 80)
    return host, port, path


def _authority(authority: bytes, default_port: int | None) -> tuple[str, int]:
    text = authority.decode("latin-1")
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1:]
        if end < 0 or (rest and not rest.startswith(":")):
            raise HttpError(400, f"explicit proxy: bad authority {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not port_text:
        if default_port is None:
            raise HttpError(400, f"explicit proxy: CONNECT needs host:port, got {text!r}")
        return host, default_port
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise HttpError(400, f"explicit proxy: bad authority {text!r}")
    return host, int(port_text)
