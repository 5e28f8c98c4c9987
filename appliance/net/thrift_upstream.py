"""Thrift upstream side: pooled connections to endpoints, routing of one call, and the state
all Thrift connections of a direction share (config, retry budget, per-method stats, sweep).

Theory of operation: an upstream connection (:class:`ThriftUpstream`) speaks the same variant
as the client connection whose call opened it, and is pooled per (endpoint, variant). Every
call written on it gets a fresh seqid from the connection's own counter; the reply's seqid
finds the call again in ``calls``, and the call writes the client's own seqid back before
the reply goes downstream. So calls from many client connections can share one upstream
connection, one after another or, with ``max_pending_per_connection`` above 1, several at
once (pipelined; replies may come in any order). The default is 1: a Thrift server usually
works through one connection's calls in order, and queueing one client's call behind
another's would add their latencies.

A reply whose seqid names no call is a broken upstream: the connection is aborted and its
calls fail (and may be retried). A call that gave up (timeout, client gone) stays in
``calls`` until its reply comes, so the late reply is recognised and dropped.

:class:`ThriftShared` holds, per direction, what outlives a connection: the pool, the retry
budget, the metric label sets, and one sweep timer (every :data:`TICK` s while any Thrift
connection exists) that enforces call deadlines, closes idle client connections and trims
the pool, so no call arms a timer of its own.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any

from appliance.net.addr import OrigDst
from appliance.protocols.thrift import (
    DEFAULT_MAX_FRAME_BYTES,
    Decoder,
    Message,
    ThriftError,
    Variant,
    with_seqid,
)
from appliance.resilience.budget import RetryBudget
from appliance.routing.path import Path, RoutingError, parse_path, show_path

if TYPE_CHECKING:
    from appliance.net.listener import Direction
    from appliance.net.thrift import Call, ThriftServer
    from appliance.routing.router import Router, Service, Target
    from appliance.telemetry.metrics import HttpStats

log = logging.getLogger("appliance.thrift")

TICK = 0.25  # seconds between sweeps (deadline precision)
MAX_LABEL = 255  # longest method name used as a label value
Key = tuple[OrigDst, Variant]


class ThriftUpstream(asyncio.Protocol):
    """One connection to an endpoint, carrying calls with its own seqids."""

    def __init__(self, shared: ThriftShared, key: Key) -> None:
        self.shared = shared
        self.key = key
        self.decoder = Decoder(key[1], max_frame_bytes=shared.max_frame_bytes)
        self.tcp = shared.d.tcp_stats("thrift", "dst")
        self.transport: Any = None
        self.calls: dict[int, Call] = {}
        self.next_seqid = 0
        self.reads = 0  # data_received calls so far: did anything come back after a write?
        self.pooled = False
        self.idle_since = 0.0
        self.closed = False

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.opened_at = self.tcp.open()

    def data_received(self, data: bytes) -> None:
        self.tcp.read_bytes += len(data)
        self.reads += 1
        try:
            messages = self.decoder.feed(data)
        except ThriftError as exc:
            self.broken(f"thrift_upstream_{exc.kind}", f"upstream sent {exc}")
            return
        for msg in messages:
            if not self.reply(msg):
                return

    def eof_received(self) -> bool:
        return False  # a half-closed upstream sends no more replies: close it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.tcp.close(self.opened_at)
        self.shared.pool.forget(self)
        calls, self.calls = self.calls, {}
        cause = "upstream closed the connection" if exc is None \
            else f"upstream connection failed: {exc}"
        for call in calls.values():
            call.upstream_failed(self, cause)

    def pause_writing(self) -> None:
        pass  # bounded by the calls in flight, each bounded by the frame limit

    def resume_writing(self) -> None:
        pass

    # --- calls -----------------------------------------------------------------------------
    def send(self, call: Call) -> None:
        """Write ``call``'s message with a seqid of this connection's own."""
        seqid = self.next_seqid = (self.next_seqid + 1) & 0x7FFFFFFF
        if not call.oneway:
            self.calls[seqid] = call
        data = with_seqid(call.msg, seqid)
        self.tcp.write_bytes += len(data)
        self.transport.write(data)

    def reply(self, msg: Message) -> bool:
        """Hand a reply to its call; False if the connection had to be dropped."""
        call = self.calls.pop(msg.seqid, None)
        if call is None:
            self.broken("thrift_upstream_bad_seqid",
                        f"upstream replied with seqid {msg.seqid}, which no call has")
            return False
        if msg.type not in (2, 3):  # REPLY, EXCEPTION
            self.broken("thrift_upstream_malformed", "upstream sent a call, not a reply")
            return False
        self.shared.pool.release(self)
        call.on_reply(self, msg)
        return True

    def broken(self, kind: str, cause: str) -> None:
        d = self.shared.d
        d.registry.error(d.name, kind)
        log.debug("thrift upstream %s: %s", self.key[0], cause)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ThriftPool:
    """Upstream connections with room for another call, per (endpoint, variant)."""

    def __init__(self, shared: ThriftShared) -> None:
        self.shared = shared
        self.free: dict[Key, list[ThriftUpstream]] = {}

    def take(self, key: Key) -> ThriftUpstream | None:
        conns = self.free.get(key)
        limit = self.shared.max_pending
        while conns:
            up = conns[-1]
            if up.closed or up.transport is None or up.transport.is_closing():
                conns.pop()
                up.pooled = False
                continue
            if len(up.calls) + 1 >= limit:
                conns.pop()
                up.pooled = False
            return up
        return None

    def release(self, up: ThriftUpstream) -> None:
        """``up`` has room again (a reply came, or it was just opened)."""
        if up.closed or up.pooled or len(up.calls) >= self.shared.max_pending:
            return
        conns = self.free.setdefault(up.key, [])
        if not up.calls and len(conns) >= self.shared.max_idle:
            up.close()
            return
        up.pooled = True
        up.idle_since = self.shared.d.loop.time()
        conns.append(up)
        self.shared.ticking()  # so it is closed when idle, even with no client left

    def forget(self, up: ThriftUpstream) -> None:
        conns = self.free.get(up.key)
        if up.pooled and conns is not None and up in conns:
            conns.remove(up)
        up.pooled = False

    def sweep(self, now: float) -> None:
        deadline = now - self.shared.idle_timeout
        for key, conns in list(self.free.items()):
            for up in [c for c in conns if not c.calls and c.idle_since < deadline]:
                conns.remove(up)
                up.pooled = False
                up.close()
            if not conns:
                del self.free[key]

    def close_all(self) -> None:
        for conns in self.free.values():
            for up in conns:
                up.close()
        self.free.clear()

    def __len__(self) -> int:
        return sum(len(c) for c in self.free.values())


class ThriftShared:
    """What every Thrift connection of one direction shares."""

    def __init__(self, d: Direction) -> None:
        self.d = d
        conf = getattr(d.config, "thrift", None)
        self.max_frame_bytes: int = getattr(conf, "max_frame_bytes", DEFAULT_MAX_FRAME_BYTES)
        self.method_in_dst: bool = getattr(conf, "method_in_dst", False)
        self.idempotent: frozenset[str] = frozenset(getattr(conf, "idempotent_methods", ()))
        self.response_timeout: float = getattr(conf, "response_timeout", 60.0)
        self.max_retries: int = getattr(conf, "max_retries", 2)
        self.max_pending: int = max(1, getattr(conf, "max_pending_per_connection", 1))
        self.idle_timeout = d.config.http.pool_idle_timeout
        self.max_idle = d.config.http.pool_max_idle
        self.client_idle_timeout = d.config.http.idle_timeout
        self.prefix: Path = parse_path(d.config.routing.prefix)
        self.budget = RetryBudget(d.loop.time)
        self.pool = ThriftPool(self)
        self.conns: set[ThriftServer] = set()
        self._timer: Any = None

    # --- metrics ---------------------------------------------------------------------------
    def call_stats(self, authority: str, method: str) -> HttpStats:
        """The counters of one call, fetched per call (the registry may expire idle label
        sets): labelled with the original destination as ``authority`` (as HTTP/1 does
        without a Host) and with the method."""
        return self.d.registry.http(self.d.name, "thrift", authority,
                                    method=method[:MAX_LABEL])

    # --- names -----------------------------------------------------------------------------
    def logical_name(self, dst: OrigDst, method: str) -> Path:
        """``/svc/<ip>:<port>``, plus ``/<method>`` with ``thrift.method_in_dst``."""
        name = self.prefix + (f"{dst.host}:{dst.port}",)
        return name + (method,) if self.method_in_dst else name

    # --- the sweep -------------------------------------------------------------------------
    def attach(self, server: ThriftServer) -> None:
        self.conns.add(server)
        self.ticking()

    def ticking(self) -> None:
        if self._timer is None:
            self._timer = self.d.loop.call_later(TICK, self.sweep)

    def sweep(self) -> None:
        self._timer = None
        now = self.d.loop.time()
        timeout = self.response_timeout
        for server in list(self.conns):
            server.sweep(now, timeout, self.client_idle_timeout)
        self.pool.sweep(now)
        if self.conns or len(self.pool):
            self._timer = self.d.loop.call_later(TICK, self.sweep)

    def close_all(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for server in list(self.conns):
            server.close()
        self.pool.close_all()


_SHARED: weakref.WeakKeyDictionary[Any, ThriftShared] = weakref.WeakKeyDictionary()


def shared(d: Direction) -> ThriftShared:
    """The Thrift state of direction ``d`` (made on first use)."""
    state = _SHARED.get(d)
    if state is None:
        state = _SHARED[d] = ThriftShared(d)
    return state


def close_all(d: Direction) -> None:
    """Close every Thrift connection of ``d`` (proxy shutdown)."""
    state = _SHARED.get(d)
    if state is not None:
        state.close_all()


def route_name(router: Router, path: Path, dst: OrigDst) -> Target | Service:
    """Route one call by its logical name: the :class:`Target`, or the :class:`Service`
    whose discovery must answer first. Raises ``RouteError``. (As ``Router.route``, but
    from a name instead of an HTTP request view.)"""
    from appliance.routing.delegate import choose
    from appliance.routing.router import RouteError, Target

    tree = router.bind(path, None, "")
    pending: list[Service] = []

    def usable(bound: Any) -> bool:
        service = router.service(bound.id)
        if service.pending:
            pending.append(service)
        return bool(service.usable)

    try:
        chosen = choose(tree, router.rng, usable)
    except RoutingError as exc:
        raise RouteError(502, f"no route: {exc}", "no_route") from None
    if chosen is None:
        if pending:
            return pending[0]
        if router.fallback_orig_dst:
            return Target(dst, None, None, "", 0.0)
        raise RouteError(502, f"no route: {show_path(path)} delegates to no usable name",
                         "no_route")
    return router.endpoint_target(chosen, path)
