"""certs.spiffe and certs.pki: names, anchor/issuer/leaf shapes, chain checks."""

from __future__ import annotations

import ipaddress
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from certs import pki, spiffe

NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("uri, parts", [
    ("spiffe://example.org/ns/default/sa/web", ("example.org", "default", "web")),
    ("spiffe://cluster.local/ns/kube-system/sa/a.b-c", ("cluster.local", "kube-system", "a.b-c")),
    ("spiffe://td_1/ns/n/sa/s", ("td_1", "n", "s")),
])
def test_parse_good(uri: str, parts: tuple[str, str, str]) -> None:
    """Well-formed SPIFFE IDs parse into their parts and print back unchanged."""
    sid = spiffe.parse(uri)
    assert (sid.trust_domain, sid.namespace, sid.account) == parts
    assert str(sid) == uri


@pytest.mark.parametrize("uri, fragment", [
    ("https://example.org/ns/a/sa/b", "not a SPIFFE ID"),
    ("spiffe://example.org/ns/a", "/ns/NAMESPACE/sa/ACCOUNT"),
    ("spiffe://example.org/sa/a/ns/b", "/ns/NAMESPACE/sa/ACCOUNT"),
    ("spiffe://Example.org/ns/a/sa/b", "trust domain 'Example.org'"),
    ("spiffe://.example.org/ns/a/sa/b", "trust domain"),
    ("spiffe://example.org/ns/-a/sa/b", "namespace '-a'"),
    ("spiffe://example.org/ns/a/sa/B", "account 'B'"),
    ("spiffe://example.org/ns/a/sa/b/c", "/ns/NAMESPACE/sa/ACCOUNT"),
    ("spiffe://example.org/ns/" + "a" * 64 + "/sa/b", "namespace"),
])
def test_parse_bad(uri: str, fragment: str) -> None:
    """Malformed SPIFFE IDs are refused with a message naming the bad part."""
    with pytest.raises(spiffe.SpiffeError, match=None) as err:
        spiffe.parse(uri)
    assert fragment in str(err.value)


_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


@given(_label, _label, _label)
def test_spiffe_round_trip(domain: str, ns: str, sa: str) -> None:
    """Any valid triple formats to a URI that parses back to the same triple."""
    sid = spiffe.SpiffeId(domain, ns, sa)
    assert spiffe.parse(sid.uri) == sid
    assert spiffe.trust_domain_of(sid.uri) == domain


def _pki(now: datetime = NOW) -> tuple[x509.Certificate, pki.Key, x509.Certificate, pki.Key]:
    anchor_key, issuer_key = pki.new_key(), pki.new_key()
    anchor = pki.make_anchor("example.org", anchor_key, now=now)
    issuer = pki.make_issuer(issuer_key, anchor, anchor_key, now=now)
    return anchor, anchor_key, issuer, issuer_key


def test_anchor_and_issuer_shape() -> None:
    """Root: self-signed CA, pathlen 1, 1 year; issuer: CA pathlen 0 under it; both P-256 and
    naming the trust domain."""
    anchor, _, issuer, _ = _pki()
    assert anchor.subject == anchor.issuer
    assert issuer.issuer == anchor.subject
    for cert, pathlen in ((anchor, 1), (issuer, 0)):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == pathlen
        assert cert.not_valid_before_utc == NOW
        assert cert.not_valid_after_utc == NOW + timedelta(days=365)
        assert pki.trust_domain(cert) == "example.org"
        assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    pki.check_chain([issuer], [anchor], NOW)


def test_issuer_never_outlives_anchor() -> None:
    """An issuer asked for 2 years under a 1-year anchor ends with the anchor."""
    anchor_key = pki.new_key()
    anchor = pki.make_anchor("example.org", anchor_key, now=NOW)
    issuer = pki.make_issuer(pki.new_key(), anchor, anchor_key, now=NOW + timedelta(days=100),
                             lifetime=timedelta(days=730))
    assert issuer.not_valid_after_utc == anchor.not_valid_after_utc


def test_issuer_refuses_foreign_anchor_key() -> None:
    """Signing an issuer with a key that is not the anchor's is refused."""
    anchor = pki.make_anchor("example.org", pki.new_key(), now=NOW)
    with pytest.raises(pki.PkiError, match="does not match"):
        pki.make_issuer(pki.new_key(), anchor, pki.new_key(), now=NOW)


def test_leaf_shape() -> None:
    """A leaf: not a CA, empty subject with a critical SAN holding the SPIFFE ID and IPs,
    serverAuth and clientAuth, backdated by the skew, lifetime from now."""
    anchor, _, issuer, issuer_key = _pki()
    key = pki.new_key()
    uri = "spiffe://example.org/ns/default/sa/web"
    leaf = pki.issue_leaf(key.public_key(), issuer, issuer_key, now=NOW + timedelta(hours=1),
                          lifetime=timedelta(seconds=30), backdate=timedelta(seconds=20),
                          uri=uri, ips=[ipaddress.ip_address("198.18.0.1")])
    assert not pki.is_ca(leaf)
    assert len(leaf.subject) == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert pki.uris(leaf) == [uri]
    assert [str(ip) for ip in pki.ip_addresses(leaf)] == ["198.18.0.1"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_before_utc == NOW + timedelta(minutes=59, seconds=40)
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=1, seconds=30)
    pki.check_chain([leaf, issuer], [anchor], NOW + timedelta(hours=1))


def test_leaf_cut_at_issuer_expiry() -> None:
    """A leaf asked near the issuer's end expires with the issuer, not after."""
    _, _, issuer, issuer_key = _pki()
    now = issuer.not_valid_after_utc - timedelta(hours=1)
    leaf = pki.issue_leaf(pki.new_key().public_key(), issuer, issuer_key, now=now,
                          uri="spiffe://example.org/ns/a/sa/b")
    assert leaf.not_valid_after_utc == issuer.not_valid_after_utc


def test_leaf_from_expired_issuer_refused() -> None:
    """An expired issuer signs nothing."""
    _, _, issuer, issuer_key = _pki()
    with pytest.raises(pki.PkiError, match="expired"):
        pki.issue_leaf(pki.new_key().public_key(), issuer, issuer_key,
                       now=issuer.not_valid_after_utc + timedelta(seconds=1),
                       uri="spiffe://example.org/ns/a/sa/b")


def test_leaf_needs_a_name() -> None:
    """A leaf with no URI, DNS name or IP is refused."""
    _, _, issuer, issuer_key = _pki()
    with pytest.raises(pki.PkiError, match="at least one name"):
        pki.issue_leaf(pki.new_key().public_key(), issuer, issuer_key, now=NOW)


def _leaf(issuer: x509.Certificate, issuer_key: pki.Key, now: datetime = NOW,
          lifetime: timedelta = timedelta(hours=1)) -> x509.Certificate:
    return pki.issue_leaf(pki.new_key().public_key(), issuer, issuer_key, now=now,
                          lifetime=lifetime, uri="spiffe://example.org/ns/a/sa/b")


def test_check_chain_failures() -> None:
    """Each broken chain is refused with the reason: expired, not yet valid, foreign
    issuer, missing intermediate, a non-CA parent, an expired anchor."""
    anchor, anchor_key, issuer, issuer_key = _pki()
    other_anchor, _, other_issuer, other_key = _pki()
    leaf = _leaf(issuer, issuer_key)
    cases = [
        ([leaf, issuer], [anchor], NOW + timedelta(hours=2), "expired"),
        ([leaf, issuer], [anchor], NOW - timedelta(seconds=1), "not valid before"),
        ([leaf, issuer], [other_anchor], NOW, "not issued by any trust anchor"),
        ([leaf], [anchor], NOW, "not issued by any trust anchor"),
        ([_leaf(other_issuer, other_key), issuer], [anchor], NOW, "was not issued by"),
        ([leaf, leaf], [anchor], NOW, "not a CA"),
        ([], [anchor], NOW, "empty"),
    ]
    for chain, anchors, now, fragment in cases:
        with pytest.raises(pki.PkiError) as err:
            pki.check_chain(chain, anchors, now)
        assert fragment in str(err.value), (fragment, str(err.value))
    pki.check_chain([leaf, issuer], [other_anchor, anchor], NOW)


def test_openssl_agrees(tmp_path: Path) -> None:
    """OpenSSL, an independent verifier, accepts the leaf -> issuer -> anchor chain."""
    now = datetime.now(UTC)
    anchor, _, issuer, issuer_key = _pki(now)
    leaf = _leaf(issuer, issuer_key, now=now)
    (tmp_path / "root.pem").write_bytes(pki.cert_pem(anchor))
    (tmp_path / "issuer.pem").write_bytes(pki.cert_pem(issuer))
    (tmp_path / "leaf.pem").write_bytes(pki.cert_pem(leaf))
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", tmp_path / "root.pem", "-untrusted",
         tmp_path / "issuer.pem", "-purpose", "sslclient", tmp_path / "leaf.pem"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize("pem, fragment", [
    (b"", "no certificate"),
    (b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n", "not a PEM"),
])
def test_load_certs_errors(pem: bytes, fragment: str) -> None:
    """Unreadable PEM names the source."""
    with pytest.raises(pki.PkiError, match=fragment) as err:
        pki.load_certs(pem, "some.pem")
    assert "some.pem" in str(err.value)


def test_load_key_refuses_other_curves() -> None:
    """Only P-256 keys are loaded; the message names the source and never the key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(pki.PkiError, match="P-256"):
        pki.load_key(pki.key_pem(other), "k.pem")  # type: ignore[arg-type]
    with pytest.raises(pki.PkiError, match="k.pem: not an unencrypted"):
        pki.load_key(pki.key_pem(pki.new_key(), b"secret"), "k.pem")
