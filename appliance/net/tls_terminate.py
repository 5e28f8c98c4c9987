"""Certificates for inbound ports that terminate TLS from clients outside the mesh.

A port in ``inbound.tls_terminate`` presents either given PEM files (loaded once, at the
first connection; a file that cannot be loaded is logged and its port refuses TLS), or a
certificate for DNS names issued by the mesh issuer through the identity service and
renewed like the workload's own (:class:`appliance.identity.dns.DnsCertificate`). The
first connection to such a port may wait for the first certificate, up to the detection
timeout. Contexts offer ALPN ``h2`` and ``http/1.1`` and TLS 1.2 or 1.3; they ask for no
client certificate.
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
ALPN = ["h2", "http/1.1"]


def file_context(term: Termination) -> ssl.SSLContext:
    """A server context presenting the given certificate files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    assert term.cert_file is not None
    ctx.load_cert_chain(term.cert_file, term.key_file)
    return ctx


class Terminator:
    """The termination certificates of one inbound direction, by port."""

    def __init__(self, d: Direction, table: dict[int, Termination]) -> None:
        self.d = d
        self.table = table
        self._files: dict[Termination, ssl.SSLContext | str] = {}

    def covers(self, port: int) -> bool:
        return port in self.table

    def context(self, port: int, ready: Ready) -> None:
        """Call ``ready(context, None)``, or ``ready(None, reason)`` when there is none; at
        once when known, else when the first issued certificate arrives (or the wait ends)."""
        term = self.table[port]
        if term.cert_file is not None:
            found = self._files.get(term)
            if found is None:
                found = self._files[term] = self._load(term)
            ready(found, None) if isinstance(found, ssl.SSLContext) else ready(None, found)
            return
        identity = self.d.identity
        if identity is None:
            ready(None, f"port {port} terminates TLS for {','.join(term.names)} with a "
                        "certificate from the mesh issuer, but identity is off")
            return
        cert = identity.dns_certificate(term.names)
        if cert.context is not None:
            ready(cert.context, None)
            return
        self.d.spawn(self._wait(cert, ready))

    async def _wait(self, cert: Any, ready: Ready) -> None:
        try:
            await asyncio.wait_for(cert.wait(), self.d.config.detect.timeout)
        except TimeoutError:
            pass
        ctx = cert.context
        ready(ctx, None if ctx is not None else
              f"no certificate for {','.join(cert.names)} yet ({cert.last_error or 'waiting'})")

    def _load(self, term: Termination) -> ssl.SSLContext | str:
        try:
            return file_context(term)
        except (OSError, ssl.SSLError, ValueError) as exc:
            reason = (f"cannot load the certificate {term.cert_file}"
                      f"{' and key ' + term.key_file if term.key_file else ''}: "
                      f"{getattr(exc, 'strerror', None) or getattr(exc, 'reason', None) or exc}")
            log.error("inbound.tls_terminate: %s", reason)
            return reason
