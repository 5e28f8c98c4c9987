"""Backends that misbehave on purpose, for fault-injection tests and bench/reliability.py.

A :class:`FaultyBackend` is an HTTP/1.1 server on 127.0.0.1 (h11, keep-alive) running on its
own thread and event loop. Its :class:`Fault` says how it misbehaves, and can be changed
while it runs:

- ``fail_share``: that share of requests (drawn from a seeded generator) gets ``503``;
- ``delay``: every response waits this many seconds first (a slow replica);
- ``reset_mid_body``: the response head and half of a body are sent, then the connection
  is reset (RST);
- ``reset_after_request``: the request is read whole, then the connection is reset before
  any response byte;
- ``blackhole``: connections are accepted and read, never answered.

Every request it reads is recorded (method, target, body length, body digest), so tests
can say exactly what reached it and how many times. Bodies are answered with the replica's
name, so the client knows which replica served it.

:class:`GrpcBackend` is the same for gRPC (grpcio, no protoc): ``/test.Echo/Unary`` answers
``<name>:<request>``, or UNAVAILABLE for ``fail_share`` of the calls (trailers-only).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import struct
import threading
from dataclasses import dataclass, field

import h11
from support import serve_requests

__all__ = ["Fault", "FaultyBackend", "GrpcBackend", "Seen"]


@dataclass
class Fault:
    """How a backend misbehaves (all off: a healthy backend)."""

    fail_share: float = 0.0
    delay: float = 0.0
    reset_mid_body: bool = False
    reset_after_request: bool = False
    blackhole: bool = False


@dataclass(frozen=True)
class Seen:
    """One request as the backend read it."""

    method: str
    target: str
    body_len: int
    digest: str
    headers: dict[str, str] = field(default_factory=dict, compare=False)


class FaultyBackend:
    """An HTTP/1.1 backend with injectable faults (see the module docstring)."""

    def __init__(self, name: str, fault: Fault | None = None, *, seed: int = 1) -> None:
        self.name = name
        self.fault = fault or Fault()
        self.rng = random.Random(seed)
        self.seen: list[Seen] = []
        self.connections = 0
        self.answered: dict[int, int] = {}  # status -> count
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._open: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"faulty-{name}")
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError(f"backend {name} did not start")

    # --- the server -------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._stop = asyncio.Event()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024))
        self.port = int(self.server.sockets[0].getsockname()[1])
        self._ready.set()
        self.loop.run_forever()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
        self._open.add(writer)
        try:
            await serve_requests(reader, writer, self._answer)
        except (h11.ProtocolError, ConnectionError):
            pass
        finally:
            self._open.discard(writer)
            if not self.loop.is_closed():
                writer.close()

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                      request: h11.Request, body: bytes) -> bool:
        """Record and answer one request; False when the connection was dropped."""
        fault = self.fault
        seen = Seen(request.method.decode(), request.target.decode(), len(body),
                    hashlib.sha256(body).hexdigest()[:16],
                    {n.decode(): v.decode("latin-1") for n, v in request.headers})
        with self._lock:
            self.seen.append(seen)
            failing = fault.fail_share > 0 and self.rng.random() < fault.fail_share
        if fault.blackhole:
            await self._stop.wait()  # never answers; the backend is closing
            return False
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.reset_after_request:
            _reset(writer)
            return False
        status = 503 if failing else 200
        payload = (f"{self.name} {seen.method} {seen.target} {seen.body_len}\n".encode()
                   if not fault.reset_mid_body else b"x" * 2000)
        headers = [("content-length", str(len(payload))), ("x-replica", self.name)]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        if fault.reset_mid_body:
            writer.write(conn.send(h11.Data(data=payload[:1000])))
            await writer.drain()
            _reset(writer)
            return False
        writer.write(conn.send(h11.Data(data=payload)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        with self._lock:
            self.answered[status] = self.answered.get(status, 0) + 1
        return True

    # --- for tests ----------------------------------------------------------------------------
    def count(self, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.seen if method is None or s.method == method)

    def reset_counts(self) -> None:
        with self._lock:
            self.seen.clear()
            self.answered.clear()
            self.connections = 0

    def close(self) -> None:
        async def shut() -> None:
            self._stop.set()
            self.server.close()
            for writer in list(self._open):
                writer.transport.abort()
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FaultyBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN: the peer sees a reset connection."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class GrpcBackend:
    """A grpcio server with ``/test.Echo/Unary``; failing or slow on demand."""

    def __init__(self, name: str, fault: Fault | None = None, *, seed: int = 1) -> None:
        from concurrent import futures

        import grpc

        self.name = name
        self.fault = fault or Fault()
        self.rng = random.Random(seed)
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._grpc = grpc
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handler = grpc.unary_unary_rpc_method_handler(self._unary)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", {"Unary": handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _unary(self, request: bytes, context: object) -> bytes:
        fault = self.fault
        with self._lock:
            self.seen.append(Seen("POST", "/test.Echo/Unary", len(request),
                                  hashlib.sha256(request).hexdigest()[:16]))
            failing = fault.fail_share > 0 and self.rng.random() < fault.fail_share
        if fault.delay:
            import time

            time.sleep(fault.delay)
        if failing:
            context.abort(self._grpc.StatusCode.UNAVAILABLE,  # type: ignore[attr-defined]
                          f"{self.name} is failing")
        return f"{self.name}:".encode() + request[:32]

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def close(self) -> None:
        self.server.stop(0)

    def __enter__(self) -> GrpcBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
