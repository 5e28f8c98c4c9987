"""The certificate directory: what ``appliance certs`` writes and the identity service reads.

Layout of DIR (names are fixed; docs/identity.md shows them)::

    trust-anchor.pem   the root certificate, public: distribute it to every proxy
    trust-anchor.key   the root key (0600): needed only to rotate the issuer; keep it offline
    issuer.pem         the intermediate certificate that signs workload certificates
    issuer.key         the intermediate's key (0600), read by the identity service

Every file is written atomically (a temporary file in DIR, fsync, rename), keys with mode
0600 from the moment they exist, so a reader never sees half a file or a readable key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from certs import pki

ANCHOR_CERT = "trust-anchor.pem"
ANCHOR_KEY = "trust-anchor.key"
ISSUER_CERT = "issuer.pem"
ISSUER_KEY = "issuer.key"


class StoreError(Exception):
    """A file of the certificate directory is missing, unreadable or inconsistent."""


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or the file type widened nothing
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def write_private(path: Path, data: bytes) -> None:
    """Write a key: mode 0600, atomically."""
    _write(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate: mode 0644, atomically."""
    _write(path, data, 0o644)


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StoreError(f"{path}: cannot read ({exc.strerror or exc})") from None


@dataclass(frozen=True)
class Issuer:
    """What signs leaves: the issuer's certificate and key, and the trust anchors."""

    cert: x509.Certificate
    key: pki.Key
    anchors: tuple[x509.Certificate, ...]
    trust_domain: str


def init(directory: Path, trust_domain: str, *, now: datetime,
         anchor_lifetime: timedelta = pki.ANCHOR_LIFETIME,
         issuer_lifetime: timedelta = pki.ISSUER_LIFETIME, force: bool = False) -> list[Path]:
    """Create a trust anchor and an issuer in ``directory``; refuse to overwrite existing
    files unless ``force``. Return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    names = (ANCHOR_CERT, ANCHOR_KEY, ISSUER_CERT, ISSUER_KEY)
    existing = [n for n in names if (directory / n).exists()]
    if existing and not force:
        raise StoreError(f"{directory}: {', '.join(existing)} already exist "
                         "(use --force to replace them, or rotate-issuer)")
    anchor_key = pki.new_key()
    anchor = pki.make_anchor(trust_domain, anchor_key, now=now, lifetime=anchor_lifetime)
    issuer_key = pki.new_key()
    issuer = pki.make_issuer(issuer_key, anchor, anchor_key, now=now, lifetime=issuer_lifetime)
    write_private(directory / ANCHOR_KEY, pki.key_pem(anchor_key))
    write_public(directory / ANCHOR_CERT, pki.cert_pem(anchor))
    write_private(directory / ISSUER_KEY, pki.key_pem(issuer_key))
    write_public(directory / ISSUER_CERT, pki.cert_pem(issuer))
    return [directory / n for n in names]


def rotate_issuer(directory: Path, *, now: datetime,
                  lifetime: timedelta = pki.ISSUER_LIFETIME,
                  anchor_key_path: Path | None = None) -> x509.Certificate:
    """Replace the issuer with a new key and certificate signed by the trust anchor.

    Leaves signed by the old issuer stay valid (their chain still ends at the anchor); the
    identity service picks the new issuer up on its next request.
    """
    anchors = pki.load_certs(read(directory / ANCHOR_CERT), str(directory / ANCHOR_CERT))
    key_path = anchor_key_path or directory / ANCHOR_KEY
    anchor_key = pki.load_key(read(key_path), str(key_path))
    matching = [a for a in anchors if a.public_key() == anchor_key.public_key()]
    if not matching:
        raise StoreError(f"{key_path}: this key belongs to no certificate in "
                         f"{directory / ANCHOR_CERT}")
    issuer_key = pki.new_key()
    issuer = pki.make_issuer(issuer_key, matching[0], anchor_key, now=now, lifetime=lifetime)
    write_private(directory / ISSUER_KEY, pki.key_pem(issuer_key))
    write_public(directory / ISSUER_CERT, pki.cert_pem(issuer))
    return issuer


def load_issuer(directory: Path, *, now: datetime) -> Issuer:
    """Read and cross-check the issuer and the anchors; :class:`StoreError` names the file
    and the problem (expired, not signed by the anchor, key does not match)."""
    anchor_path, cert_path, key_path = (directory / ANCHOR_CERT, directory / ISSUER_CERT,
                                        directory / ISSUER_KEY)
    try:
        anchors = pki.load_certs(read(anchor_path), str(anchor_path))
        cert = pki.load_certs(read(cert_path), str(cert_path))[0]
        key = pki.load_key(read(key_path), str(key_path))
        if cert.public_key() != key.public_key():
            raise StoreError(f"{key_path}: this key does not match {cert_path}")
        pki.check_chain([cert], anchors, now)
    except pki.PkiError as exc:
        raise StoreError(f"{directory}: {exc}") from None
    domain = pki.trust_domain(cert) or pki.trust_domain(anchors[0])
    if domain is None:
        raise StoreError(f"{cert_path}: names no trust domain (no spiffe:// URI SAN)")
    return Issuer(cert, key, tuple(anchors), domain)


def key_mode_problem(path: Path) -> str | None:
    """A warning if a key file can be read by group or others, else None."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if mode & 0o077:
        return f"{path}: mode {mode:04o} lets others read the key (chmod 600 {path})"
    return None
