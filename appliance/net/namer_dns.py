"""The DNS namers: ``dns`` (A and AAAA, ``/#/dns/<host>/<port>``) and ``dns-srv``.

Theory of operation: the first :meth:`watch` of a name spawns one refresh loop for it
(``ctx.spawn``, by :class:`~appliance.net.namer_loop.LoopNamer`); later watches share its
:class:`Watch`. The loop resolves the name with
dnspython's asyncio resolver, hands the answers to the pure functions of
:mod:`appliance.discovery.dns`, sets the watch, and sleeps for the answer's TTL clamped to
``[min_ttl, max_ttl]``. NXDOMAIN is ``neg``. A timeout, SERVFAIL, REFUSED or network
error is a failure: :meth:`Watch.fail` keeps the last good set (``stale=True``) and the
loop retries with jittered exponential backoff. Every resolution, good or failed, is
reported with ``ctx.report``. A ``dns`` name whose host is an IP literal is bound at once,
with no loop.

dnspython's own cache is off, so each refresh asks the server and sees the TTL it gives.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from appliance.discovery.base import Name, NamerContext, Watch, bound
from appliance.discovery.dns import (
    Answer,
    Lookup,
    Refresh,
    SrvRecord,
    host_addresses,
    host_lookup,
    is_ip,
    merge,
    parse_host_name,
    parse_nameserver,
    parse_srv_name,
    srv_lookup,
)
from appliance.discovery.registry import check_options, float_option, register
from appliance.net.namer_loop import LoopNamer


class DnsFailure(Exception):
    """A query got no usable answer (timeout, SERVFAIL, REFUSED, network error)."""


class _DnsNamerBase(LoopNamer):
    """Options and the refresh loop shared by the two DNS namers."""

    def __init__(self, ctx: NamerContext, *, nameservers: list[tuple[str, int]] | None = None,
                 min_ttl: float = 1.0, max_ttl: float = 300.0, timeout: float = 5.0,
                 rng: random.Random | None = None) -> None:
        if not 0 < min_ttl <= max_ttl:
            raise ValueError(f"min_ttl: must be above 0 and at most max_ttl ({max_ttl})")
        self.min_ttl, self.max_ttl, self.timeout = min_ttl, max_ttl, timeout
        self._rng = rng or random.Random()
        self._resolver = _resolver(nameservers, timeout)
        super().__init__(ctx)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], ctx: NamerContext) -> _DnsNamerBase:
        check_options(options, optional=("nameservers", "min_ttl", "max_ttl", "timeout"))
        servers = options.get("nameservers")
        if servers is not None:
            if isinstance(servers, str) or not isinstance(servers, list | tuple) or not servers:
                raise ValueError("nameservers: expected a non-empty list of \"ip[:port]\"")
            try:
                servers = [parse_nameserver(s) for s in servers]
            except ValueError as exc:
                raise ValueError(f"nameservers: {exc}") from None
        return cls(ctx, nameservers=servers,
                   min_ttl=float_option(options, "min_ttl", 1.0),
                   max_ttl=float_option(options, "max_ttl", 300.0),
                   timeout=float_option(options, "timeout", 5.0))

    async def _resolve(self, query: Any) -> Lookup:
        raise NotImplementedError

    async def _run(self, name: Name, query: Any, watch: Watch) -> None:
        refresh = Refresh(self.min_ttl, self.max_ttl, self._rng)
        while not self._closed:
            try:
                lookup = await self._resolve(query)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure keeps the last good set; the loop goes on
                error = str(exc) if isinstance(exc, DnsFailure) else f"{type(exc).__name__}: {exc}"
                watch.fail(error)
                self._ctx.report(self.kind, name, False, error)
                delay = refresh.after_failure()
            else:
                watch.set(lookup.state)
                self._ctx.report(self.kind, name, True, "")
                delay = refresh.after_answer(lookup.ttl)
            await asyncio.sleep(delay)

    async def _addresses(self, qname: str) -> Answer:
        """A and AAAA of ``qname``, merged."""
        a, aaaa = await _gather(self._query(qname, "A"), self._query(qname, "AAAA"))
        return merge(a, aaaa)

    async def _query(self, qname: str, rdtype: str) -> Answer:
        try:
            answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False,
                                                  search=False)
        except dns.resolver.NXDOMAIN as exc:
            return Answer(nxdomain=True, ttl=_soa_ttl(exc.responses().values()))
        except dns.resolver.LifetimeTimeout:
            raise DnsFailure(f"{qname} {rdtype}: timed out after {self.timeout}s") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsFailure(f"{qname} {rdtype}: {exc}") from None
        if answer.rrset is None:
            return Answer(ttl=_soa_ttl([answer.response]))
        return Answer(tuple(_record(rdata) for rdata in answer.rrset),
                      float(answer.chaining_result.minimum_ttl))


class DnsNamer(_DnsNamerBase):
    """``/#/dns/<host>/<port>``: the host's A and AAAA addresses, on that port."""

    kind = "dns"
    segments = 2

    def _parse(self, name: Name) -> Any:
        host, port = parse_host_name(name)
        if is_ip(host):
            return Watch(bound(host_addresses([host], port)))
        return host, port

    async def _resolve(self, query: Any) -> Lookup:
        host, port = query
        a, aaaa = await _gather(self._query(host, "A"), self._query(host, "AAAA"))
        return host_lookup(a, aaaa, port)


class DnsSrvNamer(_DnsNamerBase):
    """``/#/dns-srv/<_service._proto.domain>``: the SRV records' targets, ports, weights."""

    kind = "dns-srv"
    segments = 1

    def _parse(self, name: Name) -> Any:
        return parse_srv_name(name)

    async def _resolve(self, query: Any) -> Lookup:
        srv = await self._query(query, "SRV")
        names = sorted({r.target for r in srv.records
                        if isinstance(r, SrvRecord) and r.target != "."})
        answers = await _gather(*(self._addresses(n) for n in names))
        return srv_lookup(srv, dict(zip(names, answers, strict=True)))


def _resolver(nameservers: list[tuple[str, int]] | None, timeout: float
              ) -> dns.asyncresolver.Resolver:
    if nameservers is None:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.exception.DNSException as exc:
            raise ValueError(f"nameservers: not given, and the system's resolv.conf gives "
                             f"none ({exc})") from None
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port)
                                for ip, port in nameservers]
    resolver.cache = None
    resolver.lifetime = timeout
    resolver.timeout = min(2.0, timeout)  # per attempt, so a dead first server leaves time
    return resolver


async def _gather(*queries: Any) -> list[Answer]:
    """Run queries together; the first failure is raised once all have finished."""
    results = await asyncio.gather(*queries, return_exceptions=True)
    answers = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        answers.append(result)
    return answers


def _record(rdata: Any) -> str | SrvRecord:
    if rdata.rdtype == dns.rdatatype.SRV:
        return SrvRecord(rdata.priority, rdata.weight, rdata.port, rdata.target.to_text())
    return str(rdata.address)


def _soa_ttl(responses: Any) -> float | None:
    """The negative-caching TTL (RFC 2308) from the SOA of a negative answer, if any."""
    for response in responses:
        for rrset in getattr(response, "authority", ()):
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return None


register("dns", DnsNamer)
register("dns-srv", DnsSrvNamer)
