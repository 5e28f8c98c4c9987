"""HTTP/1.1 clients to HTTP/2 (h2c) servers: one HTTP/1.1 exchange as one HTTP/2 stream.

Theory of operation: when an HTTP/1.1 request's endpoint is on an ``h2_upstream_ports``
port, :func:`h2_upstream` (called by ``Exchange.send``) hands it to a :class:`H1ToH2`,
which takes the exchange's place on the client connection (``Http1Server.ex``). The
request head becomes an HTTP/2 header list (:mod:`appliance.protocols.h2translate`) on an
:class:`~appliance.net.h2stream.H2Stream` that goes to the shared, multiplexed upstream
pool (``H2Pool``) like any HTTP/2 client's stream: many HTTP/1.1 client connections share
a few upstream connections.

For the stream machinery, a :class:`H1ToH2` *is* the client side of that stream: it has
the small connection surface that :mod:`appliance.net.h2stream` uses on an
``Http2Server`` (``conn.send_headers``, ``send_data``, ``ack``, ``reset``, ``window``), and
turns what the upstream sends into HTTP/1.1 bytes: the status line and head (``Via``
added, framing chosen: the upstream's ``content-length``, else chunked, else, for an
HTTP/1.0 client, the end of the connection), DATA as raw or chunked body, trailers as
chunked trailer fields. So flow control stays end to end: request body bytes are credited
(``ack``) once they are in the upstream's window, and the client is paused while more than
``_HIGH`` bytes wait; when the client's socket is full (``Http1Server.pause_writing`` calls
``up.transport.pause_reading()``, which here is :class:`_ClientFlow`) no more DATA is taken
off the stream, so the upstream's window closes.

The exchange's own bookkeeping (metrics, the router's outcome, the trace span, the
in-flight slot) is done by the original ``Exchange``: success through its ``on_end``,
failures through its ``fail`` (a 502/504 with ``l5d-proxy-error`` before any response
byte, an aborted connection after), a departed client through its ``cancel``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from appliance.net.h2stream import (
    H2Stream,
    cancel_upstream,
    drain,
    flush_all,
    to_upstream,
    touch,
)
from appliance.protocols.h2frames import CANCEL
from appliance.protocols.h2send import Stream
from appliance.protocols.h2translate import (
    TranslateError,
    has_header,
    request_to_h2,
    response_to_h1,
    trailers_to_h1,
    trailers_to_h2,
)
from appliance.protocols.http1 import body_piece

if TYPE_CHECKING:
    from appliance.net.http1 import Exchange

_UPSTREAM_FULL = 2  # Http1Server's pause reason for a full upstream (appliance.net.http1)
_HIGH = 256 * 1024  # request bytes waiting for the upstream's window before the client pauses
_LOW = 64 * 1024
_BIG = 1 << 30


class _NoStats:
    """The stream machinery counts HTTP/2 responses; the exchange counts this one."""

    @staticmethod
    def response(*args: Any) -> None:
        pass


_NO_STATS = _NoStats()


def h2_upstream(ex: Exchange) -> bool:
    """Called by ``Exchange.send``: True if the request was taken over, translated."""
    d = ex.d
    side = d.config.outbound if d.name == "outbound" else d.config.inbound
    ports = side.h2_upstream_ports
    if not ports or (ex.dst.port not in ports and ex.server.dst.port not in ports):
        return False
    head = ex.head
    if head.method == b"CONNECT" or head.upgrade is not None:
        return False  # a tunnel has no HTTP/2 form here: it goes as HTTP/1.1
    H1ToH2(ex).start()
    return True


class _ClientFlow:
    """What ``Http1Server`` pauses when its client's write buffer is full (normally the
    upstream connection's transport): here, taking DATA off the stream."""

    def __init__(self, tx: H1ToH2) -> None:
        self.tx = tx
        self.transport = self

    def pause_reading(self) -> None:
        self.tx.write_paused = True

    def resume_reading(self) -> None:
        tx = self.tx
        tx.write_paused = False
        stream = tx.stream
        if stream is not None and stream.to_down:
            drain(stream, down=True)
            flush_all()


class H1ToH2:
    """One HTTP/1.1 exchange sent as an HTTP/2 stream; stands in for the exchange."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.server = ex.server
        self.d = ex.d
        self.head = ex.head
        self.stream: H2Stream | None = None
        # What h2stream expects of a client connection (see the module docstring).
        self.conn = self
        self.closed = False
        self.send_window = self.max_frame = _BIG
        self.via_header = (b"via", self.d.via)
        self.response_memo: dict[int, Any] = {}
        self.write_paused = False
        self.dirty = False
        self.out: list[bytes] = []
        # What Http1Server and the sweep expect of an exchange.
        self.up = _ClientFlow(self)
        self.waiting_since = 0.0
        self.request_done = False
        self.response_started = False
        self.finished = False
        self.tunnel_early = b""
        # The response, as written to the client.
        self.status = 0
        self.chunked = False
        self.keep = True
        self.ended = False
        self.proxy_error: tuple[int, str] | None = None
        self.reset_code: int | None = None
        self.unsent = 0  # request bytes not yet in the upstream's window
        self.paused = False

    @property
    def stats(self) -> Any:
        return self.ex.stats

    def start(self) -> None:
        ex, head = self.ex, self.head
        try:
            headers = request_to_h2(head.method, head.target, head.end_to_end())
        except TranslateError as exc:
            self.d.registry.error(self.d.name, "translate_refused")
            ex.fail(exc.status, exc.reason, "proxy")
            return
        headers.append(self.via_header)
        self.server.ex = self  # type: ignore[assignment]
        cs = Stream(1, _BIG, 0)  # the client side's stream: open until the response ends
        stream = self.stream = H2Stream(self, cs, headers, False,  # type: ignore[arg-type]
                                        ex.started)
        cs.user = stream
        stream.stats = _NO_STATS
        stream.request_ended = not head.has_body
        stream.head = head.method == b"HEAD"
        self.d.h2pool.attach(stream, ex.dst)

    # --- the request, from Http1Server -----------------------------------------------
    def request_body(self, data: bytes) -> None:
        stream = self.stream
        if stream is None or self.finished:
            return
        self.unsent += len(data)
        to_upstream(stream, data, False, len(data))
        if self.unsent > _HIGH and not self.paused:
            self.paused = True
            self.server.pause(_UPSTREAM_FULL)

    def request_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.request_done = self.ex.request_done = True
        stream = self.stream
        if stream is None or self.finished:
            return
        if not stream.request_ended:
            to_upstream(stream, trailers_to_h2(trailers) if trailers else b"", True, 0)
        if not self.response_started:
            self.waiting_since = self.d.loop.time()

    def cancel(self) -> None:
        """The client went away (or was refused): nothing more either way."""
        self.waiting_since = 0.0
        if self.finished:
            return
        self.finished = True
        stream = self.stream
        if stream is not None and not stream.done:
            stream.done = True
            cancel_upstream(stream, CANCEL)
        self.ex.cancel()

    def response_timeout(self) -> None:
        """Called by the per-second sweep when no response head came in time."""
        self.waiting_since = 0.0
        self.d.registry.error(self.d.name, "response_timeout")
        stream = self.stream
        if stream is not None and not stream.done:
            stream.done = True
            cancel_upstream(stream, CANCEL)
        self.fail(504, f"upstream timeout: no response from {self.ex.dst} within "
                       f"{self.d.config.http.response_timeout:g}s", "timeout")

    # --- the client connection, as h2stream sees it ----------------------------------
    def window(self, cs: Stream) -> int:
        return 0 if self.finished else _BIG

    def ack(self, cs: Stream, n: int) -> None:
        """``n`` request bytes went upstream: let the client send more."""
        self.unsent -= n
        if self.paused and self.unsent <= _LOW:
            self.paused = False
            self.server.resume(_UPSTREAM_FULL)

    def reset(self, cs: Stream, code: int) -> None:
        self.reset_code = code

    def send_headers(self, cs: Stream, headers: Any, end: bool = False) -> bool:
        stream = self.stream
        assert stream is not None
        if self.status:  # trailers (the head went out already)
            if self.chunked:
                self.write(trailers_to_h1(headers))
            self.ended = True
            return True
        status = int(headers[0][1])  # heads start with :status (validated, or our own)
        if status < 200:
            if status != 101 and self.head.version == b"1.1":
                self.write(response_to_h1(headers)[1])
            return True
        if not stream.response_started:  # the proxy's own error response: see fail()
            cause = dict(headers).get(b"l5d-proxy-error", b"")
            self.proxy_error = (status, cause.decode("latin-1"))
            return True
        self.write(self.head_bytes(status, headers, end))
        return True

    def head_bytes(self, status: int, headers: Any, end: bool) -> bytes:
        """The HTTP/1.1 head, with the framing the client can read."""
        head, server = self.head, self.server
        keep = head.keep_alive and not server.wants_close
        extra = []
        if head.method == b"HEAD" or status in (204, 304) or has_header(
                headers, b"content-length"):
            pass
        elif end:
            extra.append(b"content-length: 0\r\n")
        elif head.version == b"1.1":
            extra.append(b"transfer-encoding: chunked\r\n")
            self.chunked = True
        else:
            keep = False  # an HTTP/1.0 client: the body ends when we close
        if head.version == b"1.0":
            extra.append(b"connection: keep-alive\r\n" if keep else b"connection: close\r\n")
        elif not keep:
            extra.append(b"connection: close\r\n")
        self.keep = keep
        self.status = status
        self.response_started = self.ex.response_started = True
        self.waiting_since = 0.0
        self.ended = end
        return response_to_h1(headers, extra=extra)[1]

    def send_data(self, cs: Stream, data: bytes, end: bool = False) -> bool:
        if not self.status:
            return True  # the body of the proxy's own error response: see fail()
        piece = body_piece(data, end, self.chunked)
        if piece:
            self.write(piece)
        if end:
            self.ended = True
        return True

    def write(self, data: bytes) -> None:
        self.out.append(data)
        touch(self)

    def flush(self) -> None:
        out, self.out = self.out, []
        if out:
            self.server.write(out[0] if len(out) == 1 else b"".join(out))

    # --- the end ---------------------------------------------------------------------
    def stream_done(self, stream: H2Stream) -> None:
        """The stream is over (complete, reset, or answered by the proxy)."""
        if self.finished:
            return
        if self.ended:
            self.complete()
        elif self.proxy_error is not None:
            status, cause = self.proxy_error
            self.d.registry.error(self.d.name, "upstream_failed")
            self.fail(status, cause, "upstream")
        else:
            self.d.registry.error(self.d.name, "upstream_failed")
            self.fail(502, f"upstream reset the HTTP/2 stream (error code {self.reset_code})",
                      "upstream")

    def complete(self) -> None:
        """The whole response went out: the exchange ends as ``Exchange.on_end`` ends an
        HTTP/1 one (in-flight slot, metrics, the router's outcome, span, next request)."""
        self.flush()
        self.finished = True
        ex, status = self.ex, self.status
        ex.finished = True
        free_slot = getattr(ex, "free_slot", None)  # the in-flight limit, where there is one
        if free_slot is not None:
            free_slot()
        ex.stats.response(status, self.d.loop.time() - ex.started)
        if ex.target is not None:
            ex.target.done(status < 500)
        if ex.span is not None or self.d.access_log is not None:
            ex.end_span(status)
        self.server.exchange_done(self.keep and self.request_done)

    def fail(self, status: int, cause: str, kind: str) -> None:
        """A 502/504 of the exchange's own if nothing was written yet; else an abort."""
        self.flush()
        self.finished = True
        ex = self.ex
        ex.response_started = self.response_started
        ex.request_done = self.request_done
        ex.fail(status, cause, kind)
