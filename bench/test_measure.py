"""Parsing wrk's and h2load's output (run: .venv/bin/pytest bench/test_measure.py)."""

# ruff: noqa: E501  (the h2load fixtures below are verbatim output, with its long lines)

from __future__ import annotations

import os

import pytest

from bench import measure

WRK_OUT = """\
Running 10s test @ http://127.0.0.1:8080/small
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.33us  120.10us   5.21ms   90.00%
    Req/Sec    61.20k     1.10k   63.00k    70.00%
  Latency Distribution
     50%  790.00us
     75%  850.00us
     90%    0.95ms
     99%    1.50ms
  612345 requests in 10.00s, 100.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  61234.50
Transfer/sec:     10.00MB
"""


def test_parse_wrk_figures() -> None:
    """Requests, rps, percentiles in ms, socket errors and non-2xx count are all read."""
    r = measure.parse_wrk(WRK_OUT)
    assert (r.requests, r.seconds, r.rps) == (612345, 10.0, 61234.5)
    assert (r.p50_ms, r.p90_ms, r.p99_ms) == (0.79, 0.95, 1.5)
    assert r.socket_errors == {"connect": 0, "read": 2, "write": 0, "timeout": 1}
    assert r.non_2xx_3xx == 7
    assert r.problems() == ["7 non-2xx/3xx responses", "socket errors read 2, timeout 1"]


def test_parse_wrk_clean_run_has_no_problems() -> None:
    """Without error lines a run is clean."""
    clean = "\n".join(line for line in WRK_OUT.splitlines()
                      if "errors" not in line and "Non-2xx" not in line)
    r = measure.parse_wrk(clean)
    assert r.problems() == []
    assert r.non_2xx_3xx == 0


def test_cpu_and_rss_of_self() -> None:
    """/proc readings of this process are positive."""
    assert measure.cpu_seconds(os.getpid()) > 0
    assert measure.peak_rss_kib(os.getpid()) > 0


# Real h2load 1.52 output, captured once: 50 connections x 10 streams for 2 s through
# appliance (b4d007e + 2d61e2a) to nghttpd, where the first streams got 502s (see
# docs/performance.md, h2c).
H2LOAD_FAILED = """\
starting benchmark...
spawning thread #0: 50 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for measurements.
Warm-up started for thread #0.
progress: 10% of clients started
progress: 20% of clients started
progress: 30% of clients started
progress: 40% of clients started
progress: 50% of clients started
progress: 60% of clients started
progress: 70% of clients started
progress: 80% of clients started
progress: 90% of clients started
progress: 100% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.01s, 5570.50 req/s, 267.18KB/s
requests: 11141 total, 11641 started, 11141 done, 10737 succeeded, 404 failed, 0 errored, 0 timeout
status codes: 10737 2xx, 0 3xx, 0 4xx, 404 5xx
traffic: 534.36KB (547180) total, 78.87KB (80764) headers (space savings 96.06%), 162.35KB (166245) data
                     min         max         mean         sd        +/- sd
time for request:    12.73ms     73.79ms     35.58ms      7.07ms    79.36%
time for connect:       65us       648us       351us       174us    58.00%
time to 1st byte:    47.44ms     74.77ms     60.68ms     12.88ms    38.10%
req/s           :       0.00      294.69      111.29      136.83    60.00%
"""

# Real h2load 1.52 output (its summary), captured once: 50 connections x 1 stream, 2 s,
# directly to nghttpd.
H2LOAD_CLEAN = """\
finished in 2.00s, 67355.50 req/s, 2.64MB/s
requests: 134711 total, 134761 started, 134711 done, 134711 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 134711 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 5.27MB (5530301) total, 1.29MB (1353060) headers (space savings 93.48%), 1.67MB (1751243) data
                     min         max         mean         sd        +/- sd
time for request:       44us      2.54ms       529us       110us    89.48%
time for connect:     1.31ms      1.79ms      1.56ms       148us    58.00%
time to 1st byte:     2.90ms      3.81ms      3.37ms       409us    54.00%
req/s           :    1344.38     1351.01     1346.52        1.66    66.00%
"""


def test_parse_h2load_figures() -> None:
    """Done requests, rps, counts, status classes, latency in ms and HPACK savings are read;
    failed requests and 5xx are problems."""
    r = measure.parse_h2load(H2LOAD_FAILED)
    assert (r.requests, r.seconds, r.rps) == (11141, 2.01, 5570.5)
    assert (r.succeeded, r.failed, r.errored, r.timeout) == (10737, 404, 0, 0)
    assert r.status == {"2xx": 10737, "3xx": 0, "4xx": 0, "5xx": 404}
    assert (r.min_ms, r.max_ms, r.mean_ms, r.sd_ms) == (12.73, 73.79, 35.58, 7.07)
    assert r.header_savings_pct == 96.06
    assert r.problems() == ["404 failed", "status 5xx 404"]
    assert "raw" not in r.summary()


def test_parse_h2load_clean_run_in_microseconds() -> None:
    """A clean run has no problems; "us" latencies become milliseconds."""
    r = measure.parse_h2load(H2LOAD_CLEAN)
    assert (r.requests, r.rps, r.succeeded) == (134711, 67355.5, 134711)
    assert r.min_ms == pytest.approx(0.044)
    assert r.mean_ms == pytest.approx(0.529)
    assert r.max_ms == pytest.approx(2.54)
    assert r.problems() == []


def test_parse_h2load_errors_and_missing_summary() -> None:
    """Errored and timed-out requests are problems; output without a summary is refused."""
    out = H2LOAD_CLEAN.replace("0 failed, 0 errored, 0 timeout", "0 failed, 3 errored, 1 timeout")
    assert measure.parse_h2load(out).problems() == ["3 errored", "1 timeout"]
    with pytest.raises(ValueError):
        measure.parse_h2load("starting benchmark...\nno servers were available\n")
