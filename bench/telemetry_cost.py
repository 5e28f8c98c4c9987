"""What metrics and tracing cost: the same proxy with them off, metrics on (the default),
and tracing at 100% and 1% sampling, in one interleaved run (issue 7's benchmark).

    .venv/bin/python bench/telemetry_cost.py [--duration 10] [--rounds 3]

Layout as in bench/run.py: the proxy on core 0, nginx (the backend, /small) and wrk
(1 thread, 50 connections) on core 1. The tracing variants export over OTLP/gRPC to a sink
in this process (a real TraceService on grpcio that counts the spans it gets and keeps
nothing). Each variant is a separate `appliance proxy` with the same config but for:

- ``off``: ``admin.metrics=false``, no tracing (the baseline);
- ``metrics``: the defaults (metrics on, tracing off);
- ``trace100``: metrics on and ``tracing.sampler=always_on``;
- ``trace1``: metrics on and ``tracing.sampler=traceidratio``, ``sampler_arg=0.01``.

It prints rps, proxy CPU µs/request and the ratios against ``off``, per variant (medians
over the rounds), plus the spans the sink received. Load runs are bounded (``--duration``
seconds each, ``--rounds`` rounds).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import measure  # noqa: E402
import services  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import (  # noqa: E402
    trace_service_pb2,
    trace_service_pb2_grpc,
)

PROXY_CORE, LOAD_CORE = 0, 1


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC collector that counts spans and keeps nothing."""

    def __init__(self) -> None:
        self.spans = 0
        self.lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self.lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


VARIANTS: dict[str, list[str]] = {
    "off": ["admin.metrics=false"],
    "metrics": [],
    "trace100": ["tracing.sampler=always_on"],
    "trace1": ["tracing.sampler=traceidratio", "tracing.sampler_arg=0.01"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--appliance", default=str(Path(sys.executable).parent / "appliance"))
    args = ap.parse_args(argv)
    tools = services.require_tools(["wrk", "nginx"])
    os.sched_setaffinity(0, {LOAD_CORE})  # this process (the sink) beside the load
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    sink_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with tempfile.TemporaryDirectory(prefix="appliance-telemetry-bench-") as tmp_name:
        tmp = Path(tmp_name)
        backend_port, *ports = services.free_ports(1 + 3 * len(VARIANTS))
        nginx = services.nginx(tools["nginx"], tmp, backend_port, LOAD_CORE)
        proxies: dict[str, tuple[services.Service, int]] = {}
        try:
            services.start_nginx(nginx, backend_port)
            for i, (name, settings) in enumerate(VARIANTS.items()):
                out, inb, admin = ports[3 * i:3 * i + 3]
                extra = [x for s in settings for x in ("--set", s)]
                if name.startswith("trace"):
                    extra += ["--set", f"tracing.endpoint=http://127.0.0.1:{sink_port}"]
                svc = services.appliance(args.appliance, tmp, f"appliance-{name}",
                                         (out, inb, admin), backend_port, False, PROXY_CORE,
                                         extra)
                services.start_appliance(svc, out, admin)
                proxies[name] = (svc, out)
            return run(args, tools, proxies, sink)
        finally:
            for svc, _ in proxies.values():
                svc.stop()
            nginx.stop()
            server.stop(0)


def run(args: argparse.Namespace, tools: dict[str, str],
        proxies: dict[str, tuple[services.Service, int]], sink: Sink) -> int:
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in proxies}
    for _svc, port in proxies.values():  # warm-up
        measure.run_wrk(tools["wrk"], f"http://{services.HOST}:{port}/small", 2.0,
                        args.connections, LOAD_CORE)
    for rnd in range(1, args.rounds + 1):
        for name, (svc, port) in proxies.items():
            before = measure.cpu_seconds(svc.pid)
            res = measure.run_wrk(tools["wrk"], f"http://{services.HOST}:{port}/small",
                                  args.duration, args.connections, LOAD_CORE)
            cpu = measure.cpu_seconds(svc.pid) - before
            problems = res.problems()
            if problems or not svc.alive():
                print(f"{name}: {'; '.join(problems) or 'proxy died'}", file=sys.stderr)
                return 1
            us = cpu * 1e6 / max(res.requests, 1)
            samples[name].append((res.rps, us))
            print(f"round {rnd} {name:<9} {res.rps:9.0f} rps  {us:6.1f} µs/req", flush=True)
            time.sleep(0.5)
    base_rps = median(r for r, _ in samples["off"])
    base_us = median(u for _, u in samples["off"])
    print("\n| variant | rps | proxy CPU µs/req | rps vs off | CPU/req vs off |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, rows in samples.items():
        rps, us = median(r for r, _ in rows), median(u for _, u in rows)
        print(f"| {name} | {rps:.0f} | {us:.1f} | {rps / base_rps:.2f} | {us / base_us:.2f} |")
    print(f"\nspans received by the sink: {sink.spans}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
