"""HTTP/2 (h2c, prior knowledge) proxying per stream, on the h2 library.

Theory of operation: :class:`Http2Server` is the client-facing connection; every request
stream it receives becomes a :class:`H2Stream`, which opens a stream of its own on a
multiplexed :class:`Http2Upstream` to the destination (one connection per endpoint, more
when the peer's MAX_CONCURRENT_STREAMS is reached). Headers, data, trailers and resets are
forwarded stream by stream; a stream never waits on another.

Flow control is end to end: DATA received on one side is acknowledged to its sender only
once it has been handed to the other side's h2 connection within that side's flow-control
window. What does not fit waits in the stream (bounded by the window the sender was given)
and moves on ``WindowUpdated``. So a slow reader on one side slows the writer on the other,
and the proxy never holds more than the advertised windows.

Errors before a response head was sent become a response of the proxy's own: ``502``/
``504`` with ``l5d-proxy-error``, or, for gRPC, a trailers-only response with
``grpc-status`` UNAVAILABLE (14). After that, the stream is reset.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.hpack
import hpack.table
from hyperframe.frame import GoAwayFrame

from appliance.net.addr import OrigDst
from appliance.protocols.h2guard import H2Guard
from appliance.protocols.h2headers import request_problem, trailers_problem

if TYPE_CHECKING:
    from appliance.net.listener import Direction

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
_GRPC_UNAVAILABLE = b"14"
_GRPC_DEADLINE_EXCEEDED = b"4"
_GRPC_RESOURCE_EXHAUSTED = b"8"
_GRPC_INTERNAL = b"13"
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


def _config(client_side: bool) -> h2.config.H2Configuration:
    # Headers are validated once, where they enter: request headers by
    # appliance.protocols.h2headers (so a malformed request is a stream error, not a
    # connection error as in h2), response headers by h2. What we send was validated on the
    # way in, so outbound validation and normalisation are off (they cost per request).
    return h2.config.H2Configuration(
        client_side=client_side, header_encoding=None,
        validate_inbound_headers=client_side, normalize_inbound_headers=client_side,
        validate_outbound_headers=False, normalize_outbound_headers=False,
    )


def _forwardable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
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


class Http2Server(asyncio.Protocol):
    """The client-facing side of an HTTP/2 connection."""

    def __init__(self, d: Direction, transport: Any, dst: OrigDst) -> None:
        self.d = d
        self.transport = transport
        self.dst = dst
        self.conn = h2.connection.H2Connection(config=_config(client_side=False))
        limits = d.config.h2
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
        })
        self.guard = H2Guard(reset_limit=limits.reset_limit,
                             control_frame_limit=limits.control_frame_limit)
        self.streams: dict[int, H2Stream] = {}
        self.opening: list[H2Stream] = []  # new streams, sent upstream after the read
        self.tcp = d.tcp_stats("h2", "src")
        self.stats = d.registry.http(d.name, "h2")
        self.closed = False
        self.last_active = d.loop.time()

    def start(self, early: bytes, early_eof: bool) -> None:
        self.transport.set_protocol(self)
        self.tcp.opened += 1
        self.d.h2_conns.add(self)
        self.conn.initiate_connection()
        self.flush()
        if early:
            self.data_received(early)
        if early_eof:
            self.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.tcp.write_bytes += len(data)
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.tcp.read_bytes += len(data)
        self.last_active = self.d.loop.time()
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.d.registry.error(self.d.name, "h2_protocol_error")
            self.goaway(getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR))
            return
        for event in events:
            self.handle(event)
            if self.closed:
                return
        # Streams are opened upstream only now, so a request the client reset in the same
        # read (Rapid Reset's pattern) never reaches the upstream.
        opening, self.opening = self.opening, []
        if opening:
            touched = set()
            for stream in opening:
                if not stream.done:
                    self.d.h2pool.attach(stream, self.dst)
                    if stream.up is not None:
                        touched.add(stream.up)
            for up in touched:  # one write per upstream for all the streams of this read
                up.flush()
        self.flush()

    def goaway(self, code: int) -> None:
        """Close the connection with GOAWAY ``code``; its streams are cancelled upstream."""
        try:
            self.conn.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self.close()

    def shutdown(self) -> None:
        """Graceful: GOAWAY NO_ERROR naming the last stream we accepted; the streams open
        may finish. The frame is written directly: h2's close_connection() would also stop
        us sending on the streams still open."""
        if self.closed:
            return
        self.flush()
        self.last_accepted = self.conn.highest_inbound_stream_id
        frame = GoAwayFrame(stream_id=0, last_stream_id=self.last_accepted,
                            error_code=h2.errors.ErrorCodes.NO_ERROR)
        data = frame.serialize()
        self.tcp.write_bytes += len(data)
        self.transport.write(data)

    def calm(self, what: str) -> None:
        self.d.registry.error(self.d.name, what)
        self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def handle(self, event: Any) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if not event.data and event.stream_ended is None \
                    and self.guard.control_frame(self.d.loop.time()):
                self.calm("h2_control_flood")
                return
            if stream is not None:
                to_upstream(stream, event.data, False, event.flow_controlled_length)
            else:
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
        elif isinstance(event, h2.events.RequestReceived):
            self.open_stream(event.stream_id, event.headers, event.stream_ended is not None)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.request_ended:
                to_upstream(stream, b"", True, 0)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            problem = trailers_problem(event.headers)
            if problem is not None:
                self.malformed(event.stream_id, problem)
            elif stream is not None:
                to_upstream(stream, _forwardable(event.headers), True, 0)
        elif isinstance(event, h2.events.WindowUpdated):
            self.window_opened(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.done = True
                now = self.d.loop.time()
                self.stats.response(stream.status, now - stream.started, "client_reset")
                cancel_upstream(stream, event.error_code)
                if not stream.response_started and self.guard.stream_reset_early(now):
                    self.calm("h2_rapid_reset")
        elif isinstance(event, (h2.events.PingReceived, h2.events.RemoteSettingsChanged,
                                h2.events.PriorityUpdated)):
            if self.guard.control_frame(self.d.loop.time()):
                self.calm("h2_control_flood")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close()

    last_accepted = 1 << 31  # lowered by shutdown(): later streams are refused

    def open_stream(self, sid: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        if sid > self.last_accepted:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        problem = request_problem(headers)
        if problem is not None:
            self.malformed(sid, problem)
            return
        stream = H2Stream(self, sid, headers)
        stream.request_ended = ended
        self.streams[sid] = stream
        self.stats.requests += 1
        via = self.d.via
        if any(n == b"via" and self.d.via_name in v for n, v in headers):
            self.d.registry.error(self.d.name, "loop")
            respond_error(stream, 502, "request loop detected (Via names this proxy)")
            return
        out = _forwardable(headers)
        if stream.grpc and not self.apply_grpc_timeout(stream, out):
            return
        out.append((b"via", via))
        stream.headers = out
        self.opening.append(stream)

    def malformed(self, sid: int, problem: str) -> None:
        """A malformed request: reset its stream (PROTOCOL_ERROR); it goes nowhere."""
        self.d.registry.error(self.d.name, "h2_malformed")
        log.debug("stream %d reset: %s", sid, problem)
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream.done = True
            cancel_upstream(stream, h2.errors.ErrorCodes.CANCEL)
        try:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.StreamClosedError:
            pass

    def apply_grpc_timeout(self, stream: H2Stream, headers: list[tuple[bytes, bytes]]) -> bool:
        """Arm the call's deadline from ``grpc-timeout``; False if the value is invalid."""
        for i, (name, value) in enumerate(headers):
            if name != b"grpc-timeout":
                continue
            seconds = parse_grpc_timeout(value)
            if seconds is None:
                self.d.registry.error(self.d.name, "grpc_timeout_invalid")
                respond_error(stream, 400, f"invalid grpc-timeout {value!r}",
                              grpc_status=_GRPC_INTERNAL)
                return False
            # What is forwarded is what is left, measured from when we send it (now).
            headers[i] = (name, format_grpc_timeout(seconds))
            stream.deadline = self.d.loop.call_later(seconds, deadline_passed, stream)
        return True

    def window_opened(self, sid: int) -> None:
        streams = self.streams.values() if sid == 0 else (
            [self.streams[sid]] if sid in self.streams else [])
        for stream in list(streams):
            if stream.to_down:
                drain(stream, down=True)

    def stream_done(self, stream: H2Stream) -> None:
        stream.done = True
        if stream.deadline is not None:
            stream.deadline.cancel()
            stream.deadline = None
        self.streams.pop(stream.sid, None)

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True
            self.transport.close()
            self.abandon_streams()

    def abandon_streams(self) -> None:
        """This side can send nothing more: its streams are cancelled upstream now, before
        their responses arrive for a connection that is gone."""
        for stream in list(self.streams.values()):
            stream.done = True
            cancel_upstream(stream, h2.errors.ErrorCodes.CANCEL)
        self.streams.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.tcp.closed += 1
        self.d.h2_conns.discard(self)
        self.abandon_streams()


class Http2Upstream(asyncio.Protocol):
    """A multiplexed HTTP/2 connection to one endpoint."""

    def __init__(self, d: Direction, key: OrigDst) -> None:
        self.d = d
        self.key = key
        self.conn = h2.connection.H2Connection(config=_config(client_side=True))
        self.streams: dict[int, H2Stream] = {}
        self.transport: Any = None
        self.tcp = d.tcp_stats("h2", "dst")
        self.draining = False  # GOAWAY received: no new streams
        self.waiting: list[H2Stream] = []  # streams to open once connected
        self.last_read = d.loop.time()
        self.ping_sent = 0.0  # when the keepalive PING went out; 0 when none is pending
        self.settings_seen = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.tcp.opened += 1
        self.conn.initiate_connection()
        self.flush()

    def capacity(self) -> int:
        """Streams the peer lets us open now (its MAX_CONCURRENT_STREAMS minus open ones).
        Until its SETTINGS arrive, h2 assumes no limit; we assume 100 (RFC 9113's floor
        for what a peer should allow), so a burst is not refused."""
        limit = self.conn.remote_settings.max_concurrent_streams
        if not self.settings_seen:
            limit = min(limit, 100)
        return limit - self.conn.open_outbound_streams

    @property
    def full(self) -> bool:
        return self.draining or self.capacity() - len(self.waiting) <= 0

    def open(self, stream: H2Stream) -> None:
        usid = self.conn.get_next_available_stream_id()
        try:
            self.conn.send_headers(usid, stream.headers, end_stream=stream.request_ended)
        except h2.exceptions.TooManyStreamsError:
            self.d.h2pool.attach(stream, self.key)  # another connection takes it
            return
        stream.up, stream.usid = self, usid
        self.streams[usid] = stream
        for data, end, length in stream.early:
            to_upstream(stream, data, end, length)
        stream.early = []

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.tcp.write_bytes += len(data)
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.tcp.read_bytes += len(data)
        self.last_read = self.d.loop.time()
        self.ping_sent = 0.0  # any frame shows the peer is alive
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.d.registry.error(self.d.name, "h2_upstream_protocol_error")
            self.fail_all(f"upstream sent invalid HTTP/2: {exc}")
            self.flush()
            self.transport.close()
            return
        servers = set()
        for event in events:
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if stream is not None:
                servers.add(stream.server)
            try:
                self.handle(event, stream)
            except h2.exceptions.ProtocolError:
                # The client side of this stream cannot take it (its connection is closing):
                # that stream ends here; the connection and its other streams go on.
                if stream is None:
                    raise
                stream.done = True
                stream.server.streams.pop(stream.sid, None)
                cancel_upstream(stream, h2.errors.ErrorCodes.CANCEL)
        self.flush()
        for server in servers:
            server.flush()

    def handle(self, event: Any, stream: H2Stream | None) -> None:
        if isinstance(event, h2.events.DataReceived):
            if stream is not None and not stream.done:
                to_downstream(stream, event.data, False, event.flow_controlled_length)
            else:
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
        elif isinstance(event, h2.events.ResponseReceived):
            if stream is not None and not stream.done:
                response_head(stream, event.headers, event.stream_ended is not None)
        elif isinstance(event, h2.events.InformationalResponseReceived):
            if stream is not None and not stream.done:
                srv = stream.server
                srv.conn.send_headers(stream.sid, _forwardable(event.headers))
        elif isinstance(event, h2.events.TrailersReceived):
            if stream is not None and not stream.done:
                for name, value in event.headers:
                    if name == b"grpc-status":
                        stream.grpc_status = value
                to_downstream(stream, _forwardable(event.headers), True, 0)
        elif isinstance(event, h2.events.StreamEnded):
            if stream is not None and not stream.done:
                to_downstream(stream, b"", True, 0)
        elif isinstance(event, h2.events.StreamReset):
            self.streams.pop(event.stream_id, None)
            if stream is None or stream.done:
                return
            if (event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    and not stream.response_started and stream.request_ended
                    and not stream.retried):
                # Refused before any processing (RFC 9113 8.7): safe to send again.
                stream.retried = True
                stream.up = None
                self.d.h2pool.attach(stream, self.key)
                if stream.up is not None:
                    stream.up.flush()
                return
            reset_downstream(stream, event.error_code)
        elif isinstance(event, h2.events.WindowUpdated):
            targets = self.streams.values() if event.stream_id == 0 else (
                [stream] if stream is not None else [])
            for s in list(targets):
                if s.to_up:
                    drain(s, down=False)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway(event.last_stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_seen = True
            self.open_waiting()

    def open_waiting(self) -> None:
        """Open the streams that waited for this connection, as far as the peer allows;
        the rest go to another connection (the pool dials one if needed)."""
        waiting, self.waiting = self.waiting, []
        touched = {self}
        for stream in waiting:
            if stream.done:
                continue
            if self.draining or self.capacity() <= 0:
                self.d.h2pool.attach(stream, self.key)
            else:
                self.open(stream)
            if stream.up is not None:
                touched.add(stream.up)
        for up in touched:
            up.flush()

    def goaway(self, last_stream_id: int | None) -> None:
        """The upstream is going away: streams it never started are refused, so the
        client may retry them; the rest may finish."""
        self.draining = True
        self.d.h2pool.forget(self)
        last = last_stream_id or 0
        for usid, stream in list(self.streams.items()):
            if usid > last and not stream.response_started:
                self.streams.pop(usid, None)
                reset_downstream(stream, h2.errors.ErrorCodes.REFUSED_STREAM)

    def stream_done(self, stream: H2Stream) -> None:
        self.streams.pop(stream.usid, None)
        if self.draining and not self.streams and self.transport is not None:
            self.transport.close()

    def fail_all(self, cause: str) -> None:
        for stream in list(self.streams.values()) + self.waiting:
            if not stream.done:
                respond_error(stream, 502, cause)
                stream.server.flush()
        self.streams.clear()
        self.waiting = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.tcp.closed += 1
        self.transport = None
        self.d.h2pool.forget(self)
        self.fail_all("upstream closed the connection" if exc is None
                      else f"upstream connection failed: {exc}")


# --- moving a stream's parts from one side to the other -----------------------------------

def to_upstream(stream: H2Stream, data: Any, end: bool, length: int) -> None:
    if stream.done:
        stream.server.conn.acknowledge_received_data(length, stream.sid) if length else None
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
    out = [*_forwardable(headers), (b"via", stream.server.d.via)]
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
        return _GRPC_DEADLINE_EXCEEDED
    if status == 429:
        return _GRPC_RESOURCE_EXHAUSTED
    return _GRPC_UNAVAILABLE


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
                  grpc_status=_GRPC_DEADLINE_EXCEEDED)
    server.flush()


class H2Pool:
    """Multiplexed upstream connections per endpoint."""

    def __init__(self, d: Direction) -> None:
        self.d = d
        self.conns: dict[OrigDst, list[Http2Upstream]] = {}

    def attach(self, stream: H2Stream, dst: OrigDst) -> None:
        for up in self.conns.get(dst, ()):
            if not up.full:
                if up.transport is None:
                    up.waiting.append(stream)
                else:
                    up.open(stream)
                return
        up = Http2Upstream(self.d, dst)
        up.waiting.append(stream)
        self.conns.setdefault(dst, []).append(up)
        self.d.spawn(self.connect(up, dst))

    async def connect(self, up: Http2Upstream, dst: OrigDst) -> None:
        d = self.d
        try:
            await asyncio.wait_for(
                d.loop.create_connection(lambda: up, d.connect_host(dst), dst.port),
                d.connect_timeout)
        except TimeoutError:
            self.forget(up)
            d.registry.error(d.name, "connect_timeout")
            up.fail_all(f"upstream unreachable: connect to {dst} timed out")
            return
        except OSError as exc:
            self.forget(up)
            d.registry.error(d.name, "connect_refused")
            up.fail_all(f"upstream unreachable: {dst}: {exc.strerror or exc}")
            return
        up.open_waiting()

    def forget(self, up: Http2Upstream) -> None:
        conns = self.conns.get(up.key)
        if conns and up in conns:
            conns.remove(up)

    def sweep(self, now: float) -> None:
        """Keepalive: PING a connection quiet for ``h2.keepalive_interval``; one that does
        not answer within ``h2.keepalive_timeout`` is closed (its streams get errors)."""
        conf = self.d.config.h2
        for conns in list(self.conns.values()):
            for up in list(conns):
                if up.transport is None:
                    continue
                if up.ping_sent:
                    if now - up.ping_sent > conf.keepalive_timeout:
                        self.d.registry.error(self.d.name, "h2_keepalive_timeout")
                        up.transport.abort()
                elif now - up.last_read > conf.keepalive_interval:
                    up.ping_sent = now
                    up.conn.ping(b"keepaliv")
                    up.flush()

    def close_all(self) -> None:
        for conns in self.conns.values():
            for up in conns:
                if up.transport is not None:
                    up.transport.close()
        self.conns.clear()
