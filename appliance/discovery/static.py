"""The static namer, and the address syntax every namer shares.

A static namer serves a fixed table from config::

    {"services": {"web": ["198.18.0.2:8080", "198.18.0.3:8080*2",
                          {"host": "198.18.0.4", "port": 8080, "weight": 0.5,
                           "meta": {"zone": "b"}}]}}

A listed name is ``bound`` to its addresses for ever; any other name is ``neg``. There is
no source to run, so :meth:`StaticNamer.watch` answers at once and ``close`` has nothing
to stop.

The helpers :func:`parse_hostport`, :func:`parse_port`, :func:`parse_weight` and
:func:`check_host` are shared with the files and DNS namers; each raises ``ValueError``
whose message says what is wrong (the caller prefixes where: an option, a file line).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from appliance.discovery.base import NEG, Address, AddrState, Name, Namer, NamerContext, Watch
from appliance.discovery.base import bound as bound_state
from appliance.discovery.registry import check_options, register

_HOSTNAME = re.compile(r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?$")
_ENTRY_KEYS = frozenset({"host", "port", "weight", "meta"})


def check_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS host name, else ``ValueError``."""
    if not host:
        raise ValueError("empty host")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
        raise ValueError(f"bad host {host!r} (expected an IP address or a host name)")
    return host


def parse_port(value: object) -> int:
    """A TCP port from an int or a decimal string, 1 to 65535."""
    if isinstance(value, bool):
        raise ValueError(f"bad port {value!r}")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"bad port {value!r} (expected 1 to 65535)")
    return value


def parse_weight(value: object) -> float:
    """A finite weight above zero, from a number or a decimal string."""
    if isinstance(value, bool):
        raise ValueError(f"bad weight {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"bad weight {value!r} (expected a number above 0)") from None
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"bad weight {value!r} (expected a number above 0)")
    return float(value)


def split_hostport(text: str) -> tuple[str, str]:
    """``"host:port"`` or ``"[v6]:port"`` split into its two texts, unchecked."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {text!r} (expected [ipv6]:port)")
        if ":" not in host:
            raise ValueError(f"bad address {text!r} (brackets are for IPv6 only)")
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        raise ValueError(f"bad address {text!r} (expected host:port, or [ipv6]:port)")
    return host, port


def parse_hostport(text: str) -> tuple[str, int, float]:
    """``host:port[*weight]`` (IPv6 as ``[::1]:80``) to ``(host, port, weight)``."""
    text = text.strip()
    body, star, weight = text.partition("*")
    host, port = split_hostport(body)
    return check_host(host), parse_port(port), parse_weight(weight) if star else 1.0


def parse_meta(value: object) -> Mapping[str, str]:
    """Metadata: a mapping of names to scalar values, stored as strings."""
    if not isinstance(value, Mapping):
        raise ValueError(f"meta must be a mapping, not {type(value).__name__}")
    meta: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str | int | float | bool):
            raise ValueError(f"meta {key!r}: expected a name and a scalar value")
        meta[key] = str(item).lower() if isinstance(item, bool) else str(item)
    return MappingProxyType(meta)


def parse_entry(entry: object) -> Address:
    """One address from a ``host:port[*weight]`` string or a ``{host, port, ...}`` mapping."""
    if isinstance(entry, str):
        host, port, weight = parse_hostport(entry)
        return Address(host, port, weight)
    if not isinstance(entry, Mapping):
        raise ValueError(f"expected \"host:port\" or a mapping, not {type(entry).__name__}")
    unknown = sorted(str(k) for k in entry if k not in _ENTRY_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (allowed: host, port, weight, meta)")
    if "host" not in entry or "port" not in entry:
        raise ValueError("a mapping entry needs both host and port")
    if not isinstance(entry["host"], str):
        raise ValueError(f"bad host {entry['host']!r}")
    weight = parse_weight(entry["weight"]) if "weight" in entry else 1.0
    meta = parse_meta(entry.get("meta", {}))
    if meta:
        return Address(check_host(entry["host"]), parse_port(entry["port"]), weight, meta)
    return Address(check_host(entry["host"]), parse_port(entry["port"]), weight)


def parse_services(services: object) -> dict[str, frozenset[Address]]:
    """The ``services`` option: service name to a list of entries; errors name the entry."""
    if not isinstance(services, Mapping):
        raise ValueError("services: expected a mapping of service name to addresses")
    table: dict[str, frozenset[Address]] = {}
    for name, entries in services.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"services: bad service name {name!r}")
        if isinstance(entries, str) or not isinstance(entries, list | tuple):
            raise ValueError(f"services.{name}: expected a list of addresses")
        table[name] = _parse_list(name, entries)
    return table


def _parse_list(name: str, entries: list[Any] | tuple[Any, ...]) -> frozenset[Address]:
    return unique_addresses(((f"services.{name}[{i}]", str(i), entry)
                             for i, entry in enumerate(entries)), parse_entry, ValueError,
                            "entry")


def unique_addresses(items: Iterable[tuple[str, str, Any]], parse: Callable[[Any], Address],
                     error: type[ValueError], unit: str) -> frozenset[Address]:
    """The addresses of ``(where, label, item)`` triples, each parsed by ``parse``; a bad
    item or a repeated address raises ``error`` naming ``where`` (and the ``unit`` and
    label of the first occurrence)."""
    seen: dict[tuple[str, int], str] = {}
    addrs = []
    for where, label, item in items:
        try:
            addr = parse(item)
        except ValueError as exc:
            raise error(f"{where}: {exc}") from None
        if addr.key in seen:
            raise error(f"{where}: duplicate address {addr} (also {unit} {seen[addr.key]})")
        seen[addr.key] = label
        addrs.append(addr)
    return frozenset(addrs)


def neg(error: str) -> AddrState:
    """``neg`` with the reason the name cannot exist (a malformed name)."""
    return AddrState("neg", error=error)


class StaticNamer(Namer):
    """A fixed table of service name to addresses."""

    kind = "static"
    segments = 1

    def __init__(self, services: Mapping[str, frozenset[Address]]) -> None:
        self._services = dict(services)
        self._watches: dict[Name, Watch] = {}

    @classmethod
    def from_options(cls, options: Mapping[str, Any], ctx: NamerContext) -> StaticNamer:
        check_options(options, required=("services",))
        return cls(parse_services(options["services"]))

    def watch(self, name: Name) -> Watch:
        if name not in self._watches:
            self._watches[name] = Watch(self._lookup(name))
        return self._watches[name]

    def _lookup(self, name: Name) -> AddrState:
        if len(name) != self.segments:
            return neg(f"a static name has 1 segment, not {len(name)}")
        addrs = self._services.get(name[0])
        return NEG if addrs is None else bound_state(addrs)


register("static", StaticNamer)
