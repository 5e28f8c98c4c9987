"""HTTP/2 upstream connections: multiplexed, one per endpoint (more when full), pooled.

Theory of operation: :class:`H2Pool` gives each new stream a connection to its endpoint
that has room (the peer's MAX_CONCURRENT_STREAMS, 100 assumed until its SETTINGS arrive),
or dials one. :class:`Http2Upstream` forwards the response side of its streams (see
:mod:`appliance.net.h2stream`), keeps quiet connections alive with PING, and on GOAWAY
refuses to the client the streams the upstream never started.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from appliance.net.addr import OrigDst
from appliance.net.h2stream import (
    H2Stream,
    cancel_upstream,
    drain,
    forwardable,
    h2_config,
    reset_downstream,
    respond_error,
    response_head,
    to_downstream,
    to_upstream,
)

if TYPE_CHECKING:
    from appliance.net.listener import Direction


class Http2Upstream(asyncio.Protocol):
    """A multiplexed HTTP/2 connection to one endpoint."""

    def __init__(self, d: Direction, key: OrigDst) -> None:
        self.d = d
        self.key = key
        self.conn = h2.connection.H2Connection(config=h2_config(client_side=True))
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
        # Our own count: h2's open_outbound_streams walks every stream on each call. Where
        # the two differ, h2's send_headers refuses and open() finds another connection.
        return limit - len(self.streams)

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
                srv.conn.send_headers(stream.sid, forwardable(event.headers))
        elif isinstance(event, h2.events.TrailersReceived):
            if stream is not None and not stream.done:
                for name, value in event.headers:
                    if name == b"grpc-status":
                        stream.grpc_status = value
                to_downstream(stream, forwardable(event.headers), True, 0)
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
