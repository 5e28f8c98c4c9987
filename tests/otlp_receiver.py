"""A real OTLP trace receiver for tests: opentelemetry-proto's TraceService on grpcio, and the
OTLP/HTTP protobuf endpoint (``POST /v1/traces``) on the standard library's HTTP server.

Both bind 127.0.0.1 on an ephemeral port, decode what proxies export into flat
:class:`ReceivedSpan` records, and let a test wait for a number of spans with a deadline. Either
can be told to refuse exports (gRPC ``UNAVAILABLE`` / HTTP 503) to play a collector in trouble.

    with GrpcReceiver() as rx:
        tracer = from_environ({"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
        ...
        spans = rx.wait_for(2)
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

KINDS = {Span.SPAN_KIND_SERVER: "server", Span.SPAN_KIND_CLIENT: "client",
         Span.SPAN_KIND_INTERNAL: "internal", Span.SPAN_KIND_PRODUCER: "producer",
         Span.SPAN_KIND_CONSUMER: "consumer", Span.SPAN_KIND_UNSPECIFIED: "unspecified"}
STATUSES = {Status.STATUS_CODE_UNSET: "unset", Status.STATUS_CODE_OK: "ok",
            Status.STATUS_CODE_ERROR: "error"}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector got it; ids are lower-case hex ("" for no parent)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    attributes: dict[str, Any]
    status: str
    status_message: str
    start_ns: int
    end_ns: int
    trace_state: str
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    return getattr(v, which) if which else None


def _attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        assert isinstance(kv, KeyValue)
        out[kv.key] = _value(kv.value)
    return out


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Flatten an export request into spans, each with its resource and scope."""
    out: list[ReceivedSpan] = []
    for rs in request.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), name=s.name, kind=KINDS[s.kind],
                    attributes=_attrs(s.attributes), status=STATUSES[s.status.code],
                    status_message=s.status.message, start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano, trace_state=s.trace_state,
                    resource=resource, scope=ss.scope.name))
    return out


class _Store:
    """Spans received so far, and a condition to wait on."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.refused = 0
        self.failing = False
        self._cond = threading.Condition()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = decode(request)
        with self._cond:
            self.requests += 1
            self.spans.extend(spans)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """At least ``n`` spans (all received so far); AssertionError after ``timeout`` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.spans) >= n, timeout):
                raise AssertionError(f"expected {n} spans within {timeout}s, "
                                     f"got {len(self.spans)}: {[s.name for s in self.spans]}")
            return list(self.spans)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        if self.store.failing:
            self.store.refused += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "receiver told to refuse")
        self.store.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class GrpcReceiver(_Store):
    """OTLP/gRPC TraceService on 127.0.0.1:<ephemeral>; ``endpoint`` is its URL."""

    def __init__(self) -> None:
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self),
                                                                  self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server.start()

    def close(self) -> None:
        self._server.stop(grace=None).wait(5)

    def __enter__(self) -> GrpcReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer

    def do_POST(self) -> None:  # noqa: N802
        store = self.server.store
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/traces":
            return self._answer(404, b"")
        if store.failing:
            store.refused += 1
            return self._answer(503, b"")
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        store.add(request)
        self._answer(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    store: _Store


class HttpReceiver(_Store):
    """OTLP/HTTP protobuf receiver; ``endpoint`` is the base URL (``/v1/traces`` appended by
    exporters that read ``OTEL_EXPORTER_OTLP_ENDPOINT``), ``traces_url`` the full one."""

    def __init__(self) -> None:
        super().__init__()
        self._server = _HttpServer(("127.0.0.1", 0), _Handler)
        self._server.store = self
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.traces_url = self.endpoint + "/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> HttpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)
