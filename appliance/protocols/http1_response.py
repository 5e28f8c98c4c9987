"""HTTP/1.1 responses from an upstream: framing by llhttp, heads and bodies passed raw.

Theory of operation: an upstream connection carries one request at a time, so a response
always starts where the previous one ended. llhttp (through httptools) validates the
response and finds its end, but Python is called only at message boundaries
(``on_message_begin``, ``on_headers_complete``, ``on_message_complete``): the head is
taken as the raw bytes up to the blank line and rewritten with a few byte operations
(:func:`rewrite_head`), and body bytes are passed on exactly as received, chunked framing
and trailers included. That keeps per-response Python work small and constant.

Events are recorded while llhttp runs and handed to the handler after it returns, so that a
violation found later in the same read (bytes after a complete response, a body after a
HEAD response) is raised before anything of that read is passed on.

HTTP/1.0 clients cannot read chunked bodies: for them ``expect(..., decode=True)`` has llhttp
deliver the de-chunked body instead, and the client connection is closed at the end.
"""

from __future__ import annotations

from typing import Any, Protocol

import httptools

from appliance.protocols.http1 import HttpError

_IDLE, _HEAD, _INTERIM, _BODY, _DONE, _TUNNEL = range(6)

# Headers that belong to one connection (RFC 9110 7.6.1) are removed from response heads.
# Transfer-Encoding is kept when the body is passed on raw (the framing is unchanged);
# Upgrade is kept on a 101.
# In responses, TE and Proxy-Connection are not defined (they are request fields) and Upgrade
# only means something where Connection names it, so two scans find what must go; the
# rest is what Connection names.
_CONNECTION = b"\r\nconnection:"
_HOP_NEEDLES = (_CONNECTION, b"\r\nkeep-alive:")
_CONNECTION_PLAIN = frozenset({b"", b"keep-alive", b"close"})


class Handler(Protocol):
    def on_head(self, head: ResponseHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...


class ResponseHead:
    """A response head as received: the raw bytes and what the proxy must know of them."""

    __slots__ = ("status", "keep_alive", "raw", "low", "length", "chunked", "decoded")

    def __init__(self, status: int, keep_alive: bool, raw: bytes) -> None:
        self.status = status
        self.keep_alive = keep_alive
        self.raw = raw
        self.low = low = raw.lower()
        self.length = b"\r\ncontent-length:" in low
        # llhttp refuses a response with both (strict mode), so a length means no chunks.
        self.chunked = not self.length and b"\r\ntransfer-encoding:" in low and (
            b"chunked" in b"".join(header_values(low, b"transfer-encoding")))
        self.decoded = False  # the body events carry de-chunked bytes

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status}>"

    @property
    def delimited_by_close(self) -> bool:
        return not self.length and not self.chunked


def header_values(low: bytes, name: bytes) -> list[bytes]:
    """Values of every ``name`` line in a lowercased head."""
    out = []
    needle = b"\r\n" + name + b":"
    pos = low.find(needle)
    while pos >= 0:
        start = pos + len(needle)
        end = low.find(b"\r\n", start)
        out.append(low[start:end].strip())
        pos = low.find(needle, end)
    return out


def rewrite_head(head: ResponseHead, via: bytes, *, connection: bytes | None,
                 keep_upgrade: bool = False) -> bytes:
    """The head for the client: hop-by-hop lines (and those named by Connection) removed,
    ``Via`` and the proxy's own ``Connection`` added; everything else byte for byte."""
    raw, low = head.raw, head.low
    if raw.startswith(b"HTTP/1.0 "):  # we speak HTTP/1.1 to the client, whatever upstream did
        raw = b"HTTP/1.1 " + raw[9:]
        low = b"http/1.1 " + low[9:]
    if keep_upgrade:
        tail = b"\r\nvia: " + via + b"\r\nconnection: upgrade\r\n\r\n"
    elif connection is not None:
        tail = b"\r\nvia: " + via + b"\r\nconnection: " + connection + b"\r\n\r\n"
    else:
        tail = b"\r\nvia: " + via + b"\r\n\r\n"
    # The common heads first: no Connection line, or one that only says keep-alive/close.
    if not head.decoded and b"\r\nkeep-alive:" not in low:
        pos = low.find(_CONNECTION)
        if pos < 0:
            return raw[:-4] + tail
        end = low.find(b"\r\n", pos + 2)
        if low[pos + 13:end].strip() in _CONNECTION_PLAIN and low.find(_CONNECTION, end) < 0:
            return raw[:pos] + raw[end:-4] + tail
    return _cut_hop_by_hop(raw, low, head, keep_upgrade) + tail


def _cut_hop_by_hop(raw: bytes, low: bytes, head: ResponseHead, keep_upgrade: bool) -> bytes:
    """The raw head without its hop-by-hop lines and its final blank line."""
    cuts: list[tuple[int, int]] = []
    named: list[bytes] = []
    for needle in _HOP_NEEDLES:
        pos = low.find(needle)
        while pos >= 0:
            end = low.find(b"\r\n", pos + 2)
            cuts.append((pos, end))
            if needle == _CONNECTION:
                named.extend(low[pos + len(needle):end].split(b","))
            pos = low.find(needle, end)
    if head.decoded:
        named.append(b"transfer-encoding")
    for token in named:  # headers the upstream declared hop-by-hop (Upgrade, mostly)
        name = token.strip()
        if name in _CONNECTION_PLAIN or (keep_upgrade and name == b"upgrade"):
            continue
        needle = b"\r\n" + name + b":"
        pos = low.find(needle)
        while pos >= 0:
            end = low.find(b"\r\n", pos + 2)
            cuts.append((pos, end))
            pos = low.find(needle, end)
    if cuts:
        cuts.sort()
        parts, last = [], 0
        for start, end in cuts:
            if start >= last:  # a line named twice is cut once
                parts.append(raw[last:start])
                last = end
        parts.append(raw[last:])
        raw = b"".join(parts)
    return raw[:-4]


class _Decoding:
    """llhttp callbacks that also take the de-chunked body (for HTTP/1.0 clients)."""

    __slots__ = ("p",)

    def __init__(self, parser: ResponseParser) -> None:
        self.p = parser

    def on_message_begin(self) -> None:
        self.p.on_message_begin()

    def on_headers_complete(self) -> None:
        self.p.on_headers_complete()

    def on_message_complete(self) -> None:
        self.p.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self.p.on_decoded_body(body)


class ResponseParser:
    """Parses the responses on one upstream connection. Call :meth:`expect` before each."""

    def __init__(self, handler: Any, *, max_header_bytes: int = 65536) -> None:
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self._decode = False
        self._parser = httptools.HttpResponseParser(self)
        self._method = b""
        self._state = _IDLE
        self._fresh = False
        self._held = b""
        self._data = b""
        self._start = 0  # where the next head starts in _data
        self._body_from = -1  # where raw body bytes start in _data; -1: none in this read
        self._events: list[tuple[int, Any]] = []
        self._tunnel_at = -1

    def expect(self, method: bytes, *, decode: bool = False) -> None:
        """The next response answers ``method``; ``decode`` de-chunks its body."""
        self._method = method
        if self._fresh or decode != self._decode:
            self._decode = decode
            self._parser = httptools.HttpResponseParser(_Decoding(self) if decode else self)
            self._fresh = False
        self._state = _IDLE
        self._held = b""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> int | None:
        """Parse ``data`` and pass its events on; returns where tunnel bytes start after a
        101 or a 2xx to CONNECT, else None. Raises :class:`HttpError` (502)."""
        if self._state == _TUNNEL:
            return 0
        self._data = data
        self._start = 0
        self._body_from = 0 if self._state == _BODY and not self._decode else -1
        events = self._events = []
        offset: int | None = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = int(exc.args[0])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _TunnelStart):
                offset = self._tunnel_at
            elif isinstance(cause, HttpError):
                raise _invalid(cause.reason) from None
            else:
                raise
        except httptools.HttpParserError as exc:
            raise _invalid(str(exc) or type(exc).__name__) from None
        if self._state == _HEAD:
            self._hold(data[self._start:])
        elif self._body_from >= 0 and self._body_from < len(data) and self._state == _BODY:
            events.append((1, data[self._body_from:]))
        self._emit(events)
        return offset

    def _hold(self, part: bytes) -> None:
        self._held += part
        if len(self._held) > self.max_header_bytes:
            raise _invalid("response head too large")

    def _emit(self, events: list[tuple[int, Any]]) -> None:
        handler = self.handler
        for kind, value in events:
            if kind == 0:
                handler.on_head(value)
            elif kind == 1:
                handler.on_body(value)
            else:
                handler.on_end()

    # --- llhttp callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._state == _DONE:
            raise HttpError(502, "bytes after the end of the response")
        self._state = _HEAD

    def on_headers_complete(self) -> None:
        data = self._data
        if self._held:
            joined = self._held + data
            i = joined.find(b"\r\n\r\n", max(0, len(self._held) - 3))
            if i < 0:
                raise HttpError(502, "response head does not end with CRLF CRLF")
            raw, end = joined[: i + 4], i + 4 - len(self._held)
            self._held = b""
        else:
            i = data.find(b"\r\n\r\n", self._start)
            if i < 0:
                raise HttpError(502, "response head does not end with CRLF CRLF")
            raw, end = data[self._start : i + 4], i + 4
        if len(raw) > self.max_header_bytes:
            raise HttpError(502, "response head too large")
        p = self._parser
        head = ResponseHead(p.get_status_code(), p.should_keep_alive(), raw)
        head.decoded = self._decode
        self._events.append((0, head))
        status = head.status
        if status < 200:
            self._state = _TUNNEL if status == 101 else _INTERIM
            self._start = end
        elif self._method == b"CONNECT" and status < 300:
            self._state = _TUNNEL
            self._tunnel_at = end
            raise _TunnelStart()  # stop llhttp: the rest is the tunnel's
        elif self._method == b"HEAD":
            # llhttp cannot be told a response answers HEAD: end it here; the next
            # response gets a fresh parser (see expect()).
            if data[end:].strip():
                raise HttpError(502, "bytes after a response to HEAD")
            self._events.append((2, None))
            self._state = _DONE
            self._fresh = True
        else:
            self._state = _BODY
            self._body_from = -1 if self._decode else end

    def on_decoded_body(self, body: bytes) -> None:
        if self._state == _BODY:
            self._events.append((1, bytes(body)))

    def on_message_complete(self) -> None:
        state = self._state
        if state == _INTERIM:
            self._events.append((2, None))
            self._state = _IDLE
        elif state == _BODY:
            if self._body_from >= 0 and self._body_from < len(self._data):
                self._events.append((1, self._data[self._body_from:]))
            self._body_from = -1
            self._events.append((2, None))
            self._state = _DONE


class _TunnelStart(Exception):
    """Raised inside a callback to stop parsing where a CONNECT tunnel begins."""


def _invalid(reason: str) -> HttpError:
    reason = reason.replace("\r", " ").replace("\n", " ")
    return HttpError(502, "upstream sent an invalid response: " + reason)
