"""Certificates for DNS names (TLS termination): who may have which names (``--allow-dns``
grants), what the identity service signs, and what the proxy accepts and renews."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import random
import ssl
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from identity_fixtures import TOKEN, make_dir, service, settings, wait_for
from mtls_fixtures import MemPki

from appliance.identity import dns, local
from appliance.identity.manager import IdentityManager
from certs import dnsnames, pki, signing
from certs.identity_service import IdentityService
from certs.tokens import Subject

WEB = Subject("default", "web")
DOMAIN = "example.org"


@pytest.mark.parametrize("grant,subject,name,allowed", [
    ("default/web=www.example.org", WEB, "www.example.org", True),
    ("default/web=www.example.org", WEB, "api.example.org", False),
    ("default/web=www.example.org", Subject("prod", "web"), "www.example.org", False),
    ("*/web=*.example.org", Subject("prod", "web"), "a.b.example.org", True),
    ("prod/*=*.internal", Subject("prod", "api"), "db.internal", True),
    ("prod/*=*.internal", Subject("prod", "api"), "db.internal.evil", False),
    ("default/web=WWW.Example.ORG", WEB, "www.example.org", True),
])
def test_grants(grant: str, subject: Subject, name: str, allowed: bool) -> None:
    """NS/SA=PATTERN grants names by shell patterns on namespace, account and name."""
    assert dnsnames.parse_grant(grant).allows(subject, name) is allowed


@pytest.mark.parametrize("text", ["web=www.example.org", "default/web", "/web=x", "a/=x",
                                  "a/b="])
def test_bad_grants_say_the_form(text: str) -> None:
    """A grant that does not parse names the expected form."""
    with pytest.raises(dnsnames.GrantError, match="NAMESPACE/ACCOUNT=PATTERN"):
        dnsnames.parse_grant(text)


def test_the_service_name_is_never_granted() -> None:
    """Even a grant of everything does not give the identity service's own name."""
    grants = [dnsnames.parse_grant("*/*=*")]
    assert dnsnames.refused(WEB, ["identity.example.org"], grants, "identity.example.org")
    assert dnsnames.refused(WEB, ["www.example.org"], grants, "identity.example.org") is None


def csr_for(names: list[str], *, uri: str | None = None, ip: str | None = None) -> Any:
    key = pki.new_key()
    sans: list[Any] = [x509.DNSName(n) for n in names]
    if uri:
        sans.append(x509.UniformResourceIdentifier(uri))
    if ip:
        sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


CA = MemPki()
GRANTS = (dnsnames.parse_grant("default/web=*.example.org"),)


def sign(csr: Any) -> Any:
    return signing.sign_dns(csr, WEB, CA.issuer_key, CA.issuer, trust_domain=DOMAIN,
                            grants=GRANTS, now=pki.utc(time.time()),
                            lifetime=timedelta(hours=1), backdate=timedelta(0))


def test_a_granted_csr_gets_a_server_only_leaf() -> None:
    """The leaf names exactly the DNS names, no identity, and is for servers only."""
    leaf = sign(csr_for(["www.example.org", "api.example.org"]))
    assert pki.dns_names(leaf) == ["www.example.org", "api.example.org"]
    assert pki.uris(leaf) == [] and pki.ip_addresses(leaf) == []
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


@pytest.mark.parametrize("csr,status,message", [
    (lambda: csr_for(["www.example.org"], uri=f"spiffe://{DOMAIN}/ns/default/sa/web"), 400,
     "DNS names only"),
    (lambda: csr_for(["www.example.org"], ip="198.18.0.5"), 400, "DNS names only"),
    (lambda: csr_for([]), 400, "1 to 16 DNS names"),
    (lambda: csr_for([f"h{i}.example.org" for i in range(17)]), 400, "1 to 16"),
    (lambda: csr_for(["www.other.org"]), 403, "no --allow-dns grant"),
    (lambda: csr_for(["identity.example.org"]), 403, "identity service's own name"),
])
def test_refused_dns_csrs(csr: Any, status: int, message: str) -> None:
    """Identities, addresses, too many names, ungranted names, the service's name: refused
    with the status and a reason."""
    with pytest.raises(signing.CertifyError, match=message) as info:
        sign(csr())
    assert info.value.status == status


def test_answer_checks() -> None:
    """The proxy accepts an answer only for its key, every name asked, chaining to an
    anchor."""
    key = pki.new_key()
    good = pki.issue_leaf(key.public_key(), CA.issuer, CA.issuer_key,
                          now=pki.utc(time.time()), dns=["www.example.org"], client_auth=False)
    chain = pki.chain_pem([good, CA.issuer]).decode()
    creds = dns.parse_answer({"chain": chain}, key, ["www.example.org"], CA.anchors,
                             time.time())
    assert creds.not_after == good.not_valid_after_utc.timestamp()
    with pytest.raises(local.AnswerError, match="not for our key"):
        dns.parse_answer({"chain": chain}, pki.new_key(), ["www.example.org"], CA.anchors,
                         time.time())
    with pytest.raises(local.AnswerError, match="lacks api.example.org"):
        dns.parse_answer({"chain": chain}, key, ["www.example.org", "api.example.org"],
                         CA.anchors, time.time())
    with pytest.raises(local.AnswerError):
        dns.parse_answer({"chain": chain}, key, ["www.example.org"], MemPki().anchors,
                         time.time())
    with pytest.raises(local.AnswerError, match="no certificate chain"):
        dns.parse_answer({}, key, ["www.example.org"], CA.anchors, time.time())


def test_the_proxy_gets_and_renews_a_dns_certificate(tmp_path: Path) -> None:
    """Through the real identity service: the first certificate arrives, a server context
    offering the requested ALPN presents it, and renewal replaces it in the same context."""
    make_dir(tmp_path)

    async def main() -> None:
        async with service(tmp_path, leaf_lifetime=timedelta(seconds=4)) as svc:
            svc.options = _with_grants(svc, "default/web=www.example.org")
            manager = IdentityManager(settings(tmp_path, svc.port), rng=random.Random(1))
            try:
                cert = manager.dns_certificate(("www.example.org",))
                assert manager.dns_certificate(("www.example.org",)) is cert
                await asyncio.wait_for(cert.wait(), 10)
                ctx = cert.context(("http/1.1",))
                assert isinstance(ctx, ssl.SSLContext)
                first = cert.credentials
                await wait_for(lambda: cert.refresh_count >= 2, 10, "a renewal")
                assert cert.context(("http/1.1",)) is ctx
                assert cert.credentials is not first
            finally:
                await manager.stop()
    asyncio.run(main())
    assert TOKEN  # the token file the manager read


def _with_grants(svc: IdentityService, *grants: str) -> Any:
    return dataclasses.replace(svc.options, dns_grants=tuple(dnsnames.parse_grant(g)
                                                             for g in grants))


def test_ungranted_names_are_retried_and_reported(tmp_path: Path) -> None:
    """Without a grant the service refuses (403); the certificate stays absent and the
    reason is kept for the termination error message."""
    make_dir(tmp_path)

    async def main() -> None:
        async with service(tmp_path) as svc:
            manager = IdentityManager(settings(tmp_path, svc.port), backoff_base=0.05,
                                      backoff_cap=0.1)
            try:
                cert = manager.dns_certificate(("www.example.org",))
                await wait_for(lambda: cert.last_error is not None, 10, "a refusal")
                assert "HTTP 403" in cert.last_error and "no --allow-dns grant" in \
                    cert.last_error
                assert cert.context(("http/1.1",)) is None
            finally:
                await manager.stop()
    asyncio.run(main())
