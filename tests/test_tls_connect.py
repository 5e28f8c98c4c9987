"""Direction.connect (appliance.net.tls): plaintext, mesh TLS with the expected identity,
originated TLS; every TLS failure is a TlsConnectError naming the cause, and nothing
reaches a peer that did not prove who it is."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from mtls_fixtures import API, WEB, MemPki

from appliance import config
from appliance.identity.client import MeshedPeer
from appliance.identity.meshed import MISSING, MeshedLookupError
from appliance.identity.tls import MESH_ALPN
from appliance.net.addr import OrigDst
from appliance.net.listener import Direction
from appliance.net.tls import TlsConnectError
from appliance.telemetry import scrape
from appliance.telemetry.metrics import Registry
from certs import sslctx

CA = MemPki()
OTHER_CA = MemPki()


def run(coro: Callable[[], Coroutine[Any, Any, None]], timeout: float = 20) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro(), timeout)
    uvloop.run(bounded())


class StubMeshed:
    """The identity service's meshed answers, as a table (an exception: lookup fails)."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.lookups = 0

    def cached(self, address: str) -> Any:
        return MISSING

    async def lookup(self, address: str) -> Any:
        self.lookups += 1
        answer = self.answers.get(address)
        if isinstance(answer, Exception):
            raise answer
        return answer


class StubIdentity:
    def __init__(self, client: ssl.SSLContext | None, answers: dict[str, Any]) -> None:
        self.client_context = client
        self.meshed = StubMeshed(answers)

    refresh_count = 0

    async def wait_ready(self, timeout: float) -> bool:
        await asyncio.sleep(timeout)
        return False

    def expiration_timestamp_seconds(self) -> float | None:
        return None


def meshed(identity: str) -> MeshedPeer:
    return MeshedPeer("127.0.0.1", identity, 4e9)


def direction(identity: Any = None, **overrides: Any) -> Direction:
    conf = config.load(overrides={"outbound.connect_timeout": "1s", **overrides})
    registry = Registry()
    registry.identity = identity
    return Direction("outbound", conf, registry, "test", asyncio.get_running_loop())


class Client(asyncio.Protocol):
    """The caller's protocol: what it was given and what it received."""

    made = 0

    def __init__(self, d: Direction) -> None:
        Client.made += 1
        self.tcp = d.tcp_stats("http/1", "dst")
        self.transport: Any = None
        self.received = bytearray()
        self.got = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.tcp.opened += 1

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.got.set()


class Server(asyncio.Protocol):
    """An echo server that may greet first; records what it received."""

    received: list[bytes] = []

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.greeting:
            transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        Server.received.append(data)
        self.transport.write(data)


async def listen(ctx: ssl.SSLContext | None, greeting: bytes = b"") -> tuple[Any, int]:
    Server.received = []
    server = await asyncio.get_running_loop().create_server(
        lambda: Server(greeting), "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


def test_meshed_destination_gets_mesh_tls_with_the_server_identity() -> None:
    """The identity service names the server: TLS 1.3, mesh ALPN, the server's identity
    checked, and the connection counters carry tls and server_id."""
    async def main() -> None:
        server, port = await listen(CA.server_context(API))
        ident = StubIdentity(CA.client_context(WEB), {"127.0.0.1": meshed(API)})
        d = direction(ident)
        transport, client = await d.connect(lambda: Client(d), OrigDst("127.0.0.1", port))
        sslobj = transport.get_extra_info("ssl_object")
        assert sslobj.version() == "TLSv1.3" and sslobj.selected_alpn_protocol() == MESH_ALPN
        transport.write(b"hello")
        await asyncio.wait_for(client.got.wait(), 5)
        assert client.received == b"hello"
        text = d.registry.render()
        assert scrape.total(text, "tcp_open_total", tls="true", server_id=API) == 1
        transport.close()
        server.close()
    run(main)


@pytest.mark.parametrize("server_ctx,expected,kind,reason", [
    (lambda: CA.server_context(API), WEB, "mesh_tls_identity",
     f"peer presented {API}, expected {WEB}"),
    (lambda: CA.server_context(API, start=-7200, lifetime=3600), API, "mesh_tls_failed",
     "certificate verify failed: certificate has expired"),
    (lambda: OTHER_CA.server_context(API), API, "mesh_tls_failed",
     "certificate verify failed: unable to get local issuer certificate"),
    (lambda: _not_mesh_server(), API, "mesh_tls_identity",
     "did not select the mesh protocol"),
])
def test_mesh_tls_failures_name_the_cause(server_ctx: Callable[[], ssl.SSLContext],
                                          expected: str, kind: str, reason: str) -> None:
    """Wrong identity, expired or untrusted certificate, a TLS server that is no mesh
    proxy: TlsConnectError with the cause, and the caller's protocol is never made."""
    async def main() -> None:
        server, port = await listen(server_ctx())
        ident = StubIdentity(CA.client_context(WEB), {"127.0.0.1": meshed(expected)})
        d = direction(ident)
        before = Client.made
        with pytest.raises(TlsConnectError) as info:
            await d.connect(lambda: Client(d), OrigDst("127.0.0.1", port))
        assert info.value.kind == kind
        assert str(info.value).startswith(f"mesh TLS to 127.0.0.1:{port} ({expected}) failed")
        assert reason in str(info.value)
        assert info.value.strerror == str(info.value)  # OSError handlers see the message
        assert Client.made == before and Server.received == []
        server.close()
    run(main)


def _not_mesh_server() -> ssl.SSLContext:
    """A TLS server with a mesh-trusted certificate that speaks no mesh ALPN."""
    chain, key = CA.leaf(API)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sslctx.load_chain(ctx, chain, key)  # type: ignore[arg-type]
    return ctx


def test_plaintext_server_where_mesh_tls_was_expected() -> None:
    """A meshed answer for an address whose server speaks plaintext: a TLS failure."""
    async def main() -> None:
        server, port = await listen(None, greeting=b"HTTP/1.1 400 Bad Request\r\n\r\n")
        ident = StubIdentity(CA.client_context(WEB), {"127.0.0.1": meshed(API)})
        d = direction(ident)
        with pytest.raises(TlsConnectError) as info:
            await d.connect(lambda: Client(d), OrigDst("127.0.0.1", port))
        assert info.value.kind == "mesh_tls_failed"
        server.close()
    run(main)


@pytest.mark.parametrize("answer,error", [(None, 0), (MeshedLookupError("down"), 1)])
def test_unmeshed_or_unknown_destination_is_plaintext(answer: Any, error: int) -> None:
    """Not meshed, or the lookup failed with nothing cached: plaintext (the failure is
    counted as mesh_lookup_failed)."""
    async def main() -> None:
        server, port = await listen(None)
        ident = StubIdentity(CA.client_context(WEB), {"127.0.0.1": answer})
        d = direction(ident)
        transport, client = await d.connect(lambda: Client(d), OrigDst("127.0.0.1", port))
        assert transport.get_extra_info("ssl_object") is None
        transport.write(b"plain")
        await asyncio.wait_for(client.got.wait(), 5)
        assert d.registry.errors.get(("outbound", "mesh_lookup_failed"), 0) == error
        transport.close()
        server.close()
    run(main)


def test_no_certificate_yet_waits_then_fails() -> None:
    """A meshed destination while the proxy has no certificate: it waits within the
    connect timeout, then fails without sending anything."""
    async def main() -> None:
        server, port = await listen(CA.server_context(API))
        ident = StubIdentity(None, {"127.0.0.1": meshed(API)})
        d = direction(ident, **{"outbound.connect_timeout": "0.2s"})
        with pytest.raises(TlsConnectError) as info:
            await d.connect(lambda: Client(d), OrigDst("127.0.0.1", port))
        assert info.value.kind == "mesh_tls_no_certificate"
        assert "no certificate from the identity service yet" in str(info.value)
        server.close()
    run(main)


def test_refused_tcp_is_still_an_os_error() -> None:
    """TCP failures keep their own error (not a TLS one)."""
    async def main() -> None:
        ident = StubIdentity(CA.client_context(WEB), {"127.0.0.1": meshed(API)})
        d = direction(ident)
        probe = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        with pytest.raises(OSError) as info:
            await d.connect(lambda: Client(d), OrigDst("127.0.0.1", port))
        assert not isinstance(info.value, TlsConnectError)
    run(main)


def test_names_are_not_looked_up() -> None:
    """A destination given by name (explicit proxy requests) is never looked up."""
    async def main() -> None:
        server, port = await listen(None)
        ident = StubIdentity(CA.client_context(WEB), {})
        d = direction(ident)
        transport, _ = await d.connect(lambda: Client(d), OrigDst("localhost", port))
        assert ident.meshed.lookups == 0
        transport.close()
        server.close()
    run(main)


def site_server(names: tuple[str, ...]) -> tuple[ssl.SSLContext, list[str | None]]:
    chain, key = CA.leaf(None, dns=names)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sslctx.load_chain(ctx, chain, key)  # type: ignore[arg-type]
    seen: list[str | None] = []
    ctx.sni_callback = lambda obj, name, c: seen.append(name)  # type: ignore[assignment]
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx, seen


def test_origination_speaks_tls_with_sni_and_a_bundle(tmp_path: Path) -> None:
    """A configured destination gets TLS with the SNI, verified against the bundle, and
    ALPN from the caller; ``port:`` sends it to another port; it wins over mesh TLS."""
    async def main() -> None:
        ctx, seen = site_server(("api.example.test",))
        server, port = await listen(ctx, greeting=b"banner")
        bundle = tmp_path / "ca.pem"
        bundle.write_text(sslctx.anchors_pem(CA.anchors))
        ident = StubIdentity(CA.client_context(WEB), {"127.0.0.1": meshed(API)})
        d = direction(ident, **{"outbound.tls_originate":
                                f"127.0.0.1:80=sni:api.example.test,ca:{bundle},port:{port}"})
        transport, client = await d.connect(lambda: Client(d), OrigDst("127.0.0.1", 80),
                                            alpn="http/1.1")
        await asyncio.wait_for(client.got.wait(), 5)
        assert client.received == b"banner"  # what the server said first is not lost
        assert seen == ["api.example.test"] and ident.meshed.lookups == 0
        assert transport.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        assert scrape.total(d.registry.render(), "tcp_open_total", tls="true") == 1
        transport.close()
        server.close()
    run(main)


@pytest.mark.parametrize("option,reason", [
    ("sni:other.example.test,ca:{bundle}", "certificate verify failed: Hostname mismatch"),
    ("sni:api.example.test", "certificate verify failed: unable to get local issuer"),
    ("sni:api.example.test,ca:{missing}", "cannot load the CA bundle"),
])
def test_origination_failures(tmp_path: Path, option: str, reason: str) -> None:
    """Wrong name, a server the system store does not trust, a missing bundle:
    TlsConnectError tls_origination_failed naming the cause."""
    async def main() -> None:
        ctx, _ = site_server(("api.example.test",))
        server, port = await listen(ctx)
        bundle = tmp_path / "ca.pem"
        bundle.write_text(sslctx.anchors_pem(CA.anchors))
        text = option.format(bundle=bundle, missing=tmp_path / "missing.pem")
        d = direction(None, **{"outbound.tls_originate": f"{port}={text}"})
        with pytest.raises(TlsConnectError) as info:
            await d.connect(lambda: Client(d), OrigDst("127.0.0.1", port))
        assert info.value.kind == "tls_origination_failed"
        assert str(info.value).startswith(f"TLS to 127.0.0.1:{port} (")
        assert reason in str(info.value)
        server.close()
    run(main)
