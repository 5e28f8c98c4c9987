"""``appliance vm``: a workload brought up meshed in its own namespace and torn down with
nothing left over (namespace, link, route, rule, process), on exit, on signal, when the
proxy dies, and with ``--cleanup`` after a SIGKILL. Also the pure planning (tables).

Addresses are in 198.18.0.0/15. Most tests put the link's host end in a namespace of
their own (``--host-netns``), so the host namespace is not touched at all; one test uses
the default (host namespace) and checks that only the /30 link and its link route appear,
and that both are gone afterwards.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pr_netns

from appliance.telemetry import scrape
from init import vm

APPLIANCE = [sys.executable, "-m", "appliance"]

# The workload: one outbound GET to the host end (written to a file), then an HTTP server.
WORKLOAD = r"""
import http.server, sys, urllib.request
url, out = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(url, timeout=10) as resp:
    open(out, "w").write(resp.read().decode())
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"served from inside the vm namespace\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""
BACKEND = r"""
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from the host end\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 9000), H).serve_forever()
"""


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout}s")
        time.sleep(0.05)


def in_ns(ns: str, *argv: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout)


def marker_pids(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def host_state() -> tuple[str, str, str]:
    """The host namespace's addresses, routes and nat rules (both backends)."""
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True,
                            text=True).stdout
    rules = "".join(subprocess.run([tool, "-t", "nat", "-S"], capture_output=True,
                                   text=True).stdout for tool in ("iptables-legacy",
                                                                  "iptables-nft"))
    return addrs, routes, rules


class VmRun:
    """One ``appliance vm`` process started by a test, always cleaned up."""

    def __init__(self, tmp: Path, *flags: str, command: list[str]) -> None:
        self.name = f"t{os.getpid() % 10000}{secrets.token_hex(2)}"
        self.netns = vm.NS_PREFIX + self.name
        self.log = (tmp / f"{self.name}.log").open("w+")
        self.proc = subprocess.Popen([*APPLIANCE, "vm", "--name", self.name, *flags, "--",
                                      *command], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self) -> None:
        wait_for(f"workload not started:\n{self.text()}",
                 lambda: "workload started" in self.text() or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.text()

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def metrics(self) -> str:
        return in_ns(self.netns, "curl", "-s", "http://127.0.0.1:4191/metrics").stdout

    def close(self, host_netns: str | None) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        vm.cleanup(self.name, host_netns)
        self.log.close()


@pytest.fixture
def host_ns(root_required: None) -> Iterator[str]:
    """A namespace for the link's host end (named so the session reaper finds strays)."""
    name = f"nt-{os.getpid()}-{secrets.token_hex(3)}-vmhost"
    pr_netns.create(name)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        for pid in pr_netns.ns_pids().get(name, []):
            os.kill(pid, signal.SIGKILL)
        pr_netns.remove(name)


@pytest.fixture
def runs(tmp_path: Path, host_ns: str) -> Iterator[Callable[..., VmRun]]:
    made: list[tuple[VmRun, str | None]] = []

    def start(*flags: str, command: list[str], host: str | None = host_ns) -> VmRun:
        extra = ("--host-netns", host) if host else ()
        run = VmRun(tmp_path, *extra, *flags, command=command)
        made.append((run, host))
        return run

    yield start
    for run, host in made:
        run.close(host)


def assert_all_gone(run: VmRun, host_netns: str | None) -> None:
    assert run.netns not in pr_netns.listnetns()
    links = subprocess.run(["ip", *(["-n", host_netns] if host_netns else []), "-o", "link"],
                           capture_output=True, text=True).stdout
    assert f"{vm.LINK_PREFIX}{run.name}" not in links
    assert marker_pids(f"instance_id={run.netns}") == []  # the proxy


def test_workload_meshed_both_ways_then_sigterm_leaves_nothing(
        runs: Callable[..., VmRun], host_ns: str, tmp_path: Path) -> None:
    """Outbound and inbound go through the proxy; SIGTERM tears everything down."""
    before = host_state()
    backend = subprocess.Popen(["ip", "netns", "exec", host_ns, sys.executable, "-c",
                                BACKEND], start_new_session=True)
    out = tmp_path / "outbound.txt"
    marker = f"vmtest-{secrets.token_hex(4)}"
    try:
        wait_for("backend", lambda: in_ns(host_ns, "ss", "-Hltn", "sport = :9000").stdout)
        run = runs("--link", "198.18.202.0/30", command=[
            sys.executable, "-c", WORKLOAD, "http://198.18.202.1:9000/", str(out), marker])
        run.wait_ready()
        assert wait_for("outbound file", lambda: out.exists() and out.read_text()) \
            == "hello from the host end\n"
        got = wait_for("inbound answer", lambda: in_ns(
            host_ns, "curl", "-s", "--max-time", "5", "http://198.18.202.2:8080/").stdout)
        assert got == "served from inside the vm namespace\n"
        metrics = run.metrics()
        assert scrape.total(metrics, "request_total", direction="outbound") == 1, metrics
        assert scrape.total(metrics, "request_total", direction="inbound") == 1, metrics
        rules = in_ns(run.netns, "iptables-save", "-t", "nat").stdout + in_ns(
            run.netns, "iptables-legacy-save", "-t", "nat").stdout
        assert "APPLIANCE_OUTBOUND" in rules
        os.kill(run.proc.pid, signal.SIGTERM)
        assert run.wait_exit() == 128 + signal.SIGTERM, run.text()
        assert_all_gone(run, host_ns)
        assert marker_pids(marker) == []
        assert "signal 15: stopping" in run.text()
        assert host_state() == before
    finally:
        os.killpg(backend.pid, signal.SIGKILL)
        backend.wait(timeout=10)


def test_default_host_end_adds_only_the_link_and_removes_it(
        runs: Callable[..., VmRun], tmp_path: Path) -> None:
    """In the host namespace only the /30 link route appears, and the exit code passes."""
    flag = tmp_path / "go"
    wait_then_exit = ("import os, sys, time\nt = time.monotonic() + 30\n"
                      "while not os.path.exists(sys.argv[1]) and time.monotonic() < t:\n"
                      "    time.sleep(0.05)\nsys.exit(7)\n")
    addrs, routes, rules = host_state()
    run = runs("--link", "198.18.203.0/30", command=[sys.executable, "-c", wait_then_exit,
                                                     str(flag)], host=None)
    run.wait_ready()
    during = host_state()
    new_routes = set(during[1].splitlines()) - set(routes.splitlines())
    assert all(r.startswith(("198.18.203.0/30 dev apv-", "local 198.18.203.1 dev apv-",
                             "broadcast 198.18.203.3 dev apv-")) for r in new_routes), \
        new_routes
    assert any(r.startswith("198.18.203.0/30 dev apv-") for r in new_routes)
    assert during[2] == rules  # no rule in the host namespace
    flag.write_text("")
    assert run.wait_exit() == 7, run.text()
    assert_all_gone(run, None)
    assert host_state() == (addrs, routes, rules)


def test_proxy_death_stops_the_workload_and_cleans_up(runs: Callable[..., VmRun],
                                                      host_ns: str) -> None:
    """Killing the proxy ends the run with status 1 and nothing left behind."""
    marker = f"vmsleep-{secrets.token_hex(4)}"
    run = runs("--link", "198.18.204.0/30", "--grace", "2", command=[
        sys.executable, "-c", "import time, sys; time.sleep(60)", marker])
    run.wait_ready()
    proxies = marker_pids(f"instance_id={run.netns}")
    assert proxies
    for pid in proxies:
        os.kill(pid, signal.SIGKILL)
    assert run.wait_exit() == 1, run.text()
    assert "the proxy exited" in run.text()
    assert_all_gone(run, host_ns)
    assert marker_pids(marker) == []


def test_cleanup_after_sigkill(runs: Callable[..., VmRun], host_ns: str) -> None:
    """A SIGKILLed run leaves its namespace; --cleanup removes it, its link and processes."""
    marker = f"vmorphan-{secrets.token_hex(4)}"
    run = runs("--link", "198.18.205.0/30", command=[
        sys.executable, "-c", "import time; time.sleep(60)", marker])
    run.wait_ready()
    os.kill(run.proc.pid, signal.SIGKILL)
    run.wait_exit()
    assert run.netns in pr_netns.listnetns() and marker_pids(marker)
    again = subprocess.run([*APPLIANCE, "vm", "--name", run.name, "--host-netns", host_ns,
                            "--", "true"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and f"namespace {run.netns} exists" in again.stderr
    done = subprocess.run([*APPLIANCE, "vm", "--cleanup", "--name", run.name, "--host-netns",
                           host_ns], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert_all_gone(run, host_ns)
    assert wait_for("orphans to die", lambda: marker_pids(marker) == [], timeout=5)


def _args(**over: Any) -> argparse.Namespace:
    base = {"name": "web", "link": None, "host_netns": None, "user": None,
            "iptables_mode": "auto", "init_arg": [], "set": [], "ready_timeout": 30.0,
            "grace": 10.0, "cleanup": False, "command": ["app"]}
    return argparse.Namespace(**{**base, **over})


@pytest.mark.parametrize(("over", "needle"), [
    ({"name": "Web"}, "--name: 'Web' must be 1-11 characters"),
    ({"name": "a-very-long-name"}, "--name:"),
    ({"link": "198.18.0.0/24"}, "must be a /30 or /31"),
    ({"link": "198.18.0.1/30"}, "--link: bad subnet '198.18.0.1/30'"),
    ({"user": "2102"}, "--user: 2102 is the proxy's UID"),
    ({"user": "bob"}, "--user: 'bob' is not UID or UID:GID"),
    ({"command": []}, "no workload: give it after --"),
])
def test_plan_errors_name_the_flag(over: dict[str, Any], needle: str) -> None:
    """Bad flags are refused with a message naming the flag."""
    with pytest.raises(vm.VmError) as info:
        vm.make_plan(_args(**over), [])
    assert needle in str(info.value)


@pytest.mark.parametrize(("link", "host", "ns"), [
    ("198.18.9.0/30", "198.18.9.1/30", "198.18.9.2/30"),
    ("198.18.9.4/31", "198.18.9.4/31", "198.18.9.5/31"),
])
def test_link_addresses(link: str, host: str, ns: str) -> None:
    """A /30 uses its two host addresses, a /31 both of its addresses."""
    plan = vm.make_plan(_args(link=link, user="1000:100"), [])
    assert (str(plan.host_addr), str(plan.ns_addr), plan.user) == (host, ns, (1000, 100))


def test_choose_link_skips_networks_in_use() -> None:
    """The automatic /30 is the first in 198.19.0.0/16 overlapping nothing on the host."""
    taken = [ipaddress.IPv4Network("198.19.0.0/29"), ipaddress.IPv4Network("10.0.0.0/8")]
    assert vm.choose_link(taken) == ipaddress.IPv4Network("198.19.0.8/30")
    with pytest.raises(vm.VmError, match="no free /30 left in 198.19.0.0/16; give --link"):
        vm.choose_link([ipaddress.IPv4Network("198.19.0.0/16")])


def test_dry_run_prints_the_plan_and_changes_nothing() -> None:
    """--dry-run shows namespace, link, route, rules, proxy and workload."""
    done = subprocess.run([*APPLIANCE, "vm", "--name", "web", "--link", "198.18.9.0/30",
                           "--dry-run", "--", "my-app", "--port", "80"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "namespace   appliance-vm-web",
        "link        apv-web (the host namespace) 198.18.9.1/30 <-> eth0 (appliance-vm-web) "
        "198.18.9.2/30",
        "route       default via 198.18.9.1 dev eth0 (inside)",
        "rules       appliance init --iptables-mode auto",
        "proxy       appliance proxy --set instance_id=appliance-vm-web (uid 2102)",
        "workload    my-app --port 80 (as it is)",
    ]
    assert "appliance-vm-web" not in pr_netns.listnetns()
