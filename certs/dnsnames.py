"""Which workloads may get a certificate for which DNS names (TLS termination).

A workload certificate names an identity, never a host. A proxy that terminates TLS for
clients outside the mesh needs a certificate for host names instead; the identity service
issues one through ``POST /v1/certify-dns`` only where a grant allows it. Grants come from
``appliance identity --allow-dns NS/SA=PATTERN`` (repeatable): the workload's namespace and
account and the requested name are matched with shell-style patterns (``*`` matches any
characters, dots included), e.g. ``default/web=www.example.org`` or
``prod/*=*.internal.example.org``. No grant, no DNS certificate. The identity service's
own name (``identity.<trust domain>``) is never granted, whatever the patterns say.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from certs.tokens import Subject

MAX_NAMES = 16
_DNS = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                  r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class GrantError(ValueError):
    """A grant does not parse; the message names it and the expected form."""


@dataclass(frozen=True, slots=True)
class DnsGrant:
    """Workloads matching ``namespace``/``account`` may get names matching ``pattern``."""

    namespace: str
    account: str
    pattern: str

    def allows(self, subject: Subject, name: str) -> bool:
        return (fnmatchcase(subject.namespace, self.namespace)
                and fnmatchcase(subject.account, self.account)
                and fnmatchcase(name, self.pattern))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.account}={self.pattern}"


def parse_grant(text: str) -> DnsGrant:
    """``NS/SA=PATTERN``."""
    who, sep, pattern = text.strip().partition("=")
    ns, slash, sa = who.partition("/")
    if not sep or not slash or not ns or not sa or not pattern:
        raise GrantError(f"--allow-dns {text!r}: expected NAMESPACE/ACCOUNT=PATTERN, "
                         "e.g. default/web=www.example.org or prod/*=*.example.org")
    return DnsGrant(ns, sa, pattern.lower())


def check_name(name: str) -> str:
    """A DNS name (lowercase letters, digits, '-', dots; a leading ``*.`` wildcard)."""
    text = name.lower()
    if len(text) > 253 or not _DNS.match(text):
        raise ValueError(f"{name!r} is not a DNS name")
    return text


def refused(subject: Subject, names: Sequence[str], grants: Sequence[DnsGrant],
            service_name: str) -> str | None:
    """Why ``subject`` may not have ``names`` (None: it may)."""
    for name in names:
        if name == service_name:
            return f"{name} is the identity service's own name"
        if not any(g.allows(subject, name) for g in grants):
            return (f"no --allow-dns grant lets {subject.namespace}/{subject.account} "
                    f"have {name}")
    return None
