"""Tracing end to end: a request from an app on the client host through both proxies gives
a client span (client proxy) and a server span (server proxy) in ONE trace, parented
correctly, continuing the app's own traceparent; spans go to a real OTLP/gRPC receiver
(opentelemetry-proto's TraceService on grpcio) on a third host."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from meshpair import app_env, eventually

from init.mesh import MeshNode, start_app
from init.netns import Network

TESTS = Path(__file__).resolve().parent.parent / "tests"
OTLP_PORT = 4317
HTTP_PORT = 8080
APP_TRACE = "0af7651916cd43dd8448eb211c80319c"
APP_SPAN = "b7ad6b7169203331"

# The collector: tests/otlp_receiver.py's TraceService on all addresses; every span it gets
# is appended to argv[1] as one JSON line.
COLLECTOR = r"""
import json, sys, dataclasses
from concurrent import futures
import grpc
sys.path.insert(0, sys.argv[2])
from otlp_receiver import _Store, _TraceService
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

class FileStore(_Store):
    def add(self, request):
        super().add(request)
        with open(sys.argv[1], "w") as fh:
            for span in self.spans:
                fh.write(json.dumps(dataclasses.asdict(span)) + "\n")

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(FileStore()), server)
server.add_insecure_port("0.0.0.0:%d" % int(sys.argv[3]))
server.start()
server.wait_for_termination()
"""


def test_one_trace_through_two_proxies(network: Callable[..., Network],
                                       tmp_path: Path) -> None:
    """curl with a traceparent -> client proxy (client span) -> server proxy (server span)
    -> app; both spans in the app's trace, the server span a child of the client span."""
    net = network("client", "server", "collector")
    spans_file = tmp_path / "spans.jsonl"
    (tmp_path / "collector.py").write_text(COLLECTOR)
    start_app(net["collector"], [sys.executable, str(tmp_path / "collector.py"),
                                 str(spans_file), str(TESTS), str(OTLP_PORT)], OTLP_PORT,
              env=app_env())
    endpoint = f"http://{net['collector'].addr}:{OTLP_PORT}"
    client, server = MeshNode(net["client"]), MeshNode(net["server"])
    for node in (client, server):
        node.install_rules()
    client.start_proxy(f"tracing.endpoint={endpoint}", "tracing.service_name=client-proxy")
    server.start_proxy(f"tracing.endpoint={endpoint}", "tracing.service_name=server-proxy")
    (tmp_path / "page.txt").write_text("traced page\n")
    start_app(server.host, [sys.executable, "-m", "http.server", str(HTTP_PORT),
                            "--directory", str(tmp_path)], HTTP_PORT, env=app_env())
    done = client.host.run(
        ["curl", "-sS", "--max-time", "20", "-H",
         f"traceparent: 00-{APP_TRACE}-{APP_SPAN}-01",
         f"http://{server.host.addr}:{HTTP_PORT}/page.txt"], check=False, timeout=30,
        env=app_env())
    assert done.stdout == "traced page\n", (done.stderr, client.log(), server.log())

    def spans() -> list[dict[str, object]]:
        if not spans_file.exists():
            return []
        return [json.loads(line) for line in spans_file.read_text().splitlines()]

    eventually(lambda: len(spans()) >= 2, 20,
               lambda: f"spans: {spans()}\n{client.log()}\n{server.log()}")
    by_kind = {s["kind"]: s for s in spans()}
    client_span, server_span = by_kind["client"], by_kind["server"]
    assert client_span["trace_id"] == server_span["trace_id"] == APP_TRACE
    assert client_span["parent_span_id"] == APP_SPAN
    assert server_span["parent_span_id"] == client_span["span_id"]
    assert client_span["resource"]["service.name"] == "client-proxy"
    assert server_span["resource"]["service.name"] == "server-proxy"
    for span in (client_span, server_span):
        attrs = span["attributes"]
        assert isinstance(attrs, dict)
        assert attrs["http.response.status_code"] == 200
        assert attrs["url.path"] == "/page.txt"
