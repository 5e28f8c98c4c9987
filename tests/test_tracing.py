"""Tracing: OTEL_* parsing, sampling decisions, span contents, and export to a real OTLP
receiver (gRPC and HTTP/protobuf), including a collector that is down or refusing."""

from __future__ import annotations

import itertools
import os
import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from otlp_receiver import GrpcReceiver, HttpReceiver, ReceivedSpan, closed_port

from appliance.telemetry import tracing
from appliance.telemetry.propagation import W3C, extract
from appliance.telemetry.tracing import (
    RecordingSpan,
    Sampler,
    SpanHandle,
    TraceConfig,
    TraceConfigError,
    Tracer,
    parse_environ,
)
from appliance.telemetry.tracing_config import MASK64
from appliance.telemetry.tracing_spans import (
    error_type,
    redact_query,
    span_attributes,
    span_name,
)

TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"
ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}


def traceparent(flags: str = "01", trace: str = TID, span: str = SID) -> tuple[bytes, bytes]:
    return (b"traceparent", f"00-{trace}-{span}-{flags}".encode())


class MemoryExporter(SpanExporter):
    """Collects ReadableSpans; can be made to fail or to block."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.gate.wait(10)
        if self.fail:
            return SpanExportResult.FAILURE
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


class FakeClock:
    def __init__(self) -> None:
        self.ticks = itertools.count(1_000_000_000, 1000)

    def __call__(self) -> int:
        return next(self.ticks)


def make_tracer(env: dict[str, str] | None = None, seed: int = 1,
                exporter: MemoryExporter | None = None) -> tuple[Tracer, MemoryExporter]:
    mem = exporter or MemoryExporter()
    tracer = tracing.from_environ({**ENDPOINT, **(env or {})}, clock=FakeClock(),
                                  rng=random.Random(seed), exporter=lambda c: mem)
    return tracer, mem


@pytest.fixture
def tracer() -> Iterator[tuple[Tracer, MemoryExporter]]:
    t, mem = make_tracer()
    yield t, mem
    t.shutdown(1)


# ------------------------------------------------------------------------------ env parsing


@pytest.mark.parametrize("env", [
    {},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "},
    {"OTEL_SERVICE_NAME": "web", "OTEL_TRACES_SAMPLER": "always_on"},
    {**ENDPOINT, "OTEL_SDK_DISABLED": "true"},
    {**ENDPOINT, "OTEL_SDK_DISABLED": "TRUE"},
])
def test_tracing_off(env: dict[str, str]) -> None:
    """Without an endpoint (or with the SDK disabled) tracing is off and start() is None."""
    assert parse_environ(env) is None
    t = tracing.from_environ(env)
    assert t is tracing.OFF and not t.on
    assert t.start("inbound", [traceparent()]) is None
    assert t.dropped_spans() == t.exported_spans() == 0


PARSE_CASES: list[tuple[dict[str, str], dict[str, Any]]] = [
    (ENDPOINT, {"url": "http://127.0.0.1:4317", "protocol": "grpc", "service_name": "appliance",
                "sampler": Sampler(True, 1 << 64), "timeout_s": 10.0, "max_queue": 2048,
                "batch": 512, "delay_s": 5.0, "compression": "none"}),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c:4317",
      "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4317"}, {"url": "https://c:4317"}),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/", "OTEL_EXPORTER_OTLP_PROTOCOL":
      "http/protobuf"}, {"url": "http://c:4318/v1/traces", "protocol": "http/protobuf"}),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
      "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, {"url": "http://c:4318/custom"}),
    ({**ENDPOINT, "OTEL_SERVICE_NAME": "web"}, {"service_name": "web"}),
    ({**ENDPOINT, "OTEL_RESOURCE_ATTRIBUTES": "service.name=api,k8s.pod.name=p%2C1"},
     {"service_name": "api", "resource": {"service.name": "api", "k8s.pod.name": "p,1"}}),
    ({**ENDPOINT, "OTEL_RESOURCE_ATTRIBUTES": "service.name=api", "OTEL_SERVICE_NAME": "web"},
     {"service_name": "web"}),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "always_off"}, {"sampler": Sampler(False, 0)}),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "parentbased_always_off"},
     {"sampler": Sampler(True, 0)}),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
     {"sampler": Sampler(False, 1 << 62)}),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"},
     {"sampler": Sampler(True, 1 << 64)}),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "PARENTBASED_TRACEIDRATIO",
      "OTEL_TRACES_SAMPLER_ARG": "0"}, {"sampler": Sampler(True, 0)}),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "always_on", "OTEL_TRACES_SAMPLER_ARG": "junk"},
     {"sampler": Sampler(False, 1 << 64)}),  # the argument only matters for ratios
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}, {"timeout_s": 2.5}),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "100",
      "OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}, {"timeout_s": 0.1}),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%3Dcret, x=1"},
     {"headers": {"api-key": "s=cret", "x": "1"}}),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, {"compression": "gzip"}),
    ({**ENDPOINT, "OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
      "OTEL_BSP_SCHEDULE_DELAY": "250"}, {"max_queue": 100, "batch": 10, "delay_s": 0.25}),
]


@pytest.mark.parametrize("env,fields", PARSE_CASES)
def test_parse_environ(env: dict[str, str], fields: dict[str, Any]) -> None:
    """Each OTEL_* variable lands in its field; _TRACES_ forms win over generic ones."""
    config = parse_environ(env)
    assert config is not None
    for name, value in fields.items():
        assert getattr(config, name) == value, name


PARSE_ERRORS = [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://c"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://"}, "with a host"),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "'http/json' is not supported"),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp"},
     "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "jaeger_remote"}, "'jaeger_remote' is not supported"),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
     "OTEL_TRACES_SAMPLER_ARG: '1.5' is not a number in [0, 1]"),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
     "OTEL_TRACES_SAMPLER_ARG: 'half'"),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"},
     "OTEL_TRACES_SAMPLER_ARG: 'nan'"),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_TIMEOUT": "10s"},
     "OTEL_EXPORTER_OTLP_TIMEOUT: '10s' is not a positive integer"),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "0"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"}, "not none or gzip"),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS"),
    ({**ENDPOINT, "OTEL_RESOURCE_ATTRIBUTES": "=x"}, "OTEL_RESOURCE_ATTRIBUTES: '=x'"),
    ({**ENDPOINT, "OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
    ({**ENDPOINT, "OTEL_BSP_MAX_QUEUE_SIZE": "10", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "20"},
     "OTEL_BSP_MAX_EXPORT_BATCH_SIZE: 20 is larger than OTEL_BSP_MAX_QUEUE_SIZE (10)"),
]


@pytest.mark.parametrize("env,message", PARSE_ERRORS)
def test_parse_environ_errors(env: dict[str, str], message: str) -> None:
    """A bad value is refused with a message naming the variable and the value."""
    with pytest.raises(TraceConfigError) as info:
        parse_environ(env)
    assert message in str(info.value)


# -------------------------------------------------------------------------------- sampling


@given(st.integers(0, (1 << 128) - 1), st.floats(0, 1))
def test_ratio_rule(trace_id: int, ratio: float) -> None:
    """traceidratio samples exactly when the low 64 bits are under ratio * 2**64."""
    sampler = Sampler.of("traceidratio", ratio)
    assert sampler.root(trace_id) == ((trace_id & MASK64) < round(ratio * (1 << 64)))


def test_ratio_on_seeded_ids() -> None:
    """A 10% root sampler with a seeded id generator samples the roots the rule picks."""
    t, _ = make_tracer({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                        "OTEL_TRACES_SAMPLER_ARG": "0.1"}, seed=42)
    handles = [t.start("outbound", []) for _ in range(5000)]
    assert all(h is not None for h in handles)
    sampled = [h for h in handles if h is not None and h.recording]
    bound = round(0.1 * (1 << 64))
    assert all((h.trace_id & MASK64) < bound for h in sampled)
    assert all((h.trace_id & MASK64) >= bound for h in handles if h and not h.recording)
    assert 400 <= len(sampled) <= 600  # 500 +- 4.5 sigma
    t.shutdown(1)


UNSAMPLED_TP = traceparent("00")
DECISIONS = [
    # sampler, arg, headers -> None | "decision" (non-recording) | "span" (recording)
    ("parentbased_always_on", "", [], "span"),
    ("parentbased_always_on", "", [traceparent()], "span"),
    ("parentbased_always_on", "", [UNSAMPLED_TP], None),
    ("parentbased_always_off", "", [], None),
    ("parentbased_always_off", "", [traceparent()], "span"),
    ("parentbased_always_off", "", [UNSAMPLED_TP], None),
    ("parentbased_traceidratio", "0", [], None),
    ("parentbased_traceidratio", "0", [traceparent()], "span"),
    ("parentbased_traceidratio", "1", [UNSAMPLED_TP], None),
    ("parentbased_traceidratio", "0.000001", [], "decision"),
    ("always_on", "", [UNSAMPLED_TP], "span"),
    ("always_off", "", [traceparent()], "decision"),
    ("always_off", "", [UNSAMPLED_TP], None),
    ("always_off", "", [], None),
    ("parentbased_always_on", "", [(b"b3", b"0")], None),          # bare B3 deny
    ("parentbased_always_off", "", [(b"b3", b"1")], "span"),       # bare B3 accept
    ("parentbased_always_on", "", [(b"b3", f"{TID}-{SID}".encode())], "span"),  # deferred
    ("parentbased_traceidratio", "0.000001", [(b"b3", f"{TID}-{SID}".encode())], "decision"),
    ("parentbased_always_off", "", [(b"X-B3-Flags", b"1")], "span"),  # debug
    ("parentbased_always_on", "", [traceparent(trace="0" * 32)], "span"),  # invalid = root
]


@pytest.mark.parametrize("sampler,arg,headers,outcome", DECISIONS)
def test_sampling_decisions(sampler: str, arg: str, headers: list[tuple[bytes, bytes]],
                            outcome: str | None) -> None:
    """Parent-based samplers follow the caller; roots follow the rate; a decision that must
    travel gives a non-recording handle."""
    env = {"OTEL_TRACES_SAMPLER": sampler}
    if arg:
        env["OTEL_TRACES_SAMPLER_ARG"] = arg
    t, _ = make_tracer(env)
    h = t.start("inbound", headers)
    got = None if h is None else "span" if h.recording else "decision"
    assert got == outcome
    if h is not None:
        assert extract(h.headers()).sampled is h.recording
    t.shutdown(1)


def test_non_recording_handle_carries_unsampled_root() -> None:
    """An unsampled root forwards traceparent flags 00; end() exports nothing."""
    t, mem = make_tracer({"OTEL_TRACES_SAMPLER": "traceidratio",
                          "OTEL_TRACES_SAMPLER_ARG": "0.000001"})
    h = t.start("outbound", [(b"host", b"a")])
    assert isinstance(h, SpanHandle) and not h.recording
    assert h.headers() == [(b"traceparent", b"00-%032x-%016x-00" % (h.trace_id, h.span_id))]
    # apply() only appends when nothing came in, and strips what did otherwise:
    assert h.apply([(b"host", b"a")]) == [(b"host", b"a"), *h.headers()]
    h.end(200)
    assert t.flush(5)
    assert mem.spans == [] and t.exported_spans() == 0 and t.dropped_spans() == 0
    t.shutdown(1)


# ------------------------------------------------------------------------ handles and ids


def test_child_of_incoming_context(tracer: tuple[Tracer, MemoryExporter]) -> None:
    """The span continues the caller's trace; headers() names the new span as parent."""
    t, _ = tracer
    h = t.start("outbound", [(b"Host", b"web"), traceparent(), (b"tracestate", b"k=v")])
    assert isinstance(h, RecordingSpan)
    assert h.trace_id == int(TID, 16) and h.parent_span_id == int(SID, 16)
    assert h.span_id not in (0, int(SID, 16))
    assert h.headers() == [
        (b"traceparent", b"00-%s-%016x-01" % (TID.encode(), h.span_id)),
        (b"tracestate", b"k=v")]


def test_headers_keep_the_request_formats(tracer: tuple[Tracer, MemoryExporter]) -> None:
    """B3 in, B3 out (single and multi, as they came), and apply() replaces them."""
    t, _ = tracer
    incoming = [(b"X-B3-TraceId", TID.encode()), (b"X-B3-SpanId", SID.encode()),
                (b"X-B3-Sampled", b"1"), (b"b3", f"{TID}-{SID}-1".encode()), (b"Host", b"a")]
    h = t.start("outbound", incoming)
    assert h is not None
    sid = b"%016x" % h.span_id
    expected = [(b"b3", TID.encode() + b"-" + sid + b"-1-" + SID.encode()),
                (b"x-b3-traceid", TID.encode()), (b"x-b3-spanid", sid),
                (b"x-b3-parentspanid", SID.encode()), (b"x-b3-sampled", b"1")]
    assert h.headers() == expected
    assert h.apply(incoming) == [(b"Host", b"a"), *expected]


def test_root_gets_w3c(tracer: tuple[Tracer, MemoryExporter]) -> None:
    """A request without context starts a trace and forwards a W3C traceparent."""
    t, _ = tracer
    h = t.start("inbound", [(b"host", b"a")])
    assert h is not None and h.parent is None and h.formats == 0
    ex = extract(h.headers())
    assert ex.formats == W3C and ex.context is not None
    assert (ex.context.trace_id, ex.context.span_id, ex.sampled) == (h.trace_id, h.span_id, True)


def test_seeded_ids_are_reproducible() -> None:
    """The same seed gives the same ids (tests can predict them)."""
    ids = []
    for _ in range(2):
        t, _ = make_tracer(seed=9)
        h = t.start("inbound", [])
        assert h is not None
        ids.append((h.trace_id, h.span_id))
        t.shutdown(1)
    assert ids[0] == ids[1]


def test_bad_direction(tracer: tuple[Tracer, MemoryExporter]) -> None:
    """A direction other than inbound/outbound is a clear error."""
    with pytest.raises(ValueError, match="direction: 'sideways'"):
        tracer[0].start("sideways", [])


def test_end_twice_exports_once(tracer: tuple[Tracer, MemoryExporter]) -> None:
    """Only the first end() counts."""
    t, mem = tracer
    h = t.start("inbound", [])
    assert h is not None
    h.end(200)
    h.end(500)
    assert t.flush(5)
    assert len(mem.spans) == 1
    assert (mem.spans[0].attributes or {})["http.response.status_code"] == 200


# ------------------------------------------------------------------------- span contents


def _span(direction: str, headers: list[tuple[bytes, bytes]], end: dict[str, Any],
          **start: Any) -> RecordingSpan:
    t, _ = make_tracer()
    h = t.start(direction, headers, **start)
    assert isinstance(h, RecordingSpan)
    t.shutdown(0)  # closed: end() below only stamps the fields
    h.end(**end)
    return h


def test_http_client_attributes() -> None:
    """An outbound HTTP/1 request: client span with url.full, server.*, peer, resend count."""
    h = _span("outbound", [(b"Host", b"web.ns:8080"), (b"User-Agent", b"curl/8")],
              {"status": 404, "peer": ("10.1.2.3", 8080), "retries": 2, "server_id": "sa.web"},
              method=b"GET", target=b"/items?id=7")
    assert span_name(h) == "GET"
    assert span_attributes(h) == {
        "http.request.method": "GET", "url.path": "/items", "url.query": "id=7",
        "url.full": "http://web.ns:8080/items?id=7", "server.address": "web.ns",
        "server.port": 8080, "network.protocol.name": "http", "network.protocol.version": "1.1",
        "user_agent.original": "curl/8", "http.response.status_code": 404,
        "http.request.resend_count": 2, "network.peer.address": "10.1.2.3",
        "network.peer.port": 8080, "error.type": "404", "appliance.direction": "outbound",
        "appliance.server_id": "sa.web"}


def test_grpc_server_attributes() -> None:
    """An inbound gRPC call over HTTP/2: pseudo-headers, rpc.*, client identity."""
    h = _span("inbound", [(b":method", b"POST"), (b":scheme", b"http"),
                          (b":path", b"/helloworld.Greeter/SayHello"),
                          (b":authority", b"[::1]:50051"), (b"content-type", b"application/grpc")],
              {"status": 200, "grpc_status": "14", "client_id": "spiffe://td/ns/a/sa/b",
               "attributes": {"appliance.route": "/svc/greeter", "bad": object()}},
              version="2", peer=("::1", 40000, 0, 0))
    assert span_name(h) == "helloworld.Greeter/SayHello"
    assert span_attributes(h) == {
        "http.request.method": "POST", "url.path": "/helloworld.Greeter/SayHello",
        "url.scheme": "http", "server.address": "::1", "server.port": 50051,
        "network.protocol.name": "http", "network.protocol.version": "2",
        "http.response.status_code": 200, "network.peer.address": "::1",
        "network.peer.port": 40000, "client.address": "::1", "rpc.system": "grpc",
        "rpc.service": "helloworld.Greeter", "rpc.method": "SayHello",
        "rpc.grpc.status_code": 14, "error.type": "UNAVAILABLE",
        "appliance.direction": "inbound", "appliance.client_id": "spiffe://td/ns/a/sa/b",
        "appliance.route": "/svc/greeter"}


def test_unknown_method_and_absolute_target() -> None:
    """A method outside the known set is _OTHER; an absolute-form target is split."""
    h = _span("outbound", [], {"status": 200}, method=b"PURGE",
              target=b"http://cache:81/x?y=1")
    a = span_attributes(h)
    assert span_name(h) == "HTTP"
    assert (a["http.request.method"], a["http.request.method_original"]) == ("_OTHER", "PURGE")
    assert (a["url.full"], a["url.path"], a["url.query"]) == ("http://cache:81/x?y=1", "/x", "y=1")
    assert (a["server.address"], a["server.port"]) == ("cache", 81)


REDACTIONS = [
    ("", ""),
    ("id=7", "id=7"),
    ("sig=abc&id=7", "sig=REDACTED&id=7"),
    ("AWSAccessKeyId=AK&Signature=s&Expires=1",
     "AWSAccessKeyId=REDACTED&Signature=REDACTED&Expires=1"),
    ("X-Goog-Signature=x", "X-Goog-Signature=REDACTED"),
    ("signature=x&sigma=1", "signature=x&sigma=1"),   # other keys, even similar ones, stay
    ("sig", "sig"),                                   # no value to hide
]


@pytest.mark.parametrize("query,expected", REDACTIONS)
def test_query_redaction(query: str, expected: str) -> None:
    """Query values the HTTP conventions call secret are exported as REDACTED."""
    assert redact_query(query) == expected


def test_credentials_never_exported() -> None:
    """An absolute-form target's user:password and secret query values stay out of the span."""
    h = _span("outbound", [], {"status": 200}, method=b"GET",
              target=b"http://user:pw@cache:81/x?sig=s3cret")
    a = span_attributes(h)
    assert a["url.full"] == "http://cache:81/x?sig=REDACTED"
    assert a["url.query"] == "sig=REDACTED"
    assert "pw" not in repr(a) and "s3cret" not in repr(a)


ERRORS = [
    # direction, grpc, status, grpc_status, error -> error.type
    ("inbound", False, 200, None, "", None),
    ("inbound", False, 404, None, "", None),        # 4xx is the client's fault
    ("outbound", False, 404, None, "", "404"),
    ("inbound", False, 503, None, "", "503"),
    ("outbound", False, 0, None, "connection refused", "connection refused"),
    ("inbound", True, 200, "0", "", None),
    ("inbound", True, 200, "5", "", None),          # NOT_FOUND: not a server fault
    ("outbound", True, 200, "5", "", "NOT_FOUND"),
    ("inbound", True, 200, 13, "", "INTERNAL"),
    ("outbound", True, 200, "99", "", "99"),
    ("outbound", True, 200, "x", "", None),
]


@pytest.mark.parametrize("direction,grpc,status,grpc_status,error,expected", ERRORS)
def test_error_type(direction: str, grpc: bool, status: int, grpc_status: Any, error: str,
                    expected: str | None) -> None:
    """Which responses make a span an error, per the HTTP and RPC conventions."""
    headers = [(b"content-type", b"application/grpc")] if grpc else []
    h = _span(direction, headers, {"status": status, "grpc_status": grpc_status,
                                   "error": error}, method=b"POST", target=b"/a.B/C")
    assert error_type(h) == expected


# ---------------------------------------------------------------------------- the pipeline


def test_queue_full_drops_and_counts() -> None:
    """With the exporter stuck, the queue stays bounded and the excess is counted dropped."""
    mem = MemoryExporter()
    mem.gate.clear()
    t, _ = make_tracer({"OTEL_BSP_MAX_QUEUE_SIZE": "8", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4"},
                       exporter=mem)
    for i in range(100):
        h = t.start("outbound", [])
        assert h is not None
        h.end(200)
        assert t.queued_spans() <= 8, i
    # The thread holds at most one batch (4) while blocked; the queue holds at most 8.
    assert 88 <= t.dropped_spans() <= 92
    mem.gate.set()
    assert t.flush(5)
    assert t.exported_spans() + t.dropped_spans() == 100
    assert len(mem.spans) == t.exported_spans()
    t.shutdown(1)


def test_failed_export_counts_dropped() -> None:
    """An exporter that fails loses its batch, counted; when it works again, spans flow."""
    t, mem = make_tracer()
    mem.fail = True
    for _ in range(3):
        h = t.start("inbound", [])
        assert h is not None
        h.end(200)
    assert t.flush(5)
    assert (t.dropped_spans(), t.exported_spans()) == (3, 0)
    mem.fail = False
    h = t.start("inbound", [])
    assert h is not None
    h.end(200)
    assert t.flush(5)
    assert (t.dropped_spans(), t.exported_spans()) == (3, 1)
    t.shutdown(1)


def test_shutdown_flushes_then_drops_late_spans() -> None:
    """shutdown() exports what is queued; a span ended after it is dropped and counted."""
    t, mem = make_tracer()
    early, late = t.start("inbound", []), t.start("inbound", [])
    assert early is not None and late is not None
    early.end(200)
    t.shutdown(5)
    assert len(mem.spans) == 1 and t.exported_spans() == 1
    late.end(200)
    assert t.dropped_spans() == 1


def test_shutdown_gives_up_on_a_stuck_exporter() -> None:
    """A stuck export does not hold shutdown past its timeout; what is left is counted."""
    mem = MemoryExporter()
    mem.gate.clear()
    t, _ = make_tracer({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2"}, exporter=mem)
    for _ in range(6):
        h = t.start("inbound", [])
        assert h is not None
        h.end(200)
    t.shutdown(0.2)
    assert t.queued_spans() == 0
    assert t.dropped_spans() >= 4  # the batch in the exporter's hands may still land
    mem.gate.set()


# ------------------------------------------------------------- with a real OTLP receiver


def _by_kind(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.kind: s for s in spans}


def _env(rx: GrpcReceiver | HttpReceiver, **extra: str) -> dict[str, str]:
    proto = "grpc" if isinstance(rx, GrpcReceiver) else "http/protobuf"
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": proto,
            "OTEL_BSP_SCHEDULE_DELAY": "50", **extra}


@pytest.fixture(params=["grpc", "http"])
def receiver(request: pytest.FixtureRequest) -> Iterator[GrpcReceiver | HttpReceiver]:
    rx = GrpcReceiver() if request.param == "grpc" else HttpReceiver()
    yield rx
    rx.close()


def test_two_proxies_one_trace(receiver: GrpcReceiver | HttpReceiver) -> None:
    """App traceparent -> outbound proxy (client span) -> inbound proxy (server span): one
    trace, parented app -> client -> server, exported over OTLP to a real receiver."""
    clock = FakeClock()
    client = tracing.from_environ(_env(receiver, OTEL_SERVICE_NAME="front"), clock=clock,
                                  instance_id="front-1")
    server = tracing.from_environ(_env(receiver, OTEL_SERVICE_NAME="back"), clock=clock)
    app = [(b"Host", b"back.ns:80"), traceparent(), (b"tracestate", b"app=1")]
    out = client.start("outbound", app, method=b"GET", target=b"/hello")
    assert out is not None
    sent = out.apply(app)
    inn = server.start("inbound", sent, method=b"GET", target=b"/hello",
                       peer=("127.0.0.1", 50000))
    assert inn is not None
    inn.end(200, client_id="spiffe://td/ns/default/sa/front")
    out.end(200, peer=("127.0.0.1", 8080), server_id="spiffe://td/ns/default/sa/back")
    spans = _by_kind(receiver.wait_for(2))
    c, s = spans["client"], spans["server"]
    assert c.trace_id == s.trace_id == TID
    assert c.parent_span_id == SID
    assert s.parent_span_id == c.span_id
    assert (c.span_id, s.span_id) == (f"{out.span_id:016x}", f"{inn.span_id:016x}")
    assert c.trace_state == s.trace_state == "app=1"
    assert c.resource["service.name"] == "front" and s.resource["service.name"] == "back"
    assert c.resource["service.instance.id"] == "front-1"
    assert c.scope == "appliance" and c.name == "GET"
    assert c.attributes["url.full"] == "http://back.ns:80/hello"
    assert c.attributes["appliance.server_id"] == "spiffe://td/ns/default/sa/back"
    assert s.attributes["appliance.client_id"] == "spiffe://td/ns/default/sa/front"
    assert s.attributes["network.peer.address"] == "127.0.0.1"
    assert s.start_ns > c.start_ns and s.end_ns < c.end_ns  # fake clock: nested in time
    assert client.flush(5) and server.flush(5)
    assert client.exported_spans() == server.exported_spans() == 1
    client.shutdown(2)
    server.shutdown(2)


def test_b3_round_trip_through_receiver() -> None:
    """B3 multi in -> B3 multi to the next proxy -> both spans in the caller's trace."""
    with GrpcReceiver() as rx:
        a, b = tracing.from_environ(_env(rx)), tracing.from_environ(_env(rx))
        app = [(b"X-B3-TraceId", TID[16:].encode()), (b"X-B3-SpanId", SID.encode()),
               (b"X-B3-Sampled", b"1")]
        out = a.start("outbound", app)
        assert out is not None
        sent = out.apply(app)
        assert [n for n, _ in sent] == [b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid",
                                        b"x-b3-sampled"]
        inn = b.start("inbound", sent)
        assert inn is not None
        inn.end(200)
        out.end(200)
        spans = _by_kind(rx.wait_for(2))
        assert spans["client"].trace_id == spans["server"].trace_id == "0" * 16 + TID[16:]
        assert spans["client"].parent_span_id == SID
        assert spans["server"].parent_span_id == spans["client"].span_id
        a.shutdown(2)
        b.shutdown(2)


def test_unsampled_parent_exports_nothing() -> None:
    """A caller that said "not sampled" gets no span; a sampled one after it does."""
    with GrpcReceiver() as rx:
        t = tracing.from_environ(_env(rx))
        assert t.start("inbound", [traceparent("00")]) is None
        h = t.start("inbound", [traceparent("01", span="00f067aa0ba902b7")])
        assert h is not None
        h.end(200)
        assert t.flush(5)
        spans = rx.wait_for(1)
        assert [s.parent_span_id for s in spans] == ["00f067aa0ba902b7"]
        t.shutdown(2)


def test_collector_down_drops_and_counts() -> None:
    """No collector: start/end return at once, the queue stays bounded, spans are dropped
    and counted, nothing is exported."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "200", "OTEL_BSP_MAX_QUEUE_SIZE": "16",
           "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8", "OTEL_BSP_SCHEDULE_DELAY": "20"}
    t = tracing.from_environ(env)
    for _ in range(500):
        h = t.start("outbound", [traceparent()])
        assert h is not None
        h.end(200)
        assert t.queued_spans() <= 16
    assert t.flush(10)
    assert t.exported_spans() == 0
    assert t.dropped_spans() == 500
    t.shutdown(2)


def test_collector_refusing_then_back(receiver: GrpcReceiver | HttpReceiver) -> None:
    """A collector that refuses (UNAVAILABLE / 503) costs the batch; later spans get through."""
    receiver.failing = True
    t = tracing.from_environ(_env(receiver, OTEL_EXPORTER_OTLP_TIMEOUT="300"))
    h = t.start("inbound", [])
    assert h is not None
    h.end(500)
    assert t.flush(10)
    assert (t.exported_spans(), t.dropped_spans()) == (0, 1)
    assert receiver.refused >= 1
    receiver.failing = False
    h = t.start("inbound", [])
    assert h is not None
    h.end(200)
    assert t.flush(10)
    assert [s.attributes["http.response.status_code"] for s in receiver.wait_for(1)] == [200]
    assert (t.exported_spans(), t.dropped_spans()) == (1, 1)
    t.shutdown(2)


def test_config_object_direct() -> None:
    """A Tracer can be built from a TraceConfig (the config file path) as well as the env."""
    mem = MemoryExporter()
    t = Tracer(TraceConfig(url="http://127.0.0.1:1", sampler=Sampler.of("always_on")),
               exporter=lambda c: mem)
    h = t.start("inbound", [])
    assert h is not None
    h.end(200)
    assert t.flush(5) and len(mem.spans) == 1
    t.shutdown(1)


def test_forked_child_starts_clean() -> None:
    """A worker forked from a tracing process has an empty queue, zero counters, its own
    export thread and different ids; the parent's spans are not exported twice."""
    mem = MemoryExporter()
    t = tracing.from_environ(ENDPOINT, exporter=lambda c: mem)
    parent = t.start("inbound", [])
    assert parent is not None
    parent.end(200)
    assert t.flush(5) and t.exported_spans() == 1
    queued = t.start("inbound", [])
    assert queued is not None
    queued.end(200)  # still queued when the fork happens (the delay is 5 s)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        ok = t.queued_spans() == 0 and t.exported_spans() == 0 and t.dropped_spans() == 0
        h = t.start("inbound", [])
        ok = ok and h is not None and h.trace_id not in (parent.trace_id, queued.trace_id)
        if h is not None:
            h.end(200)
        ok = ok and t.flush(5) and t.exported_spans() == 1 and len(mem.spans) == 2
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert t.flush(5) and t.exported_spans() == 2
    t.shutdown(1)
