"""Mutual TLS between meshed hosts, end to end: a client host and a server host, each with
rules from ``appliance init`` and ``appliance proxy`` as UID 2102 configured only with the
trust anchor, the identity service's address and a token; the identity service
(``appliance identity``) on a third host. Unmodified apps: curl, a Python HTTP server that
answers with the headers it got, a TCP echo server.

The wire is checked with tshark on the client's veth (inside the switch namespace): a TLS
handshake offering ALPN ``appliance.mesh/1``, and no trace of a marker sent in the request
body. The rotation-under-load test runs two minutes; it is skipped unless
``APPLIANCE_LONG_TESTS=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from meshpair import RAW_CLIENT, eventually

from appliance.identity import tls as mesh_tls
from certs import pki, store
from init.mesh import ECHO_SERVER, PROXY_UID, MeshNode, start_app
from init.netns import Host, Network

DOMAIN = "example.org"
WEB = f"spiffe://{DOMAIN}/ns/default/sa/web"
API = f"spiffe://{DOMAIN}/ns/default/sa/api"
OTHER = f"spiffe://{DOMAIN}/ns/default/sa/other"
TOKENS = {"web": "tok-web-5f0c1d2e3a4b5c6d7e8f", "api": "tok-api-0a1b2c3d4e5f60718293",
          "other": "tok-oth-99887766554433221100"}
APP_PORT = 8080
ECHO_PORT = 7777
IDENTITY_PORT = 9443
LONG = os.environ.get("APPLIANCE_LONG_TESTS") == "1"

HEADER_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        seen = {}
        for k, v in self.headers.items():
            seen.setdefault(k.lower(), []).append(v)
        data = json.dumps({"headers": seen, "body": len(body)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    do_GET = do_POST = _answer
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""

# A mesh client outside the mesh's control: connects with the given certificate files,
# offering the mesh ALPN, sends a request; prints how it went.
CERT_CLIENT = r"""
import json, socket, ssl, sys
host, port, chain, key, anchors = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], \
    sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(anchors)
ctx.load_cert_chain(chain, key)
ctx.set_alpn_protocols(["appliance.mesh/1"])
result = {"reply": "", "error": ""}
try:
    with socket.create_connection((host, port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            result["reply"] = s.recv(200).decode("latin-1")
except (OSError, ssl.SSLError) as exc:
    result["error"] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(result))
"""

# The steady load of the rotation test: every ``gap`` s one HTTP request and one fresh
# echo connection (a new mesh TLS handshake each), for ``seconds`` s or ``limit`` rounds.
LOAD = r"""
import json, socket, sys, time, urllib.request
server, seconds, gap, limit = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4])
end = time.monotonic() + seconds
ok, failures, rounds = 0, [], 0
while time.monotonic() < end and rounds < limit:
    rounds += 1
    try:
        with urllib.request.urlopen(f"http://{server}:8080/r{rounds}", timeout=5) as r:
            ok += r.status == 200
    except Exception as exc:
        failures.append(f"{time.strftime('%X')} http: {exc}")
    try:
        with socket.create_connection((server, 7777), timeout=5) as s:
            s.sendall(b"ping %d" % rounds)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(100):
                got += chunk
        if got != b"ping %d" % rounds:
            failures.append(f"{time.strftime('%X')} echo: got {got!r}")
        else:
            ok += 1
    except Exception as exc:
        failures.append(f"{time.strftime('%X')} echo: {exc}")
    time.sleep(gap)
print(json.dumps({"ok": ok, "rounds": rounds, "failures": failures}))
"""


@dataclass
class MtlsMesh:
    net: Network
    files: Path  # readable by the proxy user
    monkeypatch: pytest.MonkeyPatch
    client: MeshNode
    server: MeshNode
    ident_host: Host
    ident: subprocess.Popen[str] | None = None
    ident_log: Path = field(default_factory=Path)
    extra: list[MeshNode] = field(default_factory=list)

    @property
    def anchors(self) -> Path:
        return self.files / "ca" / store.ANCHOR_CERT

    def start_identity(self, *args: str) -> None:
        self.ident_log = self.files / f"identity-{time.monotonic_ns()}.log"
        with self.ident_log.open("w") as log:
            self.ident = self.ident_host.popen(
                [sys.executable, "-m", "appliance", "identity", "--dir", str(self.files / "ca"),
                 "--tokens", str(self.files / "tokens"), "--listen",
                 f"0.0.0.0:{IDENTITY_PORT}", *args], stdout=log, stderr=subprocess.STDOUT)
        self.ident_host.wait_for_port(IDENTITY_PORT, proc=self.ident)

    def stop_identity(self) -> None:
        if self.ident is not None and self.ident.poll() is None:
            self.ident.send_signal(signal.SIGTERM)
            self.ident.wait(10)
        self.ident = None

    def start_proxy(self, node: MeshNode, account: str, *settings: str,
                    timeout: float = 20.0, addresses: str = "") -> None:
        env = {"APPLIANCE_IDENTITY_ADDR": f"{self.ident_host.addr}:{IDENTITY_PORT}",
               "APPLIANCE_TRUST_ANCHORS": str(self.anchors),
               "APPLIANCE_IDENTITY_TOKEN_FILE": str(self.files / f"token-{account}"),
               "APPLIANCE_IDENTITY_ADDRESSES": addresses}
        with self.monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            node.start_proxy(*settings, timeout=timeout)

    def diag(self, *extra: object) -> str:
        parts = [repr(e) for e in extra]
        for node in (self.client, self.server, *self.extra):
            parts.append(f"--- {node.host.name} proxy log:\n{node.log()}")
        if self.ident_log.is_file():
            parts.append(f"--- identity log:\n{self.ident_log.read_text(errors='replace')}")
        return "\n".join(parts)

    def curl(self, *args: str, host: Host | None = None) -> subprocess.CompletedProcess[str]:
        return (host or self.client.host).run(["curl", "-sS", "--max-time", "10", *args],
                                              check=False, timeout=20)

    def url(self, path: str = "/") -> str:
        return f"http://{self.server.host.addr}:{APP_PORT}{path}"

    def python(self, host: Host, script: str, *args: str, timeout: float = 30) -> dict:
        done = host.run([sys.executable, "-c", script, *args], timeout=timeout)
        return json.loads(done.stdout)


@pytest.fixture
def mtls(network: Callable[..., Network], monkeypatch: pytest.MonkeyPatch) -> Iterator[MtlsMesh]:
    """Three hosts; PKI and tokens made with the real CLI; rules on client and server; apps
    on the server. Proxies and the identity service are started by each test."""
    net = network("client", "server", "identity")
    files = Path(tempfile.mkdtemp(prefix="appliance-mtls-"))
    files.chmod(0o755)
    try:
        done = subprocess.run([sys.executable, "-m", "appliance", "certs", "init",
                               "--trust-domain", DOMAIN, "--dir", str(files / "ca")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        (files / "ca").chmod(0o755)
        (files / "tokens").write_text("".join(f"{t} default {sa}\n" for sa, t in TOKENS.items()))
        for sa, token in TOKENS.items():
            path = files / f"token-{sa}"
            path.write_text(token + "\n")
            path.chmod(0o600)
            os.chown(path, PROXY_UID, PROXY_UID)
        client, server = MeshNode(net["client"]), MeshNode(net["server"])
        for node in (client, server):
            node.install_rules()
        start_app(server.host, [sys.executable, "-c", HEADER_SERVER, str(APP_PORT)], APP_PORT)
        start_app(server.host, [sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)], ECHO_PORT)
        yield MtlsMesh(net, files, monkeypatch, client, server, net["identity"])
    finally:
        shutil.rmtree(files, ignore_errors=True)


class Capture:
    """tshark on a veth of the switch namespace, writing a pcap."""

    def __init__(self, net: Network, interface: str, path: Path, bpf: str) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", net.switch_netns, "tshark", "-i", interface, "-f", bpf,
             "-w", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 20
        for line in self.proc.stderr:  # "Capturing on 'p2'" once it listens
            if "Capturing on" in line or time.monotonic() > deadline:
                break
        time.sleep(1.0)  # the message comes a little before packets are really taken

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def fields(self, display_filter: str, *names: str) -> list[str]:
        """Fields of the matching packets; the app port is decoded as TLS (it is not a
        port tshark would guess TLS on)."""
        args = ["tshark", "-r", str(self.path), "-d", f"tcp.port=={APP_PORT},tls",
                "-Y", display_filter, "-T", "fields"]
        for name in names:
            args += ["-e", name]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        return [line for line in done.stdout.splitlines() if line.strip()]


def test_curl_between_hosts_is_mutual_tls_on_the_wire(mtls: MtlsMesh) -> None:
    """curl -> http server across hosts: the app learns the client's SPIFFE ID, the wire
    shows a mesh TLS handshake and not the request body's marker."""
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (Debian package tshark)")
    mtls.start_identity()
    mtls.start_proxy(mtls.server, "api")
    mtls.start_proxy(mtls.client, "web")
    marker = f"MARKER-{os.urandom(8).hex()}"
    pcap = mtls.files / "wire.pcap"
    capture = Capture(mtls.net, "p2", pcap, f"tcp port {APP_PORT}")  # the client's veth
    try:
        done = mtls.curl("-d", marker, mtls.url("/hello"))
    finally:
        time.sleep(0.5)
        capture.stop()
    assert done.returncode == 0, mtls.diag(done.stderr)
    seen = json.loads(done.stdout)
    assert seen["headers"].get("l5d-client-id") == [WEB], mtls.diag(seen)
    assert seen["body"] == len(marker)
    assert capture.fields("tcp.flags.syn == 1 and tcp.flags.ack == 0", "frame.number"), \
        "the capture missed the connection's start"
    hellos = capture.fields("tls.handshake.type == 1", "tls.handshake.extensions_alpn_str")
    assert hellos and all("appliance.mesh/1" in h for h in hellos), mtls.diag(hellos)
    assert capture.fields("tls.handshake.type == 2", "frame.number"), "no ServerHello"
    assert capture.fields("tls.record.opaque_type == 23", "frame.number"), "no TLS 1.3 data"
    wire = pcap.read_bytes()
    assert marker.encode() not in wire, "the request body crossed the wire in plaintext"
    assert b"l5d-client-id" not in wire and b"HTTP/1.1" not in wire
    assert mtls.server.metric("tcp_open_total", direction="inbound", tls="true",
                              client_id=WEB) >= 1, mtls.diag()
    assert mtls.client.metric("tcp_open_total", direction="outbound", tls="true",
                              server_id=API) >= 1, mtls.diag()
    for node in (mtls.client, mtls.server):
        log = node.log()
        assert "PRIVATE KEY" not in log and "tok-" not in log


def _write_client_cert(mtls: MtlsMesh, name: str, chain: list, key: pki.Key) -> tuple[str, str]:
    chain_path, key_path = mtls.files / f"{name}.pem", mtls.files / f"{name}.key"
    chain_path.write_bytes(pki.chain_pem(chain))
    key_path.write_bytes(pki.key_pem(key))
    return str(chain_path), str(key_path)


def test_strict_server_refuses_plaintext_garbage_and_bad_certificates(mtls: MtlsMesh) -> None:
    """A strict server: a plaintext request from an unmeshed host is closed, a garbage
    ClientHello is closed, untrusted and expired client certificates fail the handshake;
    the meshed client still gets through. Each refusal is counted."""
    mtls.start_identity()
    mtls.start_proxy(mtls.server, "api", "inbound.tls_mode=strict")
    mtls.start_proxy(mtls.client, "web")
    outsider, server = mtls.ident_host, mtls.server.host.addr

    plain = mtls.curl(mtls.url("/plain"), host=outsider)
    assert plain.returncode != 0 and not plain.stdout, mtls.diag(plain)
    garbage = mtls.python(outsider, RAW_CLIENT, server, str(APP_PORT),
                          "16030100080100000400ffffff", "5")
    assert garbage["reply"] == "" and garbage["end"] in ("eof", "reset"), mtls.diag(garbage)

    issuer = store.load_issuer(mtls.files / "ca", now=pki.utc(time.time()))
    rogue_key = pki.new_key()
    rogue = pki.make_anchor(DOMAIN, rogue_key, now=pki.utc(time.time() - 60))
    leaf_key = pki.new_key()
    untrusted = pki.issue_leaf(leaf_key.public_key(), rogue, rogue_key,
                               now=pki.utc(time.time()), uri=WEB)
    expired_key = pki.new_key()
    expired = pki.issue_leaf(expired_key.public_key(), issuer.cert, issuer.key,
                             now=pki.utc(time.time()), lifetime=timedelta(seconds=1), uri=WEB)
    time.sleep(1.5)
    for name, chain, key in (("untrusted", [untrusted], leaf_key),
                             ("expired", [expired, issuer.cert], expired_key)):
        paths = _write_client_cert(mtls, name, chain, key)
        result = mtls.python(outsider, CERT_CLIENT, server, str(APP_PORT), *paths,
                             str(mtls.anchors))
        assert not result["reply"].startswith("HTTP/1.1 200"), mtls.diag(name, result)

    done = mtls.curl(mtls.url("/meshed"))
    assert json.loads(done.stdout)["headers"]["l5d-client-id"] == [WEB], mtls.diag(done)
    metric = mtls.server.metric
    assert metric("proxy_errors_total", error="identity_required") >= 1, mtls.diag()
    assert metric("proxy_errors_total", error="tls_client_hello_invalid") == 1, mtls.diag()
    assert metric("proxy_errors_total", error="mesh_tls_handshake_failed") == 2, mtls.diag()
    log = mtls.server.log()
    assert "certificate has expired" in log and "unable to get local issuer" in log, log
    assert mesh_tls.MESH_ALPN  # the ALPN the clients above offered


def test_wrong_identity_at_the_destination_is_refused(mtls: MtlsMesh) -> None:
    """The identity service is told (``--addresses csr``) that the server's address belongs
    to another workload: the client proxy refuses the server's certificate, 502."""
    mtls.start_identity("--addresses", "csr")
    mtls.start_proxy(mtls.server, "api")
    mtls.start_proxy(mtls.client, "web")
    impostor = MeshNode(mtls.ident_host, instance_id="impostor")
    mtls.extra.append(impostor)
    mtls.start_proxy(impostor, "other", addresses=mtls.server.host.addr)
    done = mtls.curl("-i", mtls.url("/"))
    assert done.stdout.startswith("HTTP/1.1 502"), mtls.diag(done)
    assert f"peer presented {API}, expected {OTHER}" in done.stdout, mtls.diag(done)


@pytest.mark.timeout(240)
def test_identity_service_down_at_start_and_during_renewal(mtls: MtlsMesh) -> None:
    """Proxies started before the identity service are not ready and retry; once it is up
    they become ready. With the service stopped, renewal fails but the current certificate
    keeps serving; when it is back the certificates are renewed."""
    with pytest.raises(TimeoutError):
        mtls.start_proxy(mtls.server, "api", timeout=3)
    with pytest.raises(TimeoutError):
        mtls.start_proxy(mtls.client, "web", timeout=0.5)
    status, body = mtls.server.admin_get("/ready")
    assert status == 503 and "no certificate" in body, mtls.diag(body)
    mtls.start_identity("--leaf-lifetime", "40s")
    issued = time.monotonic()
    for node in (mtls.client, mtls.server):
        eventually(node.ready, 30, lambda: mtls.diag("not ready after the service came up"))
    assert "retrying in" in mtls.server.log()
    assert mtls.curl(mtls.url("/first")).returncode == 0, mtls.diag()

    mtls.stop_identity()
    time.sleep(max(0.0, issued + 31 - time.monotonic()))  # past the renewal time (28 s)
    late = mtls.curl(mtls.url("/renewal-failed"))
    assert late.returncode == 0 and json.loads(late.stdout)["headers"]["l5d-client-id"] == \
        [WEB], mtls.diag(late)
    assert "still serving the current certificate" in mtls.server.log(), mtls.diag()
    mtls.start_identity("--leaf-lifetime", "40s")
    for node in (mtls.client, mtls.server):
        eventually(lambda node=node: node.metric("identity_cert_refresh_count") >= 2, 15,
                   lambda: mtls.diag("not renewed after the service came back"))
    done = mtls.curl(mtls.url("/renewed"))
    assert done.returncode == 0, mtls.diag(done)


@pytest.mark.skipif(not LONG, reason="two minutes; set APPLIANCE_LONG_TESTS=1")
@pytest.mark.timeout(400)
def test_rotation_under_load_sees_no_failure(mtls: MtlsMesh) -> None:
    """Leaf lifetime 30 s: for two minutes a steady stream of HTTP requests and fresh echo
    connections (a new mesh handshake each) crosses several certificate rotations on both
    proxies without a single failure."""
    mtls.start_identity("--leaf-lifetime", "30s")
    mtls.start_proxy(mtls.server, "api")
    mtls.start_proxy(mtls.client, "web")
    result = mtls.python(mtls.client.host, LOAD, mtls.server.host.addr, "120", "0.2", "1000",
                         timeout=200)
    assert result["failures"] == [], mtls.diag(result)
    assert result["rounds"] >= 300 and result["ok"] == 2 * result["rounds"], mtls.diag(result)
    for node in (mtls.client, mtls.server):
        assert node.metric("identity_cert_refresh_count") >= 5, mtls.diag()
