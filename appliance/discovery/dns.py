"""The DNS namers' pure part: names, answers to address sets, and when to ask again.

Theory of operation: the ``dns`` namer resolves ``/#/dns/<host>/<port>`` with an A and an
AAAA query; the ``dns-srv`` namer resolves ``/#/dns-srv/<srv name>`` with an SRV query and
then A and AAAA queries for each target. The I/O layer turns each query's result into an
:class:`Answer` (records and TTL, or NXDOMAIN) and calls :func:`host_lookup` or
:func:`srv_lookup`, which give a :class:`Lookup`: the new state and the TTL it is good for.
A failure (timeout, SERVFAIL, REFUSED) never reaches these functions: the I/O layer keeps
the last good set and asks :class:`Refresh` when to retry.

Choices where DNS leaves room: names are absolute (no search list); NXDOMAIN is ``neg``
while a name with no records of the type (NODATA) is ``bound`` to the empty set; the TTL
used is the smallest of every record set involved (CNAMEs, A, AAAA, SRV, targets, and the
SOA of a negative answer), clamped to ``[min_ttl, max_ttl]``, or ``no_ttl`` when no TTL is
known. SRV: only the lowest priority that has at least one resolvable target is used (the
others are fallbacks, RFC 2782); a target of ``.`` is skipped; a record's weight is split
evenly across its target's addresses; weight 0 counts as ``ZERO_WEIGHT`` unless every
record of the priority has weight 0 (then all count as 1).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from appliance.discovery.base import NEG, Address, AddrState, Name, bound
from appliance.discovery.static import check_host, parse_port, split_hostport

ZERO_WEIGHT = 0.001
"""Weight of an SRV record of weight 0 beside records with weight (a very small chance)."""


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str
    """Absolute target name (with the trailing dot); ``"."`` means no service."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One query's result: its records (IP address texts or :class:`SrvRecord`) and TTL,
    or NXDOMAIN. ``ttl`` is ``None`` when the server gave none (no records and no SOA)."""

    records: tuple[str | SrvRecord, ...] = ()
    ttl: float | None = None
    nxdomain: bool = False


@dataclass(frozen=True, slots=True)
class Lookup:
    """The outcome of one resolution: ``bound`` or ``neg``, and how long it holds."""

    state: AddrState
    ttl: float | None


def parse_host_name(name: Name) -> tuple[str, int]:
    """``(host, port)`` from a ``dns`` name; the host is an IP literal or is made absolute."""
    if len(name) != 2:
        raise ValueError(f"a dns name is /<host>/<port>, got {len(name)} segments")
    host = check_host(name[0])
    if not is_ip(host) and not host.endswith("."):
        host += "."
    return host, parse_port(name[1])


def parse_srv_name(name: Name) -> str:
    """The absolute SRV query name from a ``dns-srv`` name such as ``_http._tcp.web``."""
    if len(name) != 1:
        raise ValueError(f"a dns-srv name is one segment, got {len(name)}")
    host = check_host(name[0])
    if is_ip(host):
        raise ValueError(f"an SRV name is a domain name, not the address {host!r}")
    return host if host.endswith(".") else host + "."


def parse_nameserver(text: object) -> tuple[str, int]:
    """``ip``, ``ip:port``, ``ipv6`` or ``[ipv6]:port`` to ``(ip, port)``; port 53 default."""
    if not isinstance(text, str):
        raise ValueError(f"bad nameserver {text!r} (expected \"ip[:port]\")")
    if is_ip(text):
        return str(ipaddress.ip_address(text)), 53
    if ":" not in text:
        raise ValueError(f"bad nameserver {text!r} (expected an IP address, optionally "
                         f"with :port)")
    try:
        host, port = split_hostport(text)
        if not is_ip(host):
            raise ValueError("expected an IP address, not a name")
        return str(ipaddress.ip_address(host)), parse_port(port)
    except ValueError as exc:
        raise ValueError(f"bad nameserver {text!r}: {exc}") from None


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def min_ttl(ttls: Iterable[float | None]) -> float | None:
    known = [t for t in ttls if t is not None]
    return min(known) if known else None


def merge(*answers: Answer) -> Answer:
    """Answers for one name (A and AAAA) as one: NXDOMAIN only if nothing was found."""
    records = tuple(r for a in answers for r in a.records)
    nxdomain = not records and any(a.nxdomain for a in answers)
    return Answer(records, min_ttl(a.ttl for a in answers), nxdomain)


def host_lookup(a: Answer, aaaa: Answer, port: int) -> Lookup:
    """The A and AAAA answers for a ``dns`` name."""
    both = merge(a, aaaa)
    if both.nxdomain:
        return Lookup(NEG, both.ttl)
    return Lookup(bound(host_addresses(both.records, port)), both.ttl)


def host_addresses(ips: Iterable[str | SrvRecord], port: int, weight: float = 1.0
                   ) -> frozenset[Address]:
    return frozenset(Address(str(ipaddress.ip_address(ip)), port, weight)
                     for ip in ips if isinstance(ip, str))


def srv_lookup(srv: Answer, targets: Mapping[str, Answer]) -> Lookup:
    """The SRV answer and each target's (merged A and AAAA) answer for a ``dns-srv`` name."""
    if srv.nxdomain:
        return Lookup(NEG, srv.ttl)
    ttl = min_ttl([srv.ttl, *(targets[r.target].ttl for r in _records(srv)
                              if r.target in targets)])
    return Lookup(bound(srv_addresses(_records(srv), targets)), ttl)


def _records(srv: Answer) -> list[SrvRecord]:
    return [r for r in srv.records if isinstance(r, SrvRecord) and r.target != "."]


def srv_addresses(records: Iterable[SrvRecord], targets: Mapping[str, Answer]
                  ) -> frozenset[Address]:
    """Addresses of the lowest priority with a resolvable target; see the module docs."""
    def ips(record: SrvRecord) -> list[str]:
        answer = targets.get(record.target)
        return [ip for ip in answer.records if isinstance(ip, str)] if answer else []

    usable = [r for r in records if r.target != "." and ips(r)]
    if not usable:
        return frozenset()
    best = min(r.priority for r in usable)
    group = [r for r in usable if r.priority == best]
    all_zero = all(r.weight == 0 for r in group)
    weights: dict[tuple[str, int], float] = {}
    for record in group:
        weight = 1.0 if all_zero else float(record.weight) or ZERO_WEIGHT
        addrs = ips(record)
        for ip in addrs:
            key = (str(ipaddress.ip_address(ip)), record.port)
            weights[key] = weights.get(key, 0.0) + weight / len(addrs)
    return frozenset(Address(host, port, weight) for (host, port), weight in weights.items())


class Refresh:
    """When to resolve one name again: after an answer its TTL, clamped to
    ``[min_ttl, max_ttl]`` (``no_ttl`` if none is known); after consecutive failures an
    exponential backoff from ``min_ttl`` doubling up to ``backoff_cap`` (at most
    ``max_ttl``), each delay drawn uniformly from its upper half ("equal jitter")."""

    def __init__(self, min_ttl: float, max_ttl: float, rng: random.Random, *,
                 no_ttl: float = 30.0, backoff_cap: float = 30.0) -> None:
        if not 0 < min_ttl <= max_ttl:
            raise ValueError(f"need 0 < min_ttl <= max_ttl, got {min_ttl} and {max_ttl}")
        self.min_ttl, self.max_ttl, self.no_ttl = min_ttl, max_ttl, no_ttl
        self.backoff_cap = max(min_ttl, min(backoff_cap, max_ttl))
        self.failures = 0
        self._rng = rng

    def after_answer(self, ttl: float | None) -> float:
        self.failures = 0
        return min(self.max_ttl, max(self.min_ttl, self.no_ttl if ttl is None else ttl))

    def after_failure(self) -> float:
        delay = min(self.backoff_cap, self.min_ttl * 2.0 ** min(self.failures, 60))
        self.failures += 1
        return delay / 2 + self._rng.random() * delay / 2
