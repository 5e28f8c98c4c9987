"""The inbound side of mesh TLS: port policy, TLS termination, client identity, authorization.

Theory of operation. Every inbound connection whose protocol was detected comes here
(:func:`serve_inbound`) before it is handed to its protocol's driver:

* **TLS** (not yet terminated): :class:`HelloReader` reads the whole ClientHello (bounded,
  within the detection timeout) and parses it (:mod:`appliance.protocols.tls`); garbage is
  counted and closed. A hello offering the mesh ALPN is terminated with the proxy's mesh
  certificate (the client must present one); a hello to a port in ``inbound.tls_terminate``
  is terminated with that port's certificate; any other TLS is passed through untouched, as
  a client without a mesh identity. Termination uses :class:`~appliance.net.tls_session.
  TlsSession`; after the handshake, a fresh detection runs on the decrypted stream, and its
  verdict comes back here with the client's identity.
* **Opaque ports** skip protocol detection, but with identity on the first bytes are still
  awaited briefly (:class:`TlsSniff`, up to a second) so that mesh TLS is terminated there
  too; silence or other bytes are relayed as they are.
* **Plaintext**, or the protocol inside terminated TLS: the port's clients
  (``inbound.authorization``, default from ``inbound.tls_mode``) decide. A connection
  without a mesh identity to a port that needs one is closed at once (``identity_required``).
  Otherwise HTTP connections get an :class:`InboundPeer`: every request is checked (403, or
  gRPC PERMISSION_DENIED, when the identity is not allowed), a client-sent ``l5d-client-id``
  is removed and the verified one is added. Other protocols are allowed or closed per
  connection.

Connection counters made during the hand-off carry the ``tls``/``client_id`` labels
(``Direction.tls_labels``); authorization decisions are counted per port, tls and client id.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any

from appliance.identity import policy
from appliance.identity.tls import MESH_ALPN, peer_identity
from appliance.net import tls_terminate
from appliance.net.tls import tls_labels
from appliance.net.tls_session import TlsSession, TlsTransport
from appliance.protocols.detect import Protocol
from appliance.protocols.tls import MAX_HELLO, ClientHello, ClientHelloError, parse_client_hello

if TYPE_CHECKING:
    from appliance.net.listener import Accepted, Direction
    from appliance.telemetry.metrics import AuthzStats

log = logging.getLogger("appliance.tls")

CLIENT_ID = b"l5d-client-id"
SNIFF_TIMEOUT = 1.0  # opaque ports, identity on: how long to wait for a ClientHello
GRPC_PERMISSION_DENIED = b"7"
_MESH_ALPN = MESH_ALPN.encode()


class TlsPeer:
    """What a terminated TLS connection told us about its client."""

    __slots__ = ("client_id", "mesh")

    def __init__(self, client_id: str | None, mesh: bool) -> None:
        self.client_id = client_id
        self.mesh = mesh


class Inbound:
    """Per-direction inbound state: the parsed policies and termination certificates."""

    def __init__(self, d: Direction) -> None:
        conf = d.config.inbound
        mode = policy.parse_mode("inbound.tls_mode", conf.tls_mode)
        self.authz = policy.parse_authorization(conf.authorization, mode)
        self.terminate = tls_terminate.Terminator(d, policy.parse_termination(conf.tls_terminate))


_STATE: weakref.WeakKeyDictionary[Direction, Inbound] = weakref.WeakKeyDictionary()


def inbound(d: Direction) -> Inbound:
    """The inbound state of ``d``, made at its first connection."""
    state = _STATE.get(d)
    if state is None:
        state = _STATE[d] = Inbound(d)
    return state


class InboundPeer:
    """The client of an inbound HTTP connection, as authorization sees it; consulted by the
    HTTP/1 and HTTP/2 servers for every request."""

    __slots__ = ("client_id", "header", "allowed", "reason", "stats")

    def __init__(self, client_id: str | None, allowed: bool, reason: str,
                 stats: AuthzStats) -> None:
        self.client_id = client_id
        self.header = (CLIENT_ID, client_id.encode()) if client_id else None
        self.allowed = allowed
        self.reason = reason
        self.stats = stats

    def admit_http1(self, server: Any, head: Any, stats: Any = None) -> bool:
        """Strip ``l5d-client-id``, add ours; False (after a 403) when not allowed."""
        headers = head.headers
        for i in range(len(headers) - 1, -1, -1):
            name = headers[i][0]
            if len(name) == 13 and name.lower() == CLIENT_ID:
                del headers[i]
        if not self.allowed:
            self.stats.deny += 1
            server.d.registry.error(server.d.name, "unauthorized")
            server.respond_error(head, 403, self.reason, request_done=False, kind="authz",
                                 stats=stats)
            return False
        self.stats.allow += 1
        if self.header is not None:
            headers.append(self.header)
        return True

    def admit_h2(self, server: Any, stream: Any) -> bool:
        """The same for an HTTP/2 stream; gRPC is denied with PERMISSION_DENIED."""
        if not self.allowed:
            from appliance.net.h2stream import respond_error

            self.stats.deny += 1
            server.d.registry.error(server.d.name, "unauthorized")
            respond_error(stream, 403, self.reason, grpc_status=GRPC_PERMISSION_DENIED)
            return False
        self.stats.allow += 1
        headers = stream.headers
        if self.header is not None or any(n == CLIENT_ID for n, _ in headers):
            kept = [h for h in headers if h[0] != CLIENT_ID]
            if self.header is not None:
                kept.append(self.header)
            stream.headers = kept
        return True


def _authz_labels(port: int, tls: bool, client_id: str | None) -> tuple[tuple[str, str], ...]:
    labels: tuple[tuple[str, str], ...] = (("port", str(port)),
                                           ("tls", "true" if tls else "false"))
    return labels + ((("client_id", client_id),) if client_id else ())


def serve_inbound(acc: Accepted, protocol: Protocol, eof: bool) -> None:
    """Apply TLS and the port's policy to a detected inbound connection, then serve it."""
    peer: TlsPeer | None = acc.tls_peer
    if peer is None and protocol is Protocol.TLS:
        HelloReader(acc, eof).start()
        return
    if peer is None and protocol is Protocol.OPAQUE and not acc.buf and not eof \
            and acc.d.identity is not None:
        TlsSniff(acc).start()  # an opaque port: detection was skipped, TLS may still come
        return
    serve_as(acc, protocol, eof, peer)


def serve_as(acc: Accepted, protocol: Protocol, eof: bool, peer: TlsPeer | None) -> None:
    """Serve ``acc`` as ``protocol`` for a client known by ``peer`` (None: plaintext or
    passed-through TLS, no identity)."""
    d = acc.d
    assert acc.dst is not None
    port = acc.dst.port
    clients = inbound(d).authz.clients(port)
    client_id = peer.client_id if peer is not None else None
    terminated = peer is not None
    labels = _authz_labels(port, terminated, client_id)
    if not terminated and clients.needs_identity:
        d.registry.authz("tcp", labels).deny += 1
        d.registry.error(d.name, "identity_required")
        acc.transport.abort()
        return
    allowed = clients.allows(client_id)
    reason = "" if allowed else (
        f"unauthorized: {client_id or 'a client without a mesh identity'} may not use port "
        f"{port} (allowed: {clients})")
    authz: InboundPeer | None = None
    if protocol in (Protocol.HTTP1, Protocol.HTTP2):
        authz = InboundPeer(client_id, allowed, reason, d.registry.authz("http", labels))
    else:
        stats = d.registry.authz("tcp", labels)
        if not allowed:
            stats.deny += 1
            d.registry.error(d.name, "unauthorized")
            acc.transport.abort()
            return
        stats.allow += 1
    saved, d.tls_labels = d.tls_labels, (tls_labels(client_id=client_id) if terminated
                                         else d.tls_labels)
    try:
        acc.serve(protocol, eof, authz)
    finally:
        d.tls_labels = saved


class TlsSniff(asyncio.Protocol):
    """On an opaque port (no protocol detection) with identity on: wait up to
    :data:`SNIFF_TIMEOUT` for the client's first bytes; a TLS ClientHello goes to
    :class:`HelloReader` (mesh clients start TLS at once), anything else, or silence (a
    server-speaks-first protocol), is relayed as it is."""

    def __init__(self, acc: Accepted) -> None:
        self.acc = acc
        self.buf = b""
        self.eof = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        d = self.acc.d
        self.acc.transport.set_protocol(self)
        self.timer = d.loop.call_later(min(SNIFF_TIMEOUT, d.config.detect.timeout),
                                       self.decide)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not _maybe_tls(self.buf) or len(self.buf) >= 6:
            self.decide()

    def eof_received(self) -> bool:
        self.eof = True
        self.decide()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()

    def decide(self) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        acc = self.acc
        acc.buf = self.buf
        if len(self.buf) >= 6 and _maybe_tls(self.buf) and self.buf[5] == 1:
            HelloReader(acc, self.eof).start()
        else:
            serve_as(acc, Protocol.OPAQUE, self.eof, None)


def _maybe_tls(buf: bytes) -> bool:
    """Could ``buf`` be the start of a TLS handshake record?"""
    return buf[:1] in (b"", b"\x16") and buf[1:2] in (b"", b"\x03")


class HelloReader(asyncio.Protocol):
    """Reads a whole ClientHello, then terminates, passes through or refuses."""

    def __init__(self, acc: Accepted, eof: bool) -> None:
        self.acc = acc
        self.d = acc.d
        self.transport = acc.transport
        self.buf = acc.buf
        self.eof = eof
        self.decided = False  # the hello is parsed; bytes after it are kept for TLS
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.transport.set_protocol(self)
        self.timer = self.d.loop.call_later(self.d.config.detect.timeout, self.timeout)
        self.check()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buf += data
        if len(self.buf) > MAX_HELLO + 4096:
            self.refuse("tls_client_hello_invalid", "ClientHello too large")
        elif not self.decided:
            self.check()

    def eof_received(self) -> bool:
        self.eof = True
        if not self.decided and not self.closed:
            self.check()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stop_timer()

    def timeout(self) -> None:
        self.timer = None
        if not self.decided:
            self.refuse("tls_hello_timeout", "no complete ClientHello in time")

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def refuse(self, kind: str, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop_timer()
        self.d.registry.error(self.d.name, kind)
        log.debug("inbound TLS from %s refused: %s", self.transport.get_extra_info("peername"),
                  reason)
        self.transport.abort()

    def check(self) -> None:
        try:
            hello = parse_client_hello(self.buf)
        except ClientHelloError as exc:
            self.refuse("tls_client_hello_invalid", str(exc))
            return
        if isinstance(hello, ClientHello):
            self.decided = True
            self.stop_timer()
            self.decide(hello.alpn)
        elif self.eof:
            self.refuse("tls_client_hello_invalid", "the client closed mid-ClientHello")

    def decide(self, alpn: tuple[bytes, ...]) -> None:
        d, acc = self.d, self.acc
        assert acc.dst is not None
        identity = d.identity
        if _MESH_ALPN in alpn and identity is not None:
            ctx = identity.server_context
            if ctx is None:
                self.refuse("mesh_tls_no_certificate",
                            "no certificate from the identity service yet")
                return
            self.terminate(ctx, mesh=True)
            return
        term = inbound(d).terminate
        if term.covers(acc.dst.port):
            term.context(acc.dst.port, self.terminated_with)
            return
        self.closed = True  # the connection goes on as opaque TLS
        acc.buf = self.buf
        serve_as(acc, Protocol.TLS, self.eof, None)  # passed through, no identity

    def terminated_with(self, ctx: Any, error: str | None) -> None:
        if self.closed:
            return
        if ctx is None:
            self.refuse("tls_no_certificate", error or "no certificate for this port yet")
            return
        self.terminate(ctx, mesh=False)

    def terminate(self, ctx: Any, *, mesh: bool) -> None:
        d = self.d
        self.closed = True  # the TLS server owns the connection from here
        server = TlsSession(ctx, self.transport, d.loop, on_ready=lambda t: self.ready(t, mesh),
                           on_error=lambda reason: self.handshake_failed(reason, mesh),
                           handshake_timeout=d.config.detect.timeout)
        server.start(self.buf, self.eof)

    def handshake_failed(self, reason: str, mesh: bool) -> None:
        kind = "mesh_tls_handshake_failed" if mesh else "tls_handshake_failed"
        self.d.registry.error(self.d.name, kind)
        log.info("inbound %s handshake with %s failed: %s", "mesh TLS" if mesh else "TLS",
                 self.transport.get_extra_info("peername"), reason)

    def ready(self, transport: TlsTransport, mesh: bool) -> None:
        """Handshake done: learn the client, run detection on the decrypted stream."""
        acc, d = self.acc, self.d
        client_id = peer_identity(transport.get_extra_info("ssl_object")) if mesh else None
        transport.set_extra("peer_identity", client_id)
        inner = type(acc)(d)
        inner.transport = transport
        inner.dst = acc.dst
        inner.tls_peer = TlsPeer(client_id, mesh)
        transport.set_protocol(inner)
        assert acc.dst is not None
        if acc.dst.port in d.config.detect.opaque_ports:
            inner.hand_off(Protocol.OPAQUE, eof=False)  # no detection inside either
        else:
            inner.timer = d.loop.call_later(d.config.detect.timeout, inner.detect_timeout)
