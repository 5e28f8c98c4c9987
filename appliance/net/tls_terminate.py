"""Certificates for inbound ports that terminate TLS from clients outside the mesh.

A port in ``inbound.tls_terminate`` presents either given PEM files (loaded once, at the
first connection; a file that cannot be loaded is logged and its port refuses TLS), or a
certificate for DNS names issued by the mesh issuer through the identity service and
renewed like the workload's own (:class:`appliance.identity.dns.DnsCertificate`). The
first connection to such a port may wait for the first certificate, up to the detection
timeout. Contexts offer TLS 1.2 or 1.3 and ask for no client certificate. ALPN: ``http/1.1``,
and ``h2`` first when the port is in ``inbound.h2_upstream_ports`` (the app speaks HTTP/2):
requests are forwarded to the app in the protocol the client chose, so offering h2 to
clients of an HTTP/1-only app would break them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.identity.policy import Termination

if TYPE_CHECKING:
    from appliance.net.listener import Direction

log = logging.getLogger("appliance.tls")

Ready = Callable[[ssl.SSLContext | None, str | None], None]
HTTP1_ONLY = ("http/1.1",)
H2_FIRST = ("h2", "http/1.1")


def file_context(term: Termination, alpn: tuple[str, ...] = HTTP1_ONLY) -> ssl.SSLContext:
    """A server context presenting the given certificate files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(alpn))
    assert term.cert_file is not None
    ctx.load_cert_chain(term.cert_file, term.key_file)
    return ctx


class Terminator:
    """The termination certificates of one inbound direction, by port."""

    def __init__(self, d: Direction, table: dict[int, Termination]) -> None:
        self.d = d
        self.table = table
        self._files: dict[tuple[Termination, tuple[str, ...]], ssl.SSLContext | str] = {}

    def covers(self, port: int) -> bool:
        return port in self.table

    def context(self, port: int, ready: Ready) -> None:
        """Call ``ready(context, None)``, or ``ready(None, reason)`` when there is none; at
        once when known, else when the first issued certificate arrives (or the wait ends)."""
        term = self.table[port]
        alpn = H2_FIRST if port in self.d.config.inbound.h2_upstream_ports else HTTP1_ONLY
        if term.cert_file is not None:
            found = self._files.get((term, alpn))
            if found is None:
                found = self._files[(term, alpn)] = self._load(term, alpn)
            ready(found, None) if isinstance(found, ssl.SSLContext) else ready(None, found)
            return
        identity = self.d.identity
        if identity is None:
            ready(None, f"port {port} terminates TLS for {','.join(term.names)} with a "
                        "certificate from the mesh issuer, but identity is off")
            return
        cert = identity.dns_certificate(term.names)
        ctx = cert.context(alpn)
        if ctx is not None:
            ready(ctx, None)
            return
        self.d.spawn(self._wait(cert, alpn, ready))

    async def _wait(self, cert: Any, alpn: tuple[str, ...], ready: Ready) -> None:
        try:
            await asyncio.wait_for(cert.wait(), self.d.config.detect.timeout)
        except TimeoutError:
            pass
        ctx = cert.context(alpn)
        ready(ctx, None if ctx is not None else
              f"no certificate for {','.join(cert.names)} yet ({cert.last_error or 'waiting'})")

    def _load(self, term: Termination, alpn: tuple[str, ...]) -> ssl.SSLContext | str:
        try:
            return file_context(term, alpn)
        except (OSError, ssl.SSLError, ValueError) as exc:
            reason = (f"cannot load the certificate {term.cert_file}"
                      f"{' and key ' + term.key_file if term.key_file else ''}: "
                      f"{getattr(exc, 'strerror', None) or getattr(exc, 'reason', None) or exc}")
            log.error("inbound.tls_terminate: %s", reason)
            return reason
