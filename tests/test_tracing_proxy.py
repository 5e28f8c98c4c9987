"""Tracing in the running proxy: spans reach a real OTLP receiver, parented on the app's own
trace context, and the context sent upstream names the proxy's span."""

from __future__ import annotations

import subprocess

from otlp_receiver import GrpcReceiver
from support import H11Server, ProxyProcess, free_port

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"


def curl(port: int, path: str, *headers: str) -> str:
    args = ["curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}"]
    for h in headers:
        args += ["-H", h]
    return subprocess.run(args + [f"http://127.0.0.1:{port}{path}"], capture_output=True,
                          text=True, timeout=30).stdout


def test_outbound_span_continues_the_apps_trace(backend: H11Server) -> None:
    """A request carrying traceparent gives one client span in that trace, whose parent is
    the app's span; the backend sees a traceparent naming the proxy's span."""
    with GrpcReceiver() as rx:
        p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{backend.port}",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
                              "OTEL_SERVICE_NAME": "client-proxy"})
        try:
            assert curl(p.outbound, "/traced?x=1",
                        f"traceparent: 00-{APP_TRACE}-{APP_SPAN}-01") == "200"
            [span] = rx.wait_for(1)
        finally:
            p.stop()
    assert span.trace_id == APP_TRACE and span.parent_span_id == APP_SPAN
    assert span.kind == "client"
    assert span.attributes["http.request.method"] == "GET"
    assert span.attributes["http.response.status_code"] == 200
    assert span.resource["service.name"] == "client-proxy"
    sent = dict(backend.requests[0][0].headers)[b"traceparent"].decode()
    assert sent == f"00-{APP_TRACE}-{span.span_id}-01"


def test_inbound_span_is_a_server_span_and_errors_are_marked() -> None:
    """Inbound requests make server spans; a 502 of the proxy's own is an error span."""
    with GrpcReceiver() as rx:
        p = ProxyProcess(f"inbound.orig_dst_override=127.0.0.1:{free_port()}",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
        try:
            assert curl(p.inbound, "/down") == "502"
            [span] = rx.wait_for(1)
        finally:
            p.stop()
    assert span.kind == "server" and span.parent_span_id == ""
    assert span.status == "error"
    assert span.attributes["http.response.status_code"] == 502


def test_unsampled_caller_is_respected(backend: H11Server) -> None:
    """traceparent with the sampled flag off: no span, the decision travels on unchanged."""
    with GrpcReceiver() as rx:
        p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{backend.port}",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
        try:
            assert curl(p.outbound, "/quiet",
                        f"traceparent: 00-{APP_TRACE}-{APP_SPAN}-00") == "200"
            assert curl(p.outbound, "/loud") == "200"  # a root: sampled (ratio 1.0)
            spans = rx.wait_for(1)
            assert [s.attributes["url.path"] for s in spans] == ["/loud"]
            assert p.metric("trace_spans_dropped_total") == 0
        finally:
            p.stop()
    quiet = dict(backend.requests[0][0].headers)[b"traceparent"].decode()
    assert quiet == f"00-{APP_TRACE}-{APP_SPAN}-00"


def test_unreachable_collector_never_fails_requests(backend: H11Server) -> None:
    """With the collector down, requests succeed and the spans are counted as dropped."""
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{backend.port}",
                     env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    try:
        assert all(curl(p.outbound, f"/{i}") == "200" for i in range(5))
    finally:
        p.stop()
    # The spans were in the queue at stop; the final flush could not deliver them.
    assert "Traceback" not in p.output()


def test_bad_sampler_is_a_config_error() -> None:
    """An invalid OTEL_TRACES_SAMPLER_ARG stops the proxy at start with exit code 2."""
    import sys

    from support import ROOT
    done = subprocess.run([sys.executable, "-m", "appliance", "proxy", "--outbound-port", "0",
                           "--inbound-port", "0", "--admin-port", "0"],
                          env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
                               "OTEL_TRACES_SAMPLER": "traceidratio",
                               "OTEL_TRACES_SAMPLER_ARG": "1.5", "PATH": "/usr/bin:/bin"},
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "OTEL_TRACES_SAMPLER_ARG" in done.stderr


def test_grpc_calls_are_traced_and_labelled(tmp_path) -> None:
    """A gRPC call (HTTP/2) carrying traceparent: a client span in the app's trace with the
    gRPC status; the call is counted under its authority; its access-log line says so."""
    import json

    import grpc
    from support import wait_for
    from test_proxy_http2 import grpc_service

    unary = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
    log = tmp_path / "access.jsonl"
    with GrpcReceiver() as rx, grpc_service("test.T", {"Unary": unary}) as port:
        p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{port}", f"access_log={log}",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
        try:
            with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
                call = channel.unary_unary("/test.T/Unary")
                assert call(b"x", timeout=10, metadata=(
                    ("traceparent", f"00-{APP_TRACE}-{APP_SPAN}-01"),)) == b"ok"
            [span] = rx.wait_for(1)
            assert p.metric("request_total", protocol="h2",
                            authority=f"127.0.0.1:{p.outbound}") == 1
            wait_for(lambda: log.exists() and log.read_text().strip(), timeout=10,
                     what="the access-log line")
        finally:
            p.stop()
    assert span.trace_id == APP_TRACE and span.parent_span_id == APP_SPAN
    assert span.attributes["rpc.system"] == "grpc"
    assert span.attributes["rpc.grpc.status_code"] == 0
    [line] = [json.loads(x) for x in log.read_text().splitlines()]
    assert line["protocol"] == "h2" and line["path"] == "/test.T/Unary"
    assert line["status"] == 200 and line["grpc_status"] == "0"
    assert line["trace_id"] == APP_TRACE


def test_thrift_calls_are_root_spans() -> None:
    """Plain Thrift carries no trace context: each call through the proxy is a root client
    span named for its method, with the RPC attributes (and no HTTP ones)."""
    from thrift_idl.echo_service import EchoServer, client

    server = EchoServer("framed-binary")
    try:
        with GrpcReceiver() as rx:
            p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{server.port}",
                             env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
            try:
                c = client("framed-binary", p.outbound)
                try:
                    c.ping()
                    assert c.add(2, 3) == 5
                finally:
                    c.close()
                spans = rx.wait_for(2)
            finally:
                p.stop()
    finally:
        server.close()
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"ping", "add"}
    add = by_name["add"]
    assert add.kind == "client" and add.parent_span_id == ""
    assert add.attributes["rpc.system"] == "thrift" and add.attributes["rpc.method"] == "add"
    assert "http.request.method" not in add.attributes


def test_unsampled_roots_add_nothing(backend: H11Server) -> None:
    """A request with no trace context that loses the root draw gets no span and no
    header: the next proxy decides for itself (as linkerd2-proxy does)."""
    with GrpcReceiver() as rx:
        p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{backend.port}",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
                              "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                              "OTEL_TRACES_SAMPLER_ARG": "0"})
        try:
            assert curl(p.outbound, "/untraced") == "200"
            assert curl(p.outbound, "/traced",
                        f"traceparent: 00-{APP_TRACE}-{APP_SPAN}-01") == "200"
            [span] = rx.wait_for(1)  # the caller asked: that one is traced
        finally:
            p.stop()
    untraced, traced = (dict(r.headers) for r, _ in backend.requests)
    assert b"traceparent" not in untraced
    assert traced[b"traceparent"].decode() == f"00-{APP_TRACE}-{span.span_id}-01"


def test_the_parser_notes_every_propagation_header() -> None:
    """The HTTP/1 parser's list of trace headers is the propagation module's."""
    from appliance.protocols.http1 import TRACE_HEADERS
    from appliance.telemetry.propagation import PROPAGATION_HEADERS

    assert TRACE_HEADERS == PROPAGATION_HEADERS
