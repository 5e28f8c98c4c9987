"""A test network of hosts in network namespaces, for netns-tests, the demo and benchmarks.

Theory of operation. ``Network`` builds, per run, one "switch" namespace holding a Linux
bridge and one namespace per host, each joined to the bridge by a veth pair created
directly between the two namespaces (pyroute2), so nothing is ever added to the root
namespace: no links, addresses, routes or rules there. Hosts get ``eth0`` with the n-th
address of the subnet (from .2) and an up ``lo``; there is no default route, so traffic
can only reach the other hosts on the bridge.

Namespace names are ``<prefix>-<pid>-<random>-<host>`` (switch: ``...--sw``), so parallel
runs never collide and a stale set from a killed run can be found by its dead pid
(``reap_stale``). Interface names stay short (``eth0``, ``p2``...; Linux allows 15 chars).

Cleanup, pass or fail: ``close()`` (idempotent; also run by ``with`` and, as a last resort,
``atexit``) kills the process group of every process started with ``Host.popen``, then
SIGKILLs anything still inside our namespaces, then removes the namespaces, which destroys
the veths and the bridge with them. Waiting is always on a condition with a deadline.
"""

from __future__ import annotations

import atexit
import functools
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

_HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,19}$")
_OPEN: set[Network] = set()
StdIO = int | IO[Any] | None


class NetnsError(RuntimeError):
    """The harness could not build, use or tear down a test network."""


class CommandFailed(subprocess.CalledProcessError):
    """A ``Host.run`` command exited non-zero; ``str()`` includes the end of its stderr."""

    def __str__(self) -> str:
        tail = (self.stderr or "").strip()[-500:]
        return f"{super().__str__()}\nstderr: {tail}" if tail else super().__str__()


@dataclass(eq=False)
class Host:
    """One host: a namespace with ``eth0`` at ``addr`` on the test subnet."""

    name: str
    netns: str
    addr: str
    network: Network = field(repr=False)

    def argv(self, argv: Sequence[str], *, uid: int | None = None) -> list[str]:
        """``argv`` wrapped to run inside this namespace, as ``uid`` (and gid) if given."""
        wrapped = [_tool("ip"), "netns", "exec", self.netns]
        if uid is not None:
            wrapped += [_tool("setpriv"), f"--reuid={uid}", f"--regid={uid}",
                        "--clear-groups"]
        return wrapped + [str(a) for a in argv]

    def run(self, argv: Sequence[str], *, uid: int | None = None, check: bool = True,
            timeout: float = 30.0, input: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run to completion inside the namespace; text output captured. On timeout the
        whole process group is killed and ``subprocess.TimeoutExpired`` raised."""
        proc = subprocess.Popen(
            self.argv(argv, uid=uid), stdin=subprocess.PIPE if input is not None else
            subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=None if env is None else dict(env), start_new_session=True)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, grace=0.0)
            proc.communicate()
            raise
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and done.returncode != 0:
            raise CommandFailed(done.returncode, proc.args, out, err)
        return done

    def popen(self, argv: Sequence[str], *, uid: int | None = None,
              env: Mapping[str, str] | None = None, stdin: StdIO = subprocess.DEVNULL,
              stdout: StdIO = subprocess.DEVNULL, stderr: StdIO = None,
              text: bool = True) -> subprocess.Popen[str]:
        """Start a background process in its own process group; it is killed on close.

        stderr is inherited by default, so pytest shows it with a failing test."""
        proc = subprocess.Popen(self.argv(argv, uid=uid), stdin=stdin, stdout=stdout,
                                stderr=stderr, text=text, start_new_session=True,
                                env=None if env is None else dict(env))
        self.network._track(proc)
        return proc

    def wait_for_port(self, port: int, timeout: float = 10.0, *,
                      proc: subprocess.Popen[Any] | None = None) -> None:
        """Block until something listens on TCP ``port`` here; see ``wait_for_port``."""
        wait_for_port(self, port, timeout, proc=proc)


class Network:
    """Hosts in namespaces on one bridge. Use as a context manager, or call close()."""

    def __init__(self, name_prefix: str, hosts: Sequence[str],
                 subnet: str = "198.18.0.0/24") -> None:
        self.prefix = _check_prefix(name_prefix)
        self.subnet = ipaddress.IPv4Network(subnet)
        self.base = f"{self.prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch_netns = f"{self.base}--sw"
        self.hosts: dict[str, Host] = {}
        self._owner_pid = os.getpid()
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._closed = False
        addrs = _addresses(self.subnet, _check_hosts(hosts))
        _OPEN.add(self)
        try:
            self._build(dict(zip(hosts, addrs, strict=True)))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this network created (switch first)."""
        return list(self._created)

    def _build(self, addrs: dict[str, str]) -> None:
        self._add_netns(self.switch_netns)
        with IPRoute(netns=self.switch_netns, flags=0) as sw:
            _up(sw, "lo")
            sw.link("add", ifname="br0", kind="bridge", br_forward_delay=0)
            _up(sw, "br0")
        for index, (name, addr) in enumerate(addrs.items()):
            host = Host(name=name, netns=f"{self.base}-{name}", addr=addr, network=self)
            self._add_netns(host.netns)
            self._wire(host, f"p{index + 2}")
            self.hosts[name] = host

    def _add_netns(self, name: str) -> None:
        pr_netns.create(name)
        self._created.append(name)

    def _wire(self, host: Host, port: str) -> None:
        """veth ``port`` (switch, on br0) <-> ``eth0`` (host), created inside the switch."""
        with IPRoute(netns=self.switch_netns, flags=0) as sw:
            sw.link("add", ifname=port, kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": host.netns})
            bridge = sw.link_lookup(ifname="br0")[0]
            sw.link("set", index=sw.link_lookup(ifname=port)[0], master=bridge, state="up")
        with IPRoute(netns=host.netns, flags=0) as ns:
            _up(ns, "lo")
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=host.addr, prefixlen=self.subnet.prefixlen)
            ns.link("set", index=eth0, state="up")

    def _track(self, proc: subprocess.Popen[Any]) -> None:
        if self._closed:
            _kill_group(proc, grace=0.0)
            raise NetnsError(f"network {self.base} is closed")
        self._procs.append(proc)

    def close(self) -> None:
        """Kill our processes, then remove our namespaces. Safe to call more than once."""
        if self._closed or os.getpid() != self._owner_pid:
            return  # a forked child must not tear down its parent's network
        self._closed = True
        _OPEN.discard(self)
        errors: list[str] = []  # keep going: every later step still frees something
        for proc in self._procs:
            try:
                _kill_group(proc, grace=2.0)
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"pid {proc.pid}: {exc}")
        try:
            _kill_inside(self._created)
        except NetnsError as exc:
            errors.append(str(exc))
        for name in reversed(self._created):
            try:
                pr_netns.remove(name)
            except OSError as exc:
                errors.append(f"{name}: {exc}")
        if errors:
            raise NetnsError(f"cleanup of {self.base} incomplete: " + "; ".join(errors))


def wait_for_port(host: Host, port: int, timeout: float = 10.0, *,
                  proc: subprocess.Popen[Any] | None = None, interval: float = 0.02) -> None:
    """Poll ``ss -ltn`` inside ``host`` until TCP ``port`` has a listener.

    Raises TimeoutError after ``timeout`` seconds, or NetnsError at once if ``proc`` (the
    process expected to listen) has exited."""
    deadline = time.monotonic() + timeout
    query = [_tool("ss"), "-Hltn", f"sport = :{port}"]
    while True:
        if proc is not None and proc.poll() is not None:
            raise NetnsError(f"{host.name}: process exited ({proc.returncode}) before "
                             f"listening on :{port}: {proc.args!r}")
        if host.run(query, timeout=max(1.0, timeout)).stdout.strip():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host.name} ({host.netns}): nothing listening on "
                               f"TCP :{port} after {timeout:.1f}s")
        time.sleep(interval)


def reap_stale(name_prefix: str) -> list[str]:
    """Remove namespaces ``<prefix>-<pid>-...`` whose creating process is gone."""
    pattern = re.compile(rf"^{re.escape(name_prefix)}-(\d+)-[0-9a-f]{{6}}-")
    stale = [n for n in pr_netns.listnetns()
             if (m := pattern.match(n)) and not _alive(int(m.group(1)))]
    _kill_inside(stale)
    for name in stale:
        pr_netns.remove(name)
    return stale


def _check_prefix(prefix: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
        raise ValueError(f"name_prefix {prefix!r}: 1-8 lowercase letters/digits, "
                         "starting with a letter")
    return prefix


def _check_hosts(hosts: Sequence[str]) -> Sequence[str]:
    bad = [h for h in hosts if not _HOST_NAME.match(h)]
    if bad or not hosts or len(set(hosts)) != len(hosts):
        raise ValueError(f"hosts {list(hosts)!r}: need unique names of 1-20 characters "
                         "[a-z0-9_], starting with a letter or digit")
    return hosts


def _addresses(subnet: ipaddress.IPv4Network, hosts: Sequence[str]) -> list[str]:
    """``.2``, ``.3``, ... of the subnet (``.1`` is left for a gateway)."""
    first = int(subnet.network_address) + 2
    if first + len(hosts) - 1 >= int(subnet.broadcast_address):
        raise ValueError(f"subnet {subnet} is too small for {len(hosts)} hosts")
    return [str(ipaddress.IPv4Address(first + i)) for i in range(len(hosts))]


@functools.cache
def _tool(name: str) -> str:
    """Absolute path of a harness tool, so a caller's ``env`` (PATH) affects only its
    own command, never how we enter the namespace."""
    path = shutil.which(name)
    if path is None:
        raise NetnsError(f"{name} not found on PATH (needed by the netns harness)")
    return path


def _up(ipr: IPRoute, ifname: str) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(proc: subprocess.Popen[Any], *, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds, reap the leader."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            proc.wait(timeout=grace if grace > 0 else 5.0)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5.0)
    _signal_group(proc.pid, signal.SIGKILL)  # children that outlived their leader
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_inside(namespaces: Sequence[str], timeout: float = 5.0) -> None:
    """SIGKILL every process still in one of ``namespaces``; wait until none is left."""
    wanted = set(namespaces)
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for ns, ps in pr_netns.ns_pids().items() if ns in wanted for p in ps]
        if not pids:
            return
        if time.monotonic() >= deadline:
            raise NetnsError(f"processes {pids} would not die in {sorted(wanted)}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


@atexit.register
def _close_all() -> None:
    for network in list(_OPEN):
        try:
            network.close()
        except NetnsError:
            pass
