"""The metrics exposition: names, labels, buckets, and promtool's own check."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from support import H11Server

from appliance.telemetry.metrics import LATENCY_BUCKETS_MS, Registry

# promtool's only findings: linkerd's own names abbreviate their unit; they are kept so
# linkerd's dashboards and queries work.
ACCEPTED_LINTS = {f"{name} metric names should not contain abbreviated units"
                  for name in ("response_latency_ms", "tcp_connection_duration_ms")}


def sample_registry() -> Registry:
    reg = Registry()
    stats = reg.http("outbound")
    stats.requests += 2
    stats.response(200, 0.0042)
    stats.response(503, 1.5, "upstream")
    tcp = reg.tcp("inbound", "opaque", "src")
    tcp.opened += 3
    tcp.closed += 1
    tcp.read_bytes += 10
    reg.error("outbound", "loop")
    return reg


def test_counts_and_labels() -> None:
    """Counters, the gauge of open connections and classification appear as expected."""
    text = sample_registry().render()
    assert 'request_total{direction="outbound",protocol="http/1"} 2' in text
    assert ('response_total{direction="outbound",protocol="http/1",status_code="503",'
            'classification="failure",error="upstream"} 1') in text
    assert 'tcp_open_connections{direction="inbound",peer="src",protocol="opaque"} 2' in text
    assert 'proxy_errors_total{direction="outbound",error="loop"} 1' in text


def test_latency_histogram_is_cumulative_with_linkerd_buckets() -> None:
    """4.2 ms lands in le=5; 1500 ms in le=2000; +Inf counts both."""
    text = sample_registry().render()
    lines = [ln for ln in text.splitlines() if ln.startswith("response_latency_ms_bucket")]
    assert len(lines) == len(LATENCY_BUCKETS_MS) + 1
    value = {ln.split('le="')[1].split('"')[0]: int(ln.rsplit(" ", 1)[1]) for ln in lines}
    assert value["4"] == 0 and value["5"] == 1 and value["1000"] == 1
    assert value["2000"] == 2 and value["+Inf"] == 2


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed "
                    "(apt-get install prometheus)")
def test_promtool_accepts_the_exposition() -> None:
    """promtool parses the text and finds no problem beyond the lint it makes of linkerd's
    own names ``response_latency_ms`` and ``tcp_connection_duration_ms``."""
    text = sample_registry().render()
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30)
    problems = [line for line in (result.stdout + result.stderr).decode().splitlines()
                if line.strip()]
    assert [p for p in problems if p not in ACCEPTED_LINTS] == []
    assert result.returncode in (0, 3)  # 3: lint findings only (the accepted one)


def test_label_sets_are_capped_with_an_overflow_series() -> None:
    """Past MAX_SERIES label sets in a direction, new authorities count as overflow."""
    from appliance.telemetry import metrics

    r = metrics.Registry()
    for i in range(metrics.MAX_SERIES):
        r.http("outbound", "http/1", f"host{i}").requests += 1
    r.http("outbound", "http/1", "one-too-many").requests += 1
    r.http("outbound", "http/1", "another").requests += 1
    text = r.render()
    assert 'authority="one-too-many"' not in text
    assert 'request_total{direction="outbound",protocol="http/1",authority="overflow",' \
           'dst_service="overflow"} 2' in text
    r.http("inbound", "http/1", "fresh").requests += 1  # the cap is per direction
    assert 'authority="fresh"' in r.render()


def test_idle_label_sets_expire() -> None:
    """A series with no new request for SERIES_TTL seconds (and none in flight) is dropped;
    the label-less series of a direction stays."""
    from appliance.telemetry import metrics

    r = metrics.Registry()
    idle = r.http("outbound", "http/1", "idle.example")
    idle.requests += 1
    idle.response(200, 0.001)
    busy = r.http("outbound", "http/1", "busy.example")
    busy.requests += 1  # in flight: never expires while so
    base = r.http("outbound", "http/1")
    base.requests += 1
    base.response(200, 0.001)
    r.expire(1000.0)
    r.expire(1000.0 + metrics.SERIES_TTL + 1)
    names = {s.labels for s in r.http_series()}
    assert (("direction", "outbound"), ("protocol", "http/1"),
            ("authority", "idle.example")) not in names
    assert any(("authority", "busy.example") in labels for labels in names)
    assert (("direction", "outbound"), ("protocol", "http/1")) in names
    again = r.http("outbound", "http/1", "idle.example")  # comes back on the next request
    assert again is not idle and again.requests == 0


@pytest.mark.skipif(shutil.which("promtool") is None or shutil.which("nghttp") is None,
                    reason="promtool or nghttp not installed")
def test_promtool_accepts_a_busy_proxy(backend: H11Server) -> None:
    """A proxy that served HTTP/1 (routed), HTTP/2, gRPC and opaque traffic: its /metrics
    passes promtool (beyond the one accepted lint) and shows every protocol."""
    import socket

    import grpc
    from support import ProxyProcess
    from test_proxy_http2 import grpc_service

    unary = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok:" + request)
    with grpc_service("test.M", {"Unary": unary}) as grpc_port:
        p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{grpc_port}",
                         f"routing.dtab=/svc/h1 => /$/inet/127.0.0.1/{backend.port}")
        try:
            h1 = subprocess.run(["curl", "-sS", "-H", "Host: h1",
                                 f"http://127.0.0.1:{p.outbound}/x"], capture_output=True,
                                timeout=30)
            assert h1.stdout == b"GET /x\n", h1.stderr
            with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
                assert channel.unary_unary("/test.M/Unary")(b"a", timeout=10) == b"ok:a"
            h2 = subprocess.run(["nghttp", "-n", f"http://127.0.0.1:{p.outbound}/plain"],
                                capture_output=True, timeout=30)  # HTTP/2, not gRPC
            assert h2.returncode == 0, h2.stderr
            with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
                s.sendall(b"\x00\x01\x02 opaque bytes\r\n")
                s.shutdown(socket.SHUT_WR)
                s.settimeout(10)
                while s.recv(65536):
                    pass
            text = p.metrics()
        finally:
            p.stop()
    for protocol in ("http/1", "h2", "opaque"):
        assert f'protocol="{protocol}"' in text, protocol
    assert 'grpc_status="0"' in text
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30)
    problems = [line for line in (result.stdout + result.stderr).decode().splitlines()
                if line.strip()]
    assert [x for x in problems if x not in ACCEPTED_LINTS] == [], problems


def test_metrics_off_records_nothing() -> None:
    """admin.metrics=false: the registry hands out counters that count nothing."""
    r = Registry(enabled=False)
    stats = r.http("outbound", "http/1", "a.example")
    stats.requests += 1
    stats.response(200, 0.001)
    r.tcp("outbound", "opaque", "src").opened += 1
    text = r.render()
    assert "request_total{" not in text and "tcp_open_total{" not in text


def test_connection_durations() -> None:
    """A closed connection's lifetime lands in tcp_connection_duration_ms."""
    r = Registry()
    stats = r.tcp("inbound", "http/1", "src")
    opened = stats.open()
    stats.close(opened - 0.05)  # as if opened 50 ms earlier
    text = r.render()
    labels = 'direction="inbound",peer="src",protocol="http/1"'
    assert f'tcp_connection_duration_ms_bucket{{{labels},le="10"}} 0' in text
    assert f'tcp_connection_duration_ms_bucket{{{labels},le="100"}} 1' in text
    assert f"tcp_connection_duration_ms_count{{{labels}}} 1" in text
    assert f"tcp_open_total{{{labels}}} 1" in text and f"tcp_close_total{{{labels}}} 1" in text
