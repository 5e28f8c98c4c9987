"""TLS termination after detection (appliance.net.tls_session) on real loopback sockets under
uvloop: the hello already read is fed in, the inner protocol gets a working transport
(identity, flow control both ways, half-close, protocol switch), failures are reported."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from mtls_fixtures import API, WEB, MemPki

from appliance.identity.tls import MESH_ALPN, peer_identity
from appliance.net.tls_session import TlsSession, TlsTransport
from certs import sslctx

CA = MemPki()


def run(coro: Callable[[], Coroutine[Any, Any, None]], timeout: float = 20) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro(), timeout)
    uvloop.run(bounded())


def site_context() -> ssl.SSLContext:
    """A plain server context (no client certificate) for ``localhost``."""
    chain, key = CA.leaf(None, dns=("localhost",))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sslctx.load_chain(ctx, chain, key)  # type: ignore[arg-type]
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def site_client() -> ssl.SSLContext:
    return ssl.create_default_context(cadata=sslctx.anchors_pem(CA.anchors))


class App(asyncio.Protocol):
    """The inner protocol: records everything; echoes unless told otherwise."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.transport: TlsTransport | None = None
        self.received = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_exc: Exception | None = None
        self.pauses = 0
        self.resumed = asyncio.Event()
        self.write_paused = False
        self.keep_open_on_eof = True

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.echo and self.transport is not None:
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.eof.set()
        return self.keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self.lost.set()

    def pause_writing(self) -> None:
        self.pauses += 1
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resumed.set()


class Terminating(asyncio.Protocol):
    """What the listener does: read the first bytes (detection), then start TLS on them."""

    def __init__(self, ctx: ssl.SSLContext, app: App, errors: list[str], *, need: int = 1,
                 timeout: float = 10.0) -> None:
        self.ctx, self.app, self.errors, self.need, self.timeout = ctx, app, errors, need, timeout
        self.buf = b""
        self.transport: Any = None
        self.ready = asyncio.Event()
        self.tls: TlsSession | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= self.need and self.tls is None:
            self.tls = TlsSession(self.ctx, self.transport, asyncio.get_running_loop(),
                                 on_ready=self.on_ready, on_error=self.errors.append,
                                 handshake_timeout=self.timeout)
            self.tls.start(self.buf, False)

    def on_ready(self, transport: TlsTransport) -> None:
        transport.set_protocol(self.app)
        self.app.connection_made(transport)
        self.ready.set()


async def serve(ctx: ssl.SSLContext, app: App, errors: list[str],
                **kw: Any) -> tuple[asyncio.AbstractServer, int, list[Terminating]]:
    made: list[Terminating] = []

    def factory() -> Terminating:
        made.append(Terminating(ctx, app, errors, **kw))
        return made[-1]
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], made


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_echo_with_the_hello_read_before_termination() -> None:
    """The ClientHello consumed by detection is fed in; the inner protocol echoes, and the
    transport answers the extra info the drivers use."""
    async def main() -> None:
        app, errors = App(), []
        server, port, made = await serve(site_context(), app, errors, need=5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=site_client(),
                                                       server_hostname="localhost")
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        t = app.transport
        assert t is not None and errors == []
        assert t.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert t.get_extra_info("peername") == writer.get_extra_info("sockname")
        assert t.get_extra_info("socket") is not None
        assert t.get_extra_info("cipher")[1] == "TLSv1.3"
        assert t.get_protocol() is app and t.is_reading() and not t.is_closing()
        t.set_extra("peer_identity", "x")
        assert t.get_extra_info("peer_identity") == "x"
        assert t.get_extra_info("nothing", 42) == 42
        app.keep_open_on_eof = False  # the client's close_notify ends it
        writer.close()
        await asyncio.wait_for(app.lost.wait(), 5)
        server.close()
    run(main)


def test_mesh_handshake_gives_the_client_identity() -> None:
    """Mesh contexts on both ends: ALPN appliance.mesh/1 and the client's SPIFFE ID."""
    async def main() -> None:
        app, errors = App(), []
        server, port, _ = await serve(CA.server_context(API), app, errors)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=CA.client_context(WEB), server_hostname=None)
        writer.write(b"x")
        await reader.readexactly(1)
        assert app.transport is not None
        sslobj = app.transport.get_extra_info("ssl_object")
        assert sslobj.selected_alpn_protocol() == MESH_ALPN
        assert peer_identity(sslobj) == WEB
        assert peer_identity(writer.get_extra_info("ssl_object")) == API
        writer.close()
        server.close()
    run(main)


OTHER_CA = MemPki()


@pytest.mark.parametrize("client,reason", [
    (lambda: _no_cert_client(), "peer did not return a certificate"),
    (lambda: OTHER_CA.client_context(WEB, trust=CA), "unable to get local issuer"),
    (lambda: CA.client_context(WEB, start=-7200, lifetime=3600), "certificate has expired"),
    (lambda: CA.client_context(WEB, start=3600), "certificate is not yet valid"),
])
def test_bad_client_certificates_fail_the_handshake(client: Callable[[], ssl.SSLContext],
                                                    reason: str) -> None:
    """No, untrusted, expired or not-yet-valid client certificate: on_error says which,
    the inner protocol is never started, the client sees the connection end."""
    async def main() -> None:
        app, errors = App(), []
        server, port, _ = await serve(CA.server_context(API), app, errors)
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client(), server_hostname=None)
            writer.write(b"hello?")
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await reader.readexactly(1)
        except (ssl.SSLError, ConnectionError):
            pass  # refused during the client's own handshake
        await until(lambda: bool(errors), "on_error")
        assert reason in errors[0], errors
        assert app.transport is None and not app.received
        server.close()
    run(main)


def _no_cert_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=sslctx.anchors_pem(CA.anchors))
    ctx.set_alpn_protocols([MESH_ALPN])
    return ctx


def test_a_stalled_handshake_times_out() -> None:
    """A client that stops mid-hello is closed after the handshake timeout."""
    async def main() -> None:
        app, errors = App(), []
        server, port, _ = await serve(site_context(), app, errors, timeout=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on us
        assert errors == ["the TLS handshake did not finish within 0.3s"]
        server.close()
    run(main)


def test_a_big_response_pauses_the_inner_writer_and_arrives_whole() -> None:
    """The raw transport's buffer fills behind a slow reader: the inner protocol is paused
    and resumed, and every byte arrives in order."""
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB

    async def main() -> None:
        app, errors = App(echo=False), []
        server, port, _ = await serve(site_context(), app, errors)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=site_client(),
                                                       server_hostname="localhost")
        writer.write(b"go")
        await until(lambda: app.received == b"go", "the request")
        transport = app.transport
        assert transport is not None

        async def slow_reader() -> bytes:
            await asyncio.sleep(0.5)  # let the buffers fill first
            return await reader.readexactly(len(payload))
        reading = asyncio.create_task(slow_reader())
        sent = 0
        while sent < len(payload):  # write while not paused, like the drivers do
            if app.write_paused:
                app.resumed.clear()
                await app.resumed.wait()
                continue
            transport.write(payload[sent:sent + 65536])
            sent += 65536
            await asyncio.sleep(0)
        got = await reading
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert app.pauses >= 1
        writer.close()
        server.close()
    run(main, timeout=60)


def test_pause_reading_holds_what_the_client_sends() -> None:
    """While the inner protocol has paused reading nothing reaches it; after resume_reading
    everything does, in order."""
    payload = b"0123456789abcdef" * (256 * 1024)  # 4 MiB

    async def main() -> None:
        app, errors = App(echo=False), []
        server, port, _ = await serve(site_context(), app, errors)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=site_client(),
                                                       server_hostname="localhost")
        writer.write(b"first")
        await until(lambda: len(app.received) >= 5, "the first bytes")
        assert app.transport is not None
        app.transport.pause_reading()
        assert not app.transport.is_reading()
        held = len(app.received)
        writer.write(payload)
        await asyncio.sleep(0.3)
        assert len(app.received) == held  # nothing while paused
        app.transport.resume_reading()
        await until(lambda: len(app.received) == 5 + len(payload), "everything")
        assert bytes(app.received) == b"first" + payload
        writer.close()
        server.close()
    run(main, timeout=60)


class BioClient:
    """A TLS client driven by hand (MemoryBIO), to send close_notify and keep reading."""

    def __init__(self, ctx: ssl.SSLContext, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> BioClient:
        """A client of 127.0.0.1:``port`` that trusts the site certificate, handshake done."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(site_client(), reader, writer)
        await client.handshake()
        return client

    def flush(self) -> None:
        if self.out.pending:
            self.writer.write(self.out.read())

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self.flush()
                return
            except ssl.SSLWantReadError:
                self.flush()
                self.inc.write(await self.reader.read(65536))

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self.flush()

    def close_notify(self) -> None:
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.flush()

    async def read_to_eof(self) -> bytes:
        got = bytearray()
        while True:
            try:
                data = self.obj.read(65536)
            except ssl.SSLWantReadError:
                more = await self.reader.read(65536)
                if not more:
                    raise AssertionError("TCP closed without close_notify") from None
                self.inc.write(more)
                continue
            except ssl.SSLZeroReturnError:
                return bytes(got)
            if not data:
                return bytes(got)
            got += data


def test_half_close_both_ways() -> None:
    """The client's close_notify is the inner protocol's EOF; the inner protocol can still
    answer, and its write_eof is a close_notify the client reads as EOF."""
    async def main() -> None:
        app, errors = App(echo=False), []
        server, port, _ = await serve(site_context(), app, errors)
        client = await BioClient.connect(port)
        client.send(b"request")
        client.close_notify()
        await asyncio.wait_for(app.eof.wait(), 5)
        assert bytes(app.received) == b"request"
        assert app.transport is not None and app.transport.can_write_eof()
        app.transport.write(b"answer after your EOF")
        app.transport.write_eof()
        assert await client.read_to_eof() == b"answer after your EOF"
        app.transport.close()
        await asyncio.wait_for(app.lost.wait(), 5)
        client.writer.close()
        server.close()
    run(main)


def test_eof_closes_when_the_inner_protocol_says_so() -> None:
    """An inner protocol whose eof_received returns False gets the connection closed, with
    close_notify (a clean EOF for the client)."""
    async def main() -> None:
        app, errors = App(echo=False), []
        app.keep_open_on_eof = False
        server, port, _ = await serve(site_context(), app, errors)
        client = await BioClient.connect(port)
        client.close_notify()
        assert await client.read_to_eof() == b""
        await asyncio.wait_for(app.lost.wait(), 5)
        client.writer.close()
        server.close()
    run(main)


class Switching(App):
    """Hands the connection to ``then`` after its first piece of data, as detection does."""

    def __init__(self, then: App) -> None:
        super().__init__(echo=False)
        self.then = then

    def data_received(self, data: bytes) -> None:
        self.received += data
        assert self.transport is not None
        self.transport.set_protocol(self.then)
        self.then.connection_made(self.transport)


def test_data_after_a_protocol_switch_goes_to_the_new_protocol() -> None:
    """set_protocol from inside data_received: later data reaches the new protocol."""
    async def main() -> None:
        second = App(echo=True)
        first, errors = Switching(second), []
        server, port, _ = await serve(site_context(), first, errors)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=site_client(),
                                                       server_hostname="localhost")
        writer.write(b"detect-me")
        await until(lambda: bool(first.received), "the first piece")
        writer.write(b"for the second")
        assert await reader.readexactly(14) == b"for the second"
        assert bytes(first.received) == b"detect-me"
        writer.close()
        server.close()
    run(main)


def test_a_corrupt_record_aborts_the_connection() -> None:
    """Bytes that are not a valid record after the handshake: the connection is aborted and
    the inner protocol learns it; the reason is kept."""
    async def main() -> None:
        app, errors = App(), []
        server, port, made = await serve(site_context(), app, errors)
        client = await BioClient.connect(port)
        client.send(b"ok")
        await until(lambda: bool(app.received), "the first record")
        client.writer.write(b"\x17\x03\x03\x00\x10" + b"\x00" * 16)
        await asyncio.wait_for(app.lost.wait(), 5)
        assert made[0].tls is not None and "tls_error" in made[0].tls.extra
        client.writer.close()
        server.close()
    run(main)


def test_close_sends_close_notify_after_pending_data() -> None:
    """close() flushes what was written, then the client sees a clean EOF."""
    async def main() -> None:
        app, errors = App(echo=False), []
        server, port, _ = await serve(site_context(), app, errors)
        client = await BioClient.connect(port)
        client.send(b"x")
        await until(lambda: bool(app.received), "the request")
        assert app.transport is not None
        app.transport.writelines([b"last ", b"words"])
        app.transport.close()
        assert app.transport.is_closing()
        app.transport.write(b"ignored after close")
        assert await client.read_to_eof() == b"last words"
        await asyncio.wait_for(app.lost.wait(), 5)
        client.writer.close()
        server.close()
    run(main)
