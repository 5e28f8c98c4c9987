"""appliance.identity.tls and certs.sslctx: mesh handshakes in memory, peer identities,
and loading keys without leaving files or descriptors behind."""

from __future__ import annotations

import os
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from identity_fixtures import handshake

from appliance.identity import tls
from certs import pki, sslctx

NOW = datetime.now(UTC)
WEB = "spiffe://example.org/ns/default/sa/web"
API = "spiffe://example.org/ns/prod/sa/api"


class CA:
    """An anchor and issuer that can mint workload credentials."""

    def __init__(self, domain: str = "example.org") -> None:
        anchor_key, self.issuer_key = pki.new_key(), pki.new_key()
        self.anchor = pki.make_anchor(domain, anchor_key, now=NOW - timedelta(hours=1))
        self.issuer = pki.make_issuer(self.issuer_key, self.anchor, anchor_key,
                                      now=NOW - timedelta(hours=1))

    def creds(self, uri: str | None = None, dns: tuple[str, ...] = ()
              ) -> tuple[list[x509.Certificate], pki.Key]:
        key = pki.new_key()
        leaf = pki.issue_leaf(key.public_key(), self.issuer, self.issuer_key, now=NOW,
                              uri=uri, dns=dns)
        return [leaf, self.issuer], key

    def server(self, uri: str, **kw: bool) -> ssl.SSLContext:
        chain, key = self.creds(uri)
        return tls.server_context(chain, key, [self.anchor], **kw)

    def client(self, uri: str) -> ssl.SSLContext:
        chain, key = self.creds(uri)
        return tls.client_context(chain, key, [self.anchor])


def test_mesh_handshake_learns_both_identities() -> None:
    """Client and server from one CA: TLS 1.3, the mesh ALPN, and each side sees the
    other's SPIFFE ID; the client's check of the expected identity passes."""
    ca = CA()
    client, server = handshake(ca.client(WEB), ca.server(API))
    assert client.version() == "TLSv1.3" and server.version() == "TLSv1.3"
    assert client.selected_alpn_protocol() == tls.MESH_ALPN
    assert tls.peer_identity(server) == WEB
    assert tls.check_peer_identity(client, API) == API


def test_wrong_server_identity_detected() -> None:
    """A valid certificate for another identity fails the client's identity check."""
    ca = CA()
    client, _ = handshake(ca.client(WEB), ca.server(API))
    with pytest.raises(tls.PeerIdentityError,
                       match=f"peer presented {API}, expected {WEB}"):
        tls.check_peer_identity(client, WEB)


def test_foreign_ca_rejected_both_ways() -> None:
    """A peer from another trust anchor fails the handshake whichever side it is."""
    ours, theirs = CA(), CA()
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        handshake(ours.client(WEB), theirs.server(API))
    with pytest.raises(ssl.SSLError):
        handshake(theirs.client(WEB), ours.server(API))


def test_client_without_certificate() -> None:
    """The mesh server requires a client certificate; with it optional, a client without
    one is accepted and has no identity."""
    ca = CA()
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=sslctx.anchors_pem([ca.anchor]))
    bare.set_alpn_protocols([tls.MESH_ALPN])
    with pytest.raises(ssl.SSLError):
        handshake(bare, ca.server(API))
    _, server = handshake(bare, ca.server(API, require_client_cert=False))
    assert tls.peer_identity(server) is None


def test_tls12_client_refused() -> None:
    """The mesh speaks TLS 1.3 only."""
    ca = CA()
    old = ca.client(WEB)
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake(old, ca.server(API))


def test_service_context_checks_the_service_name() -> None:
    """Talking to the identity service, a certificate naming identity.<domain> passes, and a
    workload certificate from the same CA does not (it cannot impersonate the service)."""
    ca = CA()
    client = tls.service_context([ca.anchor])
    svc_chain, svc_key = ca.creds(dns=("identity.example.org",))
    service = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sslctx.load_chain(service, svc_chain, svc_key)
    handshake(client, service, server_hostname="identity.example.org")
    impostor = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sslctx.load_chain(impostor, *ca.creds(WEB))
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(client, impostor, server_hostname="identity.example.org")


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_load_chain_leaves_nothing_behind(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading keys leaves no open descriptor, and the fallback (no memfd) leaves no file;
    both produce working contexts."""
    ca = CA()
    chain, key = ca.creds(WEB)
    before = _fds()
    for _ in range(20):
        sslctx.load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain, key)
    assert _fds() <= before
    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server = tls.server_context(chain, key, [ca.anchor])
    assert os.listdir(tmp_path) == []
    client, _ = handshake(ca.client(API), server)
    assert tls.check_peer_identity(client, WEB) == WEB
