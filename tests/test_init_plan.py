"""init/plan.py (and the pure helpers around it: restore text, backend choice, CLI
parsing): table-driven cases plus hypothesis for port lists. No I/O, no privileges."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from init import backends, cli
from init.errors import (
    EXIT_BACKEND,
    EXIT_FAILED,
    EXIT_PERMISSION,
    EXIT_USAGE,
    from_backend_message,
)
from init.plan import (
    MULTIPORT_MAX,
    InitOptions,
    PlanError,
    PortRange,
    chunk_ports,
    merge_ports,
    parse_ports,
    parse_subnets,
    plan,
)
from init.restore import count_rules, install_text, parse_save, uninstall_text

P = PortRange


def lines(opts: InitOptions, family: str = "ipv4", chain: str | None = None) -> list[str]:
    fp = plan(opts).family(family)  # type: ignore[arg-type]
    return [r.line() for c in fp.chains if chain in (None, c.name) for r in c.rules]


# --- port lists --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("", ()),
    ("80", (P(80, 80),)),
    ("4190,4191", (P(4190, 4191),)),
    ("8000-8010", (P(8000, 8010),)),
    (" 22 , 80 ,", (P(22, 22), P(80, 80))),
    ("80,22,80", (P(22, 22), P(80, 80))),
    ("1-10,5-20,30", (P(1, 20), P(30, 30))),
    ("1,65535", (P(1, 1), P(65535, 65535))),
])
def test_parse_ports_accepts(text: str, expected: tuple[PortRange, ...]) -> None:
    """Valid lists are sorted, de-duplicated and merged."""
    assert parse_ports(text, flag="--x") == expected


@pytest.mark.parametrize("token", ["abc", "0", "65536", "10-5", "1-2-3", "-5", "+5", "8 0",
                                   "80-", "0x50", "99999999999"])
def test_parse_ports_rejects_with_flag_and_token(token: str) -> None:
    """A bad token gives one line naming the flag and the token."""
    with pytest.raises(PlanError) as info:
        parse_ports(f"80,{token}", flag="--skip-inbound-ports")
    message = str(info.value)
    assert message.startswith("--skip-inbound-ports: ") and repr(token) in message
    assert "\n" not in message


def _covered(ranges: tuple[PortRange, ...] | list[PortRange]) -> set[int]:
    return {p for r in ranges for p in range(r.first, r.last + 1)}


port_ranges = st.lists(
    st.tuples(st.integers(1, 65535), st.integers(0, 40)).map(
        lambda t: P(t[0], min(65535, t[0] + t[1]))),
    max_size=40)


@given(port_ranges)
def test_parse_ports_roundtrips_any_list(ranges: list[PortRange]) -> None:
    """Rendering any list as FIRST-LAST tokens and parsing it covers the same ports."""
    text = ",".join(f"{r.first}-{r.last}" if r.slots == 2 else str(r.first) for r in ranges)
    parsed = parse_ports(text, flag="--x")
    assert _covered(parsed) == _covered(ranges)
    assert all(a.last + 1 < b.first for a, b in zip(parsed, parsed[1:], strict=False))


@given(port_ranges)
def test_chunks_fit_multiport_and_keep_every_port(ranges: list[PortRange]) -> None:
    """Each multiport group has at most 15 slots (a range takes two); none is lost."""
    merged = merge_ports(ranges)
    groups = chunk_ports(merged)
    assert all(0 < sum(p.slots for p in g) <= MULTIPORT_MAX for g in groups)
    assert [p for g in groups for p in g] == list(merged)


@given(port_ranges)
def test_inbound_skip_rules_cover_exactly_the_skipped_ports(ranges: list[PortRange]) -> None:
    """The inbound RETURN rules skip the given ports plus 4190 and 4191, nothing else."""
    opts = InitOptions(skip_inbound_ports=merge_ports(ranges))
    skipped: set[int] = set()
    for rule in plan(opts).family("ipv4").chains[0].rules:
        if rule.target != "RETURN":
            continue
        (match, _comment) = rule.matches
        value = dict(match.options).get("dport") or dict(match.options)["dports"]
        assert len(value.split(",")) <= MULTIPORT_MAX
        for tok in value.split(","):
            first, _, last = tok.partition(":")
            skipped |= set(range(int(first), int(last or first) + 1))
    assert skipped == _covered(ranges) | {4190, 4191}


def test_many_ports_split_into_several_multiport_rules() -> None:
    """20 single ports need two outbound RETURN rules (15 + 5)."""
    ports = ",".join(str(p) for p in range(1000, 1040, 2))
    rules = lines(InitOptions(skip_outbound_ports=parse_ports(ports, flag="--x")))
    multiport = [r for r in rules if "--dports" in r]
    assert [len(r.split("--dports ")[1].split()[0].split(",")) for r in multiport] == [15, 5]


# --- subnets ----------------------------------------------------------------------------

def test_parse_subnets_keeps_order_and_families() -> None:
    """IPv4 and IPv6 CIDRs parse; duplicates are dropped."""
    nets = parse_subnets("10.0.0.0/8, fd00::/8,10.0.0.0/8", flag="--skip-subnets")
    assert nets == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize("token", ["10.0.0.1/8", "10.0.0.0/33", "nope", "fd00::1/8"])
def test_parse_subnets_rejects_with_flag_and_token(token: str) -> None:
    """Host bits, bad prefix lengths and garbage are one-line errors naming the flag."""
    with pytest.raises(PlanError, match=rf"^--skip-outbound-subnets: bad subnet '{token}'"):
        parse_subnets(token, flag="--skip-outbound-subnets")


# --- the plan ---------------------------------------------------------------------------

DEFAULT_INBOUND = [
    '-A APPLIANCE_INBOUND -p tcp -m tcp --dport 4190:4191 -m comment --comment '
    '"appliance/skip-inbound-ports" -j RETURN',
    '-A APPLIANCE_INBOUND -p tcp -m comment --comment "appliance/redirect-inbound" '
    '-j REDIRECT --to-ports 4143',
]
DEFAULT_OUTBOUND = [
    '-A APPLIANCE_OUTBOUND -m owner --uid-owner 2102 -m comment --comment '
    '"appliance/ignore-proxy-uid" -j RETURN',
    '-A APPLIANCE_OUTBOUND -o lo -m comment --comment "appliance/ignore-loopback" -j RETURN',
    '-A APPLIANCE_OUTBOUND -p tcp -m comment --comment "appliance/redirect-outbound" '
    '-j REDIRECT --to-ports 4140',
]


def test_default_plan_is_ipv4_only_with_the_documented_rules() -> None:
    """Defaults: 4190-4191 skipped inbound, UID 2102 and lo skipped outbound."""
    p = plan(InitOptions())
    assert [fp.family for fp in p.families] == ["ipv4"]
    assert lines(InitOptions(), chain="APPLIANCE_INBOUND") == DEFAULT_INBOUND
    assert lines(InitOptions(), chain="APPLIANCE_OUTBOUND") == DEFAULT_OUTBOUND


def test_hooks_carry_comments_and_are_tcp_only() -> None:
    """Hook rules are what uninstall finds: one per built-in chain, commented."""
    hooks = [r.line() for r in plan(InitOptions()).family("ipv4").hooks]
    assert hooks == [
        '-A PREROUTING -p tcp -m comment --comment "appliance/inbound" -j APPLIANCE_INBOUND',
        '-A OUTPUT -p tcp -m comment --comment "appliance/outbound" -j APPLIANCE_OUTBOUND',
    ]


@pytest.mark.parametrize(("opts", "chain", "expected"), [
    (InitOptions(proxy_uid=1000, proxy_gid=1001), "APPLIANCE_OUTBOUND", [
        "--uid-owner 1000", "--gid-owner 1001", "-o lo", "--to-ports 4140"]),
    (InitOptions(outbound_port=15001, skip_outbound_ports=(P(22, 22),)), "APPLIANCE_OUTBOUND",
     ["--uid-owner 2102", "-o lo", "-m tcp --dport 22 ", "--to-ports 15001"]),
    (InitOptions(skip_outbound_subnets=parse_subnets("10.96.0.0/12,fd00::/8", flag="x")),
     "APPLIANCE_OUTBOUND", ["--uid-owner", "-o lo", "-d 10.96.0.0/12 ", "--to-ports 4140"]),
    (InitOptions(skip_subnets=parse_subnets("192.168.0.0/16", flag="x")), "APPLIANCE_INBOUND",
     ["--dport 4190:4191", "-s 192.168.0.0/16 ", "--to-ports 4143"]),
    (InitOptions(inbound_port=15006, skip_inbound_ports=parse_ports("22,4192", flag="x")),
     "APPLIANCE_INBOUND", ["--dports 22,4190:4192 ", "--to-ports 15006"]),
    (InitOptions(redirect_ports=parse_ports("80,443,9000-9100", flag="x")), "APPLIANCE_INBOUND",
     ["--dport 4190:4191", "--dports 80,443,9000:9100 -m comment --comment "
      '"appliance/redirect-inbound" -j REDIRECT --to-ports 4143']),
])
def test_options_shape_the_chain(opts: InitOptions, chain: str, expected: list[str]) -> None:
    """Each option shows up as its rule, in order (one fragment per rule)."""
    got = lines(opts, chain=chain)
    assert len(got) == len(expected)
    assert all(fragment in rule for fragment, rule in zip(expected, got, strict=True)), got


def test_subnets_go_only_to_their_family() -> None:
    """An IPv6 CIDR is in the ip6tables plan only, an IPv4 one in the iptables plan only."""
    nets = parse_subnets("10.0.0.0/8,fd00::/8", flag="x")
    opts = InitOptions(ipv6=True, skip_subnets=nets, skip_outbound_subnets=nets)
    v4, v6 = "\n".join(lines(opts, "ipv4")), "\n".join(lines(opts, "ipv6"))
    assert "10.0.0.0/8" in v4 and "fd00::/8" not in v4
    assert "fd00::/8" in v6 and "10.0.0.0/8" not in v6


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"inbound_port": 0}, "inbound_port"), ({"outbound_port": 70000}, "outbound_port"),
    ({"proxy_uid": -1}, "proxy_uid"), ({"proxy_gid": 2**32}, "proxy_gid"),
])
def test_options_validate_and_name_the_field(kwargs: dict[str, int], field: str) -> None:
    """Out-of-range numbers are rejected with the field's name."""
    with pytest.raises(PlanError, match=f"^{field}: "):
        InitOptions(**kwargs)  # type: ignore[arg-type]


def test_dry_run_text_is_restore_input_with_reasons() -> None:
    """Dry-run text: a header per family, *nat, chains, a '# why' before each rule, COMMIT."""
    text = plan(InitOptions(ipv6=True)).dry_run_text()
    assert text.count("*nat") == 2 and text.count("COMMIT") == 2
    assert text.startswith("# ipv4: iptables-restore --noflush, table nat\n*nat\n")
    assert "# ipv6: ip6tables-restore --noflush, table nat\n" in text
    body = [x for x in text.splitlines() if x.startswith("-A ")]
    assert all(text.splitlines()[text.splitlines().index(r) - 1].startswith("# ")
               for r in body)


# --- restore text (nft backend) ----------------------------------------------------------

FOREIGN = """# Generated by iptables-nft-save
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [3:180]
:OUTPUT ACCEPT [0:0]
:OTHER - [0:0]
-A OUTPUT -p udp -j RETURN
-A OTHER -j RETURN
COMMIT
"""


def _with_ours(extra_hooks: str = "") -> str:
    fp = plan(InitOptions()).family("ipv4")
    ours = [f":{c.name} - [0:0]" for c in fp.chains]
    ours += [r.line() for r in fp.hooks] + [r.line() for c in fp.chains for r in c.rules]
    return FOREIGN.replace("-A OTHER -j RETURN\n",
                           "-A OTHER -j RETURN\n" + "\n".join(ours) + "\n" + extra_hooks)


def test_parse_save_reads_only_the_nat_table() -> None:
    """Chains and rules of *nat; counters, comments and other tables ignored."""
    saved = parse_save(FOREIGN)
    assert saved.chains == ("PREROUTING", "OUTPUT", "OTHER")
    assert saved.rules == ("-A OUTPUT -p udp -j RETURN", "-A OTHER -j RETURN")
    assert count_rules(FOREIGN) == 3


def test_install_text_on_a_clean_table_adds_hooks() -> None:
    """No hooks yet: declare chains, add rules, append both hooks, nothing deleted."""
    fp = plan(InitOptions()).family("ipv4")
    text = install_text(fp, parse_save(FOREIGN))
    assert "-D " not in text
    assert text.splitlines()[-3:] == [fp.hooks[0].line(), fp.hooks[1].line(), "COMMIT"]


def test_install_text_keeps_identical_hooks_in_place() -> None:
    """Already installed: only the chains are rewritten; hooks are not touched."""
    fp = plan(InitOptions()).family("ipv4")
    text = install_text(fp, parse_save(_with_ours()))
    assert "PREROUTING" not in text and "-A OUTPUT" not in text


def test_install_text_replaces_duplicate_or_stale_hooks() -> None:
    """Two OUTPUT hooks: both deleted, one appended, in one transaction."""
    fp = plan(InitOptions()).family("ipv4")
    stale = '-A OUTPUT -m comment --comment "appliance/outbound" -j APPLIANCE_OUTBOUND\n'
    text = install_text(fp, parse_save(_with_ours(stale)))
    assert text.count("-D OUTPUT") == 2 and text.count("-A OUTPUT") == 1
    assert "PREROUTING" not in text


def test_uninstall_text_removes_only_ours() -> None:
    """Our hooks are deleted and our chains flushed and removed; foreign rules stay."""
    text = uninstall_text(parse_save(_with_ours()))
    assert text is not None
    assert text.splitlines() == [
        "*nat",
        '-D PREROUTING -p tcp -m comment --comment "appliance/inbound" -j APPLIANCE_INBOUND',
        '-D OUTPUT -p tcp -m comment --comment "appliance/outbound" -j APPLIANCE_OUTBOUND',
        "-F APPLIANCE_INBOUND", "-X APPLIANCE_INBOUND",
        "-F APPLIANCE_OUTBOUND", "-X APPLIANCE_OUTBOUND",
        "COMMIT",
    ]
    assert uninstall_text(parse_save(FOREIGN)) is None


# --- backend choice, privileges, error mapping -----------------------------------------

@pytest.mark.parametrize(("legacy", "nft", "nft_available", "expected"), [
    (0, 0, True, "nft"), (0, 0, False, "legacy"), (5, 0, True, "legacy"),
    (0, 5, False, "nft"), (3, 7, True, "nft"), (7, 3, True, "legacy"), (4, 4, True, "nft"),
])
def test_auto_picks_the_backend_in_use(legacy: int, nft: int, nft_available: bool,
                                       expected: str) -> None:
    """More rules wins; a tie goes to nft when its binaries exist."""
    assert backends.choose(legacy, nft, nft_available) == expected


@pytest.mark.parametrize(("cap_eff", "mode", "missing"), [
    ("000001ffffffffff", "legacy", None),
    ("0000000000001000", "nft", None),  # NET_ADMIN alone is enough for nf_tables
    ("0000000000001000", "legacy", "CAP_NET_RAW"),
    ("0000000000002000", "nft", "CAP_NET_ADMIN"),
    ("0000000000000000", "auto", "CAP_NET_ADMIN and CAP_NET_RAW"),
])
def test_privilege_check_names_missing_capabilities(cap_eff: str, mode: str,
                                                   missing: str | None) -> None:
    """CapEff is read from /proc/self/status; a missing capability is exit 3."""
    status = f"Name:\tx\nCapInh:\t0\nCapEff:\t{cap_eff}\n"
    if missing is None:
        backends.check_privileges(mode, status)  # type: ignore[arg-type]
        return
    with pytest.raises(Exception, match=f"^missing {missing}:") as info:
        backends.check_privileges(mode, status)  # type: ignore[arg-type]
    assert getattr(info.value, "exit_code", None) == EXIT_PERMISSION


@pytest.mark.parametrize(("message", "code"), [
    ("can't initialize nat: Permission denied (you must be root)", EXIT_PERMISSION),
    ("iptables-nft-restore: Could not fetch rule set generation id: Operation not "
     "permitted", EXIT_PERMISSION),
    ("can't initialize ip6tables table `nat': Table does not exist (do you need to "
     "insmod?)", EXIT_BACKEND),
    ("legacy ipv4: can't find match tcp", EXIT_BACKEND),
    ("iptables-nft-restore: line 3 failed", EXIT_FAILED),
])
def test_backend_messages_map_to_exit_codes(message: str, code: int) -> None:
    """Backend errors become one line with the documented exit code."""
    error = from_backend_message(message + "\n  second line")
    assert error.exit_code == code and "\n" not in str(error)


# --- CLI parsing (no backend is touched) -------------------------------------------------

def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["init", *argv])


@pytest.mark.parametrize("argv", [
    ["--skip-inbound-ports", "80,x"], ["--redirect-ports", "0"], ["--proxy-uid", "root"],
    ["--inbound-port", "65536"], ["--skip-subnets", "10.0.0.1/8"],
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Any unparsable value: exit 2 and a single stderr line naming the flag."""
    assert cli.run(_args(*argv)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and argv[0] in err


def test_dry_run_prints_the_plan_and_touches_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run prints exactly the plan's text and succeeds without privileges."""
    assert cli.run(_args("--dry-run", "--no-ipv6", "--proxy-gid", "7")) == 0
    assert capsys.readouterr().out == plan(InitOptions(proxy_gid=7)).dry_run_text()


def test_flags_become_options() -> None:
    """Every flag reaches InitOptions."""
    opts = cli.options_from_args(_args(
        "--proxy-uid", "1", "--proxy-gid", "2", "--inbound-port", "3", "--outbound-port", "4",
        "--skip-inbound-ports", "5", "--skip-outbound-ports", "6", "--skip-subnets",
        "10.0.0.0/8", "--skip-outbound-subnets", "fd00::/8", "--redirect-ports", "7-8",
        "--ipv6"))
    assert opts == InitOptions(
        proxy_uid=1, proxy_gid=2, inbound_port=3, outbound_port=4,
        skip_inbound_ports=(P(5, 5),), skip_outbound_ports=(P(6, 6),),
        skip_subnets=(ipaddress.ip_network("10.0.0.0/8"),),
        skip_outbound_subnets=(ipaddress.ip_network("fd00::/8"),),
        redirect_ports=(P(7, 8),), ipv6=True)


@pytest.mark.parametrize(("content", "expected"), [
    (None, False), ("", False),
    ("00000000000000000000000000000001 01 80 10 80       lo\n", True),
])
def test_ipv6_default_follows_if_inet6(tmp_path: Path, content: str | None,
                                       expected: bool) -> None:
    """IPv6 is on by default only when the namespace lists an IPv6 address."""
    path = tmp_path / "if_inet6"
    if content is not None:
        path.write_text(content)
    assert cli.ipv6_default(path) is expected
