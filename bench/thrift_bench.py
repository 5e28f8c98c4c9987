#!/usr/bin/env python3
"""Thrift calls/s through appliance against a direct connection, in the same run.

    .venv/bin/python bench/thrift_bench.py [--duration 10] [--rounds 3] [--connections 50]
                                           [--variants framed-binary,buffered-compact]
                                           [--json out.json]

Layout (2 cores, as bench/run.py): the proxy on core 0; the backend and the load on core 1.
Both are small uvloop programs in this file (run as subprocesses of it):

- backend (``--serve``): answers every call with the reply thriftpy2 writes for
  ``Echo.ping() -> "pong"``, under the call's seqid; messages are split with
  ``appliance.protocols.thrift.Decoder``. A fast, fixed backend keeps core 1 from being
  the limit as long as possible; it is not the subject.
- load (``--load``): ``--connections`` connections, each sending the thriftpy2-written
  ``ping`` call and waiting for its reply before the next (one call in flight per
  connection, as a thriftpy2 client), for ``--duration`` seconds; it checks each reply's
  seqid and type and reports calls, errors and latency percentiles.

Before anything is measured, an unmodified thriftpy2 client calls ``ping`` on every target
and must get "pong". Targets per variant: ``direct``; ``appliance`` (the per-call Thrift
proxy, original destination = backend); ``opaque`` (appliance with the backend port in
``detect.opaque_ports``: bytes relayed, no Thrift parsing), the floor for any proxy in
Python. Every round runs the targets in turn; the report is the median over rounds, with
the proxy's CPU time per call from /proc and the ratios against direct. A run during which
other processes used more than 0.1 core is marked noisy (kept, and counted in the table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for extra in (str(REPO), str(REPO / "tests")):
    if extra not in sys.path:
        sys.path.insert(0, extra)

from appliance.protocols.thrift import (  # noqa: E402
    REPLY,
    Decoder,
    Encoding,
    Transport,
    Variant,
    with_seqid,
)
from bench import measure, services  # noqa: E402
from bench.services import BenchError, Service  # noqa: E402

PROXY_CORE, LOAD_CORE = 0, 1
HOST = "127.0.0.1"
VARIANTS = {
    "framed-binary": Variant(Transport.FRAMED, Encoding.BINARY),
    "buffered-binary": Variant(Transport.BUFFERED, Encoding.BINARY),
    "framed-compact": Variant(Transport.FRAMED, Encoding.COMPACT),
    "buffered-compact": Variant(Transport.BUFFERED, Encoding.COMPACT),
}
TARGETS = ("direct", "appliance", "opaque")
NOISY_CORES = 0.1  # other processes' CPU during a run above this makes it suspect


# --- wire samples (written by thriftpy2) -------------------------------------------------

def samples(variant: Variant) -> tuple[bytes, bytes]:
    """(ping CALL, ping REPLY "pong"), both seqid 0, on the wire in ``variant``."""
    from thrift_idl.echo_service import echo
    from thriftpy2.protocol.binary import TBinaryProtocol
    from thriftpy2.protocol.compact import TCompactProtocol
    from thriftpy2.transport import TMemoryBuffer

    def one(mtype: int, payload: Any) -> bytes:
        buf = TMemoryBuffer()
        proto = TCompactProtocol(buf) if variant.compact else TBinaryProtocol(buf)
        proto.write_message_begin("ping", mtype, 0)
        payload.write(proto)
        data = bytes(buf.getvalue())
        return struct.pack(">i", len(data)) + data if variant.framed else data

    return one(1, echo.Echo.ping_args()), one(REPLY, echo.Echo.ping_result(success="pong"))


# --- the backend -------------------------------------------------------------------------

class _Backend(asyncio.Protocol):
    def __init__(self, variant: Variant, reply: Any) -> None:
        self.decoder = Decoder(variant)
        self.reply = reply
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        out = [with_seqid(self.reply, m.seqid) for m in self.decoder.feed(data)]
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


def serve(port: int, variant_name: str) -> None:
    import uvloop

    variant = VARIANTS[variant_name]
    _, reply_bytes = samples(variant)
    (reply,) = Decoder(variant).feed(reply_bytes)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Backend(variant, reply), HOST, port,
                                          backlog=1024)
        await server.serve_forever()

    uvloop.run(main())


# --- the load ----------------------------------------------------------------------------

class _Caller(asyncio.Protocol):
    def __init__(self, variant: Variant, call: Any, stats: dict[str, Any],
                 stop_at: float) -> None:
        self.decoder = Decoder(variant)
        self.call = call
        self.stats = stats
        self.stop_at = stop_at
        self.seqid = 0
        self.sent = 0.0
        self.transport: Any = None
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        self.seqid = (self.seqid + 1) & 0x7FFFFFFF
        self.sent = time.perf_counter()
        self.transport.write(with_seqid(self.call, self.seqid))

    def data_received(self, data: bytes) -> None:
        for msg in self.decoder.feed(data):
            now = time.perf_counter()
            if msg.type != REPLY or msg.seqid != self.seqid:
                self.stats["errors"] += 1
            else:
                self.stats["calls"] += 1
                self.stats["latencies"].append(now - self.sent)
            if now >= self.stop_at:
                self.transport.close()
                return
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < self.stop_at:
            self.stats["errors"] += 1
        if not self.done.done():
            self.done.set_result(None)


def load(port: int, variant_name: str, connections: int, duration: float) -> None:
    import uvloop

    variant = VARIANTS[variant_name]
    call_bytes, _ = samples(variant)
    (call,) = Decoder(variant).feed(call_bytes)
    stats: dict[str, Any] = {"calls": 0, "errors": 0, "latencies": []}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop_at = time.perf_counter() + duration
        callers = []
        for _ in range(connections):
            _, caller = await loop.create_connection(
                lambda: _Caller(variant, call, stats, stop_at), HOST, port)
            callers.append(caller)
        await asyncio.wait_for(asyncio.gather(*(c.done for c in callers)), duration + 10)

    started = time.perf_counter()
    uvloop.run(main())
    elapsed = time.perf_counter() - started
    lat = sorted(stats["latencies"])
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else \
        (lambda q: 0.0)
    print(json.dumps({"calls": stats["calls"], "errors": stats["errors"],
                      "seconds": elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99)}))


# --- orchestration -----------------------------------------------------------------------

def _self(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def thriftpy2_ping(port: int, variant_name: str) -> str:
    """An unmodified thriftpy2 client's call through ``port`` ("" if it fails)."""
    from thrift_idl.echo_service import client
    from thriftpy2.transport import TTransportException

    try:
        c = client(variant_name, port, timeout_ms=3000)
    except TTransportException:
        return ""
    try:
        return str(c.ping())
    finally:
        c.close()


def start_targets(tmp: Path, variant: str, appliance: str) -> tuple[dict[str, int],
                                                                    list[Service]]:
    back_port, a_ports, o_ports = services.free_ports(1)[0], services.free_ports(3), \
        services.free_ports(3)
    started: list[Service] = []
    backend = Service("backend", _self("--serve", str(back_port), variant), LOAD_CORE,
                      tmp / "backend.log", tmp)
    backend.start()
    started.append(backend)
    backend.wait_ready(lambda: thriftpy2_ping(back_port, variant) == "pong", 10)
    ports = {"direct": back_port}
    for name, p, opaque in (("appliance", a_ports, False), ("opaque", o_ports, True)):
        svc = services.appliance(appliance, tmp, name, (p[0], p[1], p[2]), back_port,
                                 opaque, PROXY_CORE, [])
        svc.start()
        started.append(svc)
        outbound, admin = p[0], p[2]

        def ready(admin: int = admin) -> bool:
            return services.http_get(admin, "/ready")[0] == 200

        def answers(outbound: int = outbound) -> bool:
            return thriftpy2_ping(outbound, variant) == "pong"

        svc.wait_ready(ready, 20)
        svc.wait_ready(answers, 20)
        ports[name] = outbound
    return ports, started


def run_load(port: int, variant: str, connections: int, duration: float) -> dict[str, Any]:
    done = subprocess.run(["taskset", "-c", str(LOAD_CORE),
                           *_self("--load", str(port), variant, str(connections),
                                  str(duration))],
                          capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise BenchError(f"load generator failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout))


def measure_once(target: str, port: int, proxy: Service | None, backend: Service,
                 variant: str, connections: int, duration: float) -> dict[str, Any]:
    """One load run against ``port``; also how much CPU processes other than ours used
    meanwhile (``other_cores``: the machine's busy time minus the proxy's, the backend's,
    the load generator's and this script's)."""
    own = [backend.pid, os.getpid()] + ([proxy.pid] if proxy else [])

    def snapshot() -> tuple[float, float, tuple[float, float]]:
        return (measure.system_cpu()[0],
                sum(measure.cpu_seconds(pid) for pid in own) + measure.children_cpu(),
                measure.cpu_split(proxy.pid) if proxy else (0.0, 0.0))

    busy0, mine0, cpu0 = snapshot()
    result = run_load(port, variant, connections, duration)
    busy1, mine1, cpu1 = snapshot()
    calls = max(1, result["calls"])
    result["cps"] = result["calls"] / result["seconds"]
    result["cpu_us"] = ((cpu1[0] + cpu1[1]) - (cpu0[0] + cpu0[1])) / calls * 1e6 \
        if proxy else None
    result["kernel_us"] = (cpu1[1] - cpu0[1]) / calls * 1e6 if proxy else None
    result["rss_mib"] = measure.peak_rss_kib(proxy.pid) / 1024 if proxy else None
    result["other_cores"] = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / result["seconds"]
    result["noisy"] = result["other_cores"] > NOISY_CORES
    if result["errors"] or proxy is not None and not proxy.alive():
        result["failed"] = True
    return result


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def report(variant: str, rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    direct = median(rows["direct"], "cps") or 1.0
    lines = []
    for target in TARGETS:
        cps = median(rows[target], "cps") or 0.0
        cpu, kernel = median(rows[target], "cpu_us"), median(rows[target], "kernel_us")
        failed = any(r.get("failed") for r in rows[target])
        noisy = sum(1 for r in rows[target] if r.get("noisy"))
        lines.append(
            f"| {variant} | {target} | {cps:.0f} | {median(rows[target], 'p50_ms'):.2f} | "
            f"{median(rows[target], 'p99_ms'):.2f} | "
            f"{'–' if cpu is None else f'{cpu:.1f}'} | "
            f"{'–' if kernel is None else f'{kernel:.1f}'} | {cps / direct:.2f}"
            f"{' FAILED' if failed else ''}{f' ({noisy} noisy)' if noisy else ''} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--variants", default="framed-binary,buffered-compact")
    parser.add_argument("--appliance", default=str(Path(sys.executable).parent / "appliance"))
    parser.add_argument("--json", default="")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "VARIANT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=4, metavar=("PORT", "VARIANT", "CONNS", "SECONDS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return 0
    if args.load:
        load(int(args.load[0]), args.load[1], int(args.load[2]), float(args.load[3]))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    services.require_tools(["taskset"])
    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                           "args": vars(args), "results": {}}
    table = ["| variant | target | calls/s | p50 ms | p99 ms | proxy CPU µs/call | "
             "of which kernel | calls/s vs direct |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    failed = False
    with tempfile.TemporaryDirectory(prefix="thrift-bench-") as tmpdir:
        for variant in variants:
            tmp = Path(tmpdir) / variant
            tmp.mkdir()
            ports, started = start_targets(tmp, variant, args.appliance)
            proxies = {s.name: s for s in started}
            try:
                rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TARGETS}
                for target in TARGETS:  # warm-up
                    run_load(ports[target], variant, args.connections, 1.0)
                for rnd in range(args.rounds):
                    for target in TARGETS:
                        row = measure_once(target, ports[target], proxies.get(target),
                                           proxies["backend"], variant, args.connections,
                                           args.duration)
                        rows[target].append(row)
                        cpu = "" if row["cpu_us"] is None else f" {row['cpu_us']:.1f} us/call"
                        bad = (" !! errors" if row.get("failed") else "") + (
                            f" noisy ({row['other_cores']:.2f} other cores)"
                            if row["noisy"] else "")
                        print(f"{variant} round {rnd + 1} {target}: {row['cps']:.0f} calls/s"
                              f"{cpu}{bad}", flush=True)
                table += report(variant, rows)
                failed |= any(r.get("failed") for rs in rows.values() for r in rs)
                out["results"][variant] = rows
            finally:
                for svc in reversed(started):
                    svc.stop()
    print("\n".join(table))
    if args.json:
        for rows in out["results"].values():
            for rs in rows.values():
                for r in rs:
                    r.pop("latencies", None)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
