"""Parsing wrk's output (run: .venv/bin/pytest bench/test_measure.py)."""

from __future__ import annotations

import os

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
