"""The DNS namers: pure answer handling and refresh timing, then a real dnsmasq server."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.nameserver
import dns.resolver
import pytest
from hypothesis import given
from hypothesis import strategies as st
from namer_scenario import Reports, run, wait_state

from appliance.discovery.base import NEG, Address, AddrState, NamerContext, bound
from appliance.discovery.dns import (
    ZERO_WEIGHT,
    Answer,
    Refresh,
    SrvRecord,
    host_lookup,
    parse_host_name,
    parse_nameserver,
    parse_srv_name,
    srv_addresses,
    srv_lookup,
)
from appliance.net.namer_dns import DnsNamer, DnsSrvNamer

# -- pure: names, answers, schedule ------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    (("web.example", "8080"), ("web.example.", 8080)),
    (("web.example.", "80"), ("web.example.", 80)),
    (("10.0.0.1", "80"), ("10.0.0.1", 80)),
    (("::1", "80"), ("::1", 80)),
])
def test_parse_host_name(name: tuple[str, ...], expected: tuple[str, int]) -> None:
    """A dns name is a host made absolute (IP literals kept) and a port."""
    assert parse_host_name(name) == expected


@pytest.mark.parametrize(("name", "message"), [
    (("web",), "got 1 segments"),
    (("web", "http"), "bad port 'http'"),
    (("bad host", "80"), "bad host"),
])
def test_parse_host_name_rejects(name: tuple[str, ...], message: str) -> None:
    """Malformed dns names say what is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_host_name(name)


def test_parse_srv_name() -> None:
    """SRV names are absolute domain names; an address is refused."""
    assert parse_srv_name(("_http._tcp.web.example",)) == "_http._tcp.web.example."
    with pytest.raises(ValueError, match="not the address"):
        parse_srv_name(("10.0.0.1",))


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
])
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    """ip[:port] with IPv6 bare or bracketed; port 53 by default."""
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("dns.example", "expected an IP address, optionally with :port"),
    ("dns.example:53", "expected an IP address, not a name"),
    ("127.0.0.1:0", "bad port 0"),
    (53, r"expected \"ip\[:port\]\""),
])
def test_parse_nameserver_rejects(text: Any, message: str) -> None:
    """Nameservers are IP addresses with a valid port."""
    with pytest.raises(ValueError, match=message):
        parse_nameserver(text)


A = Answer(("10.0.0.1", "10.0.0.2"), ttl=60)
AAAA = Answer(("::1",), ttl=30)
NODATA = Answer(ttl=None)
NX = Answer(nxdomain=True, ttl=5)


@pytest.mark.parametrize(("a", "aaaa", "state", "ttl"), [
    (A, AAAA, bound([Address("10.0.0.1", 80), Address("10.0.0.2", 80), Address("::1", 80)]),
     30),
    (A, NODATA, bound([Address("10.0.0.1", 80), Address("10.0.0.2", 80)]), 60),
    (NODATA, NODATA, bound([]), None),
    (NX, NX, NEG, 5),
    (A, NX, bound([Address("10.0.0.1", 80), Address("10.0.0.2", 80)]), 5),
])
def test_host_lookup(a: Answer, aaaa: Answer, state: AddrState, ttl: float | None) -> None:
    """A and AAAA merge; NXDOMAIN only when nothing was found; the smallest TTL wins."""
    lookup = host_lookup(a, aaaa, 80)
    assert (lookup.state, lookup.ttl) == (state, ttl)


def srv(priority: int, weight: int, port: int, target: str) -> SrvRecord:
    return SrvRecord(priority, weight, port, target)


T1, T2, T3 = "t1.example.", "t2.example.", "t3.example."
TARGETS = {T1: Answer(("10.0.0.1",), 10), T2: Answer(("10.0.0.2", "::2"), 20),
           T3: Answer(("10.0.0.3",), 30), "dead.": Answer(nxdomain=True)}


@pytest.mark.parametrize(("records", "expected"), [
    ([srv(0, 10, 80, T1), srv(0, 30, 81, T2)],
     {Address("10.0.0.1", 80, 10), Address("10.0.0.2", 81, 15), Address("::2", 81, 15)}),
    ([srv(1, 10, 80, T1), srv(0, 5, 80, T3)], {Address("10.0.0.3", 80, 5)}),
    ([srv(0, 5, 80, "dead."), srv(1, 7, 80, T1)], {Address("10.0.0.1", 80, 7)}),
    ([srv(0, 0, 80, T1), srv(0, 0, 80, T3)], {Address("10.0.0.1", 80), Address("10.0.0.3", 80)}),
    ([srv(0, 0, 80, T1), srv(0, 4, 80, T3)],
     {Address("10.0.0.1", 80, ZERO_WEIGHT), Address("10.0.0.3", 80, 4)}),
    ([srv(0, 2, 80, T1), srv(0, 3, 80, T1)], {Address("10.0.0.1", 80, 5)}),
    ([srv(0, 1, 80, ".")], set()),
    ([], set()),
])
def test_srv_addresses(records: list[SrvRecord], expected: set[Address]) -> None:
    """Lowest usable priority; weights split over a target's addresses and summed on
    duplicates; weight 0 is tiny beside weights, equal among zeros; "." is no service."""
    assert srv_addresses(records, TARGETS) == frozenset(expected)


def test_srv_lookup_neg_and_ttl() -> None:
    """NXDOMAIN for the SRV name is neg; the TTL is the smallest over SRV and targets."""
    assert srv_lookup(Answer(nxdomain=True, ttl=7), TARGETS).state == NEG
    lookup = srv_lookup(Answer((srv(0, 1, 80, T2), srv(0, 1, 80, T3)), ttl=100), TARGETS)
    assert lookup.ttl == 20 and len(lookup.state.addrs) == 3


@pytest.mark.parametrize(("ttl", "delay"), [(0, 1.0), (0.5, 1.0), (42, 42.0), (3600, 300.0),
                                            (None, 30.0)])
def test_refresh_after_answer_clamps_ttl(ttl: float | None, delay: float) -> None:
    """The next resolution is the TTL clamped to [min_ttl, max_ttl], 30 s if unknown."""
    assert Refresh(1.0, 300.0, random.Random(0)).after_answer(ttl) == delay


def test_refresh_backoff_doubles_to_cap_and_resets() -> None:
    """Failures back off 1, 2, 4... capped at 30 s, jittered in the upper half; an answer
    resets the count."""
    rng = random.Random(7)
    refresh = Refresh(1.0, 300.0, rng)
    expected = [1, 2, 4, 8, 16, 30, 30]
    for ceiling in expected:
        assert ceiling / 2 <= refresh.after_failure() <= ceiling
    refresh.after_answer(10)
    assert refresh.after_failure() <= 1.0


@given(st.floats(0.01, 100), st.floats(0.01, 1000), st.integers(0, 100),
       st.one_of(st.none(), st.floats(0, 1e6)))
def test_refresh_delays_stay_in_bounds(lo: float, span: float, failures: int,
                                       ttl: float | None) -> None:
    """Every delay lies within [min_ttl/2, max_ttl]; answers within [min_ttl, max_ttl]."""
    refresh = Refresh(lo, lo + span, random.Random(failures))
    for _ in range(failures):
        assert lo / 2 <= refresh.after_failure() <= lo + span
    assert lo <= refresh.after_answer(ttl) <= lo + span


@pytest.mark.parametrize(("options", "message"), [
    ({"nameservers": "127.0.0.1"}, "nameservers: expected a non-empty list"),
    ({"nameservers": []}, "nameservers: expected a non-empty list"),
    ({"nameservers": ["dns.example"]}, "nameservers: bad nameserver 'dns.example'"),
    ({"nameservers": ["127.0.0.1"], "min_ttl": 10, "max_ttl": 5}, "min_ttl: must be"),
    ({"nameservers": ["127.0.0.1"], "timeout": -1}, "timeout: bad value -1"),
    ({"nameservers": ["127.0.0.1"], "ttl": 1}, "ttl: unknown option"),
])
def test_from_options_names_the_option(options: dict[str, Any], message: str) -> None:
    """Each bad option is refused with its name first."""
    with pytest.raises(ValueError, match=message):
        DnsNamer.from_options(options, NamerContext(spawn=lambda coro: None))


def test_ip_literal_and_bad_names_need_no_source() -> None:
    """An IP host is bound at once; malformed names are neg; neither starts a loop."""
    spawned: list[Any] = []
    ctx = NamerContext(spawn=spawned.append)
    namer = DnsNamer.from_options({"nameservers": ["127.0.0.1"]}, ctx)
    assert namer.watch(("10.0.0.1", "80")).state == bound([Address("10.0.0.1", 80)])
    assert namer.watch(("web", "http")).state.kind == "neg"
    srv_namer = DnsSrvNamer.from_options({"nameservers": ["127.0.0.1"]}, ctx)
    assert srv_namer.watch(("a", "b")).state.kind == "neg"
    assert spawned == []


# -- a real DNS server --------------------------------------------------------------------

def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free UDP+TCP port")


class Dnsmasq:
    """dnsmasq as our child on 127.0.0.1: hosts from a file (reloaded on SIGHUP), SRV and
    host records from flags, TTL 1 s, NXDOMAIN for unknown names under ``example``."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_udp_tcp_port()
        self.hosts = tmp / "hosts"
        self.hosts.write_text("")
        self.hosts.chmod(0o644)
        self.records: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = ["dnsmasq", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-daemon",
                "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={self.port}",
                "--local-ttl=1", "--local=/example/", f"--addn-hosts={self.hosts}",
                "--pid-file=", "--host-record=ready.example,127.0.0.254", *self.records]
        # as root, dnsmasq would drop to "nobody", who cannot re-read the hosts file
        # under pytest's private tmp directory on SIGHUP
        self.proc = subprocess.Popen([*argv, "--user=root"] if os.geteuid() == 0 else argv,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10.0) -> None:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", self.port)]
        resolver.lifetime = 0.2
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.proc.communicate()[1]!r}")
            try:
                resolver.resolve("ready.example.", "A")
                return
            except dns.exception.DNSException:
                time.sleep(0.05)
        raise AssertionError(f"dnsmasq not answering on port {self.port} after {timeout}s")

    def set_hosts(self, text: str) -> None:
        self.hosts.write_text(text)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq not installed (apt-get install dnsmasq-base); the DNS namer "
                    "tests need a real server")
    server = Dnsmasq(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def options(server: Dnsmasq, **extra: Any) -> dict[str, Any]:
    return {"nameservers": [f"127.0.0.1:{server.port}"], "min_ttl": 0.1, "timeout": 0.5,
            **extra}


def test_a_and_aaaa(dnsmasq: Dnsmasq) -> None:
    """/#/dns/web.example/8080 is bound to the name's IPv4 and IPv6 addresses."""
    dnsmasq.hosts.write_text("127.0.0.5 web.example\n::5 web.example\n")
    dnsmasq.start()

    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        namer = DnsNamer.from_options(options(dnsmasq), ctx)
        state = await wait_state(namer.watch(("web.example", "8080")),
                                 lambda s: s.kind != "pending")
        assert state == bound([Address("127.0.0.5", 8080), Address("::5", 8080)])
        namer.close()
    reports = run(scenario)
    assert reports[0] == ("dns", ("web.example", "8080"), True, "")


def test_srv_with_weights_and_priorities(dnsmasq: Dnsmasq) -> None:
    """SRV targets resolve to addresses with the records' ports and weights; a backup
    priority is left out while the first has targets."""
    dnsmasq.records = [
        "--srv-host=_http._tcp.web.example,t1.example,8080,0,10",
        "--srv-host=_http._tcp.web.example,t2.example,8081,0,30",
        "--srv-host=_http._tcp.web.example,t3.example,9090,1,5",
        "--host-record=t1.example,127.0.0.11",
        "--host-record=t2.example,127.0.0.12,::12",
        "--host-record=t3.example,127.0.0.13",
    ]
    dnsmasq.start()

    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        namer = DnsSrvNamer.from_options(options(dnsmasq), ctx)
        state = await wait_state(namer.watch(("_http._tcp.web.example",)),
                                 lambda s: s.kind != "pending")
        assert state == bound([Address("127.0.0.11", 8080, 10.0),
                               Address("127.0.0.12", 8081, 15.0),
                               Address("::12", 8081, 15.0)])
        namer.close()
    run(scenario)


def test_ttl_refresh_picks_up_a_changed_record(dnsmasq: Dnsmasq) -> None:
    """When the 1 s TTL runs out the name is resolved again and a changed record is seen."""
    dnsmasq.hosts.write_text("127.0.0.5 web.example\n")
    dnsmasq.start()

    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        namer = DnsNamer.from_options(options(dnsmasq), ctx)
        watch = namer.watch(("web.example", "80"))
        await wait_state(watch, lambda s: s == bound([Address("127.0.0.5", 80)]))
        dnsmasq.set_hosts("127.0.0.6 web.example\n")
        await wait_state(watch, lambda s: s == bound([Address("127.0.0.6", 80)]))
        namer.close()
    reports = run(scenario)
    assert len(reports) >= 2 and all(r[2] for r in reports)


def test_nxdomain_is_neg(dnsmasq: Dnsmasq) -> None:
    """A name the server says does not exist is neg, and that is a good answer."""
    dnsmasq.start()

    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        namer = DnsNamer.from_options(options(dnsmasq), ctx)
        srv_namer = DnsSrvNamer.from_options(options(dnsmasq), ctx)
        assert await wait_state(namer.watch(("nope.example", "80")),
                                lambda s: s.kind != "pending") == NEG
        assert await wait_state(srv_namer.watch(("_http._tcp.nope.example",)),
                                lambda s: s.kind != "pending") == NEG
        namer.close()
        srv_namer.close()
    reports = run(scenario)
    assert {r[2] for r in reports} == {True}


def test_server_down_keeps_last_good_and_recovers(dnsmasq: Dnsmasq) -> None:
    """With the server gone the last good set stays (stale) and the failure is reported;
    when it is back the set is fresh again and that is reported too."""
    dnsmasq.hosts.write_text("127.0.0.5 web.example\n")
    dnsmasq.start()
    good = bound([Address("127.0.0.5", 80)])

    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        namer = DnsNamer.from_options(options(dnsmasq, timeout=0.3), ctx)
        watch = namer.watch(("web.example", "80"))
        await wait_state(watch, lambda s: s == good)
        dnsmasq.stop()
        stale = await wait_state(watch, lambda s: s.stale)
        assert stale.kind == "bound" and stale.addrs == good.addrs
        assert "web.example." in stale.error
        assert any(not ok and error == stale.error for _, _, ok, error in reports)
        dnsmasq.start()
        await wait_state(watch, lambda s: s == good, timeout=15.0)
        assert reports[-1] == ("dns", ("web.example", "80"), True, "")
        namer.close()
    run(scenario)


def test_server_down_from_the_start_is_failed() -> None:
    """With no good answer ever, an unreachable server makes the name failed."""
    port = free_udp_tcp_port()

    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        namer = DnsNamer.from_options({"nameservers": [f"127.0.0.1:{port}"], "timeout": 0.2},
                                      ctx)
        state = await wait_state(namer.watch(("web.example", "80")),
                                 lambda s: s.kind != "pending")
        assert state.kind == "failed" and state.error
        namer.close()
    reports = run(scenario)
    assert reports[0][2] is False


def test_a_dead_first_nameserver_falls_through_to_the_next(dnsmasq: Dnsmasq) -> None:
    """With the first listed nameserver down, the second one answers the lookup."""
    dnsmasq.hosts.write_text("127.0.0.5 web.example\n")
    dnsmasq.start()
    dead = free_udp_tcp_port()

    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        namer = DnsNamer.from_options(
            {"nameservers": [f"127.0.0.1:{dead}", f"127.0.0.1:{dnsmasq.port}"], "timeout": 3},
            ctx)
        state = await wait_state(namer.watch(("web.example", "80")),
                                 lambda s: s.kind != "pending")
        assert state == bound([Address("127.0.0.5", 80)])
        namer.close()
    run(scenario)
