"""Listeners: accept, read the original destination once, detect the protocol, hand off.

Theory of operation: each accepted connection starts as :class:`Accepted`. At accept it
reads the original destination (never again later) and decides whether the connection may
be forwarded at all: one that was not redirected, or whose original destination is one of
this proxy's own listeners, would loop and is refused (502 for HTTP, a close otherwise).
Connections to opaque ports are relayed at once; others are held until :func:`detect` names
the protocol, the held bytes reach ``detect.max_bytes``, the client half-closes, or
``detect.timeout`` passes (then opaque). The transport is then handed to the protocol's
driver with the bytes read so far.

Load shedding (docs/reliability.md): a connection accepted while ``limits.max_connections``
client connections are open is closed at once. Requests take an in-flight slot of the
direction's :class:`~appliance.resilience.limits.Limiter` (HTTP/1 in ``http1.py``, HTTP/2
streams in ``http2.py``); queued requests past ``limits.queue_timeout`` are shed by the
once-a-second sweep. The admin server has its own listener and is never shed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Coroutine
from typing import Any

from appliance.config import Config
from appliance.net.addr import OrigDst, is_loopback, local_addr, original_dst
from appliance.net.http1 import Http1Server, Pool
from appliance.net.http2 import Http2Server
from appliance.net.http2_upstream import H2Pool
from appliance.net.relay import Relay
from appliance.net.thrift import start_thrift
from appliance.net.tls import Connector
from appliance.net.tls_inbound import serve_inbound
from appliance.protocols import http1 as h1
from appliance.protocols.detect import NEED_MORE, Protocol, detect, finish
from appliance.resilience.limits import EndpointLimits, Limiter
from appliance.resilience.policy import Policies
from appliance.telemetry.accesslog import AccessLog
from appliance.telemetry.metrics import Registry, TcpStats
from appliance.telemetry.tracing import OFF, Tracer

log = logging.getLogger("appliance")


class Direction:
    """Everything connections of one listener share: config, metrics, pool, tasks."""

    def __init__(self, name: str, config: Config, registry: Registry, instance_id: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.config = config
        self.registry = registry
        self.loop = loop
        side = config.outbound if name == "outbound" else config.inbound
        self.connect_timeout = side.connect_timeout
        self.override = (OrigDst(side.orig_dst_override.host, side.orig_dst_override.port)
                         if side.orig_dst_override else None)
        self.loopback_forward = name == "inbound" and config.inbound.forward_to_loopback
        self.own_ports = frozenset(
            {config.outbound.port, config.inbound.port, config.admin.port} - {0}
        )
        short = "out" if name == "outbound" else "in"
        self.via_name = f"{instance_id}-{short}".encode()
        self.via = b"1.1 " + self.via_name + b" (appliance)"
        self.http = registry.http(name, "http/1")
        self.pool = Pool(self)
        self.h2pool = H2Pool(self)
        self.http_conns: set[Http1Server] = set()
        self.h2_conns: set[Http2Server] = set()
        self.relays: set[Relay] = set()  # opaque connections and tunnels
        self.tasks: set[asyncio.Task[Any]] = set()
        self._tcp: dict[tuple[str, str], TcpStats] = {}
        self.router: Any = None  # the Router, set by start_router() when a dtab is set
        limits = config.limits
        self.limiter = Limiter(loop.time, limits.max_requests, limits.max_queue,
                               limits.queue_timeout)
        self.ep_limits = EndpointLimits(limits.max_endpoint_requests)
        self.max_connections = limits.max_connections
        self.detecting = 0  # accepted connections whose protocol is not known yet
        self.policies = Policies(config.service, config.services, loop.time)
        self.rng = random.Random()
        self.tracer: Tracer = OFF  # set by the Proxy when tracing is configured
        self.access_log: AccessLog | None = None  # set by the Proxy when configured

    def start_router(self) -> None:
        """Build the logical router (outbound with a dtab only); needs the running loop."""
        if self.name == "outbound" and self.config.routing.dtab.strip():
            from appliance.net.route import build_router

            self.router = build_router(self)

    def swap_routing(self, config: Config) -> None:
        """Config reload: a new router from ``config``'s routing sections replaces the old
        one (built first, so a namer that cannot be built leaves the old in place), and the
        per-service policies (classifiers, timeouts, retries) are rebuilt."""
        self.config = dataclasses.replace(self.config, routing=config.routing,
                                          balancer=config.balancer, namers=config.namers,
                                          service=config.service, services=config.services)
        self.policies = Policies(config.service, config.services, self.loop.time)
        old = self.router
        self.router = None
        try:
            self.start_router()
        except BaseException:
            self.router = old
            raise
        if old is not None:
            old.close()

    def close_router(self) -> None:
        if self.router is not None:
            self.router.close()
            self.router = None

    # --- connecting, and mesh TLS (appliance.net.tls) -----------------------------------
    tls_labels: tuple[tuple[str, str], ...] = ()
    """While a TLS connection is handed off: its ``tls``/``client_id``/``server_id``
    labels, which the connection counters made meanwhile carry."""
    _connector: Connector | None = None

    @property
    def identity(self) -> Any:
        """The proxy's IdentityManager; None when identity is off."""
        return self.registry.identity

    async def connect(self, factory: Any, dst: OrigDst, *, alpn: str | None = None
                      ) -> tuple[Any, Any]:
        """Connect to an upstream endpoint within ``connect_timeout``: plaintext, mesh TLS
        when the endpoint is meshed, or originated TLS when configured. Raises TimeoutError,
        OSError, or TlsConnectError (an OSError) for a TLS failure."""
        if self._connector is None:
            self._connector = Connector(self)
        return await self._connector.connect(factory, dst, alpn)

    def tcp_stats(self, protocol: str, peer: str) -> TcpStats:
        if self.tls_labels:
            return self.registry.tcp(self.name, protocol, peer, self.tls_labels)
        key = (protocol, peer)
        stats = self._tcp.get(key)
        if stats is None:
            stats = self._tcp[key] = self.registry.tcp(self.name, protocol, peer)
        return stats

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start a task that is referenced until done (and cancelled at shutdown)."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def client_connections(self) -> int:
        """Client connections open now, whatever their protocol."""
        open_ = self.detecting
        for (_, peer), stats in self._tcp.items():
            if peer == "src":
                open_ += stats.opened - stats.closed
        return open_

    def shed_queued(self) -> None:
        """Requests that waited in the queue past ``limits.queue_timeout`` get 503."""
        if self.limiter.queue:
            for waiter in self.limiter.expire():
                waiter.shed("waited longer than limits.queue_timeout for an in-flight slot",
                            "shed_queue_timeout")

    def connect_host(self, dst: OrigDst) -> str:
        return "127.0.0.1" if self.loopback_forward else dst.host

    def loops_back(self, dst: OrigDst, local_host: str) -> bool:
        """Would forwarding to ``dst`` reach one of this proxy's own listeners?"""
        if dst.port not in self.own_ports:
            return False
        return dst.host == local_host or is_loopback(dst.host) or dst.host in ("0.0.0.0", "::")

    def sweep(self) -> None:
        """Once a second: enforce the response, header and idle timeouts; trim the pool.

        Checking here instead of arming a timer per request keeps timers off the hot path;
        the price is up to a second of lateness."""
        now = self.loop.time()
        conf = self.config.http
        for conn in list(self.http_conns):
            ex = conn.ex
            if ex is not None and ex.waiting_since and conf.response_timeout \
                    and now - ex.waiting_since > conf.response_timeout:
                ex.response_timeout()
                continue
            idle = now - conn.last_active > conf.idle_timeout
            if conn.parser.in_head:
                if now - conn.head_started > conf.header_timeout:
                    conn.refuse(408, "request head not received in time", "header_timeout")
            elif ex is None and not conn.queue and idle:
                conn.close()
            elif ex is not None and idle and not ex.request_done:
                # The client stopped sending its request body: give the upstream back.
                conn.refuse(408, "request body stalled", "body_timeout")
        for h2conn in list(self.h2_conns):
            if not h2conn.streams and now - h2conn.last_active > conf.idle_timeout:
                h2conn.shutdown()
                h2conn.close()
        self.pool.sweep(now)
        self.h2pool.sweep(now)
        self.shed_queued()


class Accepted(asyncio.Protocol):
    """A connection whose protocol is not yet known."""

    def __init__(self, d: Direction) -> None:
        self.d = d
        self.transport: Any = None
        self.dst: OrigDst | None = None
        self.refused: str | None = None  # why this connection may not be forwarded
        self.refused_kind = ""  # its metric label
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.explicit = False  # refused as transparent, but may be an explicit proxy request
        self.counted = False  # in d.detecting until handed off or closed

    tls_peer: Any = None  # inside terminated TLS: who the client is (tls_inbound.TlsPeer)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        d = self.d
        if d.max_connections and d.client_connections() >= d.max_connections:
            d.registry.error(d.name, "shed_connections")
            self.done = True
            transport.abort()
            return
        d.detecting += 1
        self.counted = True
        sock = transport.get_extra_info("socket")
        dst = original_dst(sock)
        local_host, _ = local_addr(sock)
        if dst is None or d.loops_back(dst, local_host):
            if d.override is not None:
                dst = d.override
            elif dst is None:
                self.refused = "no original destination (connection was not redirected)"
                self.refused_kind = "no_orig_dst"
            else:
                self.refused = f"original destination {dst} is this proxy (loop)"
                self.refused_kind = "loop"
        self.dst = dst
        if self.refused is not None and d.name == "outbound" \
                and d.config.outbound.explicit_proxy:
            peer = transport.get_extra_info("peername")
            if peer and is_loopback(peer[0].removeprefix("::ffff:")):
                self.explicit = True  # an app using us as its http_proxy, maybe
        if self.refused is None and dst is not None \
                and dst.port in d.config.detect.opaque_ports:
            self.hand_off(Protocol.OPAQUE, eof=False)
            return
        self.timer = d.loop.call_later(d.config.detect.timeout, self.detect_timeout)

    def data_received(self, data: bytes) -> None:
        buf = self.buf = self.buf + data if self.buf else data
        verdict = detect(buf)
        if verdict is NEED_MORE:
            if len(buf) >= self.d.config.detect.max_bytes:
                self.hand_off(Protocol.OPAQUE, eof=False)
            return
        assert isinstance(verdict, Protocol)
        self.hand_off(verdict, eof=False)

    def eof_received(self) -> bool:
        self.hand_off(finish(self.buf) if self.buf else Protocol.OPAQUE, eof=True)
        return True

    def detect_timeout(self) -> None:
        self.timer = None
        self.hand_off(finish(self.buf), eof=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.uncount()
        if self.timer is not None:
            self.timer.cancel()

    def uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.d.detecting -= 1

    def hand_off(self, protocol: Protocol, *, eof: bool) -> None:
        if self.done:
            return
        self.done = True
        self.uncount()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        d = self.d
        if self.explicit and protocol is Protocol.HTTP1:
            sock = self.transport.get_extra_info("socket")
            Http1Server(d, self.transport, OrigDst(*local_addr(sock)), explicit=True) \
                .start(self.buf, eof)
            return
        if self.refused is not None or self.dst is None:
            self.refuse(protocol)
            return
        if d.name == "inbound":
            serve_inbound(self, protocol, eof)  # mesh TLS and the port's policy, then serve()
            return
        self.serve(protocol, eof)

    def serve(self, protocol: Protocol, eof: bool, authz: Any = None) -> None:
        """Hand the connection to its protocol's driver. ``authz`` (inbound HTTP) checks
        each request and sets ``l5d-client-id`` (appliance.net.tls_inbound.InboundPeer)."""
        d = self.d
        assert self.dst is not None
        if protocol is Protocol.HTTP1:
            server = Http1Server(d, self.transport, self.dst)
            server.authz = authz
            server.start(self.buf, eof)
        elif protocol is Protocol.HTTP2:
            h2server = Http2Server(d, self.transport, self.dst)
            h2server.authz = authz
            h2server.start(self.buf, eof)
        elif protocol is Protocol.THRIFT:
            start_thrift(d, self.transport, self.dst, self.buf, eof)
        else:
            Relay(d, self.transport, self.dst, protocol.value, self.buf).start(eof)

    def refuse(self, protocol: Protocol) -> None:
        d = self.d
        d.registry.error(d.name, self.refused_kind)
        if protocol is Protocol.HTTP1:
            d.http.requests += 1
            d.http.response(502, 0.0, "proxy")
            self.transport.write(h1.error_response(502, self.refused or "refused", d.via,
                                                   close=True))
            self.transport.close()
        else:
            self.transport.abort()


async def start_listener(d: Direction, host: str, port: int) -> asyncio.AbstractServer:
    return await listen(d.loop, lambda: Accepted(d), host, port)


def has_ipv6() -> bool:
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as fh:
            return bool(fh.read().strip())
    except OSError:
        return False


async def listen(loop: asyncio.AbstractEventLoop, factory: Any, host: str,
                 port: int) -> asyncio.AbstractServer:
    """Listen on ``host``; "0.0.0.0" also means "::" when the host has IPv6, so IPv6
    connections that ip6tables redirects have a listener too."""
    if host == "0.0.0.0" and port and has_ipv6():
        try:
            return await loop.create_server(factory, ["0.0.0.0", "::"], port,
                                            reuse_address=True, backlog=1024)
        except OSError as exc:
            log.warning("IPv6 listener on [::]:%d unavailable (%s); IPv4 only", port, exc)
    return await loop.create_server(factory, host, port, reuse_address=True, backlog=1024)
