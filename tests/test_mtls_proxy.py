"""Mutual TLS between two real proxies on loopback, with the real identity service: each
proxy claims its own 127.0.0.x address, so the client proxy finds the server proxy meshed
and originates mesh TLS; the server proxy terminates it, learns the client's identity,
applies the port's policy and tells the app who called (l5d-client-id)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from mtls_fixtures import (
    API,
    OTHER,
    WEB,
    HeaderEcho,
    IdentityProcess,
    MemPki,
    make_pki,
    mesh_proxy,
)
from support import ProxyProcess, ThreadedTcpServer, http_get, recv_until_eof
from thrift_idl.echo_service import EchoServer as ThriftEcho
from thrift_idl.echo_service import client as thrift_client

from appliance.identity import tls as mesh_tls
from certs import pki, store

SERVER, CLIENT = "127.0.0.3", "127.0.0.2"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("mtls"))


@pytest.fixture(scope="module")
def identity(root: Path) -> Iterator[IdentityProcess]:
    ident = IdentityProcess(root, "--allow-dns", "default/api=www.example.test")
    try:
        yield ident
    finally:
        ident.stop()


@pytest.fixture(scope="module")
def backend() -> Iterator[HeaderEcho]:
    server = HeaderEcho()
    try:
        yield server
    finally:
        server.close()


class Pair:
    """Client proxy (web, 127.0.0.2) -> server proxy (api, 127.0.0.3) -> app."""

    def __init__(self, root: Path, identity: IdentityProcess, app_port: int,
                 *server_settings: str, client_settings: tuple[str, ...] = ()) -> None:
        self.server = mesh_proxy(root, identity.port, "api", SERVER,
                                 f"inbound.orig_dst_override=127.0.0.1:{app_port}",
                                 *server_settings)
        try:
            self.client = mesh_proxy(root, identity.port, "web", CLIENT,
                                     f"outbound.orig_dst_override={SERVER}:"
                                     f"{self.server.inbound}", *client_settings)
        except BaseException:
            self.server.stop()
            raise

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.client.outbound}{path}"

    def stop(self) -> None:
        outputs = self.client.output() + self.server.output()
        self.client.stop()
        self.server.stop()
        for secret in ("PRIVATE KEY", "tok-web-", "tok-api-"):
            assert secret not in outputs, f"{secret!r} in a proxy log"


@pytest.fixture
def pair(root: Path, identity: IdentityProcess, backend: HeaderEcho) -> Iterator[Pair]:
    p = Pair(root, identity, backend.port)
    try:
        yield p
    finally:
        p.stop()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                          text=True, timeout=20)


def test_http1_between_proxies_is_mutual_tls_with_the_client_identity(
        pair: Pair, backend: HeaderEcho) -> None:
    """curl -> client proxy -> mesh TLS -> server proxy -> app: the app sees the client's
    SPIFFE ID in l5d-client-id (a forged one is dropped); both proxies count the TLS
    connection with the peer's identity; the server proxy counts an allowed request."""
    done = curl("-H", "l5d-client-id: spiffe://forged/ns/x/sa/y", "-d", "MARKER-body",
                pair.url("/hello"))
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["headers"]["l5d-client-id"] == [WEB] and seen["body"] == len("MARKER-body")
    assert pair.client.metric("tcp_open_total", direction="outbound", tls="true",
                              server_id=API) == 1
    assert pair.server.metric("tcp_open_total", direction="inbound", tls="true",
                              client_id=WEB) == 1
    assert pair.server.metric("inbound_http_authz_allow_total", tls="true",
                              client_id=WEB) == 1


def test_plaintext_client_of_a_permissive_port_has_no_client_id(pair: Pair) -> None:
    """Straight to the server proxy without TLS: allowed (permissive), no l5d-client-id,
    and a client-sent one is removed."""
    status, body = http_get_with(f"http://{SERVER}:{pair.server.inbound}/",
                                 {"l5d-client-id": "spiffe://forged/ns/x/sa/y"})
    assert status == 200
    assert "l5d-client-id" not in json.loads(body)["headers"]
    assert pair.server.metric("inbound_http_authz_allow_total", tls="false") == 1


def http_get_with(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    import urllib.request

    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_strict_port_closes_plaintext_but_serves_the_mesh(
        root: Path, identity: IdentityProcess, backend: HeaderEcho) -> None:
    """tls_mode strict: a plaintext connection is closed without an answer and counted;
    a meshed client still gets through."""
    p = Pair(root, identity, backend.port, "inbound.tls_mode=strict")
    try:
        with socket.create_connection((SERVER, p.server.inbound), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_until_eof_or_reset(s) == b""
        assert p.server.metric("proxy_errors_total", error="identity_required") == 1
        assert p.server.metric("inbound_tcp_authz_deny_total", tls="false") == 1
        assert json.loads(curl(p.url()).stdout)["headers"]["l5d-client-id"] == [WEB]
    finally:
        p.stop()


def recv_until_eof_or_reset(s: socket.socket) -> bytes:
    try:
        return recv_until_eof(s)
    except ConnectionResetError:
        return b""


def test_identity_not_allowed_gets_403(root: Path, identity: IdentityProcess,
                                       backend: HeaderEcho) -> None:
    """The port allows only another identity: 403 with l5d-proxy-error naming the client,
    the app sees nothing, the denial is counted."""
    before = len(backend.requests)
    p = Pair(root, identity, backend.port, f"inbound.authorization={backend.port}={OTHER}")
    try:
        done = curl("-i", p.url("/secret"))
        assert done.stdout.startswith("HTTP/1.1 403"), done.stdout
        assert f"l5d-proxy-error: unauthorized: {WEB} may not use port" in done.stdout
        assert len(backend.requests) == before
        assert p.server.metric("inbound_http_authz_deny_total", client_id=WEB) == 1
    finally:
        p.stop()


def test_wrong_identity_at_the_destination_is_refused(
        root: Path, identity: IdentityProcess, backend: HeaderEcho) -> None:
    """Another workload claims the server's address after it: the identity service now
    names that one, the server proxy presents its own, so the client proxy refuses the
    connection before sending anything: 502 naming both identities."""
    p = Pair(root, identity, backend.port)
    impostor = None
    try:
        impostor = mesh_proxy(root, identity.port, "other", SERVER)
        before = len(backend.requests)
        done = curl("-i", p.url("/"))
        assert done.stdout.startswith("HTTP/1.1 502"), done.stdout
        assert (f"mesh TLS to {SERVER}:{p.server.inbound} ({OTHER}) failed: peer presented "
                f"{API}, expected {OTHER}") in done.stdout
        assert len(backend.requests) == before
        assert p.client.metric("proxy_errors_total", error="mesh_tls_identity") >= 1
    finally:
        if impostor is not None:
            impostor.stop()
        p.stop()


@pytest.mark.parametrize("hello", [
    b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff",
    b"\x16\x03\x01\x00\x02\x01\x00\x17\x03\x03\x00\x01x",
])
def test_garbage_client_hello_is_closed_and_counted(pair: Pair, hello: bytes) -> None:
    """Bytes that start like TLS but are no ClientHello: closed, counted."""
    with socket.create_connection((SERVER, pair.server.inbound), timeout=5) as s:
        s.sendall(hello)
        assert recv_until_eof_or_reset(s) == b""
    assert pair.server.metric("proxy_errors_total", error="tls_client_hello_invalid") == 1


CA2 = MemPki()


@pytest.mark.parametrize("make,reason", [
    (lambda root: CA2.client_context(WEB, trust=_anchors(root)), "unable to get local issuer"),
    (lambda root: _issued_client(root, start=-1800, lifetime=600), "certificate has expired"),
])
def test_bad_client_certificates_are_refused(pair: Pair, root: Path, make: Any,
                                             reason: str) -> None:
    """A mesh client with an untrusted or an expired certificate: the handshake fails,
    nothing reaches the app, the failure is counted and logged with its reason."""
    ctx = make(root)
    with socket.create_connection((SERVER, pair.server.inbound), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert tls.recv(100) == b""
        except (ssl.SSLError, ConnectionError):
            pass
    assert pair.server.metric("proxy_errors_total", error="mesh_tls_handshake_failed") == 1
    assert reason in pair.server.output()


def _anchors(root: Path) -> MemPki:
    fake = MemPki.__new__(MemPki)
    fake.anchors = pki.load_certs((root / "ca" / store.ANCHOR_CERT).read_bytes(), "anchor")
    return fake


def _issued_client(root: Path, *, start: float, lifetime: float) -> ssl.SSLContext:
    """A client context with a certificate from the real issuer, shifted in time."""
    issuer = store.load_issuer(root / "ca", now=pki.utc(__import__("time").time()))
    real = MemPki.__new__(MemPki)
    real.issuer, real.issuer_key, real.anchors = issuer.cert, issuer.key, issuer.anchors
    chain, key = real.leaf(WEB, start=start, lifetime=lifetime)
    return mesh_tls.client_context(chain, key, issuer.anchors)  # type: ignore[arg-type]


class TcpEcho(ThreadedTcpServer):
    """Echoes what it reads, and says ``<bye>`` at EOF."""

    def handle(self, conn: socket.socket, n: int) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.sendall(b"<bye>")


@pytest.mark.parametrize("opaque", [False, True])
def test_opaque_tcp_through_mesh_tls(root: Path, identity: IdentityProcess,
                                     opaque: bool) -> None:
    """Bytes that are no known protocol, or a port marked opaque on both proxies (no
    detection): relayed through mesh TLS, half-close included."""
    echo = TcpEcho()
    settings = (f"detect.opaque_ports={echo.port}",) if opaque else ()
    p = Pair(root, identity, echo.port, *settings, client_settings=settings)
    try:
        with socket.create_connection(("127.0.0.1", p.client.outbound), timeout=10) as s:
            s.sendall(b"\x00binary\xffstream")
            s.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s) == b"\x00binary\xffstream<bye>"
        assert p.server.metric("tcp_open_total", direction="inbound", tls="true",
                               client_id=WEB, protocol="opaque", peer="src") == 1
        assert p.server.metric("inbound_tcp_authz_allow_total", client_id=WEB) == 1
    finally:
        p.stop()
        echo.close()


def test_opaque_tcp_denied_is_closed(root: Path, identity: IdentityProcess) -> None:
    """An opaque connection from an identity the port does not allow is closed."""
    echo = TcpEcho()
    p = Pair(root, identity, echo.port, f"inbound.authorization={echo.port}=deny")
    try:
        with socket.create_connection(("127.0.0.1", p.client.outbound), timeout=10) as s:
            s.sendall(b"\x00binary")
            s.shutdown(socket.SHUT_WR)
            assert recv_until_eof_or_reset(s) == b""
        assert p.server.metric("inbound_tcp_authz_deny_total", client_id=WEB) == 1
    finally:
        p.stop()
        echo.close()


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    caller = dict(context.invocation_metadata()).get("l5d-client-id", "")
    return request + b" from " + caller.encode()


@pytest.fixture(scope="module")
def grpc_port() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(_unary)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def test_grpc_through_mesh_tls_and_permission_denied(root: Path, identity: IdentityProcess,
                                                     grpc_port: int) -> None:
    """gRPC (HTTP/2) through mesh TLS: the server app sees the caller's identity; on a port
    that allows only another identity the call fails with PERMISSION_DENIED."""
    p = Pair(root, identity, grpc_port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{p.client.outbound}") as channel:
            reply = channel.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
        assert reply == b"hi from " + WEB.encode()
        assert p.server.metric("tcp_open_total", protocol="h2", tls="true",
                               client_id=WEB) == 1
    finally:
        p.stop()
    p = Pair(root, identity, grpc_port, f"inbound.authorization={grpc_port}={OTHER}")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{p.client.outbound}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert p.server.metric("inbound_http_authz_deny_total", client_id=WEB) == 1
    finally:
        p.stop()


def test_termination_with_an_issued_certificate_and_origination(
        root: Path, identity: IdentityProcess, backend: HeaderEcho) -> None:
    """A port terminating TLS for www.example.test with a certificate from the mesh issuer:
    curl verifies it against the trust anchor; a proxy originating TLS to that port lets
    a plaintext app reach it over TLS. Neither client has a mesh identity."""
    anchor = root / "ca" / store.ANCHOR_CERT
    server = mesh_proxy(root, identity.port, "api", SERVER,
                        f"inbound.orig_dst_override=127.0.0.1:{backend.port}",
                        f"inbound.tls_terminate={backend.port}=www.example.test")
    origin = None
    try:
        done = curl("--cacert", str(anchor), "--resolve",
                    f"www.example.test:{server.inbound}:{SERVER}",
                    "-H", "l5d-client-id: forged", f"https://www.example.test:{server.inbound}/t")
        assert done.returncode == 0, done.stderr
        assert "l5d-client-id" not in json.loads(done.stdout)["headers"]
        origin = ProxyProcess(f"outbound.orig_dst_override={SERVER}:{server.inbound}",
                              f"outbound.tls_originate={SERVER}:{server.inbound}="
                              f"sni:www.example.test,ca:{anchor}")
        status, body = http_get(f"http://127.0.0.1:{origin.outbound}/originated")
        assert status == 200 and json.loads(body)["body"] == 0
        assert origin.metric("tcp_open_total", direction="outbound", tls="true") == 1
        assert server.metric("inbound_http_authz_allow_total", tls="true") == 2
    finally:
        if origin is not None:
            origin.stop()
        server.stop()


def test_termination_with_given_files_and_identity_off(tmp_path: Path,
                                                       backend: HeaderEcho) -> None:
    """Without identity, a port can terminate TLS with a given certificate and key."""
    ca = MemPki()
    chain, key = ca.leaf(None, dns=("files.example.test",))
    (tmp_path / "site.pem").write_bytes(pki.chain_pem(chain))  # type: ignore[arg-type]
    (tmp_path / "site.key").write_bytes(pki.key_pem(key))
    (tmp_path / "ca.pem").write_bytes(pki.cert_pem(ca.anchor))
    with_files = f"@{tmp_path / 'site.pem'},@{tmp_path / 'site.key'}"
    server = ProxyProcess(f"inbound.orig_dst_override=127.0.0.1:{backend.port}",
                          f"inbound.tls_terminate={backend.port}={with_files}")
    try:
        done = curl("--cacert", str(tmp_path / "ca.pem"), "--resolve",
                    f"files.example.test:{server.inbound}:127.0.0.1",
                    f"https://files.example.test:{server.inbound}/f")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["headers"]["via"]
    finally:
        server.stop()


def test_thrift_through_mesh_tls(root: Path, identity: IdentityProcess) -> None:
    """Thrift calls (framed binary, thriftpy2 on both ends) cross the mesh: the client
    proxy's Thrift upstream connection is mesh TLS, the server proxy detects Thrift inside
    it and counts the client's identity."""
    server = ThriftEcho("framed-binary")
    p = Pair(root, identity, server.port)
    try:
        c = thrift_client("framed-binary", p.client.outbound)
        try:
            assert c.ping() == "pong"
            assert [c.add(i, 1) for i in range(5)] == [1, 2, 3, 4, 5]
        finally:
            c.close()
        assert p.client.metric("tcp_open_total", protocol="thrift", peer="dst", tls="true",
                               server_id=API) == 1
        assert p.server.metric("tcp_open_total", protocol="thrift", peer="src", tls="true",
                               client_id=WEB) == 1
        assert p.server.metric("inbound_tcp_authz_allow_total", client_id=WEB) == 1
    finally:
        p.stop()
        server.close()
