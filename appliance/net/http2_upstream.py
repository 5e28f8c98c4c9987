"""HTTP/2 upstream connections: multiplexed, one per endpoint (more when full), pooled.

Theory of operation: :class:`H2Pool` gives each new stream a connection to its endpoint
that has room (the peer's MAX_CONCURRENT_STREAMS, 100 assumed until its SETTINGS arrive),
or dials one. :class:`Http2Upstream` is the handler of a client-role
:class:`~appliance.protocols.h2conn.H2Connection`: it forwards the response side of its
streams (see :mod:`appliance.net.h2stream`), keeps quiet connections alive with PING, and on
GOAWAY refuses to the client the streams the upstream never started.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from appliance.net.addr import OrigDst
from appliance.net.h2stream import (
    H2Stream,
    drain,
    flush_all,
    reset_downstream,
    respond_error,
    response_head,
    to_downstream,
    to_upstream,
    touch,
)
from appliance.net.tls import TlsConnectError
from appliance.net.translate_h1 import H1Pool, wants_http1
from appliance.protocols.h2conn import H2Connection, H2Error, Stream
from appliance.protocols.h2frames import CANCEL, REFUSED_STREAM
from appliance.protocols.h2send import CLOSED

if TYPE_CHECKING:
    from appliance.net.listener import Direction


class Http2Upstream(asyncio.Protocol):
    """A multiplexed HTTP/2 connection to one endpoint."""

    def __init__(self, d: Direction, key: OrigDst) -> None:
        self.d = d
        self.key = key
        self.conn = H2Connection(self, client=True)
        self.streams: dict[int, H2Stream] = {}  # by upstream stream id
        self.transport: Any = None
        self.tcp = d.tcp_stats("h2", "dst")
        self.draining = False  # GOAWAY received: no new streams
        self.waiting: list[H2Stream] = []  # streams to open once connected
        self.last_read = d.loop.time()
        self.ping_sent = 0.0  # when the keepalive PING went out; 0 when none is pending
        self.settings_seen = False
        self.limit = 100  # streams we may have open: the peer's SETTINGS say, 100 until then
        self.dirty = False
        self.write_paused = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.opened_at = self.tcp.open()
        self.conn.start()
        self.flush()

    def capacity(self) -> int:
        """Streams the peer lets us open now (its MAX_CONCURRENT_STREAMS minus open ones).
        Until its SETTINGS arrive we assume 100 (RFC 9113's floor for what a peer should
        allow), so a burst is not refused."""
        return self.limit - len(self.streams)

    @property
    def full(self) -> bool:
        return self.draining or len(self.streams) + len(self.waiting) >= self.limit

    def open(self, stream: H2Stream) -> None:
        us = self.conn.open_stream(stream.headers, stream.request_ended, stream, stream.head)
        if us is None:  # stream ids exhausted: this connection takes no more
            self.draining = True
            self.d.h2pool.forget(self)
            self.d.h2pool.attach(stream, self.key)
            return
        stream.up, stream.us = self, us
        self.streams[us.sid] = stream
        touch(self)
        early, stream.early = stream.early, ()
        for data, end, length in early:
            to_upstream(stream, data, end, length)

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
            self.conn.receive(data)
        except H2Error as exc:
            self.d.registry.error(self.d.name, "h2_upstream_protocol_error")
            self.d.h2pool.forget(self)
            self.fail_all(f"upstream sent invalid HTTP/2: {exc.reason}")
            self.flush()
            self.transport.close()
            flush_all()
            return
        if self.conn.out:
            touch(self)

    # --- the codec's callbacks ----------------------------------------------------------
    def on_head(self, s: Stream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        stream = s.user
        if stream is not None and not stream.done:
            retrying = getattr(stream.server, "retrying", None)  # Http2Server, outbound
            if retrying and stream.server.retry_head(stream, headers, end):
                return  # dropped: the stream goes to another endpoint
            response_head(stream, headers, end)

    def on_info(self, s: Stream, headers: list[tuple[bytes, bytes]]) -> None:
        stream = s.user
        if stream is not None and not stream.done:
            stream.server.conn.send_headers(stream.cs, headers)
            touch(stream.server)

    def on_data(self, s: Stream, data: bytes, flow: int, end: bool) -> None:
        stream = s.user
        if stream is not None and not stream.done:
            to_downstream(stream, data, end, flow)
        else:
            self.conn.ack(s, flow)

    def on_trailers(self, s: Stream, headers: list[tuple[bytes, bytes]]) -> None:
        stream = s.user
        if stream is None or stream.done:
            return
        if stream.grpc:
            for name, value in headers:
                if name == b"grpc-status":
                    stream.grpc_status = value
        to_downstream(stream, headers, True, 0)

    def on_reset(self, s: Stream, code: int) -> None:
        stream = s.user
        self.streams.pop(s.sid, None)
        if stream is None or stream.done:
            return
        s.user = None
        if (code == REFUSED_STREAM and not stream.response_started and stream.request_ended
                and not stream.retried):
            # Refused before any processing (RFC 9113 8.7): safe to send again.
            stream.retried = True
            stream.up = stream.us = None
            self.d.h2pool.attach(stream, self.key)
            return
        reset_downstream(stream, code)

    def on_stream_error(self, s: Stream | None, sid: int, kind: str, reason: str) -> None:
        """The upstream's response on this stream is malformed: the client gets a 502."""
        self.d.registry.error(self.d.name, "h2_upstream_malformed")
        stream = s.user if s is not None else None
        self.streams.pop(sid, None)
        if stream is not None and not stream.done:
            s.user = None  # type: ignore[union-attr]
            respond_error(stream, 502, f"upstream sent an invalid response: {reason}")

    def on_window(self, s: Stream | None) -> None:
        if s is None:
            for stream in list(self.streams.values()):
                if stream.to_up:
                    drain(stream, down=False)
        elif s.user is not None and s.user.to_up:
            drain(s.user, down=False)

    def on_settings(self) -> None:
        self.limit = self.conn.remote_max_streams
        if not self.settings_seen:
            self.settings_seen = True
            self.open_waiting()

    def on_ping_ack(self, data: bytes) -> None:
        self.ping_sent = 0.0

    def on_goaway(self, last_sid: int, code: int) -> None:
        self.goaway(last_sid)

    def on_control(self) -> None:
        pass  # upstreams are not counted for floods

    # --- connection lifecycle -----------------------------------------------------------
    def open_waiting(self) -> None:
        """Open the streams that waited for this connection, as far as the peer allows;
        the rest go to another connection (the pool dials one if needed)."""
        waiting, self.waiting = self.waiting, []
        for stream in waiting:
            if stream.done:
                continue
            if self.draining or self.capacity() <= 0:
                self.d.h2pool.attach(stream, self.key)
            else:
                self.open(stream)
        touch(self)
        flush_all()

    def goaway(self, last_stream_id: int) -> None:
        """The upstream is going away: streams it never started are refused, so the
        client may retry them; the rest may finish."""
        self.draining = True
        self.d.h2pool.forget(self)
        for usid, stream in list(self.streams.items()):
            if usid > last_stream_id and not stream.response_started:
                self.streams.pop(usid, None)
                reset_downstream(stream, REFUSED_STREAM)
        self.close_if_done()

    def stream_done(self, stream: H2Stream) -> None:
        us = stream.us
        if us is not None:
            us.user = None
            self.streams.pop(us.sid, None)
            if us.state != CLOSED:  # the response is over; the request side is not needed
                self.conn.reset(us, CANCEL)
                touch(self)
        self.close_if_done()

    def close_if_done(self) -> None:
        if self.draining and not self.streams and self.transport is not None:
            self.flush()
            self.transport.close()

    def fail_all(self, cause: str) -> None:
        for stream in list(self.streams.values()) + self.waiting:
            if not stream.done and not (stream.us is None and _requeue(stream)):
                respond_error(stream, 502, cause)
        self.streams.clear()
        self.waiting = []

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            if stream.to_up:
                drain(stream, down=False)
        flush_all()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tcp.close(self.opened_at)
        self.transport = None
        self.d.h2pool.forget(self)
        self.fail_all("upstream closed the connection" if exc is None
                      else f"upstream connection failed: {exc}")
        flush_all()


def _requeue(stream: H2Stream) -> bool:
    """A stream never opened upstream: its server may send it elsewhere (a retry)."""
    requeue = getattr(stream.server, "requeue", None)
    return requeue is not None and requeue(stream)


class H2Pool:
    """Multiplexed upstream connections per endpoint; streams whose endpoint speaks only
    HTTP/1.1 go to :class:`~appliance.net.translate_h1.H1Pool` instead."""

    def __init__(self, d: Direction) -> None:
        self.d = d
        self.conns: dict[OrigDst, list[Http2Upstream]] = {}
        side = d.config.outbound if d.name == "outbound" else d.config.inbound
        self.h1_ports = side.http1_upstream_ports
        self.h1 = H1Pool(d)

    def attach(self, stream: H2Stream, dst: OrigDst) -> None:
        if (self.h1_ports or stream.orig_proto) and wants_http1(self.d, stream, dst):
            self.h1.attach(stream, dst)
            return
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
            await d.connect(lambda: up, dst, alpn="h2")
        except TimeoutError:
            self.forget(up)
            d.registry.error(d.name, "connect_timeout")
            up.fail_all(f"upstream unreachable: connect to {dst} timed out")
            flush_all()
            return
        except TlsConnectError as exc:
            self.forget(up)
            d.registry.error(d.name, exc.kind)
            up.fail_all(str(exc))
            flush_all()
            return
        except OSError as exc:
            self.forget(up)
            d.registry.error(d.name, "connect_refused")
            up.fail_all(f"upstream unreachable: {dst}: {exc.strerror or exc}")
            flush_all()
            return
        up.open_waiting()

    def forget(self, up: Http2Upstream) -> None:
        conns = self.conns.get(up.key)
        if conns and up in conns:
            conns.remove(up)

    def sweep(self, now: float) -> None:
        """Keepalive: PING a connection quiet for ``h2.keepalive_interval``; one that does
        not answer within ``h2.keepalive_timeout`` is closed (its streams get errors)."""
        self.h1.sweep(now)
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
        self.h1.close_all()
        for conns in self.conns.values():
            for up in conns:
                if up.transport is not None:
                    up.transport.close()
        self.conns.clear()
