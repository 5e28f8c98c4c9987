"""Test support: run the real proxy as a subprocess, and small real upstream servers.

The upstream server is written on h11 (an independent, strict HTTP/1.1 implementation), so
the proxy's wire output is checked by a parser that is not the one it uses itself.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import h11

from appliance.telemetry import scrape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def recv_until_eof(s: socket.socket) -> bytes:
    """Everything the peer sends until it closes."""
    chunks = []
    while data := s.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


@contextmanager
def static_server(directory: str, host: str = "127.0.0.1") -> Iterator[int]:
    """``python3 -m http.server`` (HTTP/1.0, an unmodified real server) on a free port."""
    port = free_port()
    server = subprocess.Popen(["python3", "-m", "http.server", str(port), "--bind", host,
                               "--directory", directory],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def listening() -> bool:
            with socket.socket(family) as probe:
                return probe.connect_ex((host, port)) == 0
        wait_for(listening, what=f"http.server on {host}:{port}")
        yield port
    finally:
        server.terminate()
        server.wait()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class ProxyProcess:
    """``appliance proxy`` in a subprocess on free loopback ports."""

    def __init__(self, *settings: str, env: dict[str, str] | None = None) -> None:
        self.outbound = free_port()
        self.inbound = free_port()
        self.admin = free_port()
        args = [sys.executable, "-m", "appliance", "proxy",
                "--outbound-port", str(self.outbound), "--inbound-port", str(self.inbound),
                "--admin-port", str(self.admin),
                "--set", "outbound.bind=127.0.0.1", "--set", "inbound.bind=127.0.0.1",
                "--set", "admin.bind=127.0.0.1"]
        for s in settings:
            args += ["--set", s]
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self._output: list[bytes] = []
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        try:
            wait_for(self._ready, timeout=15, what="proxy /ready")
        except AssertionError:
            self.stop()
            raise AssertionError("proxy did not become ready:\n" + self.output()) from None

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._output.append(line)

    def output(self) -> str:
        return b"".join(self._output).decode(errors="replace")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("proxy exited:\n" + self.output())
        try:
            return http_get(f"http://127.0.0.1:{self.admin}/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def metrics(self) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.admin}/metrics")
        assert status == 200
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return scrape.total(self.metrics(), name, **labels)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def peak_rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


@contextmanager
def proxy(*settings: str, **kw: Any) -> Iterator[ProxyProcess]:
    p = ProxyProcess(*settings, **kw)
    try:
        yield p
    finally:
        code = p.stop()
        assert code == 0, f"proxy exited with {code}:\n{p.output()}"


# --- a blocking TCP server, a thread per connection --------------------------------------


class ThreadedTcpServer:
    """A TCP server on 127.0.0.1 (an ephemeral port, in ``port``): one thread accepts, and
    each connection gets a thread of its own that runs :meth:`handle`. ``connections``
    counts the accepts; :meth:`close` stops accepting."""

    def __init__(self, backlog: int = 16) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                n = self.connections
            threading.Thread(target=self.handle, args=(conn, n), daemon=True).start()

    def handle(self, conn: socket.socket, n: int) -> None:
        """Serve one connection, the ``n``-th accepted (from 1), and close it."""
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


# --- an upstream HTTP/1.1 server on h11 ---------------------------------------------------

Handler = Callable[[h11.Request, bytes], Any]
Answer = Callable[[h11.Connection, asyncio.StreamWriter, h11.Request, bytes], Awaitable[bool]]


async def read_request(conn: h11.Connection, reader: asyncio.StreamReader
                       ) -> tuple[h11.Request, bytes] | None:
    """The next request on a server connection and its whole body; None when the client
    closed the connection between requests."""
    request = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data and request is None:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def serve_requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         answer: Answer) -> None:
    """Serve one connection with keep-alive: each request is given to ``answer``, which
    writes the response (False: it dropped the connection), until either side closes.
    h11 errors and connection errors are the caller's to catch."""
    conn = h11.Connection(h11.SERVER)
    while True:
        got = await read_request(conn, reader)
        if got is None or not await answer(conn, writer, *got):
            return
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


class H11Server:
    """A threaded asyncio server speaking HTTP/1.1 through h11, with keep-alive.

    Routes by path prefix to handlers that return (status, headers, body) where body is
    bytes, or an iterator of bytes (sent chunked unless a content-length header is given),
    or an awaitable producing either.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[h11.Request, bytes]] = []
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await serve_requests(reader, writer, self._respond)
        except (h11.RemoteProtocolError, ConnectionError):
            pass
        finally:
            if not self.loop.is_closed():
                writer.close()

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                       request: h11.Request, body: bytes) -> bool:
        self.requests.append((request, body))
        target = request.target.decode()
        status, headers, payload = route(target, request, body)
        if inspect.iscoroutine(payload):
            payload = await payload
        if isinstance(payload, bytes):
            headers = [*headers, ("content-length", str(len(payload)))]
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
            if request.method != b"HEAD":
                writer.write(conn.send(h11.Data(data=payload)))
        else:
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
            for piece in payload if request.method != b"HEAD" else ():
                writer.write(conn.send(h11.Data(data=piece)))
                await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return True

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def route(target: str, request: h11.Request, body: bytes) -> tuple[int, list, Any]:
    """The behaviours the tests rely on, by path."""
    path, _, query = target.partition("?")
    if path == "/echo":
        hdrs = [(b"x-seen-" + n, v) for n, v in request.headers
                if n in (b"via", b"connection", b"transfer-encoding", b"x-custom")]
        return 200, hdrs, body
    if path == "/chunked":
        return 200, [], iter([b"hello ", b"chunked ", b"world"])
    if path == "/status":
        return int(query or 200), [], b"status\n"
    if path == "/slow":
        async def late() -> bytes:
            await asyncio.sleep(float(query or 1))
            return b"late\n"
        return 200, [], late()
    if path == "/big":
        size = int(query)
        piece = b"x" * 65536

        def gen() -> Iterator[bytes]:
            left = size
            while left > 0:
                n = min(left, len(piece))
                left -= n
                yield piece[:n]
        return 200, [("content-length", str(size))], gen()
    if path == "/count":  # consume the body, answer its size
        return 200, [], str(len(body)).encode()
    return 200, [], f"{request.method.decode()} {target}\n".encode()
