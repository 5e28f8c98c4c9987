"""The discovery HTTP client against real local servers: framing, streaming, TLS, errors."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import h11
import pytest
from fakeapis import FakeServer, Reply, Request, self_signed, server_tls
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.net import httpclient
from appliance.net.httpclient import Exchange, HTTPClientError, Target, parse_url, request_head

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A server that reads a request head, records it, then runs a script of writes."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def sends(*pieces: bytes, hold: float = 0.0) -> Script:
    """A script that writes each piece (draining between) and then holds the line."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        await asyncio.sleep(hold)
    return script


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.mark.parametrize("response, body", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n", b"hello"),
    (b"HTTP/1.1 200 OK\r\n\r\nhello", b"hello"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
])
def test_get_reads_each_body_framing(response: bytes, body: bytes) -> None:
    """Content-Length, chunked, read-until-close and bodiless responses are read whole."""
    async def scenario() -> httpclient.Response:
        async with RawServer(sends(response)) as url:
            return await httpclient.get(url + "/x")
    got = run(scenario())
    assert got.body == body


def test_request_head_on_the_wire() -> None:
    """The request line, Host, the caller's headers and Connection: close reach the server."""
    server = RawServer(sends(b"HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nX-A: 1\r\nX-A: 2\r\n"
                             b"Content-Length: 0\r\n\r\n"))

    async def scenario() -> httpclient.Response:
        async with server as url:
            return await httpclient.get(url + "/v1/a?b=c%2Fd", {"X-Consul-Token": "t0k"})
    got = run(scenario())
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(server.heads[0])
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert request.method == b"GET" and request.target == b"/v1/a?b=c%2Fd"
    headers = dict(request.headers)
    assert headers[b"host"].startswith(b"127.0.0.1:")
    assert headers[b"x-consul-token"] == b"t0k" and headers[b"connection"] == b"close"
    assert got.status == 200 and got.headers["x-consul-index"] == "7"
    assert got.headers["x-a"] == "1, 2"


def test_against_an_independent_h11_server() -> None:
    """A response framed by h11 (chunked for an unknown length) is read intact."""
    class Chunky(FakeServer):
        async def handle(self, request: Request) -> Reply:
            async def body() -> Any:
                for i in range(50):
                    yield b"%d," % i
            return 200, [("x-path", request.path)], body()

    async def scenario() -> httpclient.Response:
        async with Chunky() as server:
            return await httpclient.get(server.url + "/p")
    got = run(scenario())
    assert got.body == b"".join(b"%d," % i for i in range(50)) and got.headers["x-path"] == "/p"


@pytest.mark.parametrize("script, message", [
    (sends(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"), "middle of the body"),
    (sends(b"HTTP/1.1 200 OK\r\nContent-"), "before the response head"),
    (sends(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), "malformed response"),
    (sends(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
     "malformed response"),
    (sends(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100), "larger than"),
    (sends(b"HTTP/1.1 200 OK\r\n", hold=5), "no complete response within"),
])
def test_get_errors_name_the_url_and_the_reason(script: Script, message: str) -> None:
    """Truncated, malformed, oversized and slow responses raise HTTPClientError."""
    async def scenario() -> str:
        async with RawServer(script) as url:
            with pytest.raises(HTTPClientError) as info:
                await httpclient.get(url + "/e", timeout=0.5, max_body=50)
            return str(info.value)
    text = run(scenario())
    assert message in text and "/e" in text


@pytest.mark.parametrize("url, message", [
    ("ftp://127.0.0.1/", "scheme must be http or https"),
    ("http:///nohost", "no host"),
    ("http://127.0.0.1:99999/", "bad URL"),
])
def test_bad_urls_are_refused(url: str, message: str) -> None:
    """A URL that is not http(s) with a host and a port is an HTTPClientError."""
    with pytest.raises(HTTPClientError, match=message):
        run(httpclient.get(url))


def test_connection_refused_is_an_http_client_error() -> None:
    """Nothing listening: the error says connect failed."""
    async def scenario() -> None:
        async with RawServer(sends()) as url:
            pass
        await httpclient.get(url + "/")
    with pytest.raises(HTTPClientError, match="connect failed"):
        run(scenario())


@pytest.mark.parametrize("headers", [{"X-A": "a\r\nX-Injected: 1"}, {"X\nB": "v"}, {"": "v"}])
def test_header_injection_is_refused(headers: dict[str, str]) -> None:
    """CR, LF or NUL in a header name or value never reaches the wire."""
    with pytest.raises(HTTPClientError, match="forbidden character"):
        request_head(Target("http", "h", 80, "/"), headers)


def test_stream_yields_pieces_as_they_arrive() -> None:
    """A watch-style chunked body: the first piece is seen before the second is sent."""
    release = asyncio.Event

    async def scenario() -> list[bytes]:
        gate = release()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"6\r\nfirst\n\r\n")
            await writer.drain()
            await gate.wait()
            writer.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
            await writer.drain()

        seen = []
        async with asyncio.timeout(5), RawServer(script) as url, \
                httpclient.stream(url + "/w") as response:
            assert response.status == 200
            async for piece in response:
                seen.append(piece)
                gate.set()
        return seen
    assert run(scenario()) == [b"first\n", b"second\n"]


def test_stream_idle_timeout() -> None:
    """A stream that goes silent longer than idle_timeout raises HTTPClientError."""
    script = sends(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n", hold=5)

    async def scenario() -> list[bytes]:
        seen = []
        async with RawServer(script) as url:
            async with httpclient.stream(url + "/w", idle_timeout=0.2) as response:
                async for piece in response:
                    seen.append(piece)
        return seen
    with pytest.raises(HTTPClientError, match="nothing received for 0.2s"):
        run(scenario())


def test_stream_head_timeout() -> None:
    """A server that never answers: stream() fails after its head timeout."""
    async def scenario() -> None:
        async with RawServer(sends(hold=5)) as url:
            async with httpclient.stream(url + "/w", timeout=0.2):
                pass
    with pytest.raises(HTTPClientError, match="no response head within 0.2s"):
        run(scenario())


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return self_signed(str(tmp_path_factory.mktemp("tls")))


def test_tls_verified_with_the_given_ca(cert: tuple[str, str]) -> None:
    """https with a context trusting the server's CA works; the default context refuses."""
    class Hello(FakeServer):
        async def handle(self, request: Request) -> Reply:
            return 200, [], b"secure"

    async def scenario() -> tuple[bytes, str]:
        async with Hello(tls=server_tls(*cert)) as server:
            ok = await httpclient.get(server.url + "/", ssl=ssl.create_default_context(
                cafile=cert[0]))
            with pytest.raises(HTTPClientError) as info:
                await httpclient.get(server.url + "/")
            return ok.body, str(info.value)
    body, refused = run(scenario())
    assert body == b"secure" and "CERTIFICATE_VERIFY_FAILED" in refused


@pytest.mark.parametrize("url, target", [
    ("http://127.0.0.1:8500/v1/x?a=b", Target("http", "127.0.0.1", 8500, "/v1/x?a=b")),
    ("https://[::1]/", Target("https", "::1", 443, "/")),
    ("http://example", Target("http", "example", 80, "/")),
])
def test_parse_url_table(url: str, target: Target) -> None:
    """URLs split into scheme, host, default or given port and path with query."""
    assert parse_url(url) == target


@pytest.mark.parametrize("target, authority", [
    (Target("http", "::1", 80, "/"), "[::1]"), (Target("https", "h", 8443, "/"), "h:8443"),
])
def test_host_header_authority(target: Target, authority: str) -> None:
    """IPv6 hosts are bracketed; default ports are left out."""
    assert target.authority == authority


_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40).map(
    str.strip)


@given(st.dictionaries(st.from_regex(r"X-[a-z0-9-]{1,12}", fullmatch=True), _VALUE,
                       max_size=5))
def test_request_head_parses_as_sent(headers: dict[str, str]) -> None:
    """Any printable header values survive a strict parser (h11) unchanged."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request_head(Target("http", "h", 80, "/p"), headers))
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    got = {k.decode(): v.decode() for k, v in request.headers}
    assert all(got[name.lower()] == value for name, value in headers.items())


class _Pieces:
    """Stands for the reader and writer of an Exchange: each read returns the next piece."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces

    async def read(self, n: int) -> bytes:
        return next(self.pieces, b"")

    def close(self) -> None:
        pass


def _pieces(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in [*points, len(data)]:
        yield data[start:point]
        start = point


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=30), max_size=6),
       st.lists(st.integers(0, 10_000), max_size=8))
def test_chunked_body_survives_any_split(chunks: list[bytes], cuts: list[int]) -> None:
    """However the bytes of a chunked response are split across reads, the body is exact."""
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"

    async def scenario() -> bytes:
        io = _Pieces(p for p in _pieces(wire, cuts) if p)
        exchange = Exchange("test", io, io)  # type: ignore[arg-type]
        await exchange.read_head()
        body = b""
        while (piece := await exchange.next_chunk()) is not None:
            body += piece
        return body
    assert run(scenario()) == b"".join(chunks)
