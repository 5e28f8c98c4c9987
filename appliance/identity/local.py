"""The proxy's own credentials, without I/O: anchors, CSR, checking an answer, timing.

The private key is made once per process, in memory, and reused for every renewal (as
linkerd2-proxy does): it is never serialized except encrypted into the memfd that loads an
SSLContext (certs/sslctx.py). A CSR asks for the workload's IP addresses (IP SANs) and,
when the proxy knows it, its SPIFFE ID; otherwise the service fills in the identity the
token stands for.

An answer from the identity service is accepted only if its leaf holds our public key, names
exactly one SPIFFE ID, and its chain leads to one of our trust anchors at ``now``.

Renewal happens at 70% of the lifetime left when the certificate arrived; on failure the
next try waits a jittered exponential backoff, but never past half the time left, so tries
get denser as expiry nears (and never stop).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from appliance.identity.settings import TRUST_ANCHORS, IdentityConfigError
from certs import pki, spiffe

RENEW_FRACTION = 0.7


class AnswerError(Exception):
    """The identity service answered something we cannot use."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A certificate we hold: identity, chain (leaf first), key and validity."""

    identity: str
    chain: tuple[x509.Certificate, ...]
    key: pki.Key
    received: float
    not_after: float
    addresses: tuple[str, ...]

    def __repr__(self) -> str:  # never print the key
        return (f"Credentials(identity={self.identity!r}, not_after={self.not_after}, "
                f"addresses={self.addresses!r})")


def load_anchors(pem: bytes, source: str, now: datetime) -> list[x509.Certificate]:
    """The trust anchors that are CAs and valid at ``now``; IdentityConfigError otherwise."""
    try:
        certs = pki.load_certs(pem, source)
    except pki.PkiError as exc:
        raise IdentityConfigError(f"{TRUST_ANCHORS}: {exc}") from None
    usable = [c for c in certs if pki.is_ca(c) and c.not_valid_before_utc <= now
              < c.not_valid_after_utc]
    if not usable:
        ends = ", ".join(c.not_valid_after_utc.isoformat() for c in certs)
        raise IdentityConfigError(f"{TRUST_ANCHORS}: {source} holds no CA certificate valid "
                                  f"now (not after: {ends})")
    return usable


def read_anchors(path: Path, now: datetime) -> list[x509.Certificate]:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise IdentityConfigError(f"{TRUST_ANCHORS}: {path}: cannot read "
                                  f"({exc.strerror or exc})") from None
    return load_anchors(pem, str(path), now)


def service_name(anchors: Sequence[x509.Certificate], host: str) -> str:
    """The name the identity service's certificate must carry: ``identity.<trust domain>``
    of the first anchor that names one, else the host we dial."""
    for anchor in anchors:
        domain = pki.trust_domain(anchor)
        if domain is not None:
            return spiffe.service_name(domain)
    return host


def build_csr(key: pki.Key, addresses: Sequence[str], identity: str | None = None) -> str:
    """A PEM CSR for ``key`` naming ``addresses`` (and ``identity`` if known)."""
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(a))
                                    for a in addresses]
    if identity is not None:
        sans.insert(0, x509.UniformResourceIdentifier(identity))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def certify_body(csr_pem: str, token: str) -> bytes:
    return json.dumps({"csr": csr_pem, "token": token}).encode()


def parse_answer(payload: object, key: pki.Key, anchors: Sequence[x509.Certificate],
                 now: float) -> Credentials:
    """Check a ``/v1/certify`` answer and turn it into credentials."""
    if not isinstance(payload, dict) or not isinstance(payload.get("chain"), str):
        raise AnswerError("the answer has no certificate chain")
    try:
        chain = pki.load_certs(payload["chain"].encode("ascii"), "the answer's chain")
    except (pki.PkiError, UnicodeEncodeError) as exc:
        raise AnswerError(str(exc)) from None
    leaf = chain[0]
    if leaf.public_key() != key.public_key():
        raise AnswerError("the certificate is not for our key")
    ids = [u for u in pki.uris(leaf) if u.startswith(spiffe.SCHEME)]
    if len(ids) != 1:
        raise AnswerError(f"the certificate names {len(ids)} SPIFFE IDs, expected one")
    try:
        spiffe.parse(ids[0])
        pki.check_chain(chain, anchors, pki.utc(now))
    except (spiffe.SpiffeError, pki.PkiError) as exc:
        raise AnswerError(str(exc)) from None
    return Credentials(ids[0], tuple(chain), key, now, leaf.not_valid_after_utc.timestamp(),
                       tuple(str(ip) for ip in pki.ip_addresses(leaf)))


def renewal_delay(creds: Credentials, now: float, fraction: float = RENEW_FRACTION) -> float:
    """Seconds from ``now`` until the renewal is due."""
    due = creds.received + fraction * (creds.not_after - creds.received)
    return max(0.0, due - now)


def retry_delay(backoff: float, floor: float, now: float,
                creds: Credentials | None) -> float:
    """The wait before retrying a failed request: the backoff, but while a certificate is
    held at most half its remaining life (never less than ``floor``)."""
    if creds is None:
        return backoff
    return min(backoff, max(floor, (creds.not_after - now) / 2))
