"""The Echo service of ``echo.thrift`` for the Thrift tests and the benchmark: unmodified
thriftpy2 servers (``make_server``, a thread per connection) and clients (``make_client``),
in every transport and protocol the proxy supports.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from typing import Any

import thriftpy2
from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.rpc import make_client, make_server
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory

IDL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "echo.thrift")
echo = thriftpy2.load(IDL, module_name="echo_thrift")

# name -> (protocol factory, transport factory), as the apps of each kind would use them
VARIANTS: dict[str, tuple[Any, Any]] = {
    "framed-binary": (TBinaryProtocolFactory(), TFramedTransportFactory()),
    "buffered-binary": (TBinaryProtocolFactory(), TBufferedTransportFactory()),
    "framed-compact": (TCompactProtocolFactory(), TFramedTransportFactory()),
    "buffered-compact": (TCompactProtocolFactory(), TBufferedTransportFactory()),
    "buffered-binary-nonstrict": (
        TBinaryProtocolFactory(strict_read=False, strict_write=False),
        TBufferedTransportFactory()),
}

# The server thread logs every accept() that fails, which is how it is stopped.
logging.getLogger("thriftpy2.server").disabled = True


class Handler:
    """Answers every method of Echo; ``broken`` makes every call raise a
    TApplicationException (INTERNAL_ERROR), as a failing replica would."""

    def __init__(self, name: str, broken: bool = False) -> None:
        self.name = name
        self.broken = broken
        self.calls: Counter[str] = Counter()
        self.notes: list[str] = []
        self.lock = threading.Lock()
        self.active = 0  # slow() calls running now, and the most at once
        self.peak = 0

    def _count(self, method: str) -> None:
        with self.lock:
            self.calls[method] += 1
        if self.broken:
            raise TApplicationException(TApplicationException.INTERNAL_ERROR,
                                        f"{self.name} is broken")

    def ping(self) -> str:
        self._count("ping")
        return "pong"

    def whoami(self) -> str:
        self._count("whoami")
        return self.name

    def echo(self, text: str) -> str:
        self._count("echo")
        return text

    def roundtrip(self, item: Any) -> Any:
        self._count("roundtrip")
        return item

    def add(self, a: int, b: int) -> int:
        self._count("add")
        return a + b

    def fail(self, why: str) -> str:
        self._count("fail")
        raise echo.Unavailable(why=why)

    def note(self, text: str) -> None:
        self._count("note")
        with self.lock:
            self.notes.append(text)

    def slow(self, seconds: float) -> str:
        self._count("slow")
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(seconds)
        finally:
            with self.lock:
                self.active -= 1
        return self.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoServer:
    """``make_server`` for Echo in one variant, on a free loopback port, in a thread."""

    def __init__(self, variant: str, name: str = "echo", *, broken: bool = False,
                 host: str = "127.0.0.1", client_timeout: int | None = None) -> None:
        proto, trans = VARIANTS[variant]
        self.handler = Handler(name, broken)
        self.host = host
        self.port = free_port()
        self.server = make_server(echo.Echo, self.handler, host, self.port,
                                  proto_factory=proto, trans_factory=trans,
                                  client_timeout=client_timeout)  # type: ignore[arg-type]
        self.server.daemon = True
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 5
        while True:
            with socket.socket() as probe:
                if probe.connect_ex((host, self.port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"thrift server on {host}:{self.port} did not listen")
            time.sleep(0.01)

    @property
    def calls(self) -> Counter[str]:
        return self.handler.calls

    def close(self) -> None:
        self.server.close()
        sock = self.server.trans.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            sock.close()


def client(variant: str, port: int, host: str = "127.0.0.1", timeout_ms: int = 10000) -> Any:
    """An unmodified thriftpy2 client for Echo, on one connection."""
    proto, trans = VARIANTS[variant]
    return make_client(echo.Echo, host, port, proto_factory=proto, trans_factory=trans,
                       timeout=timeout_ms)
