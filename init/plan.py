"""Plan the nat rules that make a workload's TCP transparent to the proxy.

Theory of operation. Everything here is pure: options in, a ``Plan`` out, no I/O. The plan
is a small tree (families -> chains -> rules) of frozen dataclasses, so the same value can
be rendered as ``iptables-restore`` text (for the nft backend and ``--dry-run``) and turned
into python-iptables objects (for the legacy backend) without re-parsing text.

Like linkerd2-proxy-init, the rules live in two chains of our own, each hooked from a
built-in chain of the nat table by one rule that carries a ``appliance/...`` comment, so an
uninstall can find exactly what was added:

- ``APPLIANCE_OUTBOUND`` (from OUTPUT): leave the proxy's own traffic, loopback and skipped
  ports/subnets alone, REDIRECT all other TCP to the outbound listener.
- ``APPLIANCE_INBOUND`` (from PREROUTING): leave skipped ports (always 4190 and 4191, the
  proxy's own) and source subnets alone, REDIRECT TCP to the inbound listener.

Rules are rendered in the canonical order ``iptables-save`` prints (addresses, interfaces,
protocol, matches, target), so a saved table can be compared with a plan line by line.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Family = Literal["ipv4", "ipv6"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

INBOUND_CHAIN = "APPLIANCE_INBOUND"
OUTBOUND_CHAIN = "APPLIANCE_OUTBOUND"
COMMENT_PREFIX = "appliance/"
INBOUND_HOOK_COMMENT = COMMENT_PREFIX + "inbound"
OUTBOUND_HOOK_COMMENT = COMMENT_PREFIX + "outbound"
ALWAYS_SKIPPED_INBOUND = (4190, 4191)  # the proxy's tap and admin ports
MULTIPORT_MAX = 15  # xt_multiport slots per rule; a range takes two
_PORT_TOKEN = re.compile(r"(?P<first>[0-9]{1,5})(?:-(?P<last>[0-9]{1,5}))?")


class PlanError(ValueError):
    """An option value that cannot be planned; the message names the flag and the value."""


@dataclass(frozen=True, order=True)
class PortRange:
    """An inclusive range of TCP ports; a single port has ``first == last``."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not (1 <= self.first <= self.last <= 65535):
            raise PlanError(f"bad port range {self.first}-{self.last} (allowed 1-65535)")

    @property
    def slots(self) -> int:
        """Multiport slots this entry takes (a range is stored as two ports)."""
        return 1 if self.first == self.last else 2

    def iptables(self) -> str:
        """The iptables spelling: ``80`` or ``8000:8010``."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"


def parse_ports(text: str, *, flag: str) -> tuple[PortRange, ...]:
    """Parse ``"4190,4191,8000-8010"`` into merged, sorted ranges; errors name ``flag``.

    An empty string gives an empty tuple, so a flag can be given as ``""`` to mean none.
    """
    ranges = [_parse_port_token(tok.strip(), text, flag) for tok in text.split(",") if tok.strip()]
    return merge_ports(ranges)


def _parse_port_token(token: str, text: str, flag: str) -> PortRange:
    match = _PORT_TOKEN.fullmatch(token)
    try:
        if match is None:
            raise ValueError(token)
        lo = int(match["first"])
        return PortRange(lo, int(match["last"]) if match["last"] else lo)
    except (ValueError, PlanError):
        raise PlanError(
            f"{flag}: bad port {token!r} in {text!r} "
            "(expected PORT or FIRST-LAST, ports 1-65535, comma-separated)"
        ) from None


def merge_ports(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Sort ranges and merge those that overlap or touch."""
    merged: list[PortRange] = []
    for r in sorted(ranges):
        if merged and r.first <= merged[-1].last + 1:
            merged[-1] = PortRange(merged[-1].first, max(merged[-1].last, r.last))
        else:
            merged.append(r)
    return tuple(merged)


def parse_subnets(text: str, *, flag: str) -> tuple[IPNetwork, ...]:
    """Parse ``"10.0.0.0/8,fd00::/8"``; host bits must be zero; errors name ``flag``."""
    nets: list[IPNetwork] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        try:
            nets.append(ipaddress.ip_network(token, strict=True))
        except ValueError as exc:
            raise PlanError(f"{flag}: bad subnet {token!r} in {text!r} ({exc})") from None
    return tuple(dict.fromkeys(nets))  # de-duplicate, keep the given order


def chunk_ports(ports: Sequence[PortRange]) -> tuple[tuple[PortRange, ...], ...]:
    """Split ports into groups that each fit one multiport match (<= 15 slots)."""
    groups: list[list[PortRange]] = []
    used = MULTIPORT_MAX
    for p in ports:
        if used + p.slots > MULTIPORT_MAX:
            groups.append([])
            used = 0
        groups[-1].append(p)
        used += p.slots
    return tuple(tuple(g) for g in groups)


@dataclass(frozen=True, kw_only=True)
class InitOptions:
    """What to redirect and what to leave alone. Defaults match design.md."""

    proxy_uid: int = 2102
    proxy_gid: int | None = None
    inbound_port: int = 4143
    outbound_port: int = 4140
    skip_inbound_ports: tuple[PortRange, ...] = ()
    skip_outbound_ports: tuple[PortRange, ...] = ()
    skip_subnets: tuple[IPNetwork, ...] = ()  # inbound: by source address
    skip_outbound_subnets: tuple[IPNetwork, ...] = ()  # outbound: by destination address
    redirect_ports: tuple[PortRange, ...] = ()  # inbound only these; empty means all TCP
    ipv6: bool = False

    def __post_init__(self) -> None:
        for name in ("proxy_uid", "proxy_gid"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**32 - 1:
                raise PlanError(f"{name}: {value} is not a valid id (0-4294967294)")
        for name in ("inbound_port", "outbound_port"):
            value = getattr(self, name)
            if not 1 <= value <= 65535:
                raise PlanError(f"{name}: {value} is not a port (1-65535)")


@dataclass(frozen=True, kw_only=True)
class Match:
    """One ``-m MODULE --opt value ...`` clause; option names without dashes."""

    module: str
    options: tuple[tuple[str, str], ...]

    def argv(self) -> list[str]:
        out = ["-m", self.module]
        for opt, value in self.options:
            out += [f"--{opt}", value]
        return out


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One rule of a chain, plus ``why`` for the human reader of ``--dry-run``."""

    chain: str
    target: str
    target_options: tuple[tuple[str, str], ...] = ()
    protocol: str | None = "tcp"
    source: IPNetwork | None = None
    destination: IPNetwork | None = None
    out_interface: str | None = None
    matches: tuple[Match, ...] = ()
    why: str = ""

    def spec(self) -> list[str]:
        """The rule as iptables arguments after ``-A CHAIN``, in iptables-save order."""
        out: list[str] = []
        if self.source is not None:
            out += ["-s", str(self.source)]
        if self.destination is not None:
            out += ["-d", str(self.destination)]
        if self.out_interface is not None:
            out += ["-o", self.out_interface]
        if self.protocol is not None:
            out += ["-p", self.protocol]
        for m in self.matches:
            out += m.argv()
        out += ["-j", self.target]
        for opt, value in self.target_options:
            out += [f"--{opt}", value]
        return out

    def line(self) -> str:
        """``-A CHAIN ...`` exactly as iptables-save prints it (it quotes comments)."""
        words = ["-A", self.chain]
        spec = self.spec()
        for i, word in enumerate(spec):
            quoted = i > 0 and spec[i - 1] == "--comment"
            words.append(f'"{word}"' if quoted else word)
        return " ".join(words)

    @property
    def comment(self) -> str | None:
        for m in self.matches:
            if m.module == "comment":
                return dict(m.options)["comment"]
        return None


@dataclass(frozen=True, kw_only=True)
class Chain:
    """A chain of ours and the one rule that hooks it into a built-in chain."""

    name: str
    hook: Rule
    rules: tuple[Rule, ...]


@dataclass(frozen=True, kw_only=True)
class FamilyPlan:
    """The nat-table plan for one address family."""

    family: Family
    chains: tuple[Chain, ...]

    @property
    def hooks(self) -> tuple[Rule, ...]:
        return tuple(c.hook for c in self.chains)

    def restore_text(self, *, annotate: bool = False) -> str:
        """Input for ``iptables-restore --noflush`` (declaring a chain flushes it)."""
        lines = ["*nat"]
        lines += [f":{c.name} - [0:0]" for c in self.chains]
        for rule in [r for c in self.chains for r in c.rules] + list(self.hooks):
            if annotate and rule.why:
                lines.append(f"# {rule.why}")
            lines.append(rule.line())
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Per-family plans: ipv4 always, ipv6 when enabled."""

    options: InitOptions
    families: tuple[FamilyPlan, ...] = field(default=())

    def family(self, family: Family) -> FamilyPlan:
        for fp in self.families:
            if fp.family == family:
                return fp
        raise KeyError(family)

    def dry_run_text(self) -> str:
        """Restore-style text per family with a ``#`` line saying why for each rule."""
        parts = []
        for fp in self.families:
            tool = "iptables" if fp.family == "ipv4" else "ip6tables"
            parts.append(f"# {fp.family}: {tool}-restore --noflush, table nat\n"
                         + fp.restore_text(annotate=True))
        return "\n".join(parts)


def _comment(text: str) -> Match:
    return Match(module="comment", options=(("comment", COMMENT_PREFIX + text),))


def _port_matches(ports: Sequence[PortRange]) -> list[Match]:
    """One match per rule: plain ``--dport`` for a single entry, multiport otherwise."""
    if len(ports) == 1:
        return [Match(module="tcp", options=(("dport", ports[0].iptables()),))]
    value = ",".join(p.iptables() for p in ports)
    return [Match(module="multiport", options=(("dports", value),))]


def _port_rules(chain: str, ports: Sequence[PortRange], target: str, comment: str,
                why: str, target_options: tuple[tuple[str, str], ...] = ()) -> list[Rule]:
    return [
        Rule(chain=chain, target=target, target_options=target_options,
             matches=(*_port_matches(group), _comment(comment)),
             why=f"{why}: {','.join(p.iptables() for p in group)}")
        for group in chunk_ports(ports)
    ]


def _in_family(nets: Iterable[IPNetwork], family: Family) -> list[IPNetwork]:
    version = 4 if family == "ipv4" else 6
    return [n for n in nets if n.version == version]


def _outbound(opts: InitOptions, family: Family) -> Chain:
    c = OUTBOUND_CHAIN
    rules = [Rule(chain=c, target="RETURN", protocol=None,
                  matches=(Match(module="owner", options=(("uid-owner", str(opts.proxy_uid)),)),
                           _comment("ignore-proxy-uid")),
                  why="the proxy's own connections go out unchanged")]
    if opts.proxy_gid is not None:
        rules.append(Rule(chain=c, target="RETURN", protocol=None,
                          matches=(Match(module="owner",
                                         options=(("gid-owner", str(opts.proxy_gid)),)),
                                   _comment("ignore-proxy-gid")),
                          why="connections of the proxy's group go out unchanged"))
    rules.append(Rule(chain=c, target="RETURN", protocol=None, out_interface="lo",
                      matches=(_comment("ignore-loopback"),),
                      why="loopback (incl. the host's own addresses) is not redirected"))
    rules += _port_rules(c, opts.skip_outbound_ports, "RETURN", "skip-outbound-ports",
                         "skipped outbound destination ports")
    rules += [Rule(chain=c, target="RETURN", protocol=None, destination=net,
                   matches=(_comment("skip-outbound-subnet"),),
                   why=f"skipped outbound destination subnet {net}")
              for net in _in_family(opts.skip_outbound_subnets, family)]
    rules.append(Rule(chain=c, target="REDIRECT",
                      target_options=(("to-ports", str(opts.outbound_port)),),
                      matches=(_comment("redirect-outbound"),),
                      why=f"all other TCP goes to the outbound listener :{opts.outbound_port}"))
    hook = Rule(chain="OUTPUT", target=c, matches=(_comment("outbound"),),
                why="hook: locally generated TCP enters APPLIANCE_OUTBOUND")
    return Chain(name=c, hook=hook, rules=tuple(rules))


def _inbound(opts: InitOptions, family: Family) -> Chain:
    c = INBOUND_CHAIN
    always = [PortRange(p, p) for p in ALWAYS_SKIPPED_INBOUND]
    skip = merge_ports([*always, *opts.skip_inbound_ports])
    rules = _port_rules(c, skip, "RETURN", "skip-inbound-ports",
                        "skipped inbound destination ports")
    rules += [Rule(chain=c, target="RETURN", protocol=None, source=net,
                   matches=(_comment("skip-inbound-subnet"),),
                   why=f"skipped inbound source subnet {net}")
              for net in _in_family(opts.skip_subnets, family)]
    to_ports = (("to-ports", str(opts.inbound_port)),)
    if opts.redirect_ports:
        rules += _port_rules(c, opts.redirect_ports, "REDIRECT", "redirect-inbound",
                             f"to the inbound listener :{opts.inbound_port}, ports",
                             to_ports)
    else:
        rules.append(Rule(chain=c, target="REDIRECT", target_options=to_ports,
                          matches=(_comment("redirect-inbound"),),
                          why=f"all other TCP goes to the inbound listener :{opts.inbound_port}"))
    hook = Rule(chain="PREROUTING", target=c, matches=(_comment("inbound"),),
                why="hook: TCP arriving from the network enters APPLIANCE_INBOUND")
    return Chain(name=c, hook=hook, rules=tuple(rules))


def plan(opts: InitOptions) -> Plan:
    """Plan the chains and rules for ipv4, and for ipv6 when ``opts.ipv6``."""
    families: list[Family] = ["ipv4", "ipv6"] if opts.ipv6 else ["ipv4"]
    return Plan(options=opts, families=tuple(
        FamilyPlan(family=f, chains=(_inbound(opts, f), _outbound(opts, f))) for f in families
    ))
