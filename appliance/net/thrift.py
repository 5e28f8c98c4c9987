"""Thrift proxying per call: each call on a client connection is routed, balanced and
answered on its own.

Theory of operation: :func:`start_thrift` takes a connection that detection named Thrift,
with the bytes read so far. :class:`ThriftServer` splits the client's stream into messages
(:class:`~appliance.protocols.thrift.Decoder`, same variant as detected) and makes each call
a :class:`Call`. A call is routed by its logical name (``/svc/<ip>:<port>`` of the original
destination, plus ``/<method>`` with ``thrift.method_in_dst``) when the direction has a
router, else sent to the original destination; it then takes a pooled upstream connection
or dials one, and is written there with that connection's own seqid
(:mod:`appliance.net.thrift_upstream`). So one client connection's calls spread over all
endpoints, and their replies come back to the right caller.

Replies go back to the client in the order its calls came (a Thrift client expects the
order a single server would give); a reply that is ready early waits. Past
:data:`MAX_INFLIGHT` calls (or :data:`MAX_HELD` bytes of their requests) in flight, or while
the client does not read its replies, the client is not read until replies leave.
ONEWAY calls have no reply: they are done once written upstream.

Outcomes: a REPLY is a success (a declared exception is the method's answer, as in
Finagle); an EXCEPTION message (``TApplicationException``) is a failure for the balancer
and failure accrual. Failures the proxy sees itself (no route, connect failure, upstream
lost, no reply within ``thrift.response_timeout``) are answered with a
``TApplicationException`` (INTERNAL_ERROR) whose message starts with ``appliance:``.

Retries, bounded by ``thrift.max_retries`` and the call's deadline, and (once something was
sent) granted by the direction's retry budget: a call whose upstream could not be reached
(nothing was sent) is routed again whatever its method; a call sent on a reused pooled
connection that closed without a byte of answer is sent once more (the server most likely
closed the idle connection as we reused it, as for HTTP/1); calls of methods in
``thrift.idempotent_methods`` are also retried after a lost connection or an EXCEPTION
reply, on a newly balanced endpoint.

Bad input from the client (malformed, oversized, truncated) closes its connection and is
counted as ``proxy_errors_total{error="thrift_<kind>"}``; other connections go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from appliance.net.addr import OrigDst
from appliance.net.relay import Relay
from appliance.net.thrift_upstream import (
    Key,
    ThriftShared,
    ThriftUpstream,
    route_name,
    shared,
)
from appliance.net.tls import TlsConnectError
from appliance.protocols.thrift import (
    CALL,
    EXCEPTION,
    INTERNAL_ERROR,
    MALFORMED,
    ONEWAY,
    UNKNOWN_METHOD,
    Decoder,
    Message,
    ThriftError,
    Variant,
    encode_exception,
    sniff,
    with_seqid,
)

if TYPE_CHECKING:
    from appliance.net.listener import Direction
    from appliance.routing.router import Router, Service, Target
    from appliance.telemetry.metrics import HttpStats

log = logging.getLogger("appliance.thrift")

MAX_INFLIGHT = 64  # two-way calls per client connection before it is no longer read
MAX_HELD = 8 * 1024 * 1024  # ... or bytes of their requests (a single larger call passes)
TRACE_PROBE = "__can__finagle__trace__v3__"  # Finagle's TTwitter upgrade probe


def start_thrift(d: Direction, transport: Any, dst: OrigDst, early: bytes, eof: bool) -> None:
    """Serve a connection detected as Thrift (a variant we do not know is relayed)."""
    variant = sniff(early)
    if not isinstance(variant, Variant):
        Relay(d, transport, dst, "thrift", early).start(eof)
        return
    ThriftServer(d, transport, dst, variant).start(early, eof)


class ThriftServer(asyncio.Protocol):
    """The client side of a Thrift connection."""

    def __init__(self, d: Direction, transport: Any, dst: OrigDst, variant: Variant) -> None:
        self.d = d
        self.shared: ThriftShared = shared(d)
        self.transport = transport
        self.dst = dst
        self.variant = variant
        self.authority = str(dst)  # the metric label
        self.decoder = Decoder(variant, max_frame_bytes=self.shared.max_frame_bytes)
        self.tcp = d.tcp_stats("thrift", "src")
        self.queue: deque[Call] = deque()  # two-way calls in arrival order, until answered
        self.held = 0  # request bytes of the calls in the queue
        self.backlog: deque[Message] = deque()  # read, but not started: too many in flight
        self.closed = False
        self.wants_close = False
        self.paused = False
        self.write_paused = False
        self.last_active = d.loop.time()

    def start(self, early: bytes, eof: bool) -> None:
        self.transport.set_protocol(self)
        self.opened_at = self.tcp.open()
        self.shared.attach(self)
        if early:
            self.data_received(early)
        if eof and not self.closed:
            self.eof_received()

    # --- client bytes ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.tcp.read_bytes += len(data)
        if self.closed:
            return
        self.last_active = self.d.loop.time()
        try:
            messages = self.decoder.feed(data)
        except ThriftError as exc:
            self.protocol_error(exc)
            return
        if len(messages) == 1 and not self.backlog and not self.full():
            self.on_message(messages[0])  # the usual case
        elif messages:
            self.backlog.extend(messages)
            self.drain()
        self.flow()

    def full(self) -> bool:
        return len(self.queue) >= MAX_INFLIGHT or self.held > MAX_HELD

    def drain(self) -> None:
        """Start the calls held back, while there is room."""
        backlog = self.backlog
        while backlog and not self.closed and not self.full():
            self.on_message(backlog.popleft())

    def on_message(self, msg: Message) -> None:
        if msg.type != CALL and msg.type != ONEWAY:
            self.protocol_error(ThriftError(MALFORMED, f"client sent {msg!r}, not a call"))
            return
        call = Call(self, msg)
        if msg.type == CALL:
            self.queue.append(call)
            self.held += len(msg.data)
            if msg.name == TRACE_PROBE:  # "not upgraded": the client goes on with plain Thrift
                call.answer(encode_exception(self.variant, msg.name, msg.seqid,
                                             "appliance: no TTwitter upgrade", UNKNOWN_METHOD))
                return
        call.start()

    def eof_received(self) -> bool:
        try:
            self.decoder.eof()
        except ThriftError as exc:
            self.protocol_error(exc)
            return False
        if not self.queue and not self.backlog:
            self.close()
            return False
        self.wants_close = True  # answer what was asked, then close
        return True

    def protocol_error(self, exc: ThriftError) -> None:
        d = self.d
        d.registry.error(d.name, f"thrift_{exc.kind}")
        log.debug("thrift client connection to %s closed: %s", self.dst, exc)
        self.close()

    # --- replies, in call order ------------------------------------------------------------
    def deliver(self, call: Call) -> None:
        queue = self.queue
        if self.closed or not queue or queue[0] is not call:
            return  # an earlier call's reply is still due; this one waits in call.reply
        out: list[bytes] = []
        while queue and queue[0].reply is not None:
            done = queue.popleft()
            self.held -= len(done.msg.data)
            out.append(done.reply)  # type: ignore[arg-type]
        data = out[0] if len(out) == 1 else b"".join(out)
        self.tcp.write_bytes += len(data)
        self.transport.write(data)
        if self.backlog:
            self.drain()
        if self.wants_close and not queue and not self.backlog:
            self.close()
        elif self.paused:
            self.flow()

    def flow(self) -> None:
        busy = bool(self.backlog) or self.full() or self.write_paused
        if busy != self.paused and not self.closed:
            self.paused = busy
            if busy:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.flow()

    # --- timeouts and teardown -------------------------------------------------------------
    def sweep(self, now: float, timeout: float, idle_timeout: float) -> None:
        """Called every tick: fail calls past their deadline; close if long idle."""
        if self.queue:
            if timeout:
                for call in list(self.queue):
                    if not call.finished and now - call.started > timeout:
                        call.timed_out(timeout)
        elif now - self.last_active > idle_timeout:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.tcp.close(self.opened_at)
        self.shared.conns.discard(self)
        queue, self.queue = self.queue, deque()
        for call in queue:
            call.cancel()


class Call:
    """One call: routing, the upstream attempt(s), and its reply."""

    __slots__ = ("server", "d", "shared", "msg", "oneway", "idempotent", "started", "stats",
                 "dst", "target", "up", "mark", "reused", "attempts", "reply", "finished",
                 "span")

    def __init__(self, server: ThriftServer, msg: Message) -> None:
        self.server = server
        self.d = server.d
        self.shared = server.shared
        self.msg = msg
        self.oneway = msg.type == ONEWAY
        self.idempotent = msg.name in self.shared.idempotent
        self.started = self.d.loop.time()
        self.stats: HttpStats | None = None
        self.dst = server.dst
        self.target: Target | None = None
        self.up: ThriftUpstream | None = None
        self.mark = 0  # the upstream's read count when this call was written
        self.reused = False
        self.attempts = 0
        self.reply: bytes | None = None
        self.finished = False
        self.span: Any = None  # the trace span, when tracing is on and the call sampled

    # --- routing and sending ---------------------------------------------------------------
    def start(self) -> None:
        self.stats = self.shared.call_stats(self.server.authority, self.msg.name)
        self.stats.requests += 1
        if self.d.tracer.on:  # plain Thrift carries no trace context: each call is a root
            self.span = self.d.tracer.start(self.d.name, (), target=self.msg.name.encode(),
                                            authority=self.server.authority.encode(),
                                            has_context=False)
        self.shared.budget.deposit()
        self.attempt()

    def attempt(self) -> None:
        self.attempts += 1
        router = self.d.router
        if router is None:
            self.send()
            return
        self.routed(router, self.route(router))

    def route(self, router: Router) -> Target | Service | None:
        from appliance.routing.router import RouteError

        name = self.shared.logical_name(self.server.dst, self.msg.name)
        try:
            return route_name(router, name, self.server.dst)
        except RouteError as exc:
            self.d.registry.error(self.d.name, exc.kind)
            self.fail(exc.status, str(exc), "proxy")
            return None

    def routed(self, router: Router, routed: Target | Service | None) -> None:
        from appliance.routing.router import Target

        if isinstance(routed, Target):
            self.target = routed
            self.dst = routed.dst
            self.send()
        elif routed is not None:
            self.d.spawn(self.await_discovery(router, routed))

    async def await_discovery(self, router: Router, service: Service) -> None:
        from appliance.routing.router import Target

        try:
            await asyncio.wait_for(asyncio.shield(service.ready()),
                                   self.d.config.routing.bind_timeout)
        except TimeoutError:
            pass
        if self.finished:
            return
        routed = self.route(router)
        if routed is not None and not isinstance(routed, Target):
            self.d.registry.error(self.d.name, "discovery_timeout")
            self.fail(503, "service discovery has not answered for "
                           f"{'/'.join(service.id)}", "proxy")
            return
        self.routed(router, routed)

    def send(self) -> None:
        key: Key = (self.dst, self.server.variant)
        up = self.shared.pool.take(key)
        if up is not None:
            self.attach(up, reused=True)
        else:
            self.d.spawn(self.connect(key))

    async def connect(self, key: Key) -> None:
        d, dst = self.d, key[0]
        try:
            _, up = await d.connect(lambda: ThriftUpstream(self.shared, key), dst)
        except TimeoutError:
            self.connect_failed("connect_timeout", f"connect to {dst} timed out")
            return
        except TlsConnectError as exc:
            self.connect_failed(exc.kind, str(exc))
            return
        except OSError as exc:
            self.connect_failed("connect_refused",
                                f"upstream unreachable: {dst}: {exc.strerror or exc}")
            return
        if self.finished:  # the client left, or the deadline passed, while we dialled
            self.shared.pool.release(up)
            return
        self.attach(up, reused=False)

    def attach(self, up: ThriftUpstream, *, reused: bool) -> None:
        self.up = up
        self.mark = up.reads
        self.reused = reused
        up.send(self)
        if self.oneway:  # no reply: done once written
            self.up = None
            self.shared.pool.release(up)
            self.finish(None, 200, True)

    # --- outcomes --------------------------------------------------------------------------
    def on_reply(self, up: ThriftUpstream, msg: Message) -> None:
        if self.finished or self.up is not up:
            return  # the reply to a call that was answered already (timeout, client gone)
        self.up = None
        reply = with_seqid(msg, self.msg.seqid)
        if msg.type != EXCEPTION:
            self.finish(reply, 200, True)
            return
        self.report(False)
        if self.idempotent and self.may_retry():
            self.retry()
            return
        self.finish(reply, 500, False, "exception")

    def connect_failed(self, kind: str, cause: str) -> None:
        self.d.registry.error(self.d.name, kind)
        if self.finished:
            return
        self.report(False)
        if self.may_retry(sent=False):  # nothing was sent: safe for any method
            self.retry()
            return
        self.fail(502, cause, kind)

    def upstream_failed(self, up: ThriftUpstream, cause: str) -> None:
        if self.finished or self.up is not up:
            return
        self.up = None
        self.report(False)
        stale = self.reused and up.reads == self.mark and self.attempts == 1
        if (self.idempotent or stale) and self.may_retry():
            self.retry()
            return
        self.d.registry.error(self.d.name, "upstream_failed")
        self.fail(502, cause, "upstream")

    def timed_out(self, timeout: float) -> None:
        self.d.registry.error(self.d.name, "response_timeout")
        up, self.up = self.up, None
        self.fail(504, f"no reply from {self.dst} within {timeout:g}s", "timeout")
        if up is not None:
            up.abort()  # its reply, if it ever comes, answers nobody

    def may_retry(self, *, sent: bool = True) -> bool:
        """Another attempt: within max_retries and the deadline, and, if this attempt
        reached the upstream, granted by the retry budget (withdrawn last)."""
        shared_, server = self.shared, self.server
        if server.closed or self.attempts > shared_.max_retries:
            return False
        timeout = shared_.response_timeout
        if timeout and self.d.loop.time() - self.started >= timeout:
            return False
        return not sent or shared_.budget.try_withdraw()

    def retry(self) -> None:
        self.d.registry.error(self.d.name, "thrift_retry")
        self.attempt()

    def report(self, ok: bool) -> None:
        """Tell the balancer how the current attempt went (once per attempt)."""
        target, self.target = self.target, None
        if target is not None:
            target.done(ok)

    def fail(self, status: int, cause: str, kind: str) -> None:
        if self.finished:
            return
        self.report(False)
        data = None if self.oneway else encode_exception(
            self.server.variant, self.msg.name, self.msg.seqid, f"appliance: {cause}",
            INTERNAL_ERROR)
        self.finish(data, status, False, kind)

    def finish(self, data: bytes | None, status: int, ok: bool, error: str = "") -> None:
        self.finished = True
        if self.stats is not None:
            self.stats.response(status, self.d.loop.time() - self.started, error)
        if self.span is not None:
            self.end_span(status, error)
        self.report(ok)
        if data is not None:
            self.reply = data
            self.server.deliver(self)

    def end_span(self, status: int, error: str) -> None:
        span, self.span = self.span, None
        span.end(status, error=error, peer=self.dst if self.d.name == "outbound" else None,
                 retries=max(0, self.attempts - 1), attributes={
                     "rpc.system": "thrift", "rpc.method": self.msg.name,
                     "rpc.service": self.server.authority,
                     "appliance.thrift.oneway": self.oneway})

    def answer(self, data: bytes) -> None:
        """A reply the proxy makes itself, not counted as a request."""
        self.finished = True
        self.reply = data
        self.server.deliver(self)

    def cancel(self) -> None:
        """The client went away: nothing more will be sent either way."""
        if self.finished:
            return
        self.finished = True
        self.report(True)  # the client left: not the endpoint's failure
        if self.span is not None:
            self.end_span(0, "client went away")
        up, self.up = self.up, None
        if up is not None and all(c.finished for c in up.calls.values()):
            up.abort()  # nobody waits for what it would send
