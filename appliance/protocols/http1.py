"""HTTP/1.1 message framing on httptools (llhttp), without I/O.

Theory of operation: the proxy never buffers a whole message. A parser takes bytes and calls
a handler as parts of messages complete: ``on_head(head)``, ``on_body(bytes)`` and
``on_end(trailers)``. Heads are rewritten for the next hop (:func:`serialize_request`,
:func:`serialize_response`): hop-by-hop headers are dropped, ``Via`` is added, and framing is
chosen by the proxy (``Content-Length`` kept, chunked re-chunked as it streams through, or
close-delimited). llhttp rejects request-smuggling shapes (Content-Length with
Transfer-Encoding, duplicate lengths, bad chunk sizes); every rejection becomes a
:class:`HttpError` carrying the status code to answer with.

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


class Head:
    """What both requests and responses carry. Header names keep their case."""

    __slots__ = (
        "version", "headers", "keep_alive", "chunked", "content_length", "connection_tokens",
        "upgrade", "via",
    )

    def __init__(self) -> None:
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.chunked = False
        self.content_length: int | None = None
        self.connection_tokens: list[bytes] = []
        self.upgrade: bytes | None = None
        self.via: list[bytes] = []

    def end_to_end(self) -> list[tuple[bytes, bytes]]:
        """Headers minus hop-by-hop ones (and any named by Connection), in order."""
        drop = self.connection_tokens
        if not drop:
            return self.headers
        return [(n, v) for n, v in self.headers if n.lower() not in drop]


class RequestHead(Head):
    __slots__ = ("method", "target", "expect_continue", "host")

    def __init__(self) -> None:
        super().__init__()
        self.method = b""
        self.target = b""
        self.expect_continue = False
        self.host: bytes | None = None

    def __repr__(self) -> str:
        return f"<RequestHead {self.method!r} {self.target!r} HTTP/{self.version.decode()}>"

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class ResponseHead(Head):
    __slots__ = ("status", "reason")

    def __init__(self) -> None:
        super().__init__()
        self.status = 0
        self.reason = b""

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status} HTTP/{self.version.decode()}>"


def _note_header(head: Head, lname: bytes, value: bytes) -> bool:
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
    return lname in HOP_BY_HOP


class _Parser:
    """Shared callback plumbing for request and response parsers."""

    _head: Any
    _parser: Any
    _malformed = "malformed request: "

    def __init__(self, handler: Handler, max_header_bytes: int) -> None:
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self._in_head = False
        self._head_bytes = 0
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self.messages = 0

    # httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # after the head: chunked trailers
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

    def on_body(self, body: bytes) -> None:
        self.handler.on_body(body)

    # the one place where httptools errors enter: mapped to HttpError ----------------
    def _execute(self, data: bytes) -> int | None:
        """Run llhttp over ``data``; the tunnel offset after an upgrade, else None."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return int(exc.args[0])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _TunnelStart):
                raise cause from None
            if isinstance(cause, HttpError):
                raise self._error(cause.status, cause.reason) from None
            raise
        except httptools.HttpParserError as exc:
            raise self._error(400, self._malformed + _describe(exc)) from None
        return None

    def _error(self, status: int, reason: str) -> HttpError:
        return HttpError(status, reason)

    def on_message_complete(self) -> None:
        trailers, self._trailers = self._trailers, None
        self.messages += 1
        self.handler.on_end(trailers)


_SPECIAL = frozenset({
    b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
    b"proxy-connection", b"te", b"upgrade", b"via",
})


class RequestParser(_Parser):
    """Parses a stream of requests from a client (pipelining included)."""

    def __init__(self, handler: Handler, *, max_header_bytes: int = 65536,
                 max_uri_bytes: int = 8192) -> None:
        super().__init__(handler, max_header_bytes)
        self.max_uri_bytes = max_uri_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._head = RequestHead()
        self._url: list[bytes] = []
        self._url_len = 0
        self._raw_head_bytes = 0

    @property
    def in_head(self) -> bool:
        """True while a request head has started but is not complete."""
        return self._in_head

    def feed(self, data: bytes) -> int | None:
        """Parse ``data``; returns the offset where tunnel bytes start after an upgrade or
        CONNECT request, else None. Raises :class:`HttpError` on bad input."""
        offset = self._execute(data)
        if offset is not None:
            return offset
        if self._in_head:
            # httptools holds a partial header line itself: bound what it may hold.
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.max_header_bytes:
                raise HttpError(431, "request header fields too large")
        return None

    def on_message_begin(self) -> None:
        self._in_head = True
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

    def on_headers_complete(self) -> None:
        self._in_head = False
        head = self._head
        p = self._parser
        head.method = p.get_method()
        head.target = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        head.version = p.get_http_version().encode()
        head.keep_alive = p.should_keep_alive()
        head.expect_continue = any(
            n.lower() == b"expect" and v.strip().lower() == b"100-continue"
            for n, v in head.headers
        ) if head.version == b"1.1" and head.has_body else False
        if head.method == b"CONNECT":
            head.upgrade = None
        elif head.upgrade is not None and b"upgrade" not in head.connection_tokens:
            head.upgrade = None  # Upgrade only counts when Connection names it
        self.handler.on_head(head)


class ResponseParser(_Parser):
    """Parses responses from an upstream, one per request sent.

    Call :meth:`expect` before each request is sent, so responses to HEAD (which carry no
    body whatever their Content-Length says) end at the head.
    """

    _malformed = ""

    def __init__(self, handler: Handler, *, max_header_bytes: int = 65536) -> None:
        super().__init__(handler, max_header_bytes)
        self._parser = httptools.HttpResponseParser(self)
        self._head = ResponseHead()
        self._head_only = False
        self._stale = False
        self._connect: bytearray | None = None
        self._tunnel = False

    def expect(self, method: bytes) -> None:
        """Tell the parser which request the next response answers."""
        self._head_only = method == b"HEAD"
        # llhttp cannot know a 2xx answers CONNECT (after which the bytes are a tunnel),
        # so for CONNECT the raw bytes are kept to find where the head ends.
        self._connect = bytearray() if method == b"CONNECT" else None
        if self._stale:  # the previous response ended early (HEAD): start a fresh parser
            self._parser = httptools.HttpResponseParser(self)
            self._stale = False

    def feed(self, data: bytes) -> int | None:
        if self._tunnel:
            return 0
        connect = self._connect
        if connect is not None:
            connect += data
        try:
            return self._execute(data)
        except _TunnelStart:
            end = connect.find(b"\r\n\r\n") + 4 if connect is not None else 0
            return max(0, end - (len(connect or b"") - len(data)))

    def _error(self, status: int, reason: str) -> HttpError:
        return HttpError(502, "upstream sent an invalid response: " + reason)

    def on_message_begin(self) -> None:
        if self._stale:
            raise HttpError(502, "upstream sent bytes after a HEAD response")
        self._in_head = True
        self._head_bytes = 0
        self._head = ResponseHead()

    def on_status(self, reason: bytes) -> None:
        self._head.reason += reason

    def on_headers_complete(self) -> None:
        self._in_head = False
        head = self._head
        p = self._parser
        head.status = p.get_status_code()
        head.version = p.get_http_version().encode()
        head.keep_alive = p.should_keep_alive()
        if head.status != 101:
            head.upgrade = None
        self.handler.on_head(head)
        if self._connect is not None and 200 <= head.status < 300:
            self._tunnel = True
            raise _TunnelStart()  # stop llhttp here; feed() returns where the tunnel starts
        if self._head_only and head.status >= 200:
            # llhttp cannot be told a response answers HEAD: end the message here and parse
            # the next response with a fresh parser.
            self._stale = True
            self.messages += 1
            self.handler.on_end(None)

    def on_body(self, body: bytes) -> None:
        if self._stale:
            raise HttpError(502, "upstream sent a body in response to HEAD")
        self.handler.on_body(body)

    def on_message_complete(self) -> None:
        if self._stale:
            return
        super().on_message_complete()


class _TunnelStart(Exception):
    """Raised inside a callback to stop parsing where a CONNECT tunnel begins."""


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


def serialize_response(head: ResponseHead, via: bytes, *, chunked: bool,
                       connection: bytes | None) -> bytes:
    """A response head for the client; ``connection`` is b"close", b"keep-alive" or None."""
    reason = head.reason or STATUS_REASONS.get(head.status, b"")
    parts = [b"HTTP/1.1 ", str(head.status).encode(), b" ", reason, b"\r\n"]
    parts += _header_block(head.end_to_end())
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if head.status == 101 and head.upgrade is not None:
        parts.append(b"connection: upgrade\r\nupgrade: " + head.upgrade + b"\r\n")
    elif connection is not None:
        parts.append(b"connection: " + connection + b"\r\n")
    parts.append(b"via: " + via + b"\r\n\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: list[tuple[bytes, bytes]] | None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(_header_block(trailers)) + b"\r\n"


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
