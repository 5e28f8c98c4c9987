"""Port policies for mesh TLS: who may connect (authorization), which inbound ports terminate
TLS, which outbound destinations get TLS originated. Pure: text in, frozen values out.

The settings are strings, so they read the same in a YAML file and in an environment
variable (docs/mtls.md has the grammar and examples). Entries are separated by ``;`` or
new lines; each is ``KEY=VALUE`` where the value is a comma-separated list.

* ``inbound.tls_mode``: ``permissive`` (default: ports not listed accept anyone, plaintext
  included) or ``strict`` (ports not listed require a mesh identity).
* ``inbound.authorization``: ``PORTS=CLIENTS`` where CLIENTS are ``unauthenticated``
  (anyone, plaintext included), ``meshed`` (any mesh identity), ``deny`` (nobody), SPIFFE IDs
  and SPIFFE ID prefixes ending in ``*``. PORTS are ports and ranges: ``8080,9000-9010``.
* ``inbound.tls_terminate``: ``PORTS=NAMES`` (a certificate for these DNS names from the mesh
  issuer) or ``PORTS=@FILE[,@KEYFILE]`` (a given certificate chain and key, PEM).
* ``outbound.tls_originate``: ``DEST=sni:NAME[,ca:FILE][,port:N]`` where DEST is
  ``IP:PORT``, ``[IPv6]:PORT`` or a bare ``PORT`` (any address).

Errors are :class:`~appliance.config.ConfigError` naming the field, the entry and the rule.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from appliance.config import ConfigError
from certs import spiffe

MODES = ("permissive", "strict")
_DNS = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                  r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Clients:
    """Who may use a port."""

    unauthenticated: bool = False
    """Anyone, with or without a mesh identity (plaintext included)."""
    meshed: bool = False
    """Any client with a verified mesh identity."""
    ids: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    def allows(self, client_id: str | None) -> bool:
        """Is a client with ``client_id`` (None: no mesh identity) allowed?"""
        if self.unauthenticated:
            return True
        if client_id is None:
            return False
        return self.meshed or client_id in self.ids or client_id.startswith(self.prefixes)

    @property
    def needs_identity(self) -> bool:
        """True when a client without a mesh identity can never be allowed."""
        return not self.unauthenticated

    def __str__(self) -> str:
        parts = (["unauthenticated"] if self.unauthenticated else []) + \
            (["meshed"] if self.meshed else []) + sorted(self.ids) + \
            [p + "*" for p in self.prefixes]
        return ",".join(parts) or "deny"


ANYONE = Clients(unauthenticated=True)
MESHED = Clients(meshed=True)
NOBODY = Clients()


@dataclass(frozen=True, slots=True)
class Authorization:
    """The clients allowed per inbound port, and for every other port."""

    default: Clients = ANYONE
    ports: Mapping[int, Clients] = field(default_factory=dict)

    def clients(self, port: int) -> Clients:
        return self.ports.get(port, self.default)


@dataclass(frozen=True, slots=True)
class Termination:
    """How an inbound port terminates TLS from clients outside the mesh."""

    names: tuple[str, ...] = ()
    """DNS names of a certificate issued by the mesh issuer (when no files are given)."""
    cert_file: str | None = None
    key_file: str | None = None
    """A given certificate chain and key (PEM); the key may be in ``cert_file``."""


@dataclass(frozen=True, slots=True)
class Origination:
    """TLS that the proxy originates to a destination the app speaks plaintext to."""

    sni: str
    """Server name sent and verified in the server's certificate."""
    ca_file: str | None = None
    """PEM bundle to verify against; None: the system store."""
    port: int | None = None
    """Connect to this port instead of the original one (e.g. 443 for an app using 80)."""


# --- the grammar ------------------------------------------------------------------------

def entries(text: str, name: str) -> Iterator[tuple[str, str, list[str]]]:
    """(entry, key, values) for each ``KEY=V1,V2`` entry of ``text``."""
    for raw in re.split(r"[;\n]", text):
        entry = raw.strip()
        if not entry:
            continue
        key, sep, rest = entry.partition("=")
        values = [v for v in re.split(r"[,\s]+", rest.strip()) if v]
        if not sep or not key.strip() or not values:
            raise ConfigError(f"{name}: entry {entry!r} is not KEY=VALUE[,VALUE...]")
        yield entry, key.strip(), values


def parse_ports(name: str, entry: str, text: str) -> list[int]:
    """``8080``, ``8080,9090``, ``9000-9010``."""
    ports: list[int] = []
    for item in (p for p in re.split(r"[,\s]+", text) if p):
        lo_s, dash, hi_s = item.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if dash else lo
        except ValueError:
            raise ConfigError(f"{name}: {entry!r}: {item!r} is not a port or a "
                              "range like 9000-9010") from None
        if not 1 <= lo <= hi <= 65535:
            raise ConfigError(f"{name}: {entry!r}: {item!r} is not a port range "
                              "within 1-65535")
        ports.extend(range(lo, hi + 1))
    return ports


def parse_mode(name: str, value: str) -> str:
    text = value.strip().lower()
    if text not in MODES:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(MODES)}")
    return text


def parse_clients(name: str, entry: str, values: list[str]) -> Clients:
    unauthenticated = meshed = deny = False
    ids: set[str] = set()
    prefixes: list[str] = []
    for value in values:
        word = value.lower()
        if word in ("unauthenticated", "all-unauthenticated", "any"):
            unauthenticated = True
        elif word in ("meshed", "authenticated", "all-authenticated"):
            meshed = True
        elif word == "deny":
            deny = True
        elif value.endswith("*"):
            if not value.startswith(spiffe.SCHEME) or "*" in value[:-1]:
                raise ConfigError(f"{name}: {entry!r}: pattern {value!r} must be a "
                                  "spiffe:// prefix ending in a single *")
            prefixes.append(value[:-1])
        else:
            try:
                ids.add(spiffe.parse(value).uri)
            except spiffe.SpiffeError as exc:
                raise ConfigError(f"{name}: {entry!r}: {exc}; allowed are unauthenticated, "
                                  "meshed, deny, SPIFFE IDs and spiffe:// prefixes "
                                  "ending in *") from None
    if deny and (unauthenticated or meshed or ids or prefixes):
        raise ConfigError(f"{name}: {entry!r}: deny cannot be combined with other clients")
    return Clients(unauthenticated, meshed, frozenset(ids), tuple(prefixes))


def parse_authorization(text: str, mode: str = "permissive",
                        name: str = "inbound.authorization") -> Authorization:
    default = MESHED if mode == "strict" else ANYONE
    ports: dict[int, Clients] = {}
    for entry, key, values in entries(text, name):
        clients = parse_clients(name, entry, values)
        for port in parse_ports(name, entry, key):
            if port in ports:
                raise ConfigError(f"{name}: port {port} is listed twice")
            ports[port] = clients
    return Authorization(default, ports)


def parse_termination(text: str, name: str = "inbound.tls_terminate") -> dict[int, Termination]:
    table: dict[int, Termination] = {}
    for entry, key, values in entries(text, name):
        files = [v[1:] for v in values if v.startswith("@")]
        names = [v.lower() for v in values if not v.startswith("@")]
        if files and names:
            raise ConfigError(f"{name}: {entry!r}: give DNS names or @files, not both")
        if len(files) > 2 or any(not f for f in files):
            raise ConfigError(f"{name}: {entry!r}: give @CERT_AND_KEY or @CERT,@KEY")
        for dns in names:
            if not _DNS.match(dns) or len(dns) > 253:
                raise ConfigError(f"{name}: {entry!r}: {dns!r} is not a DNS name")
        term = Termination(tuple(names), files[0] if files else None,
                           files[1] if len(files) > 1 else None)
        for port in parse_ports(name, entry, key):
            if port in table:
                raise ConfigError(f"{name}: port {port} is listed twice")
            table[port] = term
    return table


@dataclass(frozen=True, slots=True)
class OriginationTable:
    """Destinations to originate TLS to: by address and port, or by port alone."""

    exact: Mapping[tuple[str, int], Origination] = field(default_factory=dict)
    by_port: Mapping[int, Origination] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.exact or self.by_port)

    def lookup(self, host: str, port: int) -> Origination | None:
        found = self.exact.get((_canonical(host), port)) if self.exact else None
        return found if found is not None else self.by_port.get(port)


def _canonical(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _destination(name: str, entry: str, key: str) -> tuple[str | None, int]:
    if key.isdigit():
        return None, parse_ports(name, entry, key)[0]
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", key) or re.match(r"^([^:\[\]]+):(\d+)$", key)
    if not m:
        raise ConfigError(f"{name}: {entry!r}: {key!r} is not IP:PORT, [IPv6]:PORT or PORT")
    try:
        host = str(ipaddress.ip_address(m.group(1)))
    except ValueError:
        raise ConfigError(f"{name}: {entry!r}: {m.group(1)!r} is not an IP address "
                          "(destinations are matched on the address the app dialled)") from None
    return _canonical(host), parse_ports(name, entry, m.group(2))[0]


def _origination(name: str, entry: str, values: list[str]) -> Origination:
    options: dict[str, str] = {}
    for value in values:
        opt, sep, arg = value.partition(":")
        if not sep or opt not in ("sni", "ca", "port") or not arg:
            raise ConfigError(f"{name}: {entry!r}: {value!r} is not sni:NAME, ca:FILE "
                              "or port:N")
        if opt in options:
            raise ConfigError(f"{name}: {entry!r}: {opt} is given twice")
        options[opt] = arg
    sni = options.get("sni", "").lower()
    if not sni or not _DNS.match(sni) or sni.startswith("*."):
        raise ConfigError(f"{name}: {entry!r}: needs sni:NAME, the DNS name the server's "
                          "certificate must carry")
    port = parse_ports(name, entry, options["port"])[0] if "port" in options else None
    return Origination(sni, options.get("ca"), port)


def parse_origination(text: str, name: str = "outbound.tls_originate") -> OriginationTable:
    exact: dict[tuple[str, int], Origination] = {}
    by_port: dict[int, Origination] = {}
    for entry, key, values in entries(text, name):
        host, port = _destination(name, entry, key)
        if (port in by_port) if host is None else ((host, port) in exact):
            raise ConfigError(f"{name}: destination {key} is listed twice")
        if host is None:
            by_port[port] = _origination(name, entry, values)
        else:
            exact[(host, port)] = _origination(name, entry, values)
    return OriginationTable(exact, by_port)
