"""Micro-benchmark: what tracing costs the data path per request, in microseconds.

    .venv/bin/python bench/trace_cost.py [--n 20000] [--rounds 5]

Cases (each: ``Tracer.start`` on a typical HTTP/1 header list, ``headers()`` when there is a
handle, ``end()``; the median of ``--rounds`` rounds of ``--n`` requests):

- off:                tracing off (no endpoint), the ``tracer.on`` test the data path makes
- off-call:           tracing off, calling ``start()`` anyway
- on-no-context:      ratio 0 root sampler, no incoming context (None, nothing to do)
- unsampled-parent:   incoming ``traceparent`` with flags 00 (None: forwarded as is)
- unsampled-root:     1% root sampler, a root that loses the draw (non-recording handle)
- sampled:            100%, incoming traceparent, recording span to a null exporter
- sampled-down:       100%, exporter to a closed port (collector down): spans dropped, counted
- sdk:                the OpenTelemetry SDK's own tracer (start_span + attributes + end), for
                      comparison with ``sampled``
- export-thread:      the export thread's work per span (convert + OTLP protobuf encode)
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: E402

from appliance.telemetry import tracing  # noqa: E402

HEADERS = [
    (b"Host", b"web.default.svc.cluster.local:8080"), (b"User-Agent", b"curl/8.5.0"),
    (b"Accept", b"*/*"), (b"Accept-Encoding", b"gzip"), (b"X-Request-Id", b"abc123"),
    (b"Content-Type", b"application/json"), (b"Content-Length", b"17"),
]
PARENT_SAMPLED = (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
PARENT_UNSAMPLED = (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")


class NullExporter(SpanExporter):
    def export(self, spans: Sequence[object]) -> SpanExportResult:  # type: ignore[override]
        return SpanExportResult.SUCCESS


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tracer(sampler: str, arg: str = "1", endpoint: str = "http://127.0.0.1:4317",
            null: bool = True) -> tracing.Tracer:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": sampler,
           "OTEL_TRACES_SAMPLER_ARG": arg, "OTEL_EXPORTER_OTLP_TIMEOUT": "200"}
    if null:
        return tracing.from_environ(env, rng=random.Random(7), exporter=lambda c: NullExporter())
    return tracing.from_environ(env, rng=random.Random(7))


def request_loop(tracer: tracing.Tracer, headers: list[tuple[bytes, bytes]],
                 guard: bool = False) -> Callable[[int], None]:
    start = tracer.start

    def run(n: int) -> None:
        for _ in range(n):
            if guard and not tracer.on:
                continue
            h = start("outbound", headers, method=b"GET", target=b"/api/items?id=7")
            if h is not None:
                h.headers()
                h.end(200, peer=("10.0.0.7", 8080))
    return run


def sdk_loop() -> Callable[[int], None]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        TraceFlags,
        set_span_in_context,
    )
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NullExporter(), max_queue_size=1 << 20))
    sdk = provider.get_tracer("bench")
    ctx = set_span_in_context(NonRecordingSpan(SpanContext(0x1234, 0x5678, True, TraceFlags(1))))

    def run(n: int) -> None:
        for _ in range(n):
            span = sdk.start_span("GET", context=ctx, kind=SpanKind.CLIENT, attributes={
                "http.request.method": "GET", "url.path": "/api/items", "server.address": "web"})
            span.set_attribute("http.response.status_code", 200)
            span.end()
    return run


def export_thread_cost(n: int) -> float:
    """Microseconds per span for convert + encode, measured directly."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from appliance.telemetry.tracing_spans import Converter
    tracer = _tracer("always_on")
    assert tracer.config is not None
    convert = Converter(tracer.config, "bench")
    handles = []
    for _ in range(n):
        h = tracer.start("outbound", [*HEADERS, PARENT_SAMPLED], method=b"GET", target=b"/a")
        assert isinstance(h, tracing.RecordingSpan)
        h.end(200, peer=("10.0.0.7", 8080))
        handles.append(h)
    tracer.shutdown(0)
    t0 = time.perf_counter()
    encode_spans([convert(h) for h in handles]).SerializeToString()
    return (time.perf_counter() - t0) / n * 1e6


def measure(run: Callable[[int], None], n: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run(n)
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    n, rounds = args.n, args.rounds
    down = _tracer("always_on", endpoint=f"http://127.0.0.1:{_closed_port()}", null=False)
    cases: list[tuple[str, Callable[[int], None], tracing.Tracer | None]] = [
        ("off", request_loop(tracing.OFF, HEADERS, guard=True), None),
        ("off-call", request_loop(tracing.OFF, HEADERS), None),
        ("on-no-context", request_loop(_tracer("parentbased_traceidratio", "0"), HEADERS), None),
        ("unsampled-parent", request_loop(_tracer("parentbased_always_on"),
                                          [*HEADERS, PARENT_UNSAMPLED]), None),
        ("unsampled-root", request_loop(_tracer("traceidratio", "0.0000001"), HEADERS), None),
        ("sampled", request_loop(_tracer("always_on"), [*HEADERS, PARENT_SAMPLED]), None),
        ("sampled-down", request_loop(down, [*HEADERS, PARENT_SAMPLED]), down),
        ("sdk", sdk_loop(), None),
    ]
    print(f"{'case':<18} {'us/request':>10}")
    for name, run, watched in cases:
        cost = measure(run, n, rounds)
        extra = ""
        if watched is not None:
            extra = (f"   queued<={watched.config.max_queue if watched.config else 0} "
                     f"now={watched.queued_spans()} dropped={watched.dropped_spans()} "
                     f"exported={watched.exported_spans()}")
        print(f"{name:<18} {cost:>10.3f}{extra}")
    print(f"{'export-thread':<18} {export_thread_cost(min(n, 5000)):>10.3f}   (per span, "
          "off the hot path)")
    down.shutdown(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
