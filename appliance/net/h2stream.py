"""One proxied HTTP/2 stream and how its parts move between the two connections.

Theory of operation: a request stream on the client-facing connection
(:mod:`appliance.net.http2`) is paired with a stream on a multiplexed upstream connection
(:mod:`appliance.net.http2_upstream`). Headers, data, trailers and resets are forwarded
stream by stream; a stream never waits on another.

Flow control is end to end: DATA received on one side is credited back to its sender
(``conn.ack``) only once it has been handed to the other side's connection within that
side's flow-control window. What does not fit waits in the stream (bounded by the window
the sender was given) and moves when the window opens (``on_window``). So a slow reader on
one side slows the writer on the other, and the proxy never holds more than the advertised
windows. A peer whose socket does not drain (``pause_writing``) counts as a closed window.

Frames are queued on the codecs; whoever queues frames on a connection marks it with
:func:`touch`, and :func:`flush_all` writes every marked connection once, after the event
loop has run the current iteration's callbacks (one write per connection per iteration,
whatever the streams and reads).

Errors before a response head was sent become a response of the proxy's own: ``502``/
``504`` with ``l5d-proxy-error``, or, for gRPC, a trailers-only response with
``grpc-status`` UNAVAILABLE (14). After that, the stream is reset (or, for gRPC, ended with
trailers carrying the status).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from appliance.protocols.h2frames import CANCEL, INTERNAL_ERROR
from appliance.protocols.h2send import CAN_SEND, Stream

if TYPE_CHECKING:
    from appliance.net.http2 import Http2Server
    from appliance.net.http2_upstream import Http2Upstream

log = logging.getLogger("appliance.h2")

# Headers that are connection-specific: never forwarded between HTTP/2 connections.
CONNECTION_SPECIFIC = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
})
GRPC_UNAVAILABLE = b"14"
GRPC_DEADLINE_EXCEEDED = b"4"
GRPC_RESOURCE_EXHAUSTED = b"8"
GRPC_INTERNAL = b"13"
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds from a ``grpc-timeout`` value (1 to 8 digits and a unit), else None."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not 0 < len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def format_grpc_timeout(seconds: float) -> bytes:
    """The shortest exact-enough ``grpc-timeout`` for what is left (rounded up to 1 ms)."""
    ms = max(1, int(seconds * 1000 + 0.999))
    return b"%dm" % ms if ms < 100_000_000 else b"%dS" % min(99_999_999, ms // 1000)


def forwardable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n not in CONNECTION_SPECIFIC]


# --- writing: every connection with queued frames is written once per loop iteration ----
_dirty: list[Any] = []
_scheduled = [False]  # a flush_all is pending on the event loop


def touch(peer: Any) -> None:
    """``peer`` (an Http2Server or Http2Upstream) has frames queued on its codec: it is
    written when the event loop has run this iteration's callbacks. uvloop writes at once
    on each ``transport.write``, so this is what turns many reads' worth of frames for one
    shared upstream connection into one syscall."""
    if not peer.dirty:
        peer.dirty = True
        _dirty.append(peer)
        if not _scheduled[0]:
            _scheduled[0] = True
            peer.d.loop.call_soon(flush_all)


def flush_all() -> None:
    _scheduled[0] = False
    while _dirty:
        peer = _dirty.pop()
        peer.dirty = False
        peer.flush()


class H2Stream:
    """One request stream: its client side (``cs``) and its upstream side (``us``)."""

    __slots__ = (
        "server", "sid", "cs", "up", "us", "headers", "to_up", "to_down", "grpc", "started",
        "response_started", "status", "done", "early", "request_ended", "grpc_status",
        "deadline", "retried", "head", "target", "stats", "orig_proto", "span",
    )

    def __init__(self, server: Http2Server, cs: Stream, headers: Sequence[tuple[bytes, bytes]],
                 grpc: bool, now: float) -> None:
        self.server = server
        self.sid = cs.sid
        self.cs = cs
        self.up: Http2Upstream | None = None
        self.us: Stream | None = None
        self.headers = headers  # as sent upstream
        # Parts waiting for a window, each [data or trailers, end, flow length]; an empty
        # tuple until the first one (most streams never queue anything).
        self.to_up: list[list[Any]] | tuple[()] = ()
        self.to_down: list[list[Any]] | tuple[()] = ()
        self.early: list[Any] | tuple[()] = ()  # request parts before the upstream stream
        self.grpc = grpc
        self.started = now
        self.response_started = False
        self.status = 0
        self.done = False
        self.request_ended = False  # END_STREAM came on the request's HEADERS frame
        self.grpc_status = b""
        self.deadline: asyncio.TimerHandle | None = None
        self.retried = False
        self.head = False  # a HEAD request: the response has no body
        self.target: Any = None  # the router's pick (appliance.routing.router.Target)
        self.stats: Any = server.stats  # where its response is counted
        self.span: Any = None  # the trace span (appliance.telemetry.tracing), when sampled
        self.orig_proto = False  # inbound l5d-orig-proto: HTTP/1.1 (sent on as HTTP/1.1)


# --- moving a stream's parts from one side to the other -----------------------------------

def to_upstream(stream: H2Stream, data: Any, end: bool, length: int) -> None:
    if stream.done:
        if length:  # the stream is over: give the sender its credit back, drop the data
            stream.server.conn.ack(stream.cs, length)
            touch(stream.server)
        return
    if stream.up is None:
        if stream.early:
            stream.early.append((data, end, length))  # type: ignore[union-attr]
        else:
            stream.early = [(data, end, length)]
        return
    if stream.to_up:
        stream.to_up.append([data, end, length])  # type: ignore[union-attr]
    else:
        stream.to_up = [[data, end, length]]
    drain(stream, down=False)


def to_downstream(stream: H2Stream, data: Any, end: bool, length: int) -> None:
    if stream.to_down:
        stream.to_down.append([data, end, length])  # type: ignore[union-attr]
        drain(stream, down=True)
        return
    server = stream.server
    conn = server.conn
    cs = stream.cs
    if data.__class__ is bytes and (data or end) and not server.write_paused and len(data) <= \
            min(conn.send_window, cs.send_window, conn.max_frame):
        # The usual case: nothing waits and it fits; no queue. (send_data does nothing
        # if the client's side can no longer send.)
        conn.send_data(cs, data, end)
        touch(server)
        up = stream.up
        if length and up is not None:
            up.conn.ack(stream.us, length)
            touch(up)
        if end:
            finish_side(stream, True)
        return
    stream.to_down = [[data, end, length]]
    drain(stream, down=True)


def drain(stream: H2Stream, *, down: bool) -> None:
    """Send what waits for one side, as far as that side's window allows, and credit the
    other side with what was sent."""
    src: Any
    dst: Any
    dst_s: Stream | None
    if down:
        dst, dst_s, src, src_s, queue = (stream.server, stream.cs, stream.up, stream.us,
                                         stream.to_down)
    else:
        dst, dst_s, src, src_s, queue = (stream.up, stream.us, stream.server, stream.cs,
                                         stream.to_up)
    if dst is None or dst_s is None or dst.write_paused or not queue:
        return
    conn = dst.conn
    touch(dst)
    while queue:
        item = queue[0]
        data, end, length = item
        if data.__class__ is list:  # trailers
            queue.pop(0)  # type: ignore[union-attr]
            conn.send_headers(dst_s, data, True)
            finish_side(stream, down)
            continue
        if data:
            window = conn.window(dst_s)
            if window <= 0:
                if conn.closed or not CAN_SEND[dst_s.state]:  # it never can: drop it all
                    _credit(src, src_s, sum(i[2] for i in queue))
                    queue.clear()  # type: ignore[union-attr]
                return
            if len(data) > window:
                conn.send_data(dst_s, data[:window], False)
                acked = min(length, window)
                item[0], item[2] = data[window:], length - acked
                _credit(src, src_s, acked)
                continue
            conn.send_data(dst_s, data, end)
        elif end:
            conn.send_data(dst_s, b"", True)
        queue.pop(0)  # type: ignore[union-attr]
        _credit(src, src_s, length)
        if end:
            finish_side(stream, down)


def _credit(src: Any, src_s: Stream | None, length: int) -> None:
    if length and src is not None:
        src.conn.ack(src_s, length)
        touch(src)


def finish_side(stream: H2Stream, down: bool) -> None:
    """One direction of the stream has ended; when the response has, the stream is done."""
    if down:
        stream.done = True
        server = stream.server
        stream.stats.response(stream.status, server.d.loop.time() - stream.started, "",
                              stream.grpc_status.decode("ascii", "replace"))
        server.stream_done(stream)
        if stream.up is not None:
            stream.up.stream_done(stream)


def response_head(stream: H2Stream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
    """Forward the response head; with END_STREAM on it (a gRPC trailers-only response, a
    bodiless response) the stream ends in the same frame, as it did upstream."""
    server = stream.server
    memo = server.response_memo.get(id(headers))
    if memo is None or memo[0] is not headers:
        memo = _prepare_response(server, headers)
    stream.response_started = True
    stream.status = memo[2]
    if stream.grpc:
        stream.grpc_status = memo[3]
    server.conn.send_headers(stream.cs, memo[1], end)
    touch(server)
    if end:
        finish_side(stream, True)


def _prepare_response(server: Http2Server, headers: list[tuple[bytes, bytes]]) -> tuple:
    """Computed once per distinct response head (see Http2Server.prepare)."""
    grpc_status = b""
    for name, value in headers:
        if name == b"grpc-status":
            grpc_status = value
    memo = (headers, (*headers, server.via_header), int(headers[0][1]), grpc_status)
    cache = server.response_memo
    if len(cache) >= 64:
        cache.clear()
    cache[id(headers)] = memo
    return memo


def reset_downstream(stream: H2Stream, code: int) -> None:
    if stream.done:
        return
    server = stream.server
    stream.stats.response(stream.status, server.d.loop.time() - stream.started,
                          "upstream_reset")
    server.conn.reset(stream.cs, code)
    touch(server)
    server.stream_done(stream)


def cancel_upstream(stream: H2Stream, code: int) -> None:
    """The client reset or left: reset the upstream stream, or never open it."""
    up = stream.up
    if up is None:
        return
    if stream.us is not None:
        up.conn.reset(stream.us, code)
        touch(up)
    up.stream_done(stream)


def grpc_code_for(status: int) -> bytes:
    """The gRPC status for an error the proxy produces (as linkerd maps them)."""
    if status == 504:
        return GRPC_DEADLINE_EXCEEDED
    if status == 429:
        return GRPC_RESOURCE_EXHAUSTED
    return GRPC_UNAVAILABLE


def respond_error(stream: H2Stream, status: int, cause: str, *,
                  grpc_status: bytes | None = None) -> None:
    """A response of the proxy's own, if no response head was sent yet; else a reset (or,
    for gRPC, trailers carrying the status)."""
    if stream.done:
        return
    stream.to_down = ()  # what the upstream sent but could not be delivered yet is void
    server = stream.server
    reason = cause.encode("ascii", "replace")
    if stream.response_started and not stream.grpc:
        reset_downstream(stream, INTERNAL_ERROR)
        return
    if stream.grpc:
        code = grpc_status or grpc_code_for(status)
        stream.grpc_status = code
        fields = [(b"grpc-status", code), (b"grpc-message", reason), (b"l5d-proxy-error", reason)]
        if not stream.response_started:
            stream.status = 200
            fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), *fields,
                      server.via_header]
        server.conn.send_headers(stream.cs, fields, True)
    else:
        stream.status = status
        body = reason + b"\n"
        server.conn.send_headers(stream.cs, [
            (b":status", b"%d" % status), (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % len(body)), (b"l5d-proxy-error", reason),
            server.via_header])
        server.conn.send_data(stream.cs, body, True)
    stream.response_started = True
    touch(server)
    stream.stats.response(stream.status, server.d.loop.time() - stream.started, "proxy",
                          stream.grpc_status.decode())
    server.stream_done(stream)
    if stream.up is not None:
        stream.up.stream_done(stream)


def deadline_passed(stream: H2Stream, source: str = "grpc-timeout") -> None:
    """The stream's deadline (``source``: grpc-timeout, l5d-ctx-deadline, or the route's
    timeout) ran out: cancel upstream, answer 504 (gRPC: DEADLINE_EXCEEDED)."""
    stream.deadline = None
    if stream.done:
        return
    server = stream.server
    server.d.registry.error(server.d.name, "grpc_deadline" if source == "grpc-timeout"
                            else "deadline_exceeded")
    cancel_upstream(stream, CANCEL)
    respond_error(stream, 504, f"deadline exceeded ({source})",
                  grpc_status=GRPC_DEADLINE_EXCEEDED)
    flush_all()
