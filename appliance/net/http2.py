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

Reliability (docs/reliability.md): each stream takes an in-flight slot of the direction's
limiter (or waits in its queue, or gets 503 / gRPC UNAVAILABLE at once), then
:meth:`Http2Server.send` gives it its deadline (route timeout, ``l5d-ctx-deadline``,
``grpc-timeout``: the earliest; already past: 504 / DEADLINE_EXCEEDED without calling
upstream) and, outbound, its retry state. A stream is retried when its response head says
so (an HTTP 5xx, or a trailers-only gRPC status, that the classifier calls retryable) before
anything of that response went to the client, with the request parts replayed (bodies up to
``retry_buffer_bytes``); a stream that never reached its upstream (the connection failed)
is requeued to another endpoint (:meth:`Http2Server.requeue`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from appliance.net.addr import OrigDst
from appliance.net.h2stream import (
    GRPC_DEADLINE_EXCEEDED,
    GRPC_INTERNAL,
    H2Stream,
    cancel_upstream,
    deadline_passed,
    drain,
    flush_all,
    log,
    parse_grpc_timeout,
    respond_error,
    to_upstream,
    touch,
)
from appliance.net.route import next_try, request_deadline, stamp_deadline, tag_dst
from appliance.protocols.h2conn import H2Connection, H2Error, Stream
from appliance.protocols.h2frames import CANCEL, ENHANCE_YOUR_CALM, NO_ERROR, REFUSED_STREAM
from appliance.protocols.h2guard import H2Guard
from appliance.protocols.h2send import HALF_LOCAL
from appliance.protocols.http1 import TRACE_HEADERS
from appliance.resilience.classify import ResponseClass, parse_grpc_status
from appliance.resilience.policy import Attempts

if TYPE_CHECKING:
    from appliance.net.listener import Direction
    from appliance.resilience.budget import RetryBudget
    from appliance.resilience.deadline import Deadline

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
        self.opened_at = self.tcp.open()
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
                if not stream.done:
                    self.admit(stream, router)
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
        stream.headers = tag_dst(stream.headers, routed)
        self.count_as(stream, routed)
        self.send(stream, routed.dst)

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
            stream.headers = tag_dst(stream.headers, routed)
            self.count_as(stream, routed)
            self.send(stream, routed.dst)
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
        _, out, grpc, head, looped, orig_proto, stats, has_trace = memo
        stream = H2Stream(self, s, out, grpc, self.d.loop.time())
        s.user = stream
        stream.request_ended = end
        stream.head = head
        stream.orig_proto = orig_proto
        self.streams[s.sid] = stream
        stream.stats = stats
        stats.requests += 1
        if self.d.tracer.on:
            self.trace(stream, has_trace)
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

    def trace(self, stream: H2Stream, has_context: bool) -> None:
        """Start the stream's span; the headers sent on carry its context."""
        d = self.d
        peer = self.transport.get_extra_info("peername") if d.name == "inbound" else None
        span = d.tracer.start(d.name, stream.headers, version="2", peer=peer,
                              has_context=has_context)
        if span is not None:
            stream.headers = span.apply(stream.headers)
            stream.span = span

    def record(self, stream: H2Stream, error: str = "") -> None:
        """The stream is over: end its span, write its access-log line."""
        span, stream.span = stream.span, None
        d = self.d
        grpc_status = stream.grpc_status.decode("latin-1") or None
        upstream = stream.target.dst if stream.target is not None else self.dst
        if span is not None:
            span.end(stream.status, grpc_status, error,
                     peer=upstream if d.name == "outbound" else None,
                     retries=1 if stream.retried else 0)
        log = d.access_log
        if log is not None:
            labels = dict(stream.stats.labels)
            method = path = ""
            for name, value in stream.headers:
                if name == b":method":
                    method = value.decode("latin-1")
                elif name == b":path":
                    path = value.decode("latin-1")
            log.write(direction=d.name, protocol="h2", method=method,
                      authority=labels.get("authority"), path=path, status=stream.status,
                      grpc_status=grpc_status,
                      duration_ms=round((d.loop.time() - stream.started) * 1000, 3),
                      upstream=str(upstream), dst_service=labels.get("dst_service"),
                      error=error, retries=1 if stream.retried else 0,
                      trace_id=f"{span.trace_id:032x}" if span is not None else None)

    def count_as(self, stream: H2Stream, routed: Any) -> None:
        """Routed to a service: the stream counts under its ``dst_service`` label."""
        if routed.service is None:
            return
        old = stream.stats
        new = self.d.registry.http(self.d.name, "h2", dict(old.labels).get("authority", ""),
                                   routed.service_name)
        old.requests -= 1
        new.requests += 1
        stream.stats = new

    def prepare(self, headers: list[tuple[bytes, bytes]]) -> tuple[Any, ...]:
        """What the proxy needs of a request head, computed once per distinct head: the
        decoder hands out the same list object for a repeated header block, so the result
        is kept by identity (with the list itself, so its id cannot be reused)."""
        grpc = head = looped = orig_proto = has_trace = False
        authority = ""
        via = self.d.via_name
        for name, value in headers:
            if name == b":method":
                head = value == b"HEAD"
            elif name == b":authority" or name == b"host" and not authority:
                authority = value[:255].decode("latin-1").lower()
            elif name in TRACE_HEADERS:
                has_trace = True
            elif name == b"content-type":
                grpc = value.startswith(b"application/grpc")
            elif name == b"via" and via in value:
                looped = True
            elif name == b"l5d-orig-proto" and self.d.name == "inbound":
                orig_proto = value == b"HTTP/1.1"
        out = (*headers, self.via_header)
        if orig_proto:  # linkerd's mesh downgrade: the app gets HTTP/1.1 (translate_h1)
            out = tuple(h for h in out if h[0] != b"l5d-orig-proto")
        memo = (headers, out, grpc, head, looped, orig_proto,
                self.d.registry.http(self.d.name, "h2", authority or str(self.dst)), has_trace)
        if len(self.memo) >= _MEMO_ENTRIES:
            self.memo.clear()
        self.memo[id(headers)] = memo
        return memo

    def on_data(self, s: Stream, data: bytes, flow: int, end: bool) -> None:
        stream = s.user
        if stream is not None:
            if self.retrying:
                self.keep(stream, data, end)
            to_upstream(stream, data, end, flow)
        else:
            self.conn.ack(s, flow)

    def on_trailers(self, s: Stream, headers: list[tuple[bytes, bytes]]) -> None:
        stream = s.user
        if stream is not None:
            if self.retrying:
                self.keep(stream, headers, True)
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
        self.release(stream)
        if stream.target is not None:
            stream.target.done(True)  # the client's choice, not the endpoint's failure
        now = self.d.loop.time()
        stream.stats.response(stream.status, now - stream.started, "client_reset")
        if stream.span is not None or self.d.access_log is not None:
            self.record(stream, "client reset the stream")
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
            self.release(stream)
            if stream.target is not None:
                stream.target.done(True)  # the client's request was at fault
            if stream.span is not None or self.d.access_log is not None:
                self.record(stream, reason)
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
        """Check the call's ``grpc-timeout``; False (answered) if the value is invalid. The
        deadline itself is armed by :meth:`send`, with the other sources."""
        for name, value in headers:
            if name == b"grpc-timeout" and parse_grpc_timeout(value) is None:
                self.d.registry.error(self.d.name, "grpc_timeout_invalid")
                respond_error(stream, 400, f"invalid grpc-timeout {value!r}",
                              grpc_status=GRPC_INTERNAL)
                return False
        return True

    # --- reliability: slots, deadlines, retries (docs/reliability.md) ----------------------
    held: set[H2Stream] | frozenset[H2Stream] = frozenset()  # streams holding a slot
    queued: dict[H2Stream, _Queued] = {}  # replaced per connection on first use
    retrying: dict[H2Stream, _Retry] = {}

    def admit(self, stream: H2Stream, router: Any) -> None:
        """Take an in-flight slot (or wait for one, or be shed), then route and send."""
        limiter = self.d.limiter
        if limiter.acquire():
            self.hold(stream)
            self.go(stream, router)
            return
        waiter = _Queued(self, stream)
        if limiter.enqueue(waiter):
            if not self.queued:
                self.queued = {}
            self.queued[stream] = waiter
        else:
            waiter.shed("limits.max_requests in flight and the queue is full",
                        "shed_requests")

    def hold(self, stream: H2Stream) -> None:
        if not self.held:
            self.held = set()
        self.held.add(stream)  # type: ignore[union-attr]

    def go(self, stream: H2Stream, router: Any) -> None:
        if router is None:
            self.send(stream, self.dst)
        else:
            self.route(router, stream)

    def send(self, stream: H2Stream, dst: OrigDst) -> None:
        """Before the first attempt: the deadline (504 if past) and the retry state."""
        d, target = self.d, stream.target
        policy = d.policies.for_path(target.path if target is not None else None)
        deadline = request_deadline(stream.headers, policy.timeout, d.loop.time,  # type: ignore[arg-type]
                                    grpc=stream.grpc)
        if deadline is not None:  # unbounded: malformed headers, dropped by the stamp
            if deadline.expired():
                if target is not None:
                    target.abandon()
                d.registry.error(d.name, "deadline_exceeded")
                respond_error(stream, 504, "deadline exceeded before the request was sent "
                                           f"({deadline.source})",
                              grpc_status=GRPC_DEADLINE_EXCEEDED)
                return
            stream.headers = headers = list(stream.headers)
            stamp_deadline(headers, deadline, grpc=stream.grpc)
            if deadline.bounded:
                stream.deadline = d.loop.call_at(deadline.at, deadline_passed, stream,
                                                  deadline.source)
        if d.name == "outbound" and policy.max_retries:
            service = target.service if target is not None else None
            budget = (service.budget(policy) if service is not None
                      else d.policies.dst_budget(dst, policy))
            budget.deposit()
            if not self.retrying:
                self.retrying = {}
            attempts = Attempts(policy, d.rng)
            for part, end, _ in stream.early:  # parts that came with the head
                attempts.keep((part, end), len(part) if part.__class__ is bytes else 0)
            self.retrying[stream] = _Retry(attempts, budget, deadline, dst)
        d.h2pool.attach(stream, dst)

    def keep(self, stream: H2Stream, part: Any, end: bool) -> None:
        """A request part on its way upstream: kept for a replay while retries are possible."""
        state = self.retrying.get(stream)
        if state is not None:
            state.attempts.keep((part, end), len(part) if part.__class__ is bytes else 0)

    def success(self, stream: H2Stream) -> bool:
        """A failed-looking response's verdict by the classifier (``allSuccessful``, gRPC
        ``success_grpc_codes``)."""
        target = stream.target
        policy = self.d.policies.for_path(target.path if target is not None else None)
        if stream.grpc:
            code = parse_grpc_status(stream.grpc_status) if stream.grpc_status else None
            return policy.grpc_classifier.classify(b"POST", stream.status, code).ok
        return policy.classifier.classify(b"GET", stream.status).ok

    def release(self, stream: H2Stream) -> None:
        """The stream is over: its slot goes to the next waiter; its retry state goes."""
        if self.retrying:
            self.retrying.pop(stream, None)
        if self.queued:
            waiter = self.queued.pop(stream, None)
            if waiter is not None:
                self.d.limiter.cancel(waiter)
        if stream in self.held:
            self.held.discard(stream)  # type: ignore[union-attr]
            waiter = self.d.limiter.release()
            if waiter is not None:
                self.d.loop.call_soon(waiter.admitted)

    def retry_head(self, stream: H2Stream, headers: list[tuple[bytes, bytes]],
                   end: bool) -> bool:
        """The response head arrived: True if the stream is retried instead (the head is
        then dropped; nothing of it reached the client)."""
        state = self.retrying.get(stream)
        if state is None or stream.response_started:
            return False
        status = int(headers[0][1])
        policy = state.attempts.policy
        if stream.grpc:
            if not end and status == 200:
                return False  # the gRPC status will come in the trailers: too late
            code = next((v for n, v in headers if n == b"grpc-status"), None)
            verdict = policy.grpc_classifier.classify(b"POST", status, parse_grpc_status(code))
        elif status < 500:
            return False
        else:
            method = next((v for n, v in stream.headers if n == b":method"), b"")
            verdict = policy.classifier.classify(method, status)
        return verdict.retryable and self.retry(stream, state, "response", verdict)

    def requeue(self, stream: H2Stream) -> bool:
        """The stream's upstream connection failed before the stream was opened on it:
        send it to another endpoint (True), if its policy allows."""
        state = self.retrying.get(stream)
        if state is None or stream.response_started:
            return False
        return self.retry(stream, state, "unsent", ResponseClass.RETRYABLE_FAILURE)

    def retry(self, stream: H2Stream, state: _Retry, reason: str,
              verdict: ResponseClass) -> bool:
        d = self.d
        sent = reason != "unsent"
        plan = next_try(d, state.attempts, state.budget, state.deadline, stream.target,
                        reason, verdict)
        if plan is None:
            return False
        delay, again = plan
        if again is not None:
            stream.target, state.dst = again, again.dst
        if sent:
            replay = state.attempts.replay
            queued = stream.to_up
            cancel_upstream(stream, CANCEL)
            for item in queued:  # never sent: credit the client now, they are replayed
                if item[2]:
                    self.conn.ack(stream.cs, item[2])
            touch(self)
            stream.up = stream.us = None
            stream.to_up = stream.to_down = ()
            stream.early = [(part, end, 0) for part, end in replay or ()]
        d.loop.call_later(delay, self.resend, stream, state)
        return True

    def resend(self, stream: H2Stream, state: _Retry) -> None:
        if stream.done:
            return
        if state.deadline is not None:
            stamp_deadline(stream.headers, state.deadline,  # type: ignore[arg-type]
                           grpc=stream.grpc)
        self.d.h2pool.attach(stream, state.dst)
        flush_all()

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
        self.release(stream)
        if stream.span is not None or self.d.access_log is not None:
            self.record(stream)
        target = stream.target
        if target is not None:
            status, grpc_status = stream.status, stream.grpc_status
            target.done((0 < status < 500 and grpc_status in (b"", b"0"))
                        or (status > 0 and self.success(stream)))
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
            self.release(stream)
            if stream.target is not None:
                stream.target.done(True)  # the client left
            if stream.span is not None or self.d.access_log is not None:
                self.record(stream, "client went away")
            stream.cs.user = None
            cancel_upstream(stream, CANCEL)
        self.streams.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.tcp.close(self.opened_at)
        self.d.h2_conns.discard(self)
        self.abandon_streams()
        flush_all()


class _Queued:
    """A stream waiting in the direction's limiter queue for an in-flight slot."""

    __slots__ = ("server", "stream")

    def __init__(self, server: Http2Server, stream: H2Stream) -> None:
        self.server = server
        self.stream = stream

    def admitted(self) -> None:
        """A slot was handed over (scheduled by :meth:`Http2Server.release`)."""
        server, stream = self.server, self.stream
        if server.queued:
            server.queued.pop(stream, None)
        server.hold(stream)
        if stream.done:
            server.release(stream)
            return
        server.go(stream, server.d.router)
        flush_all()

    def shed(self, cause: str, kind: str) -> None:
        """503 (gRPC: UNAVAILABLE, trailers-only) at once."""
        server, stream = self.server, self.stream
        if server.queued:
            server.queued.pop(stream, None)
        server.d.registry.error(server.d.name, kind)
        respond_error(stream, 503, f"load shed: {cause}")
        flush_all()


class _Retry:
    """One stream's retry state (outbound, with retries allowed by its policy)."""

    __slots__ = ("attempts", "budget", "deadline", "dst")

    def __init__(self, attempts: Attempts, budget: RetryBudget, deadline: Deadline | None,
                 dst: OrigDst) -> None:
        self.attempts = attempts
        self.budget = budget
        self.deadline = deadline
        self.dst = dst

