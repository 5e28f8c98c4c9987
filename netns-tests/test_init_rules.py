"""``appliance init`` in real network namespaces: exact tables, idempotency, clean
uninstall, and real redirects checked with SO_ORIGINAL_DST, for both backends.

Also checks the harness itself (init/netns.py): isolation and cleanup.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from init.netns import Host, Network
from init.plan import InitOptions, plan

MODES = ["legacy", "nft"]
PROXY_UID = 2102
INIT = [sys.executable, "-m", "appliance", "init"]

# A listener that answers each connection with one line: who answered, the local address
# and SO_ORIGINAL_DST (what the client dialled before any REDIRECT), then closes.
LISTENER = r"""
import socket, struct, sys
label, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(16)
while True:
    conn, _ = srv.accept()
    try:
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)
        oport, oaddr = struct.unpack("!2xH4s8x", raw)
        orig = f"{socket.inet_ntoa(oaddr)}:{oport}"
    except OSError:
        orig = "none"
    local = "%s:%d" % conn.getsockname()
    conn.sendall(f"{label} local={local} orig={orig}\n".encode())
    conn.close()
"""

ASK = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    print(s.makefile().readline().strip())
"""


def listen(host: Host, label: str, port: int, *, uid: int | None = None) -> None:
    """Start LISTENER on ``port`` in ``host`` and wait until it accepts."""
    proc = host.popen([sys.executable, "-c", LISTENER, label, str(port)], uid=uid)
    host.wait_for_port(port, timeout=10.0, proc=proc)


def ask(host: Host, addr: str, port: int, *, uid: int | None = None) -> str:
    """Connect from ``host`` to addr:port and return the listener's one-line answer."""
    done = host.run([sys.executable, "-c", ASK, addr, str(port)], uid=uid, timeout=15)
    return done.stdout.strip()


def init(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run([*INIT, *args], timeout=60)


def dump(host: Host, mode: str) -> dict[str, list[str]]:
    """The nat table of both families as iptables-save prints it, minus comments/counters."""
    out = {}
    for family, tool in (("ipv4", "iptables"), ("ipv6", "ip6tables")):
        text = host.run([f"{tool}-{mode}-save", "-t", "nat"]).stdout
        out[family] = [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines()
                       if line and not line.startswith("#")]
    return out


def ours(lines: list[str]) -> list[str]:
    return [line for line in lines if "APPLIANCE_" in line]


def add_foreign_rules(host: Host, mode: str) -> None:
    """Rules that are not ours, in the same table and chains, which must survive."""
    for tool in ("iptables", "ip6tables"):
        cmd = f"{tool}-{mode}"
        host.run([cmd, "-t", "nat", "-N", "OTHER_CHAIN"])
        host.run([cmd, "-t", "nat", "-A", "OTHER_CHAIN", "-p", "tcp", "--dport", "25",
                  "-j", "RETURN"])
        host.run([cmd, "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53",
                  "-j", "RETURN"])
        host.run([cmd, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "25",
                  "-j", "OTHER_CHAIN"])


@pytest.fixture
def solo(network: Callable[..., Network]) -> Host:
    return network("solo")["solo"]


@pytest.mark.parametrize("mode", MODES)
def test_install_writes_the_planned_rules_in_both_families(solo: Host, mode: str) -> None:
    """Install with defaults: exactly the planned rules, IPv6 on by default (lo has ::1)."""
    init(solo, "--iptables-mode", mode)
    expected = plan(InitOptions(ipv6=True))
    tables = dump(solo, mode)
    for family in ("ipv4", "ipv6"):
        fp = expected.family(family)  # type: ignore[arg-type]
        want = [f":{c.name} - [0:0]" for c in fp.chains]
        want += [r.line() for r in fp.hooks] + [r.line() for c in fp.chains for r in c.rules]
        assert ours(tables[family]) == want


@pytest.mark.parametrize("mode", MODES)
def test_install_twice_is_identical_and_uninstall_leaves_no_trace(solo: Host, mode: str) -> None:
    """Foreign rules present; install, install again (same dump), uninstall (pre dump)."""
    add_foreign_rules(solo, mode)
    other = "nft" if mode == "legacy" else "legacy"
    before, before_other = dump(solo, mode), dump(solo, other)
    init(solo, "--iptables-mode", mode, "--skip-outbound-ports", "22,8000-8010")
    first = dump(solo, mode)
    assert first != before and ours(first["ipv4"]) and ours(first["ipv6"])
    init(solo, "--iptables-mode", mode, "--skip-outbound-ports", "22,8000-8010")
    assert dump(solo, mode) == first
    assert dump(solo, other) == before_other  # the other backend was not touched
    init(solo, "--iptables-mode", mode, "--uninstall")
    assert dump(solo, mode) == before


@pytest.mark.parametrize("mode", MODES)
def test_reinstall_keeps_hooks_where_they_are(solo: Host, mode: str) -> None:
    """A rule appended after our hook stays after it: re-install does not move hooks."""
    init(solo, "--iptables-mode", mode, "--no-ipv6")
    solo.run([f"iptables-{mode}", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9",
              "-j", "RETURN"])
    snapshot = dump(solo, mode)
    output = [x for x in snapshot["ipv4"] if x.startswith("-A OUTPUT")]
    assert "appliance/outbound" in output[0] and "--dport 9" in output[1]
    init(solo, "--iptables-mode", mode, "--no-ipv6")
    assert dump(solo, mode) == snapshot


@pytest.mark.parametrize("mode", MODES)
def test_install_replaces_duplicated_hooks(solo: Host, mode: str) -> None:
    """A doubled hook (e.g. from a crashed script) ends up as exactly one."""
    init(solo, "--iptables-mode", mode, "--no-ipv6")
    hook = ["-p", "tcp", "-m", "comment", "--comment", "appliance/outbound",
            "-j", "APPLIANCE_OUTBOUND"]
    solo.run([f"iptables-{mode}", "-t", "nat", "-A", "OUTPUT", *hook])
    assert sum("appliance/outbound" in x for x in dump(solo, mode)["ipv4"]) == 2
    init(solo, "--iptables-mode", mode, "--no-ipv6")
    assert sum("appliance/outbound" in x for x in dump(solo, mode)["ipv4"]) == 1


@pytest.mark.parametrize("mode", MODES)
def test_outbound_redirect_keeps_the_original_destination(
        network: Callable[..., Network], mode: str) -> None:
    """App -> server:80 lands on :4140 with SO_ORIGINAL_DST = server:80; UID 2102 and
    skipped ports go straight to the server."""
    net = network("client", "server")
    client, server = net["client"], net["server"]
    listen(server, "server", 80)
    listen(server, "server", 8080)
    init(client, "--iptables-mode", mode, "--skip-outbound-ports", "8080")
    listen(client, "outbound", 4140, uid=PROXY_UID)

    assert ask(client, server.addr, 80) == (
        f"outbound local=127.0.0.1:4140 orig={server.addr}:80")
    assert ask(client, server.addr, 80, uid=PROXY_UID).startswith(
        f"server local={server.addr}:80 ")
    assert ask(client, server.addr, 8080).startswith(f"server local={server.addr}:8080 ")


@pytest.mark.parametrize("mode", MODES)
def test_inbound_redirect_keeps_the_original_destination(
        network: Callable[..., Network], mode: str) -> None:
    """Client -> server:80 lands on the server's :4143 with SO_ORIGINAL_DST = server:80;
    the admin port 4191 is never redirected."""
    net = network("client", "server")
    client, server = net["client"], net["server"]
    init(server, "--iptables-mode", mode)
    listen(server, "app", 80)
    listen(server, "inbound", 4143, uid=PROXY_UID)
    listen(server, "admin", 4191, uid=PROXY_UID)

    assert ask(client, server.addr, 80) == (
        f"inbound local={server.addr}:4143 orig={server.addr}:80")
    assert ask(client, server.addr, 4191).startswith(f"admin local={server.addr}:4191 ")


def test_network_hosts_reach_each_other_and_nothing_else(
        network: Callable[..., Network]) -> None:
    """Hosts get .2, .3 on eth0, only the link route, and can talk across the bridge."""
    net = network("a", "b")
    a, b = net["a"], net["b"]
    assert (a.addr, b.addr) == ("198.18.0.2", "198.18.0.3")
    assert a.run(["ip", "-4", "route"]).stdout.split()[:3] == ["198.18.0.0/24", "dev", "eth0"]
    assert "default" not in a.run(["ip", "route"]).stdout
    listen(b, "b", 7000)
    assert ask(a, b.addr, 7000).startswith("b local=198.18.0.3:7000 ")


def test_network_close_removes_namespaces_and_processes(
        network: Callable[..., Network]) -> None:
    """close() kills tracked and stray processes, removes every namespace, twice is fine."""
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    net = network("x")
    tracked = net["x"].popen(["sleep", "300"])
    names = net.namespaces
    net.close()
    net.close()
    assert tracked.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
    assert subprocess.run(["ip", "-o", "link"], capture_output=True,
                          text=True).stdout == root_links


@pytest.mark.parametrize(("legacy_rules", "expected"), [(True, "legacy"), (False, "nft")])
def test_auto_mode_follows_the_backend_already_in_use(
        solo: Host, legacy_rules: bool, expected: str) -> None:
    """auto: a namespace with legacy rules gets legacy; an empty one gets nft."""
    if legacy_rules:
        solo.run(["iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN"])
    done = init(solo, "--iptables-mode", "auto", "--no-ipv6")
    assert f"({expected} backend, auto:" in done.stderr
    other = "nft" if expected == "legacy" else "legacy"
    assert ours(dump(solo, expected)["ipv4"]) and not ours(dump(solo, other)["ipv4"])


@pytest.mark.parametrize(("argv", "env", "uid", "code"), [
    (["--iptables-mode", "nft"], None, PROXY_UID, 3),
    (["--iptables-mode", "legacy"], None, PROXY_UID, 3),
    (["--iptables-mode", "nft"], {"PATH": "/nonexistent"}, None, 4),
    (["--iptables-mode", "legacy"], {"XTABLES_LIBDIR": "/nonexistent"}, None, 4),
    (["--skip-outbound-ports", "80-x"], None, None, 2),
])
def test_failures_have_documented_exit_codes_and_change_nothing(
        solo: Host, argv: list[str], env: dict[str, str] | None, uid: int | None,
        code: int) -> None:
    """No privileges -> 3, backend cannot load -> 4, bad flag -> 2; one line, no rules."""
    before = {m: dump(solo, m) for m in MODES}
    done = solo.run([*INIT, *argv], uid=uid, check=False, timeout=60,
                    env=None if env is None else {**os.environ, **env})
    assert done.returncode == code, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("appliance init: error: ")
    assert {m: dump(solo, m) for m in MODES} == before
