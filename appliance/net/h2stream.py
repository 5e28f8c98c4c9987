"""One proxied HTTP/2 stream and how its parts move between the two connections.

Theory of operation: a request stream on the client-facing connection
(:mod:`appliance.net.http2`) is paired with a stream on a multiplexed upstream connection
(:mod:`appliance.net.http2_upstream`). Headers, data, trailers and resets are forwarded
stream by stream; a stream never waits on another.

Flow control is end to end: DATA received on one side is acknowledged to its sender only
once it has been handed to the other side's h2 connection within that side's flow-control
window. What does not fit waits in the stream (bounded by the window the sender was given)
and moves on ``WindowUpdated``. So a slow reader on one side slows the writer on the other,
and the proxy never holds more than the advertised windows.

Errors before a response head was sent become a response of the proxy's own: ``502``/
``504`` with ``l5d-proxy-error``, or, for gRPC, a trailers-only response with
``grpc-status`` UNAVAILABLE (14). After that, the stream is reset (or, for gRPC, ended with
trailers carrying the status).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import h2.config
import h2.errors
import h2.exceptions
import hpack.hpack
import hpack.table

if TYPE_CHECKING:
    from appliance.net.http2 import Http2Server
    from appliance.net.http2_upstream import Http2Upstream

log = logging.getLogger("appliance.h2")


class _Silent:
    """hpack logs every header it codes at DEBUG through the logging module; even disabled,
    those calls cost several microseconds per request. The proxy never wants them."""

    @staticmethod
    def debug(*args: object, **kwargs: object) -> None:
        pass


hpack.hpack.log = hpack.table.log = _Silent()  # type: ignore[assignment]

# Headers that are connection-specific: never forwarded between HTTP/2 connections.
_CONNECTION_SPECIFIC = frozenset({
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


def h2_config(client_side: bool) -> h2.config.H2Configuration:
    # Headers are validated once, where they enter: request headers by
    # appliance.protocols.h2headers (so a malformed request is a stream error, not a
    # connection error as in h2), response headers by h2. What we send was validated on the
    # way in, so outbound validation and normalisation are off (they cost per request).
    return h2.config.H2Configuration(
        client_side=client_side, header_encoding=None,
        validate_inbound_headers=client_side, normalize_inbound_headers=client_side,
        validate_outbound_headers=False, normalize_outbound_headers=False,
    )


def forwardable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n not in _CONNECTION_SPECIFIC]


class H2Stream:
    """One request stream: its client side and its upstream side."""

    __slots__ = (
        "server", "sid", "up", "usid", "headers", "to_up", "to_down", "grpc", "started",
        "response_started", "status", "done", "early", "request_ended", "grpc_status",
        "deadline", "retried",
    )

    def __init__(self, server: Http2Server, sid: int, headers: list[tuple[bytes, bytes]]):
        self.server = server
        self.sid = sid
        self.up: Http2Upstream | None = None
        self.usid = 0
        self.headers = headers
        self.to_up: list[Any] = []  # [data, end_stream, flow-controlled length] waiting
        self.to_down: list[Any] = []
        self.grpc = any(n == b"content-type" and v.startswith(b"application/grpc")
                        for n, v in headers)
        self.started = server.d.loop.time()
        self.response_started = False
        self.status = 0
        self.done = False
        self.early: list[Any] = []  # request events that came before the upstream stream
        self.request_ended = False  # END_STREAM came on the request's HEADERS frame
        self.grpc_status = b""
        self.deadline: asyncio.TimerHandle | None = None
        self.retried = False


# --- moving a stream's parts from one side to the other -----------------------------------

def to_upstream(stream: H2Stream, data: Any, end: bool, length: int) -> None:
    if stream.done:
        if length:  # the stream is over: give the sender its credit back, drop the data
            stream.server.conn.acknowledge_received_data(length, stream.sid)
        return
    if stream.up is None:
        stream.early.append((data, end, length))
        return
    stream.to_up.append([data, end, length])
    drain(stream, down=False)


def to_downstream(stream: H2Stream, data: Any, end: bool, length: int) -> None:
    stream.to_down.append([data, end, length])
    drain(stream, down=True)


def drain(stream: H2Stream, *, down: bool) -> None:
    """Send what waits for one side, as far as that side's flow-control window allows, and
    acknowledge to the other side what was sent."""
    if down:
        dst_conn, dst_sid = stream.server.conn, stream.sid
        src_conn, src_sid = (stream.up.conn if stream.up else None), stream.usid
        queue = stream.to_down
    else:
        assert stream.up is not None
        dst_conn, dst_sid = stream.up.conn, stream.usid
        src_conn, src_sid = stream.server.conn, stream.sid
        queue = stream.to_up
    try:
        while queue:
            item = queue[0]
            data, end, length = item
            if isinstance(data, list):  # trailers
                dst_conn.send_headers(dst_sid, data, end_stream=True)
                queue.pop(0)
                finish_side(stream, down)
                continue
            if data:
                window = min(dst_conn.local_flow_control_window(dst_sid),
                             dst_conn.max_outbound_frame_size)
                if window <= 0:
                    return
                piece = data[:window]
                rest = data[window:]
                dst_conn.send_data(dst_sid, piece, end_stream=end and not rest)
                sent = len(piece)
                acked = length if not rest else min(length, sent)
                if src_conn is not None and acked:
                    src_conn.acknowledge_received_data(acked, src_sid)
                if rest:
                    item[0], item[2] = rest, length - acked
                    continue
                queue.pop(0)
                if end:
                    finish_side(stream, down)
            else:
                queue.pop(0)
                if length and src_conn is not None:
                    src_conn.acknowledge_received_data(length, src_sid)
                if end:
                    dst_conn.end_stream(dst_sid)
                    finish_side(stream, down)
    except h2.exceptions.StreamClosedError:
        queue.clear()
    finally:
        if stream.up is not None:
            stream.up.flush()


def finish_side(stream: H2Stream, down: bool) -> None:
    """One direction of the stream has ended; when the response has, the stream is done."""
    if down:
        stream.done = True
        server = stream.server
        server.stats.response(stream.status or 0, server.d.loop.time() - stream.started, "",
                              stream.grpc_status.decode("ascii", "replace"))
        server.stream_done(stream)
        if stream.up is not None:
            stream.up.stream_done(stream)


def response_head(stream: H2Stream, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
    """Forward the response head; with END_STREAM on it (a gRPC trailers-only response, a
    bodiless response) the stream ends in the same frame, as it did upstream."""
    stream.response_started = True
    for name, value in headers:
        if name == b":status":
            stream.status = int(value)
        elif name == b"grpc-status":
            stream.grpc_status = value
    out = [*forwardable(headers), (b"via", stream.server.d.via)]
    stream.server.conn.send_headers(stream.sid, out, end_stream=ended)
    if ended:
        finish_side(stream, True)


def reset_downstream(stream: H2Stream, code: int) -> None:
    if stream.done:
        return
    stream.server.stats.response(stream.status or 0, stream.server.d.loop.time()
                                 - stream.started, "upstream_reset")
    try:
        stream.server.conn.reset_stream(stream.sid, code)
    except h2.exceptions.StreamClosedError:
        pass
    stream.server.stream_done(stream)
    stream.server.flush()


def cancel_upstream(stream: H2Stream, code: int) -> None:
    """The client reset or left: reset the upstream stream, or never open it."""
    up = stream.up
    if up is None:
        return
    if up.transport is not None:
        try:
            up.conn.reset_stream(stream.usid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        up.flush()
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
    server = stream.server
    if stream.done:
        return
    stream.to_down.clear()  # what the upstream sent but could not be delivered yet is void
    reason = cause.encode("ascii", "replace")
    via = (b"via", server.d.via)
    if stream.response_started:
        if stream.grpc:
            code = grpc_status or grpc_code_for(status)
            stream.grpc_status = code
            try:
                server.conn.send_headers(stream.sid, [
                    (b"grpc-status", code), (b"grpc-message", reason),
                    (b"l5d-proxy-error", reason)], end_stream=True)
            except h2.exceptions.ProtocolError:
                reset_downstream(stream, h2.errors.ErrorCodes.CANCEL)
                return
            server.stats.response(stream.status, server.d.loop.time() - stream.started,
                                  "proxy", code.decode())
            server.stream_done(stream)
            if stream.up is not None:
                stream.up.stream_done(stream)
            return
        reset_downstream(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
        return
    stream.response_started = True
    stream.status = status
    try:
        if stream.grpc:
            code = grpc_status or grpc_code_for(status)
            stream.status = 200
            stream.grpc_status = code
            server.conn.send_headers(stream.sid, [
                (b":status", b"200"), (b"content-type", b"application/grpc"),
                (b"grpc-status", code), (b"grpc-message", reason),
                (b"l5d-proxy-error", reason), via], end_stream=True)
        else:
            body = reason + b"\n"
            server.conn.send_headers(stream.sid, [
                (b":status", str(status).encode()), (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()), (b"l5d-proxy-error", reason),
                via])
            server.conn.send_data(stream.sid, body, end_stream=True)
    except h2.exceptions.StreamClosedError:
        pass
    server.stats.response(stream.status, server.d.loop.time() - stream.started, "proxy",
                          stream.grpc_status.decode())
    stream.done = True
    server.stream_done(stream)
    if stream.up is not None:
        stream.up.stream_done(stream)


def deadline_passed(stream: H2Stream) -> None:
    """The call's grpc-timeout ran out: cancel upstream, answer DEADLINE_EXCEEDED."""
    stream.deadline = None
    if stream.done:
        return
    server = stream.server
    server.d.registry.error(server.d.name, "grpc_deadline")
    cancel_upstream(stream, h2.errors.ErrorCodes.CANCEL)
    respond_error(stream, 504, "deadline exceeded (grpc-timeout)",
                  grpc_status=GRPC_DEADLINE_EXCEEDED)
    server.flush()
