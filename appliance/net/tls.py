"""Connecting to upstream endpoints: plaintext, mesh TLS, or originated TLS.

Theory of operation. Every upstream connection of the proxy (HTTP/1 exchanges, the HTTP/2
pool, Thrift, opaque relays) is opened by :meth:`Connector.connect` (``Direction.connect``),
which picks one of three ways, within the direction's ``connect_timeout``:

1. **Originated TLS**, when ``outbound.tls_originate`` names the destination (address and
   port, or port): TLS with the configured SNI, verified against the system store or the
   given bundle. Explicit configuration wins over everything else.
2. **Mesh TLS**, outbound, when identity is on and the identity service says the
   destination address is meshed (a cached answer costs nothing; an unknown one is asked for
   with half the connect timeout). TLS 1.3, ALPN ``appliance.mesh/1``, our certificate,
   the peer's chain verified against the trust anchors, and then the peer's SPIFFE ID
   compared with the one the identity service named. If the lookup fails and nothing is
   cached, the connection goes in plaintext (see docs/mtls.md: a strict peer refuses it).
3. **Plaintext** otherwise (and always inbound, to the local workload).

TLS runs over the connected socket in a :class:`~appliance.net.tls_session.TlsSession`
(not ``loop.start_tls``: asyncio's TLS transports cannot half-close, which opaque relays
need); only after the handshake and the identity check is the caller's protocol created and
attached, so nothing is sent to a peer that has not proved who it is. TCP failures keep
their usual exceptions (TimeoutError, OSError); every TLS failure (handshake,
verification, ALPN, identity, no certificate yet) is a :class:`TlsConnectError`, an OSError
whose ``strerror`` says ``mesh TLS to X failed: ...`` and whose ``kind`` is the
``proxy_errors_total`` label.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.identity import policy
from appliance.identity.meshed import MISSING, MeshedLookupError
from appliance.identity.tls import MESH_ALPN, PeerIdentityError, check_peer_identity
from appliance.net.addr import OrigDst
from appliance.net.tls_session import TlsSession, TlsTransport

if TYPE_CHECKING:
    from appliance.identity.client import MeshedPeer
    from appliance.identity.manager import IdentityManager
    from appliance.net.listener import Direction

log = logging.getLogger("appliance.tls")

Factory = Callable[[], asyncio.BaseProtocol]


class TlsConnectError(OSError):
    """TLS to an upstream failed; ``kind`` names the cause for metrics."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(errno.EPROTO, message)
        self.kind = kind

    def __str__(self) -> str:
        return str(self.strerror)


def tls_labels(server_id: str | None = None, client_id: str | None = None
               ) -> tuple[tuple[str, str], ...]:
    """The ``tls``/``client_id``/``server_id`` metric labels of a TLS connection."""
    labels: tuple[tuple[str, str], ...] = (("tls", "true"),)
    if client_id:
        labels += (("client_id", client_id),)
    if server_id:
        labels += (("server_id", server_id),)
    return labels


def relabel(d: Direction, protocol: Any, labels: tuple[tuple[str, str], ...]) -> None:
    """Move a protocol's connection counters to the label set of its TLS connection (done
    before ``connection_made``, so nothing was counted on the old set yet)."""
    from appliance.telemetry.metrics import TcpStats

    for attr in ("tcp", "stats"):
        old = getattr(protocol, attr, None)
        if isinstance(old, TcpStats):
            names = dict(old.labels)
            saved, d.tls_labels = d.tls_labels, labels
            try:
                setattr(protocol, attr, d.tcp_stats(names["protocol"], names["peer"]))
            finally:
                d.tls_labels = saved


class Connector:
    """``Direction.connect``: one per direction."""

    def __init__(self, d: Direction) -> None:
        self.d = d
        self.origination = (policy.parse_origination(d.config.outbound.tls_originate)
                            if d.name == "outbound" else policy.OriginationTable())
        self._contexts: dict[tuple[policy.Origination, str | None], ssl.SSLContext] = {}

    async def connect(self, factory: Factory, dst: OrigDst, alpn: str | None = None
                      ) -> tuple[Any, Any]:
        d = self.d
        loop = d.loop
        host = d.connect_host(dst)
        deadline = loop.time() + d.connect_timeout
        plan = self.origination.lookup(host, dst.port) if self.origination else None
        if plan is not None:
            return await self._originate(factory, host, dst, plan, alpn, deadline)
        identity: IdentityManager | None = d.identity
        if identity is not None and d.name == "outbound":
            peer = await self._meshed(identity, host, deadline)
            if peer is not None:
                return await self._mesh(identity, factory, host, dst, peer, deadline)
        return await asyncio.wait_for(loop.create_connection(factory, host, dst.port),
                                      d.connect_timeout)

    async def _meshed(self, identity: IdentityManager, host: str,
                      deadline: float) -> MeshedPeer | None:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return None  # a name (explicit proxy requests): not looked up
        hit = identity.meshed.cached(host)
        if hit is not MISSING:
            return hit  # type: ignore[return-value]
        budget = max(0.0, (deadline - self.d.loop.time()) / 2)
        try:
            return await asyncio.wait_for(identity.meshed.lookup(host), budget)
        except (MeshedLookupError, TimeoutError) as exc:
            self.d.registry.error(self.d.name, "mesh_lookup_failed")
            log.debug("meshed lookup of %s failed, connecting in plaintext: %s", host,
                      exc or "timed out")
            return None

    async def _tcp(self, host: str, port: int, deadline: float) -> Any:
        remaining = max(0.0, deadline - self.d.loop.time())
        transport, _ = await asyncio.wait_for(
            self.d.loop.create_connection(asyncio.Protocol, host, port), remaining)
        return transport

    async def _start_tls(self, transport: Any, ctx: ssl.SSLContext, sni: str | None,
                         deadline: float, what: str, kind: str) -> TlsTransport:
        """The client side of a handshake on a connected transport; the caller's protocol
        is attached later (:meth:`_attach`), so nothing is sent before the checks."""
        loop = self.d.loop
        done: asyncio.Future[TlsTransport] = loop.create_future()

        def ready(tls: TlsTransport) -> None:
            if not done.done():
                done.set_result(tls)

        def failed(reason: str) -> None:
            if not done.done():
                done.set_exception(TlsConnectError(f"{what} failed: {reason}", kind))

        session = TlsSession(ctx, transport, loop, on_ready=ready, on_error=failed,
                             handshake_timeout=max(0.001, deadline - loop.time()),
                             server_side=False, server_hostname=sni)
        session.start(b"", False)
        try:
            return await done  # the session's own timer bounds the wait
        except asyncio.CancelledError:
            transport.abort()
            raise

    async def _mesh(self, identity: IdentityManager, factory: Factory, host: str,
                    dst: OrigDst, peer: MeshedPeer, deadline: float) -> tuple[Any, Any]:
        what = f"mesh TLS to {dst} ({peer.identity})"
        ctx = identity.client_context
        if ctx is None:  # no certificate yet: wait for it within the connect timeout
            await identity.wait_ready(max(0.0, deadline - self.d.loop.time()))
            ctx = identity.client_context
            if ctx is None:
                raise TlsConnectError(f"{what} failed: no certificate from the identity "
                                      "service yet", "mesh_tls_no_certificate")
        transport = await self._tcp(host, dst.port, deadline)
        tls = await self._start_tls(transport, ctx, None, deadline, what, "mesh_tls_failed")
        sslobj = tls.get_extra_info("ssl_object")
        try:
            if sslobj.selected_alpn_protocol() != MESH_ALPN:
                raise PeerIdentityError("the server did not select the mesh protocol "
                                        f"({MESH_ALPN}): not a mesh proxy")
            server_id = check_peer_identity(sslobj, peer.identity)
        except PeerIdentityError as exc:
            tls.abort()
            raise TlsConnectError(f"{what} failed: {exc}", "mesh_tls_identity") from None
        return self._attach(tls, factory, tls_labels(server_id=server_id), what)

    def _attach(self, tls: TlsTransport, factory: Factory,
                labels: tuple[tuple[str, str], ...], what: str) -> tuple[Any, Any]:
        if tls.is_closing():
            raise TlsConnectError(f"{what} failed: the server closed the connection right "
                                  "after the handshake", "tls_closed")
        protocol = factory()
        relabel(self.d, protocol, labels)
        tls.set_protocol(protocol)  # what the server sent meanwhile follows
        protocol.connection_made(tls)
        return tls, protocol

    async def _originate(self, factory: Factory, host: str, dst: OrigDst,
                         plan: policy.Origination, alpn: str | None,
                         deadline: float) -> tuple[Any, Any]:
        port = plan.port or dst.port
        what = f"TLS to {host}:{port} ({plan.sni})"
        ctx = self._origination_context(plan, alpn, what)
        transport = await self._tcp(host, port, deadline)
        tls = await self._start_tls(transport, ctx, plan.sni, deadline, what,
                                    "tls_origination_failed")
        return self._attach(tls, factory, tls_labels(), what)

    def _origination_context(self, plan: policy.Origination, alpn: str | None,
                             what: str) -> ssl.SSLContext:
        key = (plan, alpn)
        ctx = self._contexts.get(key)
        if ctx is None:
            try:
                ctx = ssl.create_default_context(cafile=plan.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise TlsConnectError(f"{what} failed: cannot load the CA bundle "
                                      f"{plan.ca_file}: {describe(exc)}",
                                      "tls_origination_failed") from None
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if alpn:
                ctx.set_alpn_protocols([alpn])
            self._contexts[key] = ctx
        return ctx


def describe(exc: BaseException) -> str:
    """A short reason for a TLS failure: OpenSSL's reason and verify message, or the
    error's text (never key material)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
