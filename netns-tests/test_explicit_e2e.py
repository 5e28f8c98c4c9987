"""Explicit proxy mode end to end: an app on a host with NO iptables rules sets http_proxy /
https_proxy to the local proxy and reaches a meshed server host, over plain HTTP and over
HTTPS through a CONNECT tunnel (TLS end to end between curl and the server)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from meshpair import app_env, eventually

from init.mesh import MeshNode, start_app
from init.netns import Network

HTTP_PORT = 8080
TLS_PORT = 8443

# An HTTPS server (stdlib) answering every GET with a fixed page.
TLS_SERVER = r"""
import ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"secret page over tls\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


def _cert(work: Path, ip: str) -> tuple[Path, Path]:
    cert, key = work / "server.pem", work / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=server",
                    "-addext", f"subjectAltName=IP:{ip}", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.fixture
def hosts(network: Callable[..., Network], tmp_path: Path) -> tuple[MeshNode, MeshNode, Path]:
    """A client host running only the proxy (no rules), a meshed server host."""
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl is not installed")
    net = network("client", "server")
    client, server = MeshNode(net["client"]), MeshNode(net["server"])
    server.install_rules()
    server.start_proxy()
    client.start_proxy()
    cert, key = _cert(tmp_path, server.host.addr)
    (tmp_path / "tls.py").write_text(TLS_SERVER)
    start_app(server.host, [sys.executable, str(tmp_path / "tls.py"), str(TLS_PORT),
                            str(cert), str(key)], TLS_PORT, env=app_env())
    start_app(server.host, [sys.executable, "-m", "http.server", str(HTTP_PORT), "--directory",
                            str(tmp_path)], HTTP_PORT, env=app_env())
    return client, server, tmp_path


def test_http_proxy_variable_reaches_the_server(hosts: tuple[MeshNode, MeshNode, Path]) -> None:
    """curl with http_proxy=http://127.0.0.1:4140 gets the server's file through both
    proxies (the client's as an explicit proxy, the server's inbound as usual)."""
    client, server, work = hosts
    (work / "hello.txt").write_text("hello through the explicit proxy\n")
    done = client.host.run(["curl", "-sS", "--max-time", "20",
                            f"http://{server.host.addr}:{HTTP_PORT}/hello.txt"],
                           check=False, timeout=30,
                           env=app_env(http_proxy="http://127.0.0.1:4140"))
    assert done.stdout == "hello through the explicit proxy\n", (done.stderr, client.log())
    assert client.metric("request_total", direction="outbound") == 1
    eventually(lambda: server.metric("request_total", direction="inbound") == 1, 5,
               lambda: server.log())


def test_https_through_connect(hosts: tuple[MeshNode, MeshNode, Path]) -> None:
    """curl https:// with https_proxy set tunnels through CONNECT; TLS is end to end (curl
    verifies the server's own certificate)."""
    client, server, work = hosts
    done = client.host.run(["curl", "-sS", "--max-time", "20", "--cacert",
                            str(work / "server.pem"),
                            f"https://{server.host.addr}:{TLS_PORT}/"],
                           check=False, timeout=30,
                           env=app_env(https_proxy="http://127.0.0.1:4140"))
    assert done.stdout == "secret page over tls\n", (done.stderr, client.log())
    assert client.metric("tcp_open_total", direction="outbound", protocol="tunnel",
                         peer="dst") == 1, client.metrics()


def test_without_the_variable_nothing_is_proxied(
        hosts: tuple[MeshNode, MeshNode, Path]) -> None:
    """No rules and no variable: curl goes direct and the client proxy sees nothing."""
    client, server, work = hosts
    (work / "direct.txt").write_text("direct\n")
    done = client.host.run(["curl", "-sS", "--max-time", "20",
                            f"http://{server.host.addr}:{HTTP_PORT}/direct.txt"],
                           check=False, timeout=30, env=app_env())
    assert done.stdout == "direct\n", done.stderr
    assert client.metric("request_total", direction="outbound") == 0
