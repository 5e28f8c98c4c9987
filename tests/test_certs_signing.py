"""certs.signing: what the identity service agrees to sign (no sockets)."""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certs import meshed, pki, signing
from certs.tokens import Subject

NOW = datetime(2030, 1, 1, tzinfo=UTC)
WEB = Subject("default", "web")
WEB_ID = "spiffe://example.org/ns/default/sa/web"


def _csr(*names: x509.GeneralName, key: object = None) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)),
                                        critical=False)
    return builder.sign(key or pki.new_key(), hashes.SHA256())  # type: ignore[arg-type]


def _pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _sign(csr: x509.CertificateSigningRequest, *, peer: str = "198.18.0.1",
          policy: signing.AddressPolicy = "peer") -> signing.Signed:
    anchor_key, issuer_key = pki.new_key(), pki.new_key()
    anchor = pki.make_anchor("example.org", anchor_key, now=NOW - timedelta(hours=1))
    issuer = pki.make_issuer(issuer_key, anchor, anchor_key, now=NOW - timedelta(hours=1))
    return signing.sign(csr, WEB, issuer_key, issuer, trust_domain="example.org", peer=peer,
                        policy=policy, now=NOW, lifetime=timedelta(seconds=30),
                        backdate=timedelta(seconds=5))


def _uri(u: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(u)


def _ip(a: str) -> x509.IPAddress:
    return x509.IPAddress(ipaddress.ip_address(a))


def test_sign_fills_identity_and_peer_address() -> None:
    """A CSR with no names gets the token's identity and the request's source address."""
    signed = _sign(_csr(), peer="::ffff:198.18.0.7")
    assert signed.identity == WEB_ID
    assert signed.addresses == ("198.18.0.7",)
    assert pki.uris(signed.leaf) == [WEB_ID]
    assert [str(a) for a in pki.ip_addresses(signed.leaf)] == ["198.18.0.7"]
    assert signed.leaf.not_valid_after_utc == NOW + timedelta(seconds=30)
    assert signed.leaf.not_valid_before_utc == NOW - timedelta(seconds=5)


def test_sign_accepts_matching_identity_and_address() -> None:
    """A CSR asking for the token's identity and the source address is granted."""
    signed = _sign(_csr(_uri(WEB_ID), _ip("198.18.0.1")))
    assert signed.addresses == ("198.18.0.1",)


@pytest.mark.parametrize("names, policy, status, fragment", [
    ([_uri("spiffe://example.org/ns/default/sa/db")], "peer", 403,
     "asks for spiffe://example.org/ns/default/sa/db but the token is for " + WEB_ID),
    ([_uri("spiffe://other.org/ns/default/sa/web")], "peer", 403, "asks for"),
    ([_uri(WEB_ID), _uri(WEB_ID + "x")], "peer", 400, "2 URI SANs"),
    ([x509.DNSName("web.example.org")], "peer", 400, "DNS names are not allowed"),
    ([_ip("198.18.0.9")], "peer", 403,
     "address 198.18.0.9 is not the address the request came from (198.18.0.1)"),
    ([_ip("198.18.0.1"), _ip("10.0.0.1")], "peer", 403, "address 10.0.0.1"),
    ([_ip(f"10.0.0.{i}") for i in range(17)], "csr", 400, "more than 16 IP addresses"),
])
def test_sign_refusals(names: list[x509.GeneralName], policy: signing.AddressPolicy,
                       status: int, fragment: str) -> None:
    """Each rule violation is refused with its status and a message naming it."""
    with pytest.raises(signing.CertifyError) as err:
        _sign(_csr(*names), policy=policy)
    assert err.value.status == status
    assert fragment in str(err.value)


def test_csr_policy_takes_claimed_addresses() -> None:
    """With the csr policy, claimed addresses are taken (deduplicated) whatever the peer."""
    signed = _sign(_csr(_ip("10.0.0.1"), _ip("fd00::1"), _ip("10.0.0.1")), policy="csr")
    assert signed.addresses == ("10.0.0.1", "fd00::1")


@pytest.mark.parametrize("body, status, fragment", [
    (b"not json", 400, "not JSON"),
    (b"[1]", 400, "JSON object"),
    (json.dumps({"token": "t"}).encode(), 400, "csr: expected"),
    (json.dumps({"csr": "x"}).encode(), 401, "token: missing"),
    (json.dumps({"csr": "x", "token": "  "}).encode(), 401, "token: missing"),
])
def test_parse_body_errors(body: bytes, status: int, fragment: str) -> None:
    """Malformed bodies are refused with the status and field."""
    with pytest.raises(signing.CertifyError) as err:
        signing.parse_body(body)
    assert (err.value.status, fragment in str(err.value)) == (status, True)


def test_load_csr_checks() -> None:
    """Garbage, a forged signature and an RSA key are refused; P-256 passes."""
    with pytest.raises(signing.CertifyError, match="not a PEM"):
        signing.load_csr("junk")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(signing.CertifyError, match="ECDSA P-256 or P-384"):
        signing.load_csr(_pem(_csr(key=rsa_key)))
    good = _csr(_uri(WEB_ID))
    signing.load_csr(_pem(good))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    forged = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(signing.CertifyError, match="does not verify"):
        signing.load_csr(_pem(forged))
    signing.load_csr(_pem(_csr(key=ec.generate_private_key(ec.SECP384R1()))))


def test_answer_shape() -> None:
    """The answer holds the identity, leaf+issuer PEM chain, expiry and addresses."""
    signed = _sign(_csr())
    issuer = signed.leaf  # any cert will do for the shape
    answer = signing.answer(signed, issuer)
    assert answer["identity"] == WEB_ID
    assert answer["expiry"] == int((NOW + timedelta(seconds=30)).timestamp())
    assert str(answer["chain"]).count("BEGIN CERTIFICATE") == 2
    assert answer["addresses"] == ["198.18.0.1"]


def test_registry_expiry_and_newest_wins() -> None:
    """The meshed registry forgets expired records and keeps the later-expiring one."""
    now = [100.0]
    reg = meshed.Registry(lambda: now[0])
    reg.record(["10.0.0.1", "::ffff:10.0.0.2"], "spiffe://d/ns/a/sa/x", 200.0)
    assert reg.get("10.0.0.2") == meshed.Record("spiffe://d/ns/a/sa/x", 200.0)
    reg.merge("10.0.0.1", meshed.Record("spiffe://d/ns/a/sa/y", 150.0))
    assert reg.get("10.0.0.1").identity == "spiffe://d/ns/a/sa/x"  # type: ignore[union-attr]
    reg.merge("10.0.0.1", meshed.Record("spiffe://d/ns/a/sa/y", 300.0))
    assert reg.get("10.0.0.1").identity == "spiffe://d/ns/a/sa/y"  # type: ignore[union-attr]
    now[0] = 250.0
    assert reg.get("10.0.0.2") is None
    reg.purge()
    assert len(reg) == 1
    with pytest.raises(ValueError, match="'nope' is not an IP address"):
        reg.get("nope")
