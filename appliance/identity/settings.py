"""Where the proxy's identity comes from: three environment variables (fixed interface).

* ``APPLIANCE_IDENTITY_ADDR``: ``host:port`` of the identity service;
* ``APPLIANCE_TRUST_ANCHORS``: a PEM file with the trust anchor(s);
* ``APPLIANCE_IDENTITY_TOKEN_FILE``: a file holding the token (re-read at every request,
  so a rotated Kubernetes token is picked up).

None set: the proxy runs without identity. Some but not all set: an error naming the
missing ones. Syntax only is checked here; :mod:`appliance.identity.local` reads the
anchors.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ADDR = "APPLIANCE_IDENTITY_ADDR"
TRUST_ANCHORS = "APPLIANCE_TRUST_ANCHORS"
TOKEN_FILE = "APPLIANCE_IDENTITY_TOKEN_FILE"
VARIABLES = (ADDR, TRUST_ANCHORS, TOKEN_FILE)
ADDRESSES = "APPLIANCE_IDENTITY_ADDRESSES"
"""Optional: the workload's IP addresses for the CSR (comma-separated), instead of the
local address of the connection to the identity service. For hosts behind NAT, and for
several proxies on one host (tests); the service must run with ``--addresses csr``."""


class IdentityConfigError(ValueError):
    """The identity configuration is unusable; the message names the variable or file."""


@dataclass(frozen=True, kw_only=True)
class IdentitySettings:
    """How to reach the identity service and prove who we are."""

    host: str
    port: int
    trust_anchors: Path
    token_file: Path
    server_name: str | None = None
    """The DNS name the service's certificate must carry; None: ``identity.<trust domain>``
    of the first anchor, or the host when the anchor names no trust domain."""
    addresses: tuple[str, ...] | None = None
    """The workload's IP addresses for the CSR; None: the local address of the connection
    to the identity service (the address peers reach this workload on)."""


def parse_addr(value: str, name: str = ADDR) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    host, sep, port = value.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise IdentityConfigError(f"{name}: {value!r} is not HOST:PORT "
                                  "(e.g. identity.mesh.svc:8080 or 198.18.0.3:8080)")
    return host, int(port)


def from_environ(environ: Mapping[str, str]) -> IdentitySettings | None:
    """The settings, None if identity is off, or :class:`IdentityConfigError`."""
    given = {name: environ[name].strip() for name in VARIABLES if environ.get(name, "").strip()}
    if not given:
        return None
    missing = [name for name in VARIABLES if name not in given]
    if missing:
        raise IdentityConfigError(
            f"{', '.join(missing)} not set: identity needs all of {', '.join(VARIABLES)} "
            "(or none of them to run without identity)")
    host, port = parse_addr(given[ADDR])
    return IdentitySettings(host=host, port=port, trust_anchors=Path(given[TRUST_ANCHORS]),
                            token_file=Path(given[TOKEN_FILE]),
                            addresses=parse_addresses(environ.get(ADDRESSES, "")))


def parse_addresses(value: str) -> tuple[str, ...] | None:
    """``APPLIANCE_IDENTITY_ADDRESSES``: comma-separated IP addresses (None when empty)."""
    items = [a for a in value.replace(" ", ",").split(",") if a]
    if not items:
        return None
    out: list[str] = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_address(item.strip("[]"))))
        except ValueError:
            raise IdentityConfigError(f"{ADDRESSES}: {item!r} is not an IP address") from None
    return tuple(out)
