"""Certificates of the mesh: trust anchor (root), issuer (intermediate) and leaves.

All keys are ECDSA P-256, all signatures ECDSA with SHA-256. The trust anchor and the issuer
carry the trust domain as a URI SAN ``spiffe://<trust-domain>`` so tools can read it back; a
leaf carries its workload's SPIFFE ID as a URI SAN, optionally the workload's IP addresses,
and (for the identity service's own certificate) DNS names. Leaves are never CAs and may
authenticate both ends of a TLS connection (serverAuth and clientAuth).

Nothing here reads a clock: each builder takes ``now`` so tests are exact. A leaf never
outlives its issuer: its ``not_after`` is cut to the issuer's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs import spiffe

Key = ec.EllipticCurvePrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ANCHOR_LIFETIME = timedelta(days=365)
ISSUER_LIFETIME = timedelta(days=365)
LEAF_LIFETIME = timedelta(hours=24)


class PkiError(ValueError):
    """A key, certificate or chain is unusable; the message names which and why."""


def new_key() -> Key:
    """A fresh P-256 private key (held in memory by the caller)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: Key, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with ``password`` when one is given."""
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def chain_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert_pem(c) for c in certs)


def load_certs(pem: bytes, source: str) -> list[x509.Certificate]:
    """Every certificate in a PEM text; :class:`PkiError` names ``source`` if there is none
    or one is malformed."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise PkiError(f"{source}: no certificate found (expected PEM)")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise PkiError(f"{source}: not a PEM certificate list ({exc})") from None
    if not certs:
        raise PkiError(f"{source}: no certificate found")
    return certs


def load_key(pem: bytes, source: str) -> Key:
    """A P-256 private key from unencrypted PEM; the error names ``source``, never the key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{source}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise PkiError(f"{source}: expected an ECDSA P-256 key")
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(subject: x509.Name, issuer: x509.Name, key: Key, signer: Key, *, domain: str,
        path_length: int, now: datetime, lifetime: timedelta) -> x509.Certificate:
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(spiffe.SCHEME + domain)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if signer is not key:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            signer.public_key()), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_anchor(trust_domain: str, key: Key, *, now: datetime,
                lifetime: timedelta = ANCHOR_LIFETIME) -> x509.Certificate:
    """The self-signed root of ``trust_domain`` (CN ``root.<domain>``)."""
    spiffe.check_trust_domain(trust_domain)
    name = _name(f"root.{trust_domain}")
    return _ca(name, name, key, key, domain=trust_domain, path_length=1, now=now,
               lifetime=lifetime)


def make_issuer(key: Key, anchor: x509.Certificate, anchor_key: Key, *, now: datetime,
                lifetime: timedelta = ISSUER_LIFETIME) -> x509.Certificate:
    """The intermediate that signs leaves (CN ``issuer.<domain>``), signed by the anchor.
    Its lifetime is cut so it never outlives the anchor."""
    domain = trust_domain(anchor)
    if domain is None:
        raise PkiError("the trust anchor names no trust domain (no spiffe:// URI SAN)")
    if anchor.public_key() != anchor_key.public_key():
        raise PkiError("the trust anchor key does not match the trust anchor certificate")
    end = min(now + lifetime, anchor.not_valid_after_utc)
    return _ca(_name(f"issuer.{domain}"), anchor.subject, key, anchor_key, domain=domain,
               path_length=0, now=now, lifetime=end - now)


def issue_leaf(public_key: ec.EllipticCurvePublicKey, issuer: x509.Certificate,
               issuer_key: Key, *, now: datetime, lifetime: timedelta = LEAF_LIFETIME,
               backdate: timedelta = timedelta(0), uri: str | None = None,
               dns: Sequence[str] = (), ips: Sequence[IPAddress] = (),
               client_auth: bool = True) -> x509.Certificate:
    """A leaf for ``public_key``: valid from ``now - backdate`` (clock skew between hosts)
    for ``lifetime`` from ``now``, never past the issuer's own expiry. Extended key usage
    serverAuth, plus clientAuth unless ``client_auth`` is False."""
    sans: list[x509.GeneralName] = []
    if uri is not None:
        sans.append(x509.UniformResourceIdentifier(uri))
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ip) for ip in ips]
    if not sans:
        raise PkiError("a leaf needs at least one name (URI, DNS or IP)")
    start = max(now - backdate, issuer.not_valid_before_utc)
    end = min(now + lifetime, issuer.not_valid_after_utc)
    if end <= now:
        raise PkiError(f"the issuer expired at {issuer.not_valid_after_utc.isoformat()}")
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([])).issuer_name(issuer.subject).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth
            else [ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # an empty subject makes the SAN the only name, so RFC 5280 wants it critical
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def _san(cert: x509.Certificate | x509.CertificateSigningRequest) -> x509.SubjectAlternativeName:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return x509.SubjectAlternativeName([])


def uris(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    return list(_san(cert).get_values_for_type(x509.UniformResourceIdentifier))


def dns_names(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    return list(_san(cert).get_values_for_type(x509.DNSName))


def ip_addresses(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[IPAddress]:
    return [ip for ip in _san(cert).get_values_for_type(x509.IPAddress)
            if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)]


def trust_domain(cert: x509.Certificate) -> str | None:
    """The trust domain named by the first ``spiffe://`` URI SAN, if any."""
    for uri in uris(cert):
        domain = spiffe.trust_domain_of(uri)
        if domain is not None:
            return domain
    return None


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def describe(cert: x509.Certificate) -> str:
    """A short name for messages: the subject CN or the first SAN."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        return str(cns[0].value)
    names = uris(cert) + dns_names(cert)
    return names[0] if names else f"serial {cert.serial_number:x}"


def _check_time(cert: x509.Certificate, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise PkiError(f"{describe(cert)} is not valid before "
                       f"{cert.not_valid_before_utc.isoformat()}")
    if now >= cert.not_valid_after_utc:
        raise PkiError(f"{describe(cert)} expired at {cert.not_valid_after_utc.isoformat()}")


def check_chain(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
                now: datetime) -> None:
    """Check that ``chain`` (leaf first) leads, signature by signature, to one of
    ``anchors``, that every certificate above the leaf is a CA, and that all are valid at
    ``now``. Raise :class:`PkiError` naming the first problem."""
    if not chain:
        raise PkiError("empty certificate chain")
    for cert in chain:
        _check_time(cert, now)
    for child, parent in zip(chain, chain[1:], strict=False):
        _check_issued(child, parent)
    top = chain[-1]
    for anchor in anchors:
        try:
            _check_issued(top, anchor)
        except PkiError:
            continue
        _check_time(anchor, now)
        return
    raise PkiError(f"{describe(top)} was not issued by any trust anchor")


def _check_issued(child: x509.Certificate, parent: x509.Certificate) -> None:
    if not is_ca(parent):
        raise PkiError(f"{describe(parent)} is not a CA")
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"{describe(child)} was not issued by {describe(parent)}") from None


def utc(timestamp: float) -> datetime:
    """A POSIX timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(timestamp, UTC)
