#!/usr/bin/env python3
"""The HTTP/2 proxy path without sockets: Python cost per request, and a cProfile.

    .venv/bin/python bench/h2_inproc.py [--streams 10] [--requests 200000] [--profile]

A real :class:`Http2Server` and :class:`Http2Upstream` (real codecs, metrics and pool)
are driven with fake transports. Client reads are precomputed as h2load sends them
(``--streams`` HEADERS frames and a connection WINDOW_UPDATE per read), and so are the
upstream's answers (nghttpd's response head and a 13-byte body per stream). What is
timed is exactly the proxy's Python: codec, stream bookkeeping, metrics; no syscalls and
no event loop. The figure is a floor under the CPU per request that bench/run.py reports.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from appliance.config import Config  # noqa: E402
from appliance.net import h2stream  # noqa: E402
from appliance.net.addr import OrigDst  # noqa: E402
from appliance.net.http2 import Http2Server  # noqa: E402
from appliance.net.http2_upstream import Http2Upstream  # noqa: E402
from appliance.net.listener import Direction  # noqa: E402
from appliance.protocols.h2conn import H2Connection  # noqa: E402
from appliance.protocols.h2frames import PREFACE, frame, settings_frame, window_frame  # noqa: E402
from appliance.protocols.hpack_codec import Encoder  # noqa: E402
from appliance.telemetry.metrics import Registry  # noqa: E402

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/small"),
           (b":authority", b"127.0.0.1:4140"), (b"user-agent", b"h2load nghttp2/1.52.0")]
RESPONSE = [(b":status", b"200"), (b"server", b"nghttpd nghttp2/1.52.0"),
            (b"date", b"Thu, 26 Nov 2026 22:40:00 GMT"), (b"content-length", b"13"),
            (b"last-modified", b"Thu, 26 Nov 2026 20:00:00 GMT"),
            (b"etag", b'"6566a1c0-d"')]
BODY = b"hello, world\n"


class FakeTransport:
    """Takes writes and counts them."""

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def set_protocol(self, protocol: Any) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return None

    def close(self) -> None:
        pass

    abort = close


class FakeLoop:
    """The loop's clock; flushes are called by the driver, not scheduled."""

    time = staticmethod(time.monotonic)

    def call_soon(self, *args: Any) -> None:
        pass

    def call_later(self, *args: Any) -> None:
        pass


class _Null:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def client_reads(streams: int, batches: int) -> list[bytes]:
    """What h2load sends: the preface, then per read ``streams`` requests and a
    connection WINDOW_UPDATE for the bodies of the batch before."""
    conn = H2Connection(_Null(), client=True)
    conn.start()
    reads = [conn.data_to_send() + settings_frame({})]
    for _ in range(batches):
        for _ in range(streams):
            conn.open_stream(REQUEST, True)
        conn.out.append(window_frame(0, streams * len(BODY)))
        reads.append(conn.data_to_send())
    return reads


def upstream_reads(streams: int, batches: int) -> list[bytes]:
    """What nghttpd answers: its SETTINGS, then per read ``streams`` responses."""
    conn = H2Connection(_Null(), client=False)
    conn.start()
    conn.receive(PREFACE + settings_frame({}))
    reads = [conn.data_to_send() + frame(4, 1, 0)]
    hpack_request = Encoder().encode(REQUEST)  # no table use: the same block each time
    sid = 1
    for _ in range(batches):
        for _ in range(streams):
            conn.receive(frame(1, 5, sid, hpack_request))
            s = conn.streams[sid]
            conn.send_headers(s, RESPONSE)
            conn.send_data(s, BODY, True)
            sid += 2
        reads.append(conn.data_to_send())
    return reads


def run(streams: int, requests: int, profile: bool) -> float:
    batches = requests // streams
    creads, ureads = client_reads(streams, batches), upstream_reads(streams, batches)
    loop = asyncio.new_event_loop()
    d = Direction("outbound", Config(), Registry(), "bench", loop)
    d.loop = FakeLoop()  # type: ignore[assignment]
    dst = OrigDst("127.0.0.1", 1)
    server = Http2Server(d, FakeTransport(), dst)
    up = Http2Upstream(d, dst)
    d.h2pool.conns[dst] = [up]
    up.connection_made(FakeTransport())
    server.start(creads[0], False)
    up.data_received(ureads[0])
    h2stream.flush_all()
    prof = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if prof:
        prof.enable()
    for i in range(1, batches + 1):
        server.data_received(creads[i])
        h2stream.flush_all()
        up.data_received(ureads[i])
        h2stream.flush_all()
    if prof:
        prof.disable()
    elapsed = time.perf_counter() - start
    done = sum(sum(st.responses.values()) for st in _h2_stats(d.registry))
    assert done == batches * streams, done
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    loop.close()
    return elapsed / (batches * streams) * 1e6


def _h2_stats(registry: Registry) -> list[Any]:
    """Every HTTP/2 label set (per authority, where the registry has them)."""
    table = getattr(registry, "_http", None)
    if isinstance(table, dict):
        return [st for key, st in table.items() if "h2" in key]
    return [registry.http("outbound", "h2")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=10, help="requests per client read")
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--profile", action="store_true", help="print a cProfile (slower)")
    args = p.parse_args()
    us = run(args.streams, args.requests, args.profile)
    print(f"{us:.2f} us of Python per request ({args.streams} streams per read)")


if __name__ == "__main__":
    main()
