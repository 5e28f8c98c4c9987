"""HTTP/1.1 proxying: a client-facing connection, exchanges, and pooled upstream connections.

Theory of operation: :class:`Http1Server` parses requests from the client; each request
becomes an :class:`Exchange`, which takes an idle upstream connection from the pool (or dials
one), sends the rewritten head and streams the body as it arrives. The upstream's
:class:`Http1Upstream`'s parser hands the exchange the response head (rewritten for
the client) and the body bytes as received; a body delimited by the upstream's close is
passed on with ``Connection: close``. Responses go out in request order: a pipelined
request waits, queued and with the client paused, until the exchange before it is done.

Backpressure runs both ways: a full client write buffer pauses reading the upstream, a full
upstream write buffer pauses reading the client. An Upgrade answered 101, or a CONNECT
answered 2xx, turns both connections into an opaque :class:`~appliance.net.relay.Relay`.

Failures become one-line responses with ``l5d-proxy-error`` (502 refused/invalid, 504 timeout)
as long as no response byte has reached the client; after that the client connection is
aborted, so a truncated response is never mistaken for a complete one. A request that fails
on a reused pooled connection before any response byte, and has no body, is sent once more
on a fresh connection (the server may have closed the idle connection as we reused it).

Reliability (docs/reliability.md): a request takes an in-flight slot of the direction's
limiter, or waits in its bounded queue, or is shed with 503 (:meth:`Exchange.wait_for_slot`).
Before the first attempt :meth:`Exchange.arm` resolves the request's policy (by its logical
name), its deadline (route timeout, ``l5d-ctx-deadline``; already past: 504 without calling
upstream) and, outbound, its retry state and budget. One timer per request that has a
deadline or an attempt timeout. A failed attempt (not sent, connection lost, a response the
classifier calls retryable, attempt timeout) goes through :meth:`Exchange.retry_after`:
while no response byte reached the client it may be sent again after a backoff, on an
endpoint picked again, with the body replayed from :class:`~appliance.resilience.policy.
Attempts`.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import TYPE_CHECKING, Any

from appliance.net.addr import OrigDst
from appliance.net.relay import Relay
from appliance.net.route import next_try, request_deadline, stamp_deadline
from appliance.net.tls import TlsConnectError
from appliance.net.translate import h2_upstream
from appliance.protocols.http1 import (
    HttpError,
    RequestHead,
    RequestParser,
    chunk,
    error_response,
    last_chunk,
    proxy_target,
    response_has_body,
    serialize_request,
)
from appliance.protocols.http1_response import ResponseHead, ResponseParser, rewrite_head
from appliance.resilience.classify import ResponseClass
from appliance.resilience.policy import Attempts

if TYPE_CHECKING:
    from appliance.net.listener import Direction
    from appliance.resilience.budget import RetryBudget
    from appliance.resilience.deadline import Deadline
    from appliance.resilience.policy import Policy
    from appliance.routing.router import Pending, Router, Target
    from appliance.telemetry.metrics import HttpStats

# Reasons the client side is paused; reading resumes when none is left.
_PIPELINE = 1
_UPSTREAM_FULL = 2
_CONNECTING = 4
_TUNNEL = 8
_HOLD_LIMIT = 64 * 1024


class Http1Server(asyncio.Protocol):
    """The client-facing side of an HTTP/1 connection."""

    def __init__(self, d: Direction, transport: Any, dst: OrigDst, *,
                 explicit: bool = False) -> None:
        self.d = d
        self.transport = transport
        self.dst = dst
        self.explicit = explicit  # requests name their destination: we are an http_proxy
        conf = d.config.http
        self.parser = RequestParser(self, max_header_bytes=conf.max_header_bytes,
                                    max_uri_bytes=conf.max_uri_bytes)
        self.tcp = d.tcp_stats("http/1", "src")
        self.ex: Exchange | None = None
        self.queue: deque[tuple[int, Any]] = deque()
        self.paused = 0
        self.closed = False
        self.last_active = d.loop.time()
        self.head_started = 0.0

    def start(self, early: bytes, early_eof: bool) -> None:
        self.transport.set_protocol(self)
        self.opened_at = self.tcp.open()
        self.d.http_conns.add(self)
        if early:
            self.data_received(early)
        if early_eof and not self.closed:
            self.eof_received()

    # --- client bytes ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.tcp.read_bytes += len(data)
        if self.closed:
            return
        parser = self.parser
        was_in_head = parser.in_head
        self.feeding = True
        try:
            offset = parser.feed(data)
        except HttpError as exc:
            self.feeding = False
            self.flush_upstreams()
            self.refuse(exc.status, exc.reason)
            return
        self.feeding = False
        if self.corked:
            self.flush_upstreams()
        now = self.d.loop.time()
        self.last_active = now
        if parser.in_head and not was_in_head:
            self.head_started = now
        if offset is not None:
            self.upgrade_pending(data[offset:])

    def upgrade_pending(self, rest: bytes) -> None:
        """Bytes after an Upgrade/CONNECT request belong to the tunnel, if it opens."""
        ex = self.ex
        if ex is None:  # the request was refused before an exchange started
            return
        ex.tunnel_early = rest
        self.pause(_TUNNEL)

    def eof_received(self) -> bool:
        # A client that half-closes after its request still gets the response.
        if self.ex is None and not self.queue:
            self.close()
            return False
        self.wants_close = True
        return True

    def drain(self) -> None:
        """Graceful shutdown: an idle connection is closed now; a busy one after its
        current response, which says ``Connection: close``."""
        if self.ex is None and not self.queue:
            self.close()
        else:
            self.wants_close = True

    wants_close = False
    authz: Any = None  # inbound: authorization and l5d-client-id (tls_inbound.InboundPeer)
    # While a read is parsed, writes to a freshly attached upstream are collected and sent
    # as one write after the parse (head and body of a small request in one syscall).
    feeding = False
    corked: list[Http1Upstream] = []  # replaced per connection on first use

    def cork(self, up: Http1Upstream) -> None:
        if up.out is None:
            up.out = []
            if not self.corked:
                self.corked = []
            self.corked.append(up)

    def flush_upstreams(self) -> None:
        corked, self.corked = self.corked, []
        for up in corked:
            up.flush()

    # --- parser events -----------------------------------------------------------------
    def on_head(self, head: RequestHead) -> None:
        if self.ex is not None or self.queue:
            self.queue.append((0, head))
            self.pause(_PIPELINE)
            return
        self.begin(head)

    def on_body(self, data: bytes) -> None:
        if self.queue:
            self.queue.append((1, data))
        elif self.ex is not None:
            self.ex.request_body(data)

    def on_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.queue:
            self.queue.append((2, trailers))
        elif self.ex is not None:
            self.ex.request_end(trailers)

    def authority(self, head: RequestHead) -> str:
        """The ``authority`` metric label: the Host the client asked for (lower case,
        bounded), else the original destination."""
        host = head.host
        if host:
            return host[:255].decode("latin-1").lower()
        return "" if self.explicit else str(self.dst)

    _stats_host: bytes | None = None  # the Host of the last request, and its counters
    _stats: HttpStats | None = None
    _stats_gen = -1

    def stats_for(self, head: RequestHead) -> HttpStats:
        """The counters of this request's labels: kept per connection while the Host is
        the same and the registry dropped no label set since (see Registry.expire)."""
        registry = self.d.registry
        if head.host == self._stats_host and self._stats_gen == registry.generation \
                and self._stats is not None:
            return self._stats
        stats = self._stats = registry.http(self.d.name, "http/1", self.authority(head))
        self._stats_host, self._stats_gen = head.host, registry.generation
        return stats

    def begin(self, head: RequestHead) -> None:
        d = self.d
        stats = self.stats_for(head)
        stats.requests += 1
        if head.via and any(d.via_name in v for v in head.via):
            d.registry.error(d.name, "loop")
            self.respond_error(head, 502, "request loop detected (Via names this proxy)",
                               request_done=False, stats=stats)
            return
        if self.authz is not None and not self.authz.admit_http1(self, head, stats):
            return  # denied: answered 403 (l5d-client-id is set or stripped otherwise)
        ex = self.ex = Exchange(self, head, stats)
        if d.tracer.on:
            ex.trace()
        if d.limiter.acquire():
            ex.slot = True
            ex.start()
        else:
            ex.wait_for_slot()

    # --- responses the proxy makes itself ----------------------------------------------
    def refuse(self, status: int, reason: str, kind: str = "") -> None:
        """Bad input (or none in time) from the client: answer if we still can, close."""
        self.d.registry.error(self.d.name, kind or f"http_{status}")
        ex = self.ex
        if ex is not None and ex.response_started:
            self.abort()
            return
        if ex is not None:
            ex.cancel()
        if ex is None or self.parser.in_head:  # a request not counted yet
            stats = self.d.http
            stats.requests += 1
        else:
            stats = ex.stats
        stats.response(status, 0.0, "bad_request")
        self.write(error_response(status, reason, self.d.via, close=True))
        self.close()

    def respond_error(self, head: RequestHead, status: int, cause: str, *,
                      request_done: bool, kind: str = "proxy",
                      stats: HttpStats | None = None) -> None:
        keep = request_done and head.keep_alive and not self.wants_close
        (stats or self.d.http).response(status, 0.0, kind)
        self.write(error_response(status, cause, self.d.via, close=not keep))
        self.exchange_done(keep)

    # --- exchange lifecycle ------------------------------------------------------------
    def exchange_done(self, keep_alive: bool) -> None:
        self.ex = None
        if not keep_alive or self.wants_close:
            self.close()
            return
        if not self.queue:  # the usual case: nothing pipelined behind it
            if self.paused & _PIPELINE:
                self.resume(_PIPELINE)
            return
        if self.draining:  # an error answered while replaying the queue: the loop goes on
            return
        self.draining = True
        try:
            self.replay_queue()
        finally:
            self.draining = False
        if not self.queue and not self.closed:
            self.resume(_PIPELINE)

    draining = False

    def replay_queue(self) -> None:
        """Start the next pipelined request and feed it the events held for it."""
        queue = self.queue
        while queue and not self.closed:
            kind, item = queue[0]
            if kind == 0:
                if self.ex is not None:
                    return
                queue.popleft()
                self.begin(item)
                continue
            queue.popleft()
            ex = self.ex
            if ex is None:
                continue  # the rest of a request that was already answered
            if kind == 1:
                ex.request_body(item)
            else:
                ex.request_end(item)

    # --- flow control ------------------------------------------------------------------
    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and not self.closed:
            self.transport.resume_reading()

    write_paused = False

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.ex
        if ex is not None and ex.up is not None and ex.up.transport is not None:
            ex.up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.ex
        if ex is not None and ex.up is not None and ex.up.transport is not None:
            ex.up.transport.resume_reading()

    # --- output and teardown -----------------------------------------------------------
    # Response bytes produced while one upstream read is parsed are sent as one write.
    out: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.tcp.write_bytes += len(data)
            out = self.out
            if out is not None:
                out.append(data)
            else:
                self.transport.write(data)

    def flush(self) -> None:
        out, self.out = self.out, None
        if out and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        self.out = None
        self.closed = True
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.tcp.close(self.opened_at)
        self.d.http_conns.discard(self)
        ex = self.ex
        if ex is not None:
            ex.cancel()
        self.queue.clear()

    def detach_for_tunnel(self) -> None:
        """The connection becomes a relay: stop acting on it as HTTP."""
        self.d.http_conns.discard(self)
        self.tcp.close(self.opened_at)  # counted again under the tunnel's stats
        self.closed = True


class Exchange:
    """One request and its response."""

    __slots__ = (
        "server", "d", "head", "started", "up", "pending", "pending_len", "request_done",
        "response_started", "response_head", "close_delimited",
        "keep_client", "waiting_since", "reused", "retried", "body_sent", "tunnel_early",
        "finished", "interim", "dst", "target", "span", "stats",
        "policy", "attempts", "deadline", "timer", "budget", "slot", "queued", "ep", "told",
        "retries", "connecting", "dropping",
    )

    def __init__(self, server: Http1Server, head: RequestHead, stats: HttpStats) -> None:
        self.server = server
        self.d = server.d
        self.head = head
        self.stats = stats  # request_total & co. for this request's labels
        self.started = self.d.loop.time()
        self.up: Http1Upstream | None = None
        self.pending: list[bytes] = []
        self.pending_len = 0
        self.request_done = False
        self.response_started = False
        self.response_head: ResponseHead | None = None
        self.close_delimited = False
        self.keep_client = True
        self.waiting_since = 0.0  # when the whole request had been sent; 0 once answered
        self.reused = False
        self.retried = False
        self.body_sent = False
        self.tunnel_early = b""
        self.finished = False
        self.interim = False
        self.dst = server.dst  # the endpoint, once routed
        self.target: Target | None = None  # the router's pick, when routing is on
        self.span: Any = None  # the trace span (appliance.telemetry.tracing), when sampled
        self.policy: Policy | None = None  # set by arm() before the first attempt
        self.attempts: Attempts | None = None  # the retry state, when retries are possible
        self.deadline: Deadline | None = None
        self.timer: asyncio.TimerHandle | None = None  # the deadline or attempt timeout
        self.budget: RetryBudget | None = None
        self.slot = False  # holds an in-flight slot of d.limiter
        self.queued = False  # waits in d.limiter's queue for one
        self.ep: OrigDst | None = None  # the endpoint this attempt is counted against
        self.told = False  # an interim (1xx) response reached the client
        self.retries = 0
        self.connecting = False
        self.dropping = False  # the parser may still hand us parts of a dropped response

    def trace(self) -> None:
        """Start this request's span and put its context in the headers sent on."""
        head, d = self.head, self.d
        root_id = 0
        if not head.has_trace:  # a root: one draw decides, and most lose it
            root_id = d.tracer.draw_root()
            if not root_id:
                return
        peer = None
        if d.name == "inbound":
            peer = self.server.transport.get_extra_info("peername")
        span = d.tracer.start(d.name, head.headers, method=head.method, target=head.target,
                              authority=head.host or b"", version=head.version.decode(),
                              peer=peer, has_context=head.has_trace, root_id=root_id)
        if span is not None:
            head.headers = span.apply(head.headers)
            self.span = span

    def end_span(self, status: int, error: str = "") -> None:
        """The request is over (``error`` says why if it failed): end its span and write
        its access-log line."""
        span, self.span = self.span, None
        if span is not None:
            span.end(status, error=error, peer=self.dst if self.d.name == "outbound" else None,
                     retries=self.retries)
        log = self.d.access_log
        if log is not None:
            head, labels = self.head, dict(self.stats.labels)
            log.write(direction=self.d.name, protocol="http/1",
                      method=head.method.decode("latin-1"),
                      authority=labels.get("authority"), path=head.target.decode("latin-1"),
                      status=status, duration_ms=round(
                          (self.d.loop.time() - self.started) * 1000, 3),
                      upstream=str(self.dst), dst_service=labels.get("dst_service"),
                      error=error, retries=self.retries,
                      trace_id=f"{span.trace_id:032x}" if span is not None else None)

    # --- request side ------------------------------------------------------------------
    def start(self) -> None:
        if self.server.explicit and not self.explicit_target():
            return
        router = self.d.router
        if router is not None and not self.route(router):
            return
        self.send()

    def explicit_target(self) -> bool:
        """An explicit proxy request: its destination is in its target (absolute URI or
        CONNECT authority); the target sent on is the origin form."""
        head = self.head
        if head.target.startswith(b"/"):
            self.d.registry.error(self.d.name, "no_orig_dst")
            self.fail(502, "no original destination (connection was not redirected), and "
                           "not an explicit proxy request (absolute http:// URI or CONNECT)",
                      "proxy")
            return False
        try:
            host, port, path = proxy_target(head)
        except HttpError as exc:
            self.d.registry.error(self.d.name, "explicit_bad_target")
            self.fail(exc.status, exc.reason, "proxy")
            return False
        dst = OrigDst(host, port)
        if self.d.loops_back(dst, self.server.dst.host) or (host.lower() == "localhost" \
                and port in self.d.own_ports):
            self.d.registry.error(self.d.name, "loop")
            self.fail(502, f"request loop: {dst} is this proxy", "proxy")
            return False
        self.dst = dst
        if head.method != b"CONNECT":
            head.target = path
            if head.host is None:
                authority = host if port == 80 else f"{host}:{port}"
                head.headers.append((b"host", authority.encode("latin-1")))
                head.host = authority.encode("latin-1")
        return True

    def route(self, router: Router) -> bool:
        """Pick the endpoint (logical routing); False if the exchange cannot go on now."""
        from appliance.net.route import route_http1
        from appliance.routing.router import Pending, RouteError

        try:
            routed = route_http1(router, self.head, self.dst,
                                 self.d.config.routing.allow_overrides)
        except RouteError as exc:
            self.d.registry.error(self.d.name, exc.kind)
            self.fail(exc.status, str(exc), "proxy")
            return False
        if isinstance(routed, Pending):
            self.server.pause(_CONNECTING)
            self.d.spawn(self.await_discovery(router, routed))
            return False
        self.target = routed
        self.dst = routed.dst
        self.count_as(routed)
        return True

    def count_as(self, routed: Target) -> None:
        """Routed to a service: the request counts under its ``dst_service`` label and
        carries linkerd's ``l5d-dst-*`` headers."""
        from appliance.net.route import tag_dst

        if routed.service is None:
            return
        self.head.headers = tag_dst(self.head.headers, routed)
        old = self.stats
        labels = dict(old.labels)
        new = self.d.registry.http(self.d.name, "http/1", labels.get("authority", ""),
                                   routed.service_name)
        old.requests -= 1
        new.requests += 1
        self.stats = new

    async def await_discovery(self, router: Router, pending: Pending) -> None:
        from appliance.routing.router import Pending, RouteError

        try:
            await pending.wait(self.d.config.routing.bind_timeout)
        except TimeoutError:
            pass
        if self.finished:
            return
        self.server.resume(_CONNECTING)
        try:
            routed = router.again(pending)
        except RouteError as exc:
            self.d.registry.error(self.d.name, exc.kind)
            self.fail(exc.status, str(exc), "proxy")
            return
        if isinstance(routed, Pending):
            self.d.registry.error(self.d.name, "discovery_timeout")
            self.fail(503, "service discovery has not answered for "
                           f"{'/'.join(pending.service.id)}", "proxy")
            return
        self.target = routed
        self.dst = routed.dst
        self.count_as(routed)
        self.send()

    def send(self) -> None:
        head = self.head
        if self.server.explicit and head.method == b"CONNECT":
            self.server.pause(_CONNECTING)
            self.d.spawn(self.connect())  # a tunnel of ours: a fresh connection, no request
            return
        if h2_upstream(self):  # the endpoint speaks only HTTP/2: appliance/net/translate.py
            return
        if not self.arm():
            return
        tunnel = head.method == b"CONNECT" or head.upgrade is not None
        # Body parts that came while the request waited (queue, discovery) follow the head.
        self.pending.insert(0, serialize_request(head, self.d.via, upgrade=tunnel))
        self.dispatch()

    def dispatch(self) -> None:
        """Send one attempt: on a pooled connection to the endpoint, or a new one."""
        policy = self.policy
        if self.deadline is not None or (policy is not None and policy.attempt_timeout):
            self.arm_timer()
        d = self.d
        if d.ep_limits.max_per_endpoint and not self.count_endpoint():
            return
        up = d.pool.take(self.dst)
        if up is not None:
            self.reused = True
            self.attach(up)
        else:
            self.server.pause(_CONNECTING)
            self.connecting = True
            d.spawn(self.connect())

    def arm(self) -> bool:
        """Before the first attempt: the request's policy, deadline and retry state. False
        (answered 504, upstream never called) when its deadline has already passed."""
        d, target = self.d, self.target
        policy = self.policy = d.policies.for_path(target.path if target is not None else None)
        deadline = request_deadline(self.head.headers, policy.timeout, d.loop.time) \
            if self.head.has_deadline or policy.timeout is not None else None
        if deadline is not None:
            if deadline.expired():
                if target is not None:
                    target.abandon()  # never sent: not the endpoint's failure
                d.registry.error(d.name, "deadline_exceeded")
                self.fail(504, f"deadline exceeded before the request was sent "
                               f"({deadline.source})", "timeout")
                return False
            self.deadline = deadline
            stamp_deadline(self.head.headers, deadline)
        if d.name == "outbound" and policy.max_retries:
            if self.pending or self.head.has_body:  # a body to keep for a replay
                attempts = self.attempts = Attempts(policy, d.rng)
                for part in self.pending:  # body parts that came while the request waited
                    attempts.keep(part)
            # (a bodiless request's retry state is made only if it is retried: retry_state)
            service = target.service if target is not None else None
            budget = self.budget = (service.budget(policy) if service is not None
                                    else d.policies.dst_budget(self.dst, policy))
            budget.deposit()
        return True

    def arm_timer(self) -> None:
        """Wake up at the deadline or the attempt timeout, whichever comes first."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        at = self.deadline.at if self.deadline is not None else math.inf
        per_try = self.policy.attempt_timeout if self.policy is not None else None
        if per_try:
            at = min(at, self.d.loop.time() + per_try)
        if at != math.inf:
            self.timer = self.d.loop.call_at(at, self.timed_out)

    async def connect(self) -> None:
        d = self.d
        dst = self.dst
        try:
            _, up = await d.connect(lambda: Http1Upstream(d, dst), dst, alpn="http/1.1")
        except TimeoutError:
            self.connect_failed("connect_timeout",
                                f"upstream unreachable: connect to {dst} timed out")
            return
        except TlsConnectError as exc:
            self.connect_failed(exc.kind, str(exc))
            return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            self.connect_failed("connect_refused", f"upstream unreachable: {dst}: {reason}")
            return
        if self.finished:  # the client left while we dialled: keep the connection
            d.pool.put(up)
            return
        self.server.resume(_CONNECTING)
        if self.server.explicit and self.head.method == b"CONNECT":
            self.open_tunnel(up)
            return
        self.attach(up)

    def open_tunnel(self, up: Http1Upstream) -> None:
        """CONNECT to us as an explicit proxy: the connection is up, say so and relay."""
        self.finished = True
        self.connecting = False
        self.free_slot()
        self.stats.response(200, self.d.loop.time() - self.started)
        if self.target is not None:
            self.target.done(True)
        if self.span is not None or self.d.access_log is not None:
            self.end_span(200)
        up.detach_for_tunnel()
        self.server.detach_for_tunnel()
        relay = Relay(self.d, self.server.transport, self.dst, "tunnel", b"")
        relay.join(up.transport, to_up=self.tunnel_early,
                   to_down=b"HTTP/1.1 200 Connection established\r\nvia: " + self.d.via
                   + b"\r\n\r\n")

    def connect_failed(self, kind: str, cause: str) -> None:
        self.d.registry.error(self.d.name, kind)
        self.connecting = False
        if not self.finished:
            self.server.resume(_CONNECTING)
            if self.retry_after("unsent", ResponseClass.RETRYABLE_FAILURE):
                return
            self.fail(502, cause, kind)

    def attach(self, up: Http1Upstream) -> None:
        self.connecting = False
        self.up = up
        up.ex = self
        parser = up.parser
        parser.handler = self
        parser.expect(self.head.method, decode=self.head.version == b"1.0")
        pending, self.pending = self.pending, []
        self.pending_len = 0
        server = self.server
        if server.write_paused:
            up.transport.pause_reading()
        if server.feeding:
            server.cork(up)
        up.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if len(pending) > 1:
            self.body_sent = True

    def request_body(self, data: bytes) -> None:
        size = len(data)
        if self.head.chunked:
            data = chunk(data)
        if self.attempts is not None:
            self.attempts.keep(data, size)  # for a replay
        up = self.up
        if up is not None:
            self.body_sent = True
            up.write(data)
            return
        self.pending.append(data)
        self.pending_len += len(data)
        if self.pending_len > _HOLD_LIMIT:
            self.server.pause(_CONNECTING)

    def request_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.head.chunked:
            end = last_chunk(trailers)
            if self.attempts is not None:
                self.attempts.keep(end, 0)
            if self.up is not None:
                self.up.write(end)
            else:
                self.pending.append(end)
        self.request_done = True
        if self.response_head is None:
            self.waiting_since = self.d.loop.time()

    # --- response side: events from the upstream's ResponseParser ----------------------
    def on_head(self, rh: ResponseHead) -> None:
        status = rh.status
        server = self.server
        if status < 200 and status != 101:
            self.interim = True
            if self.head.version == b"1.1":
                self.told = True
                server.write(rewrite_head(rh, self.d.via, connection=None))
            return
        self.interim = False
        if status >= 500 and self.budget is not None and self.policy is not None:
            verdict = self.policy.classifier.classify(self.head.method, status)
            if verdict.retryable and self.retry_after("response", verdict):
                self.dropping = True  # the rest of it is dropped with its connection
                return
        if self.timer is not None:
            self.timer.cancel()  # the deadline covers the wait for the response head
            self.timer = None
        self.waiting_since = 0.0
        self.response_head = rh
        self.response_started = True
        head = self.head
        if self.tunnel_opens(rh):
            server.write(rewrite_head(rh, self.d.via, connection=None,
                                      keep_upgrade=status == 101))
            return
        keep = head.keep_alive and not server.wants_close
        if head.method == b"CONNECT" or head.upgrade is not None:
            keep = False  # a refused tunnel: the bytes after the request are not HTTP
        if response_has_body(status, head.method):
            if rh.delimited_by_close:
                self.close_delimited = True  # the body ends when the upstream closes
                keep = False
            elif rh.decoded and rh.chunked:
                keep = False  # de-chunked for an HTTP/1.0 client: delimited by our close
        self.keep_client = keep
        connection: bytes | None
        if head.version == b"1.0":
            connection = b"keep-alive" if keep else b"close"
        else:
            connection = None if keep else b"close"
        server.write(rewrite_head(rh, self.d.via, connection=connection))

    def tunnel_opens(self, rh: ResponseHead) -> bool:
        if self.head.method == b"CONNECT":
            return 200 <= rh.status < 300
        return rh.status == 101 and self.head.upgrade is not None

    def on_body(self, data: bytes) -> None:
        if not self.dropping:  # else: the rest of a response dropped for a retry
            self.server.write(data)

    def on_end(self) -> None:
        if self.dropping:
            return  # the end of a response dropped for a retry
        if self.interim:
            self.interim = False
            return
        rh = self.response_head
        assert rh is not None
        if (rh.status == 101 or self.head.method == b"CONNECT") and self.tunnel_opens(rh):
            return  # the tunnel takes over in upgraded()
        self.finished = True
        self.free_slot()
        self.stats.response(rh.status, self.d.loop.time() - self.started)
        if self.target is not None:
            self.target.done(rh.status < 500 or self.success(rh.status))
        if self.span is not None or self.d.access_log is not None:
            self.end_span(rh.status)
        self.release()

    def release(self) -> None:
        """The response is complete: pool the upstream if it is clean, free the client.

        A response that ends before its request did (an early 413, say) leaves the client
        mid-body: both connections are closed rather than resynchronised."""
        up, self.up = self.up, None
        rh = self.response_head
        reusable = (
            self.request_done and rh is not None and rh.keep_alive
            and not self.close_delimited and up is not None
        )
        if up is not None:
            up.detach()
            if reusable:
                if self.server.write_paused and up.transport is not None:
                    up.transport.resume_reading()
                self.d.pool.put(up)
            else:
                up.close()
        self.server.exchange_done(self.keep_client and self.request_done)

    def upgraded(self, rest: bytes) -> None:
        """The upstream switched protocols (101 to an Upgrade, 2xx to CONNECT)."""
        up, server = self.up, self.server
        assert up is not None
        rh = self.response_head
        if rh is None or not self.tunnel_opens(rh):
            self.upstream_failed("upstream switched protocols unasked")
            return
        self.finished = True
        self.free_slot()
        self.stats.response(rh.status, self.d.loop.time() - self.started)
        up.detach()
        up.detach_for_tunnel()
        server.detach_for_tunnel()
        if self.target is not None:
            self.target.done(True)
        if self.span is not None or self.d.access_log is not None:
            self.end_span(rh.status)
        relay = Relay(self.d, server.transport, self.dst, "tunnel", b"")
        relay.join(up.transport, to_up=self.tunnel_early, to_down=rest)

    # --- failures ----------------------------------------------------------------------
    def response_timeout(self) -> None:
        """Called by the per-second sweep (Direction.sweep) when the wait is over."""
        self.waiting_since = 0.0
        self.d.registry.error(self.d.name, "response_timeout")
        self.discard_upstream()
        self.fail(504, f"upstream timeout: no response from {self.dst} within "
                       f"{self.d.config.http.response_timeout:g}s", "timeout")

    def upstream_failed(self, cause: str, *, clean_close: bool = False) -> None:
        """The upstream broke (closed, reset, sent garbage) before the response ended."""
        if self.finished:
            return
        if self.close_delimited and clean_close:
            self.on_end()  # the close is the end of this body
            return
        if (self.reused and not self.retried and not self.response_started
                and not self.body_sent and not self.head.has_body):
            self.retry()
            return
        policy = self.policy
        if policy is not None and not self.response_started and self.retry_after(
                "connection", policy.classifier.classify(self.head.method, None, None, cause)):
            return
        self.discard_upstream()
        self.d.registry.error(self.d.name, "upstream_failed")
        self.fail(502, cause, "upstream")

    def retry(self) -> None:
        """The stale-connection resend (a reused idle connection closed under us)."""
        self.retried = True
        self.retries += 1
        self.d.registry.retry(self.d.name, "stale")
        if self.deadline is not None:
            stamp_deadline(self.head.headers, self.deadline)
        self.reused = False
        up, self.up = self.up, None
        if up is not None:
            up.detach()
            up.close()
        if self.request_done:
            self.waiting_since = self.d.loop.time()
        tunnel = self.head.method == b"CONNECT" or self.head.upgrade is not None
        self.pending = [serialize_request(self.head, self.d.via, upgrade=tunnel)]
        self.server.pause(_CONNECTING)
        self.d.spawn(self.connect())

    def fail(self, status: int, cause: str, kind: str) -> None:
        self.waiting_since = 0.0
        self.finished = True
        self.free_slot()
        if self.target is not None:
            self.target.done(False)
        if self.span is not None or self.d.access_log is not None:
            self.end_span(status, cause)
        self.discard_upstream()
        server = self.server
        if self.response_started:
            self.stats.response(self.response_head.status if self.response_head else status,
                                self.d.loop.time() - self.started, kind)
            server.abort()
            return
        server.respond_error(self.head, status, cause, request_done=self.request_done,
                             kind=kind, stats=self.stats)

    def discard_upstream(self) -> None:
        up, self.up = self.up, None
        if up is not None:
            up.detach()
            up.abort()

    def cancel(self) -> None:
        """The client went away: nothing more will be sent either way."""
        self.waiting_since = 0.0
        if not self.finished:
            self.finished = True
            self.free_slot()
            if self.target is not None:
                self.target.done(True)  # the client left: not the endpoint's failure
            if self.span is not None or self.d.access_log is not None:
                self.end_span(0, "client went away")
            self.discard_upstream()


    # --- retries and timeouts (docs/reliability.md) --------------------------------------
    def success(self, status: int) -> bool:
        """A 5xx response's verdict for the balancer (``allSuccessful`` says success)."""
        policy = self.policy
        return policy is not None and policy.classifier.classify(self.head.method, status).ok

    def timed_out(self) -> None:
        """The deadline or the attempt timeout came before the response head."""
        self.timer = None
        if self.finished or self.response_started:
            return
        deadline, policy = self.deadline, self.policy
        whole = deadline is not None and deadline.expired()
        if not whole and not self.connecting and policy is not None:
            verdict = policy.classifier.classify(self.head.method, None, None, "timeout")
            if self.retry_after("timeout", verdict):
                return
        if whole:
            assert deadline is not None
            kind, what = "deadline_exceeded", f"deadline exceeded ({deadline.source})"
        else:
            assert policy is not None and policy.attempt_timeout is not None
            kind, what = "attempt_timeout", f"attempt timeout ({policy.attempt_timeout:g}s)"
        self.d.registry.error(self.d.name, kind)
        self.discard_upstream()
        self.server.resume(_CONNECTING)
        self.fail(504, f"upstream timeout: no response from {self.dst}: {what}", "timeout")

    def retry_state(self) -> Attempts | None:
        """The retry state: made by arm() for a request with a body (its bytes are kept for
        a replay), on first use here for one without (most requests are never retried)."""
        if self.attempts is None and self.budget is not None and self.policy is not None:
            self.attempts = Attempts(self.policy, self.d.rng)
        return self.attempts

    def retry_after(self, reason: str, verdict: ResponseClass) -> bool:
        """A failed attempt (``reason``: unsent, connection, response, timeout): schedule
        the next one when the policy allows (True); else False and the caller answers."""
        attempts = self.retry_state()
        if attempts is None or self.response_started or self.told or self.finished:
            return False
        d = self.d
        sent = reason != "unsent"
        plan = next_try(d, attempts, self.budget, self.deadline, self.target, reason, verdict)
        if plan is None:
            return False
        delay, again = plan
        if again is not None:
            self.target, self.dst = again, again.dst
        self.retries += 1
        self.discard_upstream()
        self.release_endpoint()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.waiting_since = 0.0
        self.reused = self.body_sent = False
        if sent:
            self.pending = []  # the body so far is in attempts.replay
            self.pending_len = 0
        self.server.pause(_CONNECTING)
        d.loop.call_later(delay, self.next_attempt, sent)
        return True

    def next_attempt(self, sent: bool) -> None:
        """The backoff is over: send the request again (head stamped anew)."""
        self.dropping = False
        if self.finished:
            return
        self.server.resume(_CONNECTING)
        head = self.head
        if self.deadline is not None:
            stamp_deadline(head.headers, self.deadline)
        tunnel = head.method == b"CONNECT" or head.upgrade is not None
        first = serialize_request(head, self.d.via, upgrade=tunnel)
        if sent:
            replay = self.attempts.replay if self.attempts is not None else None
            if replay is None:  # the body outgrew the buffer while we waited
                self.fail(502, "upstream failed and the request body is too large to "
                               "replay", "upstream")
                return
            self.pending = [first, *replay]
        elif self.pending:
            self.pending[0] = first
        else:
            self.pending = [first]
        if self.request_done:
            self.waiting_since = self.d.loop.time()
        self.dispatch()

    # --- load shedding -----------------------------------------------------------------
    def wait_for_slot(self) -> None:
        """Every in-flight slot is taken: wait in the bounded queue, or be shed at once."""
        if self.d.limiter.enqueue(self):
            self.queued = True
            self.server.pause(_CONNECTING)
        else:
            self.shed("limits.max_requests in flight and the queue is full", "shed_requests")

    def admitted(self) -> None:
        """A slot was handed to this queued request (scheduled by free_slot)."""
        self.queued = False
        self.slot = True
        if self.finished:
            self.free_slot()
            return
        self.server.resume(_CONNECTING)
        self.start()

    def shed(self, cause: str, kind: str) -> None:
        """503 at once, without calling the upstream."""
        if self.queued:
            self.queued = False
        self.d.registry.error(self.d.name, kind)
        if not self.finished:
            self.server.resume(_CONNECTING)
            if self.target is not None:
                self.target.abandon()
            self.fail(503, f"load shed: {cause}", "shed")

    def count_endpoint(self) -> bool:
        """Per-endpoint limit: count this attempt, trying another endpoint once when
        routed; False (shed with 503) when there is no room."""
        limits = self.d.ep_limits
        if limits.acquire(self.dst):
            self.ep = self.dst
            return True
        target = self.target
        if target is not None and target.service is not None:
            target.abandon()
            again = target.again()
            if again is not None:
                self.target, self.dst = again, again.dst
                if limits.acquire(again.dst):
                    self.ep = again.dst
                    return True
        self.shed(f"{self.dst} has limits.max_endpoint_requests in flight", "shed_endpoint")
        return False

    def release_endpoint(self) -> None:
        if self.ep is not None:
            self.d.ep_limits.release(self.ep)
            self.ep = None

    def free_slot(self) -> None:
        """The exchange is over: its timer, endpoint count and in-flight slot go."""
        self.release_endpoint()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        limiter = self.d.limiter
        if self.queued:
            self.queued = False
            limiter.cancel(self)
        if self.slot:
            self.slot = False
            waiter = limiter.release()
            if waiter is not None:
                self.d.loop.call_soon(waiter.admitted)


class Http1Upstream(asyncio.Protocol):
    """A connection to an upstream endpoint; pooled between exchanges."""

    def __init__(self, d: Direction, key: OrigDst) -> None:
        self.d = d
        self.key = key
        self.parser = ResponseParser(self, max_header_bytes=d.config.http.max_header_bytes)
        self.tcp = d.tcp_stats("http/1", "dst")
        self.transport: Any = None
        self.ex: Exchange | None = None
        self.idle_since = 0.0
        self.tunnel = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.opened_at = self.tcp.open()

    out: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        self.tcp.write_bytes += len(data)
        out = self.out
        if out is not None:
            out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def flush(self) -> None:
        out, self.out = self.out, None
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def data_received(self, data: bytes) -> None:
        self.tcp.read_bytes += len(data)
        ex = self.ex
        if ex is None:  # bytes on an idle connection: the server is confused, drop it
            self.abort()
            return
        server = ex.server
        server.out = []
        try:
            offset = self.parser.feed(data)
        except HttpError as exc:
            server.flush()
            if self.ex is not None:
                self.ex.upstream_failed(exc.reason)
            else:
                self.abort()
            return
        finally:
            if server.out is not None:
                server.flush()
        if offset is not None and self.ex is not None:
            self.ex.upgraded(data[offset:])

    # The parser's handler is the exchange while one is attached; between exchanges it is
    # this connection, and a response with no request is a broken upstream.
    def on_head(self, head: ResponseHead) -> None:
        raise HttpError(502, "response without a request")

    def on_body(self, data: bytes) -> None:
        raise HttpError(502, "response without a request")

    def on_end(self) -> None:
        raise HttpError(502, "response without a request")

    def detach(self) -> None:
        """The exchange is over: this connection no longer belongs to it."""
        self.ex = None
        self.parser.handler = self

    def pause_writing(self) -> None:
        if self.ex is not None:
            self.ex.server.pause(_UPSTREAM_FULL)

    def resume_writing(self) -> None:
        if self.ex is not None:
            self.ex.server.resume(_UPSTREAM_FULL)

    def eof_received(self) -> bool:
        return False  # HTTP/1 upstreams do not half-close usefully: treat as close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel:
            return
        self.tcp.close(self.opened_at)
        self.transport = None
        self.d.pool.forget(self)
        ex = self.ex
        if ex is not None:
            self.ex = None
            ex.upstream_failed("upstream closed the connection" if exc is None
                               else f"upstream connection failed: {exc}",
                               clean_close=exc is None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def detach_for_tunnel(self) -> None:
        self.tunnel = True
        self.tcp.close(self.opened_at)


class Pool:
    """Idle upstream connections per endpoint, most recently used first."""

    def __init__(self, d: Direction) -> None:
        self.d = d
        self.max_idle = d.config.http.pool_max_idle
        self.idle: dict[OrigDst, list[Http1Upstream]] = {}

    def take(self, key: OrigDst) -> Http1Upstream | None:
        conns = self.idle.get(key)
        while conns:  # expired ones are closed by sweep(), once a second
            up = conns.pop()
            if up.transport is not None and not up.transport.is_closing():
                return up
        return None

    def put(self, up: Http1Upstream) -> None:
        if up.transport is None or up.transport.is_closing():
            return
        conns = self.idle.setdefault(up.key, [])
        if len(conns) >= self.max_idle:
            up.close()
            return
        up.idle_since = self.d.loop.time()
        conns.append(up)

    def forget(self, up: Http1Upstream) -> None:
        conns = self.idle.get(up.key)
        if conns and up in conns:
            conns.remove(up)

    def sweep(self, now: float) -> None:
        deadline = now - self.d.config.http.pool_idle_timeout
        for key, conns in list(self.idle.items()):
            keep = [c for c in conns if c.idle_since >= deadline]
            for c in conns:
                if c.idle_since < deadline:
                    c.close()
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]

    def close_all(self) -> None:
        for conns in self.idle.values():
            for c in conns:
                c.close()
        self.idle.clear()
