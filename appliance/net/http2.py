"""HTTP/2 (h2c, prior knowledge): the client-facing connection.

Theory of operation: :class:`Http2Server` receives request streams, validates their headers
once (:mod:`appliance.protocols.h2headers`), applies the abuse limits
(:mod:`appliance.protocols.h2guard`) and hands each stream to the pool of multiplexed
upstream connections (:mod:`appliance.net.http2_upstream`) after the whole read was
processed. How a stream's parts move is in :mod:`appliance.net.h2stream`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from appliance.net.addr import OrigDst
from appliance.net.h2stream import (
    GRPC_INTERNAL,
    H2Stream,
    cancel_upstream,
    deadline_passed,
    drain,
    format_grpc_timeout,
    forwardable,
    h2_config,
    log,
    parse_grpc_timeout,
    respond_error,
    to_upstream,
)
from appliance.protocols.h2guard import H2Guard
from appliance.protocols.h2headers import request_problem, trailers_problem

if TYPE_CHECKING:
    from appliance.net.listener import Direction


class Http2Server(asyncio.Protocol):
    """The client-facing side of an HTTP/2 connection."""

    def __init__(self, d: Direction, transport: Any, dst: OrigDst) -> None:
        self.d = d
        self.transport = transport
        self.dst = dst
        self.conn = h2.connection.H2Connection(config=h2_config(client_side=False))
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
                to_upstream(stream, forwardable(event.headers), True, 0)
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
        out = forwardable(headers)
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
                              grpc_status=GRPC_INTERNAL)
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
