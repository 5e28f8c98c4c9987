"""``appliance certs inspect``: what the certificates in a directory or files say.

For each certificate: subject, issuer, serial, validity and time left, CA or leaf, SANs and
the SHA-256 fingerprint. For a certificate directory it also checks that the issuer chains to
the trust anchor and that each key matches its certificate. Problems (expired, not yet
valid, broken chain, mismatched key, readable key) are collected so the command can exit
non-zero; expiring within 30 days is a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from certs import pki, store

WARN_BEFORE = timedelta(days=30)


@dataclass
class Report:
    """Lines to print, and the problems and warnings found."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _left(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return "expired"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f"{days}d{hours}h{rest // 60}m left"
    return f"{hours}h{rest // 60}m{rest % 60}s left"


def describe(cert: x509.Certificate, now: datetime) -> list[str]:
    """Human-readable lines about one certificate (no key material)."""
    sans = ([f"URI:{u}" for u in pki.uris(cert)] + [f"DNS:{d}" for d in pki.dns_names(cert)]
            + [f"IP:{ip}" for ip in pki.ip_addresses(cert)])
    return [
        f"  subject:     {cert.subject.rfc4514_string() or '(empty)'}",
        f"  issuer:      {cert.issuer.rfc4514_string()}",
        f"  serial:      {cert.serial_number:x}",
        f"  kind:        {'CA' if pki.is_ca(cert) else 'leaf'}",
        f"  not before:  {cert.not_valid_before_utc.isoformat()}",
        f"  not after:   {cert.not_valid_after_utc.isoformat()} "
        f"({_left(cert.not_valid_after_utc - now)})",
        f"  names:       {', '.join(sans) or '(none)'}",
        f"  sha256:      {cert.fingerprint(hashes.SHA256()).hex(':')}",
    ]


def _check_time(report: Report, where: str, cert: x509.Certificate, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        report.problems.append(f"{where}: not valid before {cert.not_valid_before_utc}")
    elif now >= cert.not_valid_after_utc:
        report.problems.append(f"{where}: expired at {cert.not_valid_after_utc}")
    elif cert.not_valid_after_utc - now < WARN_BEFORE:
        report.warnings.append(f"{where}: expires at {cert.not_valid_after_utc}")


def inspect_file(path: Path, now: datetime, report: Report) -> list[x509.Certificate]:
    """Describe each certificate in ``path`` into ``report``; return them."""
    try:
        certs = pki.load_certs(store.read(path), str(path))
    except (store.StoreError, pki.PkiError) as exc:
        report.problems.append(str(exc))
        return []
    for i, cert in enumerate(certs):
        where = f"{path}" + (f" [{i}]" if len(certs) > 1 else "")
        report.lines.append(f"{where}:")
        report.lines += describe(cert, now)
        _check_time(report, where, cert, now)
    return certs


def _check_key(report: Report, key_path: Path, cert: x509.Certificate | None) -> None:
    if not key_path.exists():
        return
    warning = store.key_mode_problem(key_path)
    if warning:
        report.problems.append(warning)
    try:
        key = pki.load_key(store.read(key_path), str(key_path))
    except (store.StoreError, pki.PkiError) as exc:
        report.problems.append(str(exc))
        return
    if cert is not None and key.public_key() != cert.public_key():
        report.problems.append(f"{key_path}: does not match its certificate")


def inspect_dir(directory: Path, now: datetime) -> Report:
    """Describe the anchor and issuer of a certificate directory and check them together."""
    report = Report()
    anchors = inspect_file(directory / store.ANCHOR_CERT, now, report)
    issuers = inspect_file(directory / store.ISSUER_CERT, now, report)
    _check_key(report, directory / store.ANCHOR_KEY, anchors[0] if anchors else None)
    _check_key(report, directory / store.ISSUER_KEY, issuers[0] if issuers else None)
    if anchors and issuers:
        try:
            pki.check_chain(issuers[:1], anchors, now)
            report.lines.append(f"chain: {store.ISSUER_CERT} -> {store.ANCHOR_CERT} ok")
        except pki.PkiError as exc:
            report.problems.append(f"chain: {exc}")
    return report


def inspect_paths(paths: list[Path], now: datetime) -> Report:
    """Describe certificate files; a directory is inspected as a certificate directory."""
    report = Report()
    for path in paths:
        if path.is_dir():
            sub = inspect_dir(path, now)
            report.lines += sub.lines
            report.problems += sub.problems
            report.warnings += sub.warnings
        else:
            inspect_file(path, now, report)
    return report
