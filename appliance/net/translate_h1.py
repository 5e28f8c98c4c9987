"""HTTP/2 clients to HTTP/1.1-only servers: one HTTP/2 stream as one HTTP/1.1 exchange.

Theory of operation: ``H2Pool.attach`` sends a stream here instead of to an HTTP/2
upstream when its endpoint is on an ``http1_upstream_ports`` port (gRPC excepted: it
needs HTTP/2), or when an inbound request carries ``l5d-orig-proto: HTTP/1.1`` (linkerd's
mesh downgrade: the peer proxy upgraded an HTTP/1.1 request to HTTP/2 for the hop, and
the app behind us gets it back as HTTP/1.1; its response carries the same header back).

:class:`H1Conn` is an HTTP/1.1 connection to the endpoint that carries one stream at a
time and is pooled (:class:`H1Pool`, idle connections per endpoint, trimmed by the pool's
sweep) between streams. For the stream machinery of :mod:`appliance.net.h2stream` it *is*
the stream's upstream side, with the connection surface it uses on an ``Http2Upstream``
(``conn.send_data``, ``send_headers`` for trailers, ``ack``, ``reset``, ``window``): the
request head is written as HTTP/1.1 (:mod:`appliance.protocols.h2translate`), the body as
is under the request's ``content-length``, else chunked, with trailers as chunked trailer
fields. The response is parsed by llhttp (httptools) into a head, body and trailers that
go to the client through ``h2stream`` as if an HTTP/2 upstream had sent them.

Flow control stays end to end: the client's DATA is credited once written to this
connection, and not while its socket is full (``pause_writing``); response bytes not yet
passed to the client past ``_HIGH`` pause reading from the endpoint until the client has
taken them (``ack``). A response that ends before its request did, a cancelled stream or a
broken response closes the connection instead of pooling it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import httptools

from appliance.net.addr import OrigDst
from appliance.net.h2stream import (
    H2Stream,
    drain,
    flush_all,
    respond_error,
    response_head,
    to_downstream,
    to_upstream,
    touch,
)
from appliance.protocols.h2send import CAN_SEND, HALF_LOCAL, Stream
from appliance.protocols.h2translate import (
    TranslateError,
    has_header,
    request_to_h1,
    response_to_h2,
    trailers_to_h1,
    trailers_to_h2,
)
from appliance.protocols.http1 import body_piece

if TYPE_CHECKING:
    from appliance.net.listener import Direction

_HIGH = 64 * 1024  # response bytes the client has not taken before reading pauses
_LOW = 16 * 1024
_BIG = 1 << 30
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
ORIG_PROTO = (b"l5d-orig-proto", b"HTTP/1.1")
_INFO, _HEAD, _BODY, _END = range(4)  # parsed parts of a response, in the order they came


def wants_http1(d: Direction, stream: H2Stream, dst: OrigDst) -> bool:
    """Does this stream go to its endpoint as HTTP/1.1?"""
    if stream.orig_proto:
        return True
    side = d.config.outbound if d.name == "outbound" else d.config.inbound
    ports = side.http1_upstream_ports
    if not ports or stream.grpc:
        return False
    origin = getattr(stream.server, "dst", None)
    return dst.port in ports or (origin is not None and origin.port in ports)


class H1Conn(asyncio.Protocol):
    """An HTTP/1.1 connection carrying translated HTTP/2 streams, one at a time."""

    def __init__(self, d: Direction, pool: H1Pool, key: OrigDst) -> None:
        self.d = d
        self.pool = pool
        self.key = key
        self.transport: Any = None
        self.tcp = d.tcp_stats("http/1", "dst")
        self.stream: H2Stream | None = None
        self.conn = self  # what h2stream calls the upstream's codec
        self.closed = False
        self.write_paused = False
        self.dirty = False
        self.out: list[bytes] = []
        self.idle_since = 0.0
        self.max_head = d.config.http.max_header_bytes
        self._exchange_state()

    def _exchange_state(self) -> None:
        self.parser: Any = None
        self.chunked_request = False
        self.method = b""
        self.status = 0
        self.fields: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.in_trailers = False
        self.head_sent = False
        self.complete = False
        self.keep_alive = False
        self.close_delimited = False
        self.unacked = 0
        self.reading_paused = False
        self.events: list[tuple[int, Any]] = []

    # --- asyncio ----------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.opened_at = self.tcp.open()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tcp.close(self.opened_at)
        self.transport = None
        self.closed = True
        self.pool.forget(self)
        stream = self.stream
        if stream is None or stream.done or self.complete:
            return
        if self.head_sent and self.close_delimited and exc is None:
            self.complete = True  # the close is the end of this body
            to_downstream(stream, b"", True, 0)
        else:
            self.d.registry.error(self.d.name, "upstream_failed")
            respond_error(stream, 502, "upstream closed the connection" if exc is None
                          else f"upstream connection failed: {exc}")
        flush_all()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        stream = self.stream
        if stream is not None and stream.to_up:
            drain(stream, down=False)
            flush_all()

    def flush(self) -> None:
        out, self.out = self.out, []
        if out and self.transport is not None and not self.transport.is_closing():
            data = out[0] if len(out) == 1 else b"".join(out)
            self.tcp.write_bytes += len(data)
            self.transport.write(data)

    def write(self, data: bytes) -> None:
        self.out.append(data)
        touch(self)

    # --- a stream starts --------------------------------------------------------------
    def begin(self, stream: H2Stream) -> None:
        """Send ``stream``'s request on this (idle, connected) connection."""
        self._exchange_state()
        headers = [h for h in stream.headers if h != ORIG_PROTO]
        has_len = has_header(headers, b"content-length")
        method = next((v for n, v in headers if n == b":method"), b"")
        if method == b"CONNECT":
            respond_error(stream, 502, "CONNECT cannot be translated to HTTP/1.1")
            self.pool.put(self)
            return
        self.chunked_request = not stream.request_ended and not has_len
        if stream.request_ended and not has_len and method in _BODY_METHODS:
            headers.append((b"content-length", b"0"))
        try:
            head = request_to_h1(headers, chunked=self.chunked_request)
        except TranslateError as exc:
            respond_error(stream, exc.status, exc.reason)
            self.pool.put(self)
            return
        self.stream = stream
        self.method = method
        self.parser = httptools.HttpResponseParser(self)
        us = Stream(1, _BIG, 0)
        us.user = stream
        if stream.request_ended:
            us.state = HALF_LOCAL
        stream.up, stream.us = self, us  # type: ignore[assignment]
        self.write(head)
        early, stream.early = stream.early, ()
        for data, end, length in early:
            to_upstream(stream, data, end, length)

    # --- the request side, as h2stream sees it ----------------------------------------
    def window(self, us: Stream) -> int:
        return _BIG if CAN_SEND[us.state] and not self.closed else 0

    def send_data(self, us: Stream, data: bytes, end: bool = False) -> bool:
        if not CAN_SEND[us.state] or self.closed:
            return False
        piece = body_piece(data, end, self.chunked_request)
        if piece:
            self.write(piece)
        if end:
            us.state = HALF_LOCAL
        return True

    def send_headers(self, us: Stream, trailers: Any, end: bool = True) -> bool:
        """Request trailers: chunked trailer fields (dropped under a content-length)."""
        if not CAN_SEND[us.state] or self.closed:
            return False
        if self.chunked_request:
            self.write(trailers_to_h1(trailers))
        us.state = HALF_LOCAL
        return True

    def ack(self, us: Stream | None, n: int) -> None:
        """The client took ``n`` response bytes: read on once it has taken enough."""
        self.unacked -= n
        if self.reading_paused and self.unacked <= _LOW and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def reset(self, us: Stream, code: int) -> None:
        """The stream was cancelled: an HTTP/1.1 request can only be cancelled by closing."""
        if not self.complete and self.transport is not None:
            self.closed = True
            self.transport.abort()

    def stream_done(self, stream: H2Stream) -> None:
        """The stream is over: pool this connection if its exchange ended cleanly."""
        if self.stream is not stream:
            return
        self.stream = None
        reusable = (self.complete and self.keep_alive and self.stream_sent(stream)
                    and not self.closed and self.transport is not None)
        if reusable:
            self.pool.put(self)
        elif self.transport is not None:
            self.flush()
            self.closed = True
            self.transport.close()

    @staticmethod
    def stream_sent(stream: H2Stream) -> bool:
        us = stream.us
        return us is not None and not CAN_SEND[us.state]

    # --- the response -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.tcp.read_bytes += len(data)
        stream = self.stream
        if stream is None or self.complete:  # bytes with no request: a confused server
            self.closed = True
            self.transport.abort()
            return
        self.events = []
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.broken(stream, "upstream switched protocols unasked")
            return
        except httptools.HttpParserCallbackError as exc:
            self.broken(stream, str(exc.__context__ or exc))
            return
        except httptools.HttpParserError as exc:
            self.broken(stream, str(exc) or type(exc).__name__)
            return
        self.deliver(stream)

    def broken(self, stream: H2Stream, why: str) -> None:
        self.d.registry.error(self.d.name, "upstream_failed")
        self.closed = True
        self.transport.abort()
        respond_error(stream, 502, "upstream sent an invalid response: "
                      + why.replace("\r", " ").replace("\n", " "))
        flush_all()

    def deliver(self, stream: H2Stream) -> None:
        """Pass the parsed parts on to the client, in order. A head directly followed by
        its end (no body, no trailers) goes out as one HEADERS frame with END_STREAM."""
        events = self.events
        i, n = 0, len(events)
        while i < n and not stream.done:
            kind, value = events[i]
            i += 1
            if kind == _INFO:
                server = stream.server
                server.conn.send_headers(stream.cs, value)
                touch(server)
            elif kind == _HEAD:
                end = i < n and events[i] == (_END, None)
                i += end
                response_head(stream, value, end)
            elif kind == _BODY:
                self.unacked += len(value)
                to_downstream(stream, value, False, len(value))
            else:
                to_downstream(stream, value or b"", True, 0)
        if self.unacked > _HIGH and not self.reading_paused and not stream.done:
            self.reading_paused = True
            self.transport.pause_reading()

    # --- llhttp callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            raise ValueError("response head too large")
        (self.trailers if self.in_trailers else self.fields).append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        status = p.get_status_code()
        fields, self.fields = self.fields, []
        self.head_size = 0
        if status < 200:
            if status == 101:
                raise ValueError("101 Switching Protocols to a translated request")
            self.events.append((_INFO, response_to_h2(status, fields)))
            return
        headers = response_to_h2(status, fields)
        stream = self.stream
        if stream is not None and stream.orig_proto:
            headers.append(ORIG_PROTO)
        self.head_sent = True
        self.in_trailers = True
        self.keep_alive = p.should_keep_alive()
        lows = {n.lower() for n, _ in fields}
        no_body = self.method == b"HEAD" or status in (204, 304)
        if not no_body and b"content-length" not in lows and not any(
                n.lower() == b"transfer-encoding" and b"chunked" in v.lower()
                for n, v in fields):
            self.close_delimited = True
            self.keep_alive = False
        self.events.append((_HEAD, headers))
        if no_body:
            self.finish(None)

    def on_body(self, body: bytes) -> None:
        if self.head_sent and not self.complete:
            self.events.append((_BODY, bytes(body)))

    def on_message_complete(self) -> None:
        if not self.head_sent:
            self.head_size = 0  # an informational response: the next head follows
            return
        if not self.complete:
            self.finish(trailers_to_h2(self.trailers) if self.trailers else None)

    def finish(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.complete = True
        self.events.append((_END, trailers))


class H1Pool:
    """Idle HTTP/1.1 connections for translated streams, per endpoint."""

    def __init__(self, d: Direction) -> None:
        self.d = d
        self.idle: dict[OrigDst, list[H1Conn]] = {}

    def attach(self, stream: H2Stream, dst: OrigDst) -> None:
        conns = self.idle.get(dst)
        while conns:
            c = conns.pop()
            if c.transport is not None and not c.closed and not c.transport.is_closing():
                c.begin(stream)
                return
        c = H1Conn(self.d, self, dst)
        self.d.spawn(self.connect(c, stream, dst))

    async def connect(self, c: H1Conn, stream: H2Stream, dst: OrigDst) -> None:
        d = self.d
        try:
            await d.connect(lambda: c, dst, alpn="http/1.1")
        except TimeoutError:
            d.registry.error(d.name, "connect_timeout")
            respond_error(stream, 502, f"upstream unreachable: connect to {dst} timed out")
            flush_all()
            return
        except OSError as exc:
            d.registry.error(d.name, getattr(exc, "kind", "connect_refused"))
            reason = getattr(exc, "kind", None) and str(exc) or exc.strerror or str(exc)
            respond_error(stream, 502, f"upstream unreachable: {dst}: {reason}")
            flush_all()
            return
        if stream.done:  # the client left while we dialled: keep the connection
            self.put(c)
            return
        c.begin(stream)
        flush_all()

    def put(self, c: H1Conn) -> None:
        if c.transport is None or c.closed or c.transport.is_closing():
            return
        conns = self.idle.setdefault(c.key, [])
        if len(conns) >= self.d.config.http.pool_max_idle:
            c.closed = True
            c.transport.close()
            return
        c.idle_since = self.d.loop.time()
        conns.append(c)

    def forget(self, c: H1Conn) -> None:
        conns = self.idle.get(c.key)
        if conns and c in conns:
            conns.remove(c)

    def sweep(self, now: float) -> None:
        deadline = now - self.d.config.http.pool_idle_timeout
        for key, conns in list(self.idle.items()):
            for c in [c for c in conns if c.idle_since < deadline]:
                conns.remove(c)
                if c.transport is not None:
                    c.transport.close()
            if not conns:
                del self.idle[key]

    def close_all(self) -> None:
        for conns in self.idle.values():
            for c in conns:
                if c.transport is not None:
                    c.transport.close()
        self.idle.clear()

