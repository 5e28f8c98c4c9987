"""HTTP/2 (h2c, prior knowledge): the client-facing connection.

Theory of operation: :class:`Http2Server` is the handler of a server-role
:class:`~appliance.protocols.h2conn.H2Connection`, which validates frames and request
headers and calls it per stream. It applies the abuse limits
(:mod:`appliance.protocols.h2guard`) and hands each stream to the pool of multiplexed
upstream connections (:mod:`appliance.net.http2_upstream`) after the whole read was
processed. How a stream's parts move is in :mod:`appliance.net.h2stream`.

A client that sends but does not read makes its connection's write buffer grow; from
then on (``pause_writing``) no DATA is sent to it, so the upstream is not read for it
either, and the control-frame answers it keeps asking for (PING and SETTINGS ACKs) are
counted: past ``_ANSWER_BACKLOG`` of them the connection is dropped.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from appliance.net.addr import OrigDst
from appliance.net.h2stream import (
    GRPC_INTERNAL,
    H2Stream,
    cancel_upstream,
    deadline_passed,
    drain,
    flush_all,
    format_grpc_timeout,
    log,
    parse_grpc_timeout,
    respond_error,
    to_upstream,
    touch,
)
from appliance.protocols.h2conn import H2Connection, H2Error, Stream
from appliance.protocols.h2frames import CANCEL, ENHANCE_YOUR_CALM, NO_ERROR, REFUSED_STREAM
from appliance.protocols.h2guard import H2Guard
from appliance.protocols.h2send import HALF_LOCAL

if TYPE_CHECKING:
    from appliance.net.listener import Direction

# PING/SETTINGS ACKs a client may have us queue while it does not read what we send.
_ANSWER_BACKLOG = 256
_MEMO_ENTRIES = 64


class Http2Server(asyncio.Protocol):
    """The client-facing side of an HTTP/2 connection."""

    def __init__(self, d: Direction, transport: Any, dst: OrigDst) -> None:
        self.d = d
        self.transport = transport
        self.dst = dst
        limits = d.config.h2
        self.conn = H2Connection(self, client=False,
                                 max_concurrent_streams=limits.max_concurrent_streams,
                                 max_header_list_size=limits.max_header_list_size)
        self.guard = H2Guard(reset_limit=limits.reset_limit,
                             control_frame_limit=limits.control_frame_limit)
        self.streams: dict[int, H2Stream] = {}
        self.memo: dict[int, tuple[Any, ...]] = {}  # see prepare()
        self.response_memo: dict[int, tuple[Any, ...]] = {}  # see h2stream.response_head
        self.opening: list[H2Stream] = []  # new streams, sent upstream after the read
        self.tcp = d.tcp_stats("h2", "src")
        self.stats = d.registry.http(d.name, "h2")
        self.via_header = (b"via", d.via)
        self.closed = False
        self.dirty = False
        self.write_paused = False
        self.backlog = 0  # control answers queued while the client was not reading
        self.last_active = d.loop.time()

    def start(self, early: bytes, early_eof: bool) -> None:
        self.transport.set_protocol(self)
        self.tcp.opened += 1
        self.d.h2_conns.add(self)
        self.conn.start()
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
        conn = self.conn
        try:
            conn.receive(data)
        except H2Error as exc:
            self.d.registry.error(self.d.name, exc.kind)
            log.debug("h2 connection error: %s", exc.reason)
            self.close()
            flush_all()
            return
        if conn.answers:
            self.answered(conn.answers)
        # Streams are opened upstream only now, so a request the client reset in the same
        # read (Rapid Reset's pattern) never reaches the upstream.
        opening = self.opening
        if opening:
            self.opening = []
            router = self.d.router
            for stream in opening:
                if stream.done:
                    continue
                if router is None:
                    self.d.h2pool.attach(stream, self.dst)
                else:
                    self.route(router, stream)
        if conn.out:
            touch(self)

    def route(self, router: Any, stream: H2Stream) -> None:
        """Logical routing: pick this stream's endpoint (per request, not per connection)."""
        from appliance.net.route import route_h2
        from appliance.routing.router import Pending, RouteError

        # route_h2 may take override headers out of the list: a copy of the shared head.
        stream.headers = headers = list(stream.headers)
        try:
            routed = route_h2(router, headers, self.dst, self.d.config.routing.allow_overrides)
        except RouteError as exc:
            self.d.registry.error(self.d.name, exc.kind)
            respond_error(stream, exc.status, str(exc))
            return
        if isinstance(routed, Pending):
            self.d.spawn(self.await_discovery(router, stream, routed))
            return
        stream.target = routed
        self.d.h2pool.attach(stream, routed.dst)

    async def await_discovery(self, router: Any, stream: H2Stream, pending: Any) -> None:
        from appliance.routing.router import Pending, RouteError

        try:
            await pending.wait(self.d.config.routing.bind_timeout)
        except TimeoutError:
            pass
        if stream.done:
            return
        try:
            routed = router.again(pending)
        except RouteError as exc:
            self.d.registry.error(self.d.name, exc.kind)
            respond_error(stream, exc.status, str(exc))
            routed = None
        if isinstance(routed, Pending):
            self.d.registry.error(self.d.name, "discovery_timeout")
            respond_error(stream, 503, "service discovery has not answered for "
                                       f"{'/'.join(pending.service.id)}")
        elif routed is not None:
            stream.target = routed
            self.d.h2pool.attach(stream, routed.dst)
        self.flush()
        flush_all()

    def answered(self, answers: int) -> None:
        self.conn.answers = 0
        if self.write_paused:
            self.backlog += answers
            if self.backlog > _ANSWER_BACKLOG:
                self.d.registry.error(self.d.name, "h2_control_backlog")
                self.abort()

    def shutdown(self) -> None:
        """Graceful: GOAWAY NO_ERROR naming the last stream we accepted; the streams open
        may finish, later ones are refused."""
        if self.closed:
            return
        self.last_accepted = self.conn.highest_remote
        self.conn.goaway(NO_ERROR, self.last_accepted)
        self.flush()

    last_accepted = 1 << 31  # lowered by shutdown()
    authz: Any = None  # inbound: authorization and l5d-client-id (tls_inbound.InboundPeer)

    # --- the codec's callbacks ----------------------------------------------------------
    def on_head(self, s: Stream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if s.sid > self.last_accepted:
            self.conn.reset(s, REFUSED_STREAM)
            return
        memo = self.memo.get(id(headers))
        if memo is None or memo[0] is not headers:
            memo = self.prepare(headers)
        _, out, grpc, head, looped, orig_proto = memo
        stream = H2Stream(self, s, out, grpc, self.d.loop.time())
        s.user = stream
        stream.request_ended = end
        stream.head = head
        stream.orig_proto = orig_proto
        self.streams[s.sid] = stream
        self.stats.requests += 1
        if looped:
            self.d.registry.error(self.d.name, "loop")
            respond_error(stream, 502, "request loop detected (Via names this proxy)")
            return
        if grpc:
            stream.headers = out = list(out)
            if not self.apply_grpc_timeout(stream, out):
                return
        if self.authz is not None and not self.authz.admit_h2(self, stream):
            return  # denied: 403 or PERMISSION_DENIED (l5d-client-id is set otherwise)
        self.opening.append(stream)

    def prepare(self, headers: list[tuple[bytes, bytes]]) -> tuple[Any, ...]:
        """What the proxy needs of a request head, computed once per distinct head: the
        decoder hands out the same list object for a repeated header block, so the result
        is kept by identity (with the list itself, so its id cannot be reused)."""
        grpc = head = looped = orig_proto = False
        via = self.d.via_name
        for name, value in headers:
            if name == b":method":
                head = value == b"HEAD"
            elif name == b"content-type":
                grpc = value.startswith(b"application/grpc")
            elif name == b"via" and via in value:
                looped = True
            elif name == b"l5d-orig-proto" and self.d.name == "inbound":
                orig_proto = value == b"HTTP/1.1"
        out = (*headers, self.via_header)
        if orig_proto:  # linkerd's mesh downgrade: the app gets HTTP/1.1 (translate_h1)
            out = tuple(h for h in out if h[0] != b"l5d-orig-proto")
        memo = (headers, out, grpc, head, looped, orig_proto)
        if len(self.memo) >= _MEMO_ENTRIES:
            self.memo.clear()
        self.memo[id(headers)] = memo
        return memo

    def on_data(self, s: Stream, data: bytes, flow: int, end: bool) -> None:
        stream = s.user
        if stream is not None:
            to_upstream(stream, data, end, flow)
        else:
            self.conn.ack(s, flow)

    def on_trailers(self, s: Stream, headers: list[tuple[bytes, bytes]]) -> None:
        stream = s.user
        if stream is not None:
            to_upstream(stream, headers, True, 0)

    def on_info(self, s: Stream, headers: list[tuple[bytes, bytes]]) -> None:
        pass  # clients send no informational responses

    def on_reset(self, s: Stream, code: int) -> None:
        stream = s.user
        if stream is None:
            return
        s.user = None
        self.streams.pop(s.sid, None)
        stream.done = True
        if stream.target is not None:
            stream.target.done(True)  # the client's choice, not the endpoint's failure
        now = self.d.loop.time()
        self.stats.response(stream.status, now - stream.started, "client_reset")
        cancel_upstream(stream, code)
        if not stream.response_started and self.guard.stream_reset_early(now):
            raise H2Error(ENHANCE_YOUR_CALM, "too many streams reset early (Rapid Reset)",
                          "h2_rapid_reset")

    def on_stream_error(self, s: Stream | None, sid: int, kind: str, reason: str) -> None:
        """The codec reset a stream (malformed, refused, over a limit): it goes nowhere."""
        self.d.registry.error(self.d.name, kind)
        log.debug("stream %d reset: %s", sid, reason)
        stream = s.user if s is not None else None
        if s is not None and stream is not None:
            s.user = None
            stream.done = True
            if stream.target is not None:
                stream.target.done(True)  # the client's request was at fault
            self.streams.pop(sid, None)
            cancel_upstream(stream, CANCEL)

    def on_window(self, s: Stream | None) -> None:
        if s is None:
            for stream in list(self.streams.values()):
                if stream.to_down:
                    drain(stream, down=True)
        elif s.user is not None and s.user.to_down:
            drain(s.user, down=True)

    def on_settings(self) -> None:
        pass

    def on_ping_ack(self, data: bytes) -> None:
        pass

    def on_goaway(self, last_sid: int, code: int) -> None:
        self.close()  # the client is leaving: its streams are cancelled upstream

    def on_control(self) -> None:
        if self.guard.control_frame(self.d.loop.time()):
            raise H2Error(ENHANCE_YOUR_CALM, "too many control frames", "h2_control_flood")

    # --- gRPC deadlines -----------------------------------------------------------------
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

    # --- the transport ------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.backlog = 0
        for stream in list(self.streams.values()):
            if stream.to_down:
                drain(stream, down=True)
        flush_all()

    def stream_done(self, stream: H2Stream) -> None:
        stream.done = True
        if stream.target is not None:
            stream.target.done(0 < stream.status < 500 and stream.grpc_status in (b"", b"0"))
        if stream.deadline is not None:
            stream.deadline.cancel()
            stream.deadline = None
        cs = stream.cs
        cs.user = None
        self.streams.pop(stream.sid, None)
        if cs.state == HALF_LOCAL:  # answered before the request ended: stop its body
            self.conn.reset(cs, NO_ERROR)
            touch(self)

    def goaway(self, code: int) -> None:
        """Close the connection with GOAWAY ``code``; its streams are cancelled upstream."""
        self.conn.goaway(code)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True
            self.transport.close()
            self.abandon_streams()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()
            self.abandon_streams()

    def abandon_streams(self) -> None:
        """This side can send nothing more: its streams are cancelled upstream now, before
        their responses arrive for a connection that is gone."""
        self.opening = []
        for stream in list(self.streams.values()):
            stream.done = True
            if stream.target is not None:
                stream.target.done(True)  # the client left
            stream.cs.user = None
            cancel_upstream(stream, CANCEL)
        self.streams.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.tcp.closed += 1
        self.d.h2_conns.discard(self)
        self.abandon_streams()
        flush_all()

