"""``appliance vm``: run one workload meshed in its own network namespace on a host.

Theory of operation. ``appliance vm --name web -- CMD...`` (as root):

1. creates the namespace ``appliance-vm-<name>`` and a veth pair: ``apv-<name>`` stays in
   the host namespace (or ``--host-netns``) with the first address of a /30 (or /31)
   link, ``eth0`` moves into the new namespace with the second; inside, ``lo`` comes up
   and the default route points at the host's end. The only thing added to the host
   namespace is that link and its address, whose connected route covers the link alone;
2. runs ``appliance init`` inside (the nat rules), then ``appliance proxy`` inside as UID
   2102, and waits until its ``/ready`` answers 200;
3. runs CMD inside, as ``--user`` if given, and waits. The workload's connections go
   through the proxy exactly as in a Kubernetes pod;
4. on the workload's exit, a SIGTERM/SIGINT/SIGHUP, or the proxy's death, tears down in
   reverse: SIGTERM to the workload's process group (SIGKILL after ``--grace``), the same
   for the proxy, SIGKILL to anything still in the namespace, then the namespace is
   deleted, which deletes both ends of the veth and with them every rule inside. Each
   step runs even if an earlier one failed; waits are bounded.

If ``appliance vm`` itself is SIGKILLed nothing can clean up: ``appliance vm --cleanup
--name web`` removes what is left (the systemd unit in docs/vm.md runs it before start
and after stop). Exit status: the workload's, 128+N when stopped by signal N, 1 when the
mesh could not be set up or the proxy died, 2 bad arguments, 3 not root.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

EXIT_FAILED, EXIT_USAGE, EXIT_PERMISSION = 1, 2, 3
NS_PREFIX = "appliance-vm-"
LINK_PREFIX = "apv-"
DEFAULT_POOL = ipaddress.IPv4Network("198.19.0.0/16")  # benchmarking range (RFC 2544)
PROXY_UID = 2102
ADMIN_PORT = 4191
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,10}$")  # "apv-" + 11 chars = 15 (IFNAMSIZ - 1)


class VmError(Exception):
    """Setup or teardown failed; the message says which step and why."""


@dataclass(frozen=True, kw_only=True)
class VmPlan:
    """Names and addresses of one VM-mode workload (pure; see ``make_plan``)."""

    name: str
    netns: str
    host_link: str
    host_netns: str | None
    host_addr: ipaddress.IPv4Interface
    ns_addr: ipaddress.IPv4Interface
    command: tuple[str, ...]
    user: tuple[int, int] | None = None
    iptables_mode: str = "auto"
    init_args: tuple[str, ...] = ()
    proxy_args: tuple[str, ...] = ()
    ready_timeout: float = 30.0
    grace: float = 10.0

    def describe(self) -> str:
        """What ``--dry-run`` prints."""
        user = "as it is" if self.user is None else f"as {self.user[0]}:{self.user[1]}"
        where = self.host_netns or "the host namespace"
        return "\n".join([
            f"namespace   {self.netns}",
            f"link        {self.host_link} ({where}) {self.host_addr} <-> eth0 "
            f"({self.netns}) {self.ns_addr}",
            f"route       default via {self.host_addr.ip} dev eth0 (inside)",
            f"rules       appliance init --iptables-mode {self.iptables_mode} "
            f"{' '.join(self.init_args)}".rstrip(),
            " ".join(["proxy       appliance proxy --set", f"instance_id={self.netns}",
                      *self.proxy_args, f"(uid {PROXY_UID})"]),
            f"workload    {' '.join(self.command)} ({user})",
        ]) + "\n"


def parse_link(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise VmError(f"--link: bad subnet {text!r} ({exc})") from None
    if net.prefixlen not in (30, 31):
        raise VmError(f"--link: {text!r} must be a /30 or /31 (a point-to-point link whose "
                      "route covers nothing but the link)")
    return net


def link_addresses(net: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Interface, ...]:
    """(host end, namespace end): the two usable addresses of a /30, both of a /31."""
    hosts = list(net.hosts()) if net.prefixlen == 30 else list(net)
    return tuple(ipaddress.IPv4Interface(f"{a}/{net.prefixlen}") for a in hosts[:2])


def choose_link(taken: Iterable[ipaddress.IPv4Network],
                pool: ipaddress.IPv4Network = DEFAULT_POOL) -> ipaddress.IPv4Network:
    """The first /30 of ``pool`` that overlaps no network already on the host."""
    used = list(taken)
    for net in pool.subnets(new_prefix=30):
        if not any(net.overlaps(u) for u in used):
            return net
    raise VmError(f"no free /30 left in {pool}; give --link")


def parse_user(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)(?::(\d+))?", text.strip())
    if not m:
        raise VmError(f"--user: {text!r} is not UID or UID:GID")
    uid = int(m[1])
    gid = int(m[2]) if m[2] else uid
    if uid == PROXY_UID:
        raise VmError(f"--user: {uid} is the proxy's UID; its traffic would bypass the proxy")
    return uid, gid


def make_plan(args: argparse.Namespace, taken: Iterable[ipaddress.IPv4Network]) -> VmPlan:
    """Validate the flags into a plan; VmError names the bad flag."""
    if not _NAME.match(args.name or ""):
        raise VmError(f"--name: {args.name!r} must be 1-11 characters [a-z0-9-], starting "
                      "with a letter or digit (it names the namespace and the link)")
    if not args.command and not args.cleanup:
        raise VmError("no workload: give it after --, e.g. appliance vm --name web -- "
                      "/usr/bin/web-server --port 8080")
    net = parse_link(args.link) if args.link else choose_link(taken)
    host_addr, ns_addr = link_addresses(net)
    return VmPlan(name=args.name, netns=NS_PREFIX + args.name,
                  host_link=LINK_PREFIX + args.name, host_netns=args.host_netns,
                  host_addr=host_addr, ns_addr=ns_addr, command=tuple(args.command),
                  user=parse_user(args.user), iptables_mode=args.iptables_mode,
                  init_args=tuple(args.init_arg), proxy_args=tuple(
                      a for s in args.set for a in ("--set", s)),
                  ready_timeout=args.ready_timeout, grace=args.grace)


@dataclass
class _Stop:
    """Set by the signal handlers; the main loop polls it."""

    signum: int = 0
    handlers: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.handlers[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, old in self.handlers.items():
            signal.signal(sig, old)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signum = self.signum or signum


def _log(message: str) -> None:
    print(f"appliance vm: {message}", file=sys.stderr, flush=True)


def _ip(*args: str) -> list[str]:
    return ["ip", *args]


def _in_ns(plan: VmPlan, argv: Sequence[str], uid: tuple[int, int] | None = None) -> list[str]:
    wrapped = _ip("netns", "exec", plan.netns)
    if uid is not None:
        wrapped += ["setpriv", f"--reuid={uid[0]}", f"--regid={uid[1]}", "--clear-groups"]
    return wrapped + list(argv)


class VmRunner:
    """Brings one plan up, runs its workload, and always tears it down."""

    def __init__(self, plan: VmPlan) -> None:
        self.plan = plan
        self.proxy: subprocess.Popen[bytes] | None = None
        self.workload: subprocess.Popen[bytes] | None = None
        self.stop = _Stop()

    def run(self) -> int:
        self.stop.install()
        try:
            try:
                self.up()
            except VmError as exc:
                _log(f"error: {exc}")
                return EXIT_FAILED
            if self.stop.signum:
                return 128 + self.stop.signum
            return self.supervise()
        finally:
            errors = self.down()
            for error in errors:
                _log(f"cleanup: {error}")
            self.stop.restore()

    # --- bring up -------------------------------------------------------------------
    def up(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2 import netns as pr_netns

        p = self.plan
        if p.netns in pr_netns.listnetns():
            raise VmError(f"namespace {p.netns} exists (another run, or a stale one: "
                          f"appliance vm --cleanup --name {p.name})")
        pr_netns.create(p.netns)
        with IPRoute(**({"netns": p.host_netns} if p.host_netns else {})) as host:
            if host.link_lookup(ifname=p.host_link):
                raise VmError(f"link {p.host_link} exists (appliance vm --cleanup "
                              f"--name {p.name})")
            host.link("add", ifname=p.host_link, kind="veth",
                      peer={"ifname": "eth0", "net_ns_fd": p.netns})
            index = host.link_lookup(ifname=p.host_link)[0]
            _no_ipv6(p.host_link, p.host_netns)  # no fe80::/64, ff00::/8 routes on the host
            host.addr("add", index=index, address=str(p.host_addr.ip),
                      prefixlen=p.host_addr.network.prefixlen)
            host.link("set", index=index, state="up")
        with IPRoute(netns=p.netns) as ns:
            for name in ("lo", "eth0"):
                ns.link("set", index=ns.link_lookup(ifname=name)[0], state="up")
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=str(p.ns_addr.ip),
                    prefixlen=p.ns_addr.network.prefixlen)
            ns.route("add", dst="0.0.0.0/0", gateway=str(p.host_addr.ip), oif=eth0)
        _log(f"{p.netns}: eth0 {p.ns_addr} <-> {p.host_link} {p.host_addr}")
        self._init_rules()
        self._start_proxy()

    def _init_rules(self) -> None:
        argv = [sys.executable, "-m", "appliance", "init", "--iptables-mode",
                self.plan.iptables_mode, *self.plan.init_args]
        done = subprocess.run(_in_ns(self.plan, argv), capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise VmError(f"appliance init failed ({done.returncode}): "
                          f"{done.stderr.strip()[-500:]}")

    def _start_proxy(self) -> None:
        p = self.plan
        argv = [sys.executable, "-m", "appliance", "proxy", "--set",
                f"instance_id={p.netns}", *p.proxy_args]
        self.proxy = subprocess.Popen(_in_ns(p, argv, (PROXY_UID, PROXY_UID)),
                                      start_new_session=True)
        deadline = time.monotonic() + p.ready_timeout
        while not self._ready():
            if self.proxy.poll() is not None:
                raise VmError(f"the proxy exited ({self.proxy.returncode}) before ready")
            if self.stop.signum:
                return
            if time.monotonic() > deadline:
                raise VmError(f"the proxy was not ready after {p.ready_timeout:g}s")
            time.sleep(0.05)
        _log(f"proxy ready (pid {self.proxy.pid}, uid {PROXY_UID})")

    def _ready(self) -> bool:
        """GET /ready on the admin port, from inside the namespace."""
        from pyroute2 import netns as pr_netns

        pr_netns.pushns(self.plan.netns)
        try:
            sock = socket.socket()
        finally:
            pr_netns.popns()
        try:
            sock.settimeout(1.0)
            sock.connect(("127.0.0.1", ADMIN_PORT))
            sock.sendall(b"GET /ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return sock.recv(64).startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
        except OSError:
            return False
        finally:
            sock.close()

    # --- run ------------------------------------------------------------------------
    def supervise(self) -> int:
        p = self.plan
        self.workload = subprocess.Popen(_in_ns(p, p.command, p.user), start_new_session=True)
        _log(f"workload started (pid {self.workload.pid}): {' '.join(p.command)}")
        while True:
            code = self.workload.poll()
            if code is not None:
                _log(f"workload exited ({code})")
                return code if code >= 0 else 128 - code
            if self.stop.signum:
                _log(f"signal {self.stop.signum}: stopping")
                return 128 + self.stop.signum
            if self.proxy is not None and self.proxy.poll() is not None:
                _log(f"error: the proxy exited ({self.proxy.returncode}); stopping the "
                     "workload, which has no network without it")
                return EXIT_FAILED
            time.sleep(0.05)

    # --- tear down ------------------------------------------------------------------
    def down(self) -> list[str]:
        errors: list[str] = []
        for proc in (self.workload, self.proxy):
            if proc is not None:
                try:
                    _stop_group(proc, self.plan.grace)
                except (OSError, subprocess.SubprocessError) as exc:
                    errors.append(f"pid {proc.pid}: {exc}")
        errors += cleanup(self.plan.name, self.plan.host_netns)
        return errors


def _no_ipv6(link: str, netns: str | None) -> None:
    """Turn IPv6 off on the host's end of the link (it carries IPv4 only)."""
    from pyroute2 import netns as pr_netns

    if netns:
        pr_netns.pushns(netns)
    try:
        with open(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6", "w") as fh:
            fh.write("1")
    except FileNotFoundError:
        pass  # IPv6 is off in this kernel
    finally:
        if netns:
            pr_netns.popns()


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; reap the leader."""
    if proc.poll() is None:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    _killpg(proc.pid, signal.SIGKILL)  # whatever the leader left behind


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cleanup(name: str, host_netns: str | None = None, timeout: float = 10.0) -> list[str]:
    """Kill whatever runs in the namespace, delete it and the host's link end. Idempotent;
    returns the problems (empty when all is gone)."""
    from pyroute2 import IPRoute
    from pyroute2 import netns as pr_netns

    netns, link = NS_PREFIX + name, LINK_PREFIX + name
    errors: list[str] = []
    if netns in pr_netns.listnetns():
        deadline = time.monotonic() + timeout
        while pids := pr_netns.ns_pids().get(netns, []):
            if time.monotonic() > deadline:
                errors.append(f"processes {pids} would not die in {netns}")
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        try:
            pr_netns.remove(netns)
        except OSError as exc:
            errors.append(f"{netns}: {exc}")
    try:
        with IPRoute(**({"netns": host_netns} if host_netns else {})) as host:
            for index in host.link_lookup(ifname=link):
                host.link("del", index=index)
    except Exception as exc:  # noqa: BLE001 (pyroute2 raises several kinds)
        errors.append(f"{link}: {exc}")
    return errors


def host_networks(host_netns: str | None) -> list[ipaddress.IPv4Network]:
    """IPv4 networks of every address in the host namespace (for choose_link)."""
    from pyroute2 import IPRoute

    with IPRoute(**({"netns": host_netns} if host_netns else {})) as host:
        return [ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
                for a in host.get_addr(family=socket.AF_INET)]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``vm`` on the ``appliance`` subcommand parser."""
    p = sub.add_parser("vm", help="run a workload meshed in its own network namespace "
                                  "(a host or VM without Kubernetes; root)")
    p.add_argument("--name", required=True, help="names the namespace appliance-vm-NAME "
                                                 "and the link apv-NAME (1-11 chars)")
    p.add_argument("--link", metavar="CIDR", help="a /30 or /31 for the veth pair (default: "
                                                  f"the first free /30 in {DEFAULT_POOL})")
    p.add_argument("--host-netns", metavar="NS", help="put the link's host end in this "
                                                      "namespace instead of the host's own")
    p.add_argument("--user", metavar="UID[:GID]", help="run the workload as this user")
    p.add_argument("--iptables-mode", choices=["auto", "legacy", "nft"], default="auto")
    p.add_argument("--init-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for appliance init, e.g. --init-arg="
                        "--skip-inbound-ports=22 (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="proxy config field (repeatable); APPLIANCE_* and OTEL_* variables "
                        "in the environment reach the proxy too")
    p.add_argument("--ready-timeout", type=float, default=30.0, metavar="SECONDS")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="after SIGTERM, how long the workload and then the proxy get")
    p.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    p.add_argument("--cleanup", action="store_true",
                   help="remove what a killed run of --name left behind, then exit")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``appliance vm``; returns the exit code."""
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    try:
        if args.cleanup:
            make_plan(args, [])  # validates --name
            if os.geteuid() != 0:
                raise PermissionError
            errors = cleanup(args.name, args.host_netns)
            for error in errors:
                _log(f"cleanup: {error}")
            return EXIT_FAILED if errors else 0
        plan = make_plan(args, [] if args.link else host_networks(args.host_netns))
    except VmError as exc:
        _log(f"error: {exc}")
        return EXIT_USAGE
    except PermissionError:
        _log("error: needs root (network namespaces, veth links, iptables)")
        return EXIT_PERMISSION
    if args.dry_run:
        print(plan.describe(), end="")
        return 0
    if os.geteuid() != 0:
        _log("error: needs root (network namespaces, veth links, iptables)")
        return EXIT_PERMISSION
    return VmRunner(plan).run()
