"""The metrics exposition: names, labels, buckets, and promtool's own check."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from appliance.telemetry.metrics import LATENCY_BUCKETS_MS, Registry


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
    """promtool parses the text and finds no problem beyond the one lint it makes of
    linkerd's own name ``response_latency_ms`` (kept for dashboard compatibility)."""
    text = sample_registry().render()
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30)
    problems = [line for line in (result.stdout + result.stderr).decode().splitlines()
                if line.strip()]
    accepted = "response_latency_ms metric names should not contain abbreviated units"
    assert [p for p in problems if p != accepted] == []
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
