"""The mesh is transparent, end to end: two hosts in namespaces, each with rules installed by
``appliance init`` and ``appliance proxy`` running as UID 2102, and unmodified apps
(``python3 -m http.server``, ``curl``, a TCP echo server) that know nothing about it.

Each test builds its own mesh (client and server host) for both iptables backends, so no
test depends on another's traffic; counters are compared as before/after deltas.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from meshpair import RAW_CLIENT, MeshPair, delta, eventually, meshed_pair

from appliance.telemetry import scrape
from init.mesh import ECHO_SERVER, PROXY_UID, MeshNode, start_app
from init.netns import Host, Network

MODES = ["legacy", "nft"]
HTTP_PORT = 8080
ECHO_PORT = 7777  # not a default opaque port: the bytes go through protocol detection
PAGE_NAME = "page.html"
# A page that spans several reads, with bytes a careless relay would mangle.
PAGE = (b"<html><body>appliance mesh e2e</body></html>\r\n" + bytes(range(256)) * 400)
VIA_CLIENT_OUT = "1.1 client-out (appliance)"
VIA_SERVER_IN = "1.1 server-in (appliance)"
# Counters that move only when new traffic reaches a proxy (not when old traffic closes).
TRAFFIC_COUNTERS = ("request_total", "response_total", "tcp_open_total", "proxy_errors_total")

# Sends a payload file, half-closes, writes everything echoed back to another file.
ECHO_CLIENT = r"""
import socket, sys, threading
host, port, src, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
payload = open(src, "rb").read()
sock = socket.create_connection((host, port), timeout=10)
def send():
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
sender = threading.Thread(target=send)
sender.start()
chunks = []
while data := sock.recv(65536):
    chunks.append(data)
sender.join()
open(dst, "wb").write(b"".join(chunks))
"""

@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes | None

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    def __repr__(self) -> str:
        size = "not kept" if self.body is None else f"{len(self.body)} bytes"
        return f"Response({self.status}, {self.headers!r}, body {size})"


def difference(got: bytes | None, want: bytes) -> str | None:
    """None if ``got == want``, else a short account of the first difference."""
    if got == want:
        return None
    if got is None:
        return "no body"
    pairs = enumerate(zip(got, want, strict=False))
    at = next((i for i, (a, b) in pairs if a != b), min(len(got), len(want)))
    return (f"got {len(got)} bytes, want {len(want)}; first difference at offset {at}: "
            f"{got[at:at + 8]!r} != {want[at:at + 8]!r}")


class Mesh(MeshPair):
    app_name = "http.server"

    @property
    def url(self) -> str:
        return f"http://{self.server.host.addr}:{HTTP_PORT}/{PAGE_NAME}"

    def curl(self, host: Host, url: str, *, uid: int | None = None,
             keep_body: bool = True) -> Response:
        """Unmodified curl in ``host``: status, headers in order, and the exact body."""
        body_file = self.work / f"body-{time.monotonic_ns()}"
        out = str(body_file) if keep_body else "/dev/null"
        done = host.run(["curl", "-sS", "--max-time", "10", "-D", "-", "-o", out, url],
                        uid=uid, check=False, timeout=20)
        assert done.returncode == 0, self.diag(f"curl {url} failed", done.stderr)
        lines = done.stdout.splitlines()
        status = int(lines[0].split()[1])
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers.append((name.strip().lower(), value.strip()))
        return Response(status, headers, body_file.read_bytes() if keep_body else None)

    def raw(self, host: Host, addr: str, port: int, data: bytes,
            timeout: float = 5.0) -> tuple[bytes, str]:
        """Send ``data`` from ``host`` on a fresh connection; (reply, how it ended)."""
        done = host.run([sys.executable, "-c", RAW_CLIENT, addr, str(port), data.hex(),
                         str(timeout)], timeout=timeout + 15)
        result = json.loads(done.stdout)
        return result["reply"].encode("latin-1"), result["end"]

    def served(self, path: str, times: int = 1, timeout: float = 5.0) -> None:
        """Wait until the http.server log shows exactly ``times`` GETs of ``path``."""
        line = f'"GET {path} HTTP/1.1" 200'
        eventually(lambda: self.app_log.read_text(errors="replace").count(line) == times,
                   timeout, lambda: self.diag(f"http.server did not log {line} {times}x"))







def counters(node: MeshNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every traffic counter of a proxy, by name and label set."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for s in scrape.parse(node.metrics()) if s.name in TRAFFIC_COUNTERS}




@pytest.fixture(params=MODES)
def mesh(request: pytest.FixtureRequest, network: Callable[..., Network],
         tmp_path: Path) -> Mesh:
    """client and server hosts, both meshed, with http.server and an echo server."""
    mode: str = request.param
    net, client, server = meshed_pair(network, mode)
    www = tmp_path / "www"
    www.mkdir()
    (www / PAGE_NAME).write_bytes(PAGE)
    work = tmp_path / "work"
    work.mkdir()
    m = Mesh(mode, net, client, server, work, tmp_path / "http.log")
    with m.app_log.open("w") as log:
        start_app(server.host, [sys.executable, "-u", "-m", "http.server", str(HTTP_PORT),
                                "--bind", "0.0.0.0", "--directory", str(www)],
                  HTTP_PORT, stderr=log)
    start_app(server.host, [sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)], ECHO_PORT)
    return m  # the network fixture kills every process and removes the namespaces


def test_http_request_passes_both_proxies_and_reaches_the_original_destination(
        mesh: Mesh) -> None:
    """Unmodified curl -> http.server: exact page, Via names both proxies, both count it."""
    c0, s0 = mesh.client.metrics(), mesh.server.metrics()
    resp = mesh.curl(mesh.client.host, mesh.url)

    assert resp.status == 200, mesh.diag(resp)
    assert difference(resp.body, PAGE) is None, mesh.diag(difference(resp.body, PAGE))
    assert resp.header("via") == [VIA_SERVER_IN, VIA_CLIENT_OUT], mesh.diag(resp)
    mesh.served(f"/{PAGE_NAME}")

    def counted() -> bool:
        c1, s1 = mesh.client.metrics(), mesh.server.metrics()
        return (delta(c0, c1, "request_total", direction="outbound") == 1
                and delta(c0, c1, "response_total", direction="outbound",
                          status_code="200") == 1
                and delta(s0, s1, "request_total", direction="inbound") == 1
                and delta(s0, s1, "response_total", direction="inbound",
                          status_code="200") == 1)

    eventually(counted, 5.0, lambda: mesh.diag(mesh.client.metrics(), mesh.server.metrics()))
    c1, s1 = mesh.client.metrics(), mesh.server.metrics()
    assert delta(c0, c1, "request_total", direction="inbound") == 0, mesh.diag(c1)
    assert delta(s0, s1, "request_total", direction="outbound") == 0, mesh.diag(s1)


def test_opaque_tcp_is_relayed_byte_for_byte_through_both_proxies(mesh: Mesh) -> None:
    """300 KB of every byte value to an echo server come back identical, counted opaque."""
    payload = bytes(range(256)) * 1200
    src, dst = mesh.work / "payload", mesh.work / "echoed"
    src.write_bytes(payload)
    c0, s0 = mesh.client.metrics(), mesh.server.metrics()

    mesh.client.host.run([sys.executable, "-c", ECHO_CLIENT, mesh.server.host.addr,
                          str(ECHO_PORT), str(src), str(dst)], timeout=30)

    echoed = dst.read_bytes()
    assert difference(echoed, payload) is None, mesh.diag(difference(echoed, payload))

    def counted() -> bool:
        c1, s1 = mesh.client.metrics(), mesh.server.metrics()
        return all(
            delta(before, after, "tcp_open_total", direction=direction, peer=peer,
                  protocol="opaque") == 1
            and delta(before, after, "tcp_read_bytes_total", direction=direction,
                      peer=peer, protocol="opaque") == len(payload)
            for before, after, direction in ((c0, c1, "outbound"), (s0, s1, "inbound"))
            for peer in ("src", "dst"))

    eventually(counted, 5.0, lambda: mesh.diag(mesh.client.metrics(), mesh.server.metrics()))
    c1, s1 = mesh.client.metrics(), mesh.server.metrics()
    assert delta(c0, c1, "tcp_open_total", direction="inbound") == 0, mesh.diag(c1)
    assert delta(s0, s1, "tcp_open_total", direction="outbound") == 0, mesh.diag(s1)


def test_after_uninstall_traffic_goes_direct_and_bypasses_the_proxies(mesh: Mesh) -> None:
    """init --uninstall on both hosts: the page still arrives, no proxy sees it (still up)."""
    meshed = mesh.curl(mesh.client.host, mesh.url)
    assert meshed.header("via") == [VIA_SERVER_IN, VIA_CLIENT_OUT], mesh.diag(meshed)

    for node in (mesh.client, mesh.server):
        node.uninstall_rules()
    mesh.healthy()  # the proxies keep running and listening: only the rules are gone
    before = {n.host.name: counters(n) for n in (mesh.client, mesh.server)}

    resp = mesh.curl(mesh.client.host, mesh.url)

    assert resp.status == 200, mesh.diag(resp)
    assert difference(resp.body, PAGE) is None, mesh.diag(difference(resp.body, PAGE))
    assert resp.header("via") == [], mesh.diag(resp)
    mesh.served(f"/{PAGE_NAME}", times=2)
    after = {n.host.name: counters(n) for n in (mesh.client, mesh.server)}
    assert after == before, mesh.diag(before, after)


def test_proxy_user_traffic_is_not_redirected_by_its_own_host(mesh: Mesh) -> None:
    """A request made by UID 2102 on the client leaves unproxied; the server's proxy has it."""
    c0, s0 = counters(mesh.client), mesh.server.metrics()

    resp = mesh.curl(mesh.client.host, mesh.url, uid=PROXY_UID, keep_body=False)

    assert resp.status == 200, mesh.diag(resp)
    assert resp.header("via") == [VIA_SERVER_IN], mesh.diag(resp)
    mesh.served(f"/{PAGE_NAME}")
    eventually(lambda: delta(s0, mesh.server.metrics(), "request_total",
                             direction="inbound") == 1,
               5.0, lambda: mesh.diag(mesh.server.metrics()))
    assert counters(mesh.client) == c0, mesh.diag(c0, counters(mesh.client))


@pytest.mark.parametrize("target", ["server:4143", "127.0.0.1:4140", "client:4140"])
def test_http_aimed_at_a_proxy_port_gets_502_not_a_loop(mesh: Mesh, target: str) -> None:
    """Requests to a proxy's own listener are refused once (502), and the mesh stays up."""
    name, _, port = target.partition(":")
    addr = mesh.net.hosts[name].addr if name in mesh.net.hosts else name
    c0, s0 = mesh.client.metrics(), mesh.server.metrics()

    resp = mesh.curl(mesh.client.host, f"http://{addr}:{port}/loop")

    assert resp.status == 502, mesh.diag(resp)
    assert any("loop" in v or "not redirected" in v for v in resp.header("l5d-proxy-error")), \
        mesh.diag(resp)
    c1, s1 = mesh.client.metrics(), mesh.server.metrics()
    # Exactly one request per proxy it crossed: nothing went round again.
    assert delta(c0, c1, "request_total") == 1, mesh.diag(c1)
    assert delta(s0, s1, "request_total") == (1 if name == "server" else 0), mesh.diag(s1)
    before, after = (s0, s1) if name == "server" else (c0, c1)
    assert delta(before, after, "proxy_errors_total") == 1, mesh.diag(after)
    assert "/loop" not in mesh.app_log.read_text(), mesh.diag()
    mesh.healthy()
    after_loop = mesh.curl(mesh.client.host, mesh.url)
    assert difference(after_loop.body, PAGE) is None, mesh.diag(after_loop)


def test_opaque_bytes_aimed_at_the_server_inbound_port_are_closed_not_looped(
        mesh: Mesh) -> None:
    """Binary bytes to the server's :4143 get a closed connection, and the mesh stays up."""
    s0 = mesh.server.metrics()

    reply, end = mesh.raw(mesh.client.host, mesh.server.host.addr, 4143,
                          bytes(range(256)) * 4)

    assert (reply, end) in ((b"", "eof"), (b"", "reset")), mesh.diag(reply, end)
    s1 = mesh.server.metrics()
    assert delta(s0, s1, "proxy_errors_total", direction="inbound", error="loop") == 1, \
        mesh.diag(s1)
    mesh.healthy()
    # Opaque from the first byte, so detection answers at once; the echo server keeps the
    # connection open, so "open" at the deadline is the healthy outcome.
    echoed = mesh.raw(mesh.client.host, mesh.server.host.addr, ECHO_PORT, b"ping\x00\xff",
                      timeout=2.0)
    assert echoed == (b"ping\x00\xff", "open"), mesh.diag(echoed)


def test_request_with_content_length_and_chunked_gets_400_and_close(mesh: Mesh) -> None:
    """A smuggling-shaped request (CL + TE) is answered 400 and closed; the next one works."""
    smuggle = (f"POST /{PAGE_NAME} HTTP/1.1\r\nHost: {mesh.server.host.addr}\r\n"
               "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
               "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n").encode()

    reply, end = mesh.raw(mesh.client.host, mesh.server.host.addr, HTTP_PORT, smuggle)

    assert reply.startswith(b"HTTP/1.1 400 "), mesh.diag(reply, end)
    assert reply.count(b"HTTP/1.1 ") == 1 and end == "eof", mesh.diag(reply, end)
    assert f"via: {VIA_CLIENT_OUT}".encode() in reply, mesh.diag(reply)  # refused at source
    resp = mesh.curl(mesh.client.host, mesh.url)
    assert resp.status == 200, mesh.diag(resp)
    assert difference(resp.body, PAGE) is None, mesh.diag(difference(resp.body, PAGE))
    mesh.served(f"/{PAGE_NAME}")
    log = mesh.app_log.read_text(errors="replace")
    assert "POST" not in log and "/smuggled" not in log, mesh.diag()
    mesh.healthy()

