"""The rules for signing a workload's CSR, without sockets or clocks.

Given the authenticated subject (from a token) and the request body, decide what to sign:

* the body is JSON ``{"csr": PEM, "token": str}``, at most 64 KiB;
* the CSR's own signature must verify, its key must be ECDSA P-256 or P-384;
* it may carry no URI SAN (the service fills in the token's identity) or exactly one, equal
  to ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>`` of the token; any other is refused (403);
* it may carry no DNS names: a workload certificate names an identity, not a host;
* its IP SANs are the workload's addresses. With the ``peer`` policy (default) each must be
  the address the request came from, and none means that address; with ``csr`` they are
  taken as given (for requests that pass through NAT; see docs/identity.md).

Every refusal is a :class:`CertifyError` with the HTTP status to answer and a message that
names what is wrong and never repeats the token.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from certs import dnsnames, pki, spiffe
from certs.meshed import normalize_ip
from certs.tokens import Subject

AddressPolicy = Literal["peer", "csr"]
MAX_BODY = 64 * 1024
MAX_ADDRESSES = 16
_CURVES = ("secp256r1", "secp384r1")


class CertifyError(Exception):
    """Refuse the request with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class CertifyRequest:
    csr_pem: str
    token: str


@dataclass(frozen=True, slots=True)
class Signed:
    """What was issued: the identity, the addresses it covers, the leaf."""

    identity: str
    addresses: tuple[str, ...]
    leaf: x509.Certificate


def parse_body(body: bytes) -> CertifyRequest:
    """The JSON body of ``POST /v1/certify``."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise CertifyError(400, "the body is not JSON") from None
    if not isinstance(payload, dict):
        raise CertifyError(400, "the body must be a JSON object with csr and token")
    csr, token = payload.get("csr"), payload.get("token")
    if not isinstance(csr, str) or not csr:
        raise CertifyError(400, "csr: expected a PEM certificate signing request (string)")
    if not isinstance(token, str) or not token.strip():
        raise CertifyError(401, "token: missing (the workload's bootstrap or "
                                "ServiceAccount token)")
    return CertifyRequest(csr, token.strip())


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    """Parse and check a CSR: PEM, self-signature, key type."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise CertifyError(400, "csr: not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CertifyError(400, "csr: its signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise CertifyError(400, "csr: the key must be ECDSA P-256 or P-384")
    return csr


def _identity(csr: x509.CertificateSigningRequest, expected: spiffe.SpiffeId) -> str:
    uris = pki.uris(csr)
    if pki.dns_names(csr):
        raise CertifyError(400, "csr: DNS names are not allowed in a workload certificate")
    if len(uris) > 1:
        raise CertifyError(400, f"csr: {len(uris)} URI SANs; ask for one identity")
    if uris and uris[0] != expected.uri:
        raise CertifyError(403, f"csr: asks for {uris[0]} but the token is for {expected.uri}")
    return expected.uri


def _addresses(csr: x509.CertificateSigningRequest, peer: str,
               policy: AddressPolicy) -> tuple[str, ...]:
    claimed = [normalize_ip(str(ip)) for ip in pki.ip_addresses(csr)]
    if len(claimed) > MAX_ADDRESSES:
        raise CertifyError(400, f"csr: more than {MAX_ADDRESSES} IP addresses")
    if not claimed:
        return (normalize_ip(peer),)
    if policy == "peer":
        source = normalize_ip(peer)
        for addr in claimed:
            if addr != source:
                raise CertifyError(403, f"csr: address {addr} is not the address the "
                                        f"request came from ({source})")
    return tuple(dict.fromkeys(claimed))


def sign(csr: x509.CertificateSigningRequest, subject: Subject, issuer: pki.Key,
         issuer_cert: x509.Certificate, *, trust_domain: str, peer: str,
         policy: AddressPolicy, now: datetime, lifetime: timedelta,
         backdate: timedelta) -> Signed:
    """Check ``csr`` against the authenticated ``subject`` and sign a leaf for it."""
    expected = spiffe.SpiffeId(trust_domain, subject.namespace, subject.account)
    identity = _identity(csr, expected)
    addresses = _addresses(csr, peer, policy)
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)  # load_csr checked it
    try:
        leaf = pki.issue_leaf(
            public, issuer_cert, issuer, now=now, lifetime=lifetime, backdate=backdate,
            uri=identity, ips=[ipaddress.ip_address(a) for a in addresses])
    except pki.PkiError as exc:
        raise CertifyError(503, f"cannot sign: {exc}") from None
    return Signed(identity, addresses, leaf)


def sign_dns(csr: x509.CertificateSigningRequest, subject: Subject, issuer: pki.Key,
             issuer_cert: x509.Certificate, *, trust_domain: str,
             grants: Sequence[dnsnames.DnsGrant], now: datetime, lifetime: timedelta,
             backdate: timedelta) -> x509.Certificate:
    """A server-only leaf for the DNS names of ``csr`` (``POST /v1/certify-dns``): no
    identity, no addresses, each name granted to ``subject`` (certs/dnsnames.py)."""
    if pki.uris(csr) or pki.ip_addresses(csr):
        raise CertifyError(400, "csr: a DNS certificate names DNS names only (no URI or IP)")
    try:
        names = list(dict.fromkeys(dnsnames.check_name(n) for n in pki.dns_names(csr)))
    except ValueError as exc:
        raise CertifyError(400, f"csr: {exc}") from None
    if not 1 <= len(names) <= dnsnames.MAX_NAMES:
        raise CertifyError(400, f"csr: ask for 1 to {dnsnames.MAX_NAMES} DNS names")
    why = dnsnames.refused(subject, names, grants, spiffe.service_name(trust_domain))
    if why is not None:
        raise CertifyError(403, f"csr: {why}")
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)  # load_csr checked it
    try:
        return pki.issue_leaf(public, issuer_cert, issuer, now=now, lifetime=lifetime,
                              backdate=backdate, dns=names, client_auth=False)
    except pki.PkiError as exc:
        raise CertifyError(503, f"cannot sign: {exc}") from None


def answer(signed: Signed, issuer_cert: x509.Certificate) -> dict[str, object]:
    """The JSON answer to a granted request."""
    return {
        "identity": signed.identity,
        "chain": pki.chain_pem([signed.leaf, issuer_cert]).decode("ascii"),
        "expiry": int(signed.leaf.not_valid_after_utc.timestamp()),
        "addresses": list(signed.addresses),
    }
