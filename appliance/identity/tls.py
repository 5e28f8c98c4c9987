"""SSL contexts for mesh TLS, and reading the peer's identity after a handshake.

Both mesh roles use TLS 1.3 only, the ALPN protocol ``appliance.mesh/1``, the proxy's
current certificate chain, and the trust anchors to verify the peer's chain. Peers are
named by a SPIFFE ID in a URI SAN, which OpenSSL's host name check does not look at: the
contexts verify the chain (``CERT_REQUIRED``), and the caller then checks the name with
:func:`check_peer_identity` (client side: the identity the destination is expected to
have) or reads it with :func:`peer_identity` (server side: who the client is).

A context is built per certificate: when the certificate is renewed, new connections use
the new contexts and established ones keep theirs.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from cryptography import x509

from certs import pki, spiffe, sslctx

MESH_ALPN = "appliance.mesh/1"


class PeerIdentityError(Exception):
    """The peer's certificate does not name the expected identity."""


def _mesh(ctx: ssl.SSLContext, chain: Sequence[x509.Certificate], key: pki.Key,
          anchors: Sequence[x509.Certificate]) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([MESH_ALPN])
    ctx.load_verify_locations(cadata=sslctx.anchors_pem(anchors))
    sslctx.load_chain(ctx, chain, key)
    return ctx


def server_context(chain: Sequence[x509.Certificate], key: pki.Key,
                   anchors: Sequence[x509.Certificate], *,
                   require_client_cert: bool = True) -> ssl.SSLContext:
    """For the inbound side of mesh TLS: presents our chain, verifies the client's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return _mesh(ctx, chain, key, anchors)


def client_context(chain: Sequence[x509.Certificate], key: pki.Key,
                   anchors: Sequence[x509.Certificate]) -> ssl.SSLContext:
    """For the outbound side of mesh TLS: presents our chain, verifies the server's chain
    (the caller checks its identity with :func:`check_peer_identity`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _mesh(ctx, chain, key, anchors)


def service_context(anchors: Sequence[x509.Certificate]) -> ssl.SSLContext:
    """For talking to the identity service: verify its certificate against the anchors and
    its name (``identity.<trust domain>``), present nothing."""
    ctx = ssl.create_default_context(cadata=sslctx.anchors_pem(anchors))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The SPIFFE ID in the verified peer certificate, or None if it presented none."""
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for entry in cert.get("subjectAltName", ()):
        kind, value = entry[0], entry[1]
        if kind == "URI" and isinstance(value, str) and value.startswith(spiffe.SCHEME):
            return value
    return None


def check_peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: str) -> str:
    """Return the peer's SPIFFE ID if it is ``expected``; raise PeerIdentityError if not."""
    found = peer_identity(ssl_object)
    if found != expected:
        raise PeerIdentityError(f"peer presented {found or 'no SPIFFE ID'}, "
                                f"expected {expected}")
    return found
