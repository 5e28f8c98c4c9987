"""``appliance init``: plan and install (or remove) the nat rules for transparent proxying.

Flags and exit codes are documented in docs/init.md. Values are parsed here rather than by
argparse ``type=`` so each bad value gives one line naming the flag and the bad token.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from init import backends
from init.errors import EXIT_OK, EXIT_USAGE, BackendUnavailable, InitError
from init.plan import (
    Family,
    InitOptions,
    IPNetwork,
    PlanError,
    PortRange,
    parse_ports,
    parse_subnets,
    plan,
)

IF_INET6 = Path("/proc/net/if_inet6")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``init`` on the ``appliance`` subcommand parser."""
    p = sub.add_parser("init", help="install the iptables nat rules that redirect TCP "
                                    "to the proxy (run once per network namespace)")
    p.add_argument("--proxy-uid", default="2102", metavar="UID",
                   help="the proxy's UID; its own traffic is not redirected (2102)")
    p.add_argument("--proxy-gid", metavar="GID",
                   help="also exempt traffic of this GID (default: none)")
    p.add_argument("--inbound-port", default="4143", metavar="PORT",
                   help="the proxy's inbound listener (4143)")
    p.add_argument("--outbound-port", default="4140", metavar="PORT",
                   help="the proxy's outbound listener (4140)")
    p.add_argument("--skip-inbound-ports", default="", metavar="PORTS",
                   help="e.g. 22,8000-8010; 4190 and 4191 are always skipped")
    p.add_argument("--skip-outbound-ports", default="", metavar="PORTS",
                   help="destination ports the app reaches directly, e.g. 5432")
    p.add_argument("--skip-subnets", default="", metavar="CIDRS",
                   help="inbound source subnets left alone, e.g. 10.0.0.0/8,fd00::/8")
    p.add_argument("--skip-outbound-subnets", default="", metavar="CIDRS",
                   help="outbound destination subnets left alone")
    p.add_argument("--redirect-ports", default="", metavar="PORTS",
                   help="redirect only these inbound ports (default: all TCP)")
    p.add_argument("--iptables-mode", choices=backends.MODES, default="auto",
                   help="legacy (python-iptables), nft (iptables-nft) or auto (default)")
    p.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=None,
                   help="also plan ip6tables rules (default: on when the namespace has "
                        "an IPv6 address, per /proc/net/if_inet6)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the rules as iptables-restore text; change nothing")
    p.add_argument("--uninstall", action="store_true",
                   help="remove our hook rules and chains, nothing else")
    p.set_defaults(func=run)


def ipv6_default(if_inet6: Path = IF_INET6) -> bool:
    """IPv6 is on when the kernel lists at least one IPv6 address in this namespace
    (``::1`` on an up ``lo`` is enough); disabled IPv6 leaves the file empty or absent."""
    try:
        return bool(if_inet6.read_text().strip())
    except OSError:
        return False


def _int(value: str, flag: str, lo: int, hi: int) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        number = lo - 1
    if not lo <= number <= hi:
        raise PlanError(f"{flag}: bad value {value!r} (expected an integer {lo}-{hi})")
    return number


def options_from_args(args: argparse.Namespace) -> InitOptions:
    """Turn the flag strings into validated options; PlanError names the bad flag."""
    def ports(flag: str) -> tuple[PortRange, ...]:
        return parse_ports(getattr(args, flag[2:].replace("-", "_")), flag=flag)

    def subnets(flag: str) -> tuple[IPNetwork, ...]:
        return parse_subnets(getattr(args, flag[2:].replace("-", "_")), flag=flag)

    return InitOptions(
        proxy_uid=_int(args.proxy_uid, "--proxy-uid", 0, 2**32 - 2),
        proxy_gid=(None if args.proxy_gid is None
                   else _int(args.proxy_gid, "--proxy-gid", 0, 2**32 - 2)),
        inbound_port=_int(args.inbound_port, "--inbound-port", 1, 65535),
        outbound_port=_int(args.outbound_port, "--outbound-port", 1, 65535),
        skip_inbound_ports=ports("--skip-inbound-ports"),
        skip_outbound_ports=ports("--skip-outbound-ports"),
        skip_subnets=subnets("--skip-subnets"),
        skip_outbound_subnets=subnets("--skip-outbound-subnets"),
        redirect_ports=ports("--redirect-ports"),
        ipv6=ipv6_default() if args.ipv6 is None else args.ipv6,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``appliance init``; returns the exit code."""
    try:
        opts = options_from_args(args)
    except PlanError as exc:
        return _fail(str(exc), EXIT_USAGE)
    the_plan = plan(opts)
    families = [fp.family for fp in the_plan.families]
    if args.dry_run:
        text = (_uninstall_summary(["ipv4"] if args.ipv6 is False else ["ipv4", "ipv6"])
                if args.uninstall else the_plan.dry_run_text())
        print(text, end="")
        return EXIT_OK
    try:
        backends.check_privileges(args.iptables_mode)
        choice, reason = backends.resolve(args.iptables_mode)
        backend = backends.load(choice)
        if args.uninstall:
            removed = _uninstall(backend, explicit_ipv6=args.ipv6)
            _log(f"uninstalled ({backend.name} backend, {reason}): "
                 f"{', '.join(removed) or 'nothing of ours was installed'}")
        else:
            for fp in the_plan.families:
                backend.install(fp)
            _log(f"installed {', '.join(families)} nat rules "
                 f"({backend.name} backend, {reason})")
    except InitError as exc:
        return _fail(str(exc), exc.exit_code)
    return EXIT_OK


def _uninstall(backend: backends.Backend, *, explicit_ipv6: bool | None) -> list[Family]:
    """Remove ours from ipv4 and, unless --no-ipv6, from ipv6: an uninstall must not
    leave ip6tables rules behind just because IPv6 looks off in the namespace today."""
    removed: list[Family] = []
    families: list[Family] = ["ipv4"] if explicit_ipv6 is False else ["ipv4", "ipv6"]
    for family in families:
        try:
            if backend.uninstall(family):
                removed.append(family)
        except BackendUnavailable:
            if family == "ipv6" and explicit_ipv6 is None:
                continue  # no ip6 nat table here: nothing of ours can be in it
            raise
    return removed


def _uninstall_summary(families: Sequence[str]) -> str:
    lines = [f"# {f}: delete rules commented appliance/* outside our chains, then "
             "flush and delete APPLIANCE_INBOUND and APPLIANCE_OUTBOUND (nat table)"
             for f in families]
    return "\n".join(lines) + "\n"


def _log(message: str) -> None:
    print(f"appliance init: {message}", file=sys.stderr)


def _fail(message: str, code: int) -> int:
    _log(f"error: {message}")
    return code
