#!/usr/bin/env python3
"""Request-level reliability under injected faults: the numbers of issue 5, measured.

    .venv/bin/python bench/reliability.py [--requests 3000] [--rate 200] [--concurrency 8]
                                          [--only fail50,slow,blackhole,budget] [--json out.json]

Each scenario starts three replicas (tests/faulty.py, HTTP/1.1 on loopback, in this
process), one ``appliance proxy`` routing ``/svc/web`` to them with a static namer (all
other settings at their defaults unless the scenario says), and a paced load: ``--rate``
requests per second from ``--concurrency`` keep-alive connections, ``--requests`` GETs in
all, at most ``--max-seconds`` per scenario. Every number comes from what the client saw
and from the proxy's /metrics and /api/endpoints.

- ``fail50``: one replica answers 503 to half its requests; classifier
  ``io.l5d.http.retryableRead5XX``. Client success rate; retries and their share of the
  requests against the budget (20 % + 10/s over 10 s); the failing replica's share.
  With peak-EWMA the failing replica soon gets few requests (failures weigh on its
  latency); ``fail50_rr`` is the same with ``balancer.kind=round_robin``, which keeps
  sending it a third of the first attempts, so the retries do the work.
- ``slow``: one replica answers 200 ms later than the others. After ``--warmup`` requests:
  its share of the requests, the client p50/p99 overall and on the fast replicas.
- ``blackhole``: one replica accepts and never answers; ``service.timeout=1s``,
  ``service.attempt_timeout=250ms``, retryableRead5XX. The longest any request waited,
  how many failed, how many reached the blackhole, and its failure-accrual state. With
  peak-EWMA, one timeout keeps the replica out of rotation for about a minute, so the 7
  failures in a row that eject it take minutes to gather; ``blackhole_ll`` is the same
  with ``balancer.kind=p2c_least_loaded`` (no latency view), where failure accrual is what
  takes it out.
- ``budget``: every replica answers 503 to every request (retryableRead5XX, max_retries 3):
  retries are bounded by the budget alone; retries per request against the allowance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for extra in (str(REPO), str(REPO / "tests")):
    if extra not in sys.path:
        sys.path.insert(0, extra)

from faulty import Fault, FaultyBackend  # noqa: E402
from support import ProxyProcess, free_port  # noqa: E402

SCENARIOS = ("fail50", "fail50_rr", "slow", "blackhole", "blackhole_ll", "budget")


@dataclass
class Sample:
    status: int
    replica: str
    seconds: float


@dataclass
class Load:
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0


# --- the load --------------------------------------------------------------------------------

async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
              path: str) -> tuple[int, str]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    if headers.get("connection", "").lower() == "close":
        raise ConnectionResetError("closed by the proxy")
    return status, headers.get("x-replica", "")


async def run_load(port: int, total: int, rate: float, concurrency: int,
                   max_seconds: float) -> Load:
    """``total`` GETs at ``rate`` per second from ``concurrency`` connections."""
    load = Load()
    start = time.monotonic()
    tickets = iter(range(total))

    async def worker() -> None:
        reader = writer = None
        for n in tickets:
            due = start + n / rate
            now = time.monotonic()
            if now - start > max_seconds:
                return
            if due > now:
                await asyncio.sleep(due - now)
            t0 = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                status, replica = await asyncio.wait_for(one(reader, writer, f"/{n}"), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                status, replica = 0, ""
                if writer is not None:
                    writer.close()
                reader = writer = None
            load.samples.append(Sample(status, replica, time.monotonic() - t0))
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.seconds = time.monotonic() - start
    return load


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the setup ---------------------------------------------------------------------------------

def proxy_for(backends: list[FaultyBackend], *settings: str) -> ProxyProcess:
    addrs = ", ".join(f"'{b.address}'" for b in backends)
    return ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{free_port()}",
                        "routing.dtab=/svc/web => /#/static/web",
                        f"namers=[{{kind: static, services: {{web: [{addrs}]}}}}]", *settings)


def endpoint_states(p: ProxyProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin}/api/endpoints", timeout=5) as r:
        data = json.load(r)
    return {ep["address"]: ep for s in data["services"] for ep in s["endpoints"]}


def scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    backends = [FaultyBackend(n, seed=i + 1) for i, n in enumerate("abc")]
    bad = backends[2]
    settings: list[str] = ["service.classifier=io.l5d.http.retryableRead5XX"]
    if name == "fail50":
        bad.fault = Fault(fail_share=0.5)
    elif name == "fail50_rr":
        bad.fault = Fault(fail_share=0.5)
        settings.append("balancer.kind=round_robin")
    elif name == "slow":
        bad.fault = Fault(delay=0.2)
        settings = []
    elif name == "blackhole":
        bad.fault = Fault(blackhole=True)
        settings += ["service.timeout=1s", "service.attempt_timeout=250ms"]
    elif name == "blackhole_ll":
        bad.fault = Fault(blackhole=True)
        settings += ["service.timeout=1s", "service.attempt_timeout=250ms",
                     "balancer.kind=p2c_least_loaded"]
    elif name == "budget":
        for b in backends:
            b.fault = Fault(fail_share=1.0)
        settings += ["service.max_retries=3", "balancer.consecutive_failures=1000000"]
    p = proxy_for(backends, *settings)
    try:
        warm = 0
        if name == "slow":
            warm = args.warmup
            asyncio.run(run_load(p.outbound, warm, args.rate, args.concurrency,
                                 args.max_seconds))
            for b in backends:
                b.reset_counts()
        load = asyncio.run(run_load(p.outbound, args.requests, args.rate, args.concurrency,
                                    args.max_seconds))
        metrics = {
            "retries": p.metric("retry_total", direction="outbound"),
            "budget_exhausted": p.metric("retry_budget_exhausted_total", direction="outbound"),
            "requests": p.metric("request_total", direction="outbound", protocol="http/1"),
        }
        states = endpoint_states(p)
        return report(name, load, backends, metrics, states, warm)
    finally:
        p.stop()
        for b in backends:
            b.close()


def report(name: str, load: Load, backends: list[FaultyBackend], metrics: dict[str, float],
           states: dict[str, Any], warm: int) -> dict[str, Any]:
    s = load.samples
    n = len(s)
    ok = sum(1 for x in s if x.status == 200)
    bad = backends[2]
    out: dict[str, Any] = {
        "scenario": name, "requests": n, "seconds": round(load.seconds, 2),
        "rate": round(n / load.seconds, 1) if load.seconds else 0,
        "success_rate": round(ok / n, 5) if n else 0,
        "statuses": {str(k): sum(1 for x in s if x.status == k) for k in sorted(
            {x.status for x in s})},
        "retries": int(metrics["retries"]),
        "retries_per_request": round(metrics["retries"] / max(metrics["requests"], 1), 4),
        "budget_exhausted": int(metrics["budget_exhausted"]),
        # The default budget over disjoint 10 s windows: 20 % of the requests plus a
        # reserve of 10/s x 10 s per window.
        "budget_allowance": int(0.2 * metrics["requests"]
                                + 100 * max(1, math.ceil(load.seconds / 10.0))),
        "reached": {b.name: b.count() for b in backends},
        "bad_share": round(bad.count() / max(1, sum(b.count() for b in backends)), 4),
        "bad_state": states.get(bad.address, {}).get("state"),
        "bad_ejections": states.get(bad.address, {}).get("ejections"),
        "p50_ms": round(quantile([x.seconds for x in s], 0.5) * 1000, 1),
        "p99_ms": round(quantile([x.seconds for x in s], 0.99) * 1000, 1),
        "max_ms": round(max((x.seconds for x in s), default=math.nan) * 1000, 1),
    }
    fast = [x.seconds for x in s if x.replica and x.replica != bad.name]
    out["p99_fast_ms"] = round(quantile(fast, 0.99) * 1000, 1)
    out["served_by_bad"] = round(sum(1 for x in s if x.replica == bad.name) / max(1, n), 4)
    if warm:
        out["warmup"] = warm
    return out


def show(r: dict[str, Any]) -> None:
    name = r["scenario"]
    head = (f"{name:9} {r['requests']} requests in {r['seconds']} s ({r['rate']}/s): "
            f"success {r['success_rate'] * 100:.2f} %, statuses {r['statuses']}")
    print(head)
    print(f"          retries {r['retries']} ({r['retries_per_request'] * 100:.1f} % of requests; "
          f"budget allowance {r['budget_allowance']}), budget exhausted "
          f"{r['budget_exhausted']}")
    print(f"          reached {r['reached']}; bad replica share {r['bad_share'] * 100:.1f} % "
          f"(served {r['served_by_bad'] * 100:.1f} %), state {r['bad_state']}, "
          f"ejections {r['bad_ejections']}")
    print(f"          latency p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms (fast replicas "
          f"{r['p99_fast_ms']} ms), max {r['max_ms']} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--json")
    args = parser.parse_args()
    if not 1 <= args.requests <= 100_000 or not 0 < args.rate <= 5000 \
            or not 1 <= args.concurrency <= 256 or args.max_seconds > 600:
        parser.error("bounded load only: requests 1-100000, rate <= 5000/s, "
                     "concurrency 1-256, max-seconds <= 600")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from "
                     + ", ".join(SCENARIOS))
    results = []
    for name in names:
        r = scenario(name, args)
        show(r)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
