"""SPIFFE IDs for workloads: ``spiffe://<trust-domain>/ns/<namespace>/sa/<account>``.

Names follow the SPIFFE ID spec for the trust domain (lowercase letters, digits, ``.``,
``-``, ``_``; at most 255 characters) and Kubernetes for the rest: a namespace is a DNS-1123
label, an account a DNS-1123 subdomain, so an identity means the same thing on a VM as in a
cluster. Every error names the part that is wrong and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class SpiffeError(ValueError):
    """A trust domain, namespace, account or SPIFFE ID is malformed."""


def check_trust_domain(value: str) -> str:
    """Return ``value`` if it is a valid trust domain, else raise :class:`SpiffeError`."""
    if not _TRUST_DOMAIN.match(value) or value.strip(".") != value or ".." in value:
        raise SpiffeError(
            f"trust domain {value!r}: use 1-255 lowercase letters, digits, '.', '-' or '_', "
            "not starting or ending with '.' (e.g. cluster.local)")
    return value


def check_namespace(value: str) -> str:
    """A namespace is a DNS-1123 label: 1-63 of a-z, 0-9, '-', alphanumeric at both ends."""
    if not _LABEL.match(value):
        raise SpiffeError(f"namespace {value!r}: use 1-63 lowercase letters, digits or '-', "
                          "starting and ending with a letter or digit")
    return value


def check_account(value: str) -> str:
    """An account is a DNS-1123 subdomain: 1-253 of a-z, 0-9, '-', '.'."""
    if not _SUBDOMAIN.match(value) or ".." in value:
        raise SpiffeError(f"account {value!r}: use 1-253 lowercase letters, digits, '-' or "
                          "'.', starting and ending with a letter or digit")
    return value


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity; ``str()`` gives the URI."""

    trust_domain: str
    namespace: str
    account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        check_namespace(self.namespace)
        check_account(self.account)

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.account}"

    def __str__(self) -> str:
        return self.uri


def parse(uri: str) -> SpiffeId:
    """Parse ``spiffe://TD/ns/NS/sa/SA``; raise :class:`SpiffeError` naming what is wrong."""
    if not uri.startswith(SCHEME):
        raise SpiffeError(f"{uri!r} is not a SPIFFE ID (expected spiffe://DOMAIN/ns/NS/sa/SA)")
    domain, _, path = uri[len(SCHEME):].partition("/")
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise SpiffeError(f"{uri!r}: the path must be /ns/NAMESPACE/sa/ACCOUNT")
    return SpiffeId(domain, parts[1], parts[3])


def trust_domain_of(uri: str) -> str | None:
    """The trust domain of any ``spiffe://`` URI (a workload's or a bare domain's), or None."""
    if not uri.startswith(SCHEME):
        return None
    domain = uri[len(SCHEME):].partition("/")[0]
    try:
        return check_trust_domain(domain)
    except SpiffeError:
        return None


def service_name(trust_domain: str) -> str:
    """The DNS name in the identity service's own certificate, which proxies verify:
    it names no address, so the service may listen anywhere (see docs/identity.md)."""
    return f"identity.{check_trust_domain(trust_domain)}"
