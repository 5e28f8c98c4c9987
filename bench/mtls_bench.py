#!/usr/bin/env python3
"""Proxy-to-proxy requests/s and added latency: mesh TLS against plaintext, in one run.

    .venv/bin/python bench/mtls_bench.py [--duration 10] [--rounds 3] [--connections 50]
                                         [--json out.json]

Two proxies in a row, as between two meshed hosts: wrk -> client proxy (outbound) ->
server proxy (inbound) -> nginx. Two pairs run side by side: ``plaintext`` (no identity)
and ``mtls`` (identity on: a trust anchor from ``appliance certs init``, ``appliance
identity`` on loopback, each proxy claiming its own loopback address, so the client proxy
finds the server proxy meshed and speaks mesh TLS to it). ``direct`` is wrk to nginx, the
reference for added latency.

Cases:

- ``http``: HTTP/1.1 keep-alive GET /small (13 bytes). The proxy-to-proxy connections are
  pooled, so this measures the record encryption and the TLS transport, not handshakes.
- ``conn``: one request per connection (``Connection: close``) on a port both proxies
  treat as opaque, so every request is a new TCP connection and, for ``mtls``, a new mesh
  TLS handshake (ECDSA P-256, TLS 1.3) between the proxies.

Layout (2 cores): both proxies on core 0 (their CPU is added up: the cost of a request
through the pair), nginx and wrk on core 1, the identity service (idle after start) on
core 1. Variants are interleaved in every round; the median over rounds is reported, with
ratios mtls/plaintext. Only 127.0.0.x is bound. See docs/performance.md, "mTLS".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from appliance.telemetry import scrape  # noqa: E402
from bench import measure, services  # noqa: E402
from bench.services import HOST, SMALL_BODY, BenchError, Service  # noqa: E402

PROXY_CORE = 0
LOAD_CORE = 1
TOKENS = {"web": "bench-web-0123456789abcdef", "api": "bench-api-0123456789abcdef"}
CLIENT_ADDR, SERVER_ADDR = "127.0.0.2", "127.0.0.3"
VARIANTS = ("direct", "plaintext", "mtls")
CASES = ("http", "conn")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--cases", default=",".join(CASES), help="http,conn")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in args.cases if c not in CASES]
    if bad or args.rounds < 1 or args.duration <= 0:
        p.error(f"bad --cases {bad}" if bad else "--rounds >= 1 and --duration > 0")
    return args


def appliance(tmp: Path, name: str, settings: list[str], env: dict[str, str]) -> tuple[
        Service, dict[str, int]]:
    outbound, inbound, admin = services.free_ports(3)
    argv = [sys.executable, "-m", "appliance", "proxy", "--outbound-port", str(outbound),
            "--inbound-port", str(inbound), "--admin-port", str(admin),
            "--log-level", "warning", "--set", f"outbound.bind={HOST}",
            "--set", f"admin.bind={HOST}"]
    for s in settings:
        argv += ["--set", s]
    svc = Service(name, ["env", *(f"{k}={v}" for k, v in env.items()), *argv], PROXY_CORE,
                  tmp / f"{name}.log", REPO)
    return svc, {"outbound": outbound, "inbound": inbound, "admin": admin}


class Pair:
    """client proxy -> server proxy -> nginx, with or without identity."""

    def __init__(self, tmp: Path, name: str, nginx_port: int, ident: dict[str, str] | None,
                 opaque: bool) -> None:
        self.name = name
        env_server = env_client = {}
        server_bind = client_bind = HOST
        if ident is not None:
            env_server = {**ident, "APPLIANCE_IDENTITY_TOKEN_FILE": str(tmp / "token-api"),
                          "APPLIANCE_IDENTITY_ADDRESSES": SERVER_ADDR}
            env_client = {**ident, "APPLIANCE_IDENTITY_TOKEN_FILE": str(tmp / "token-web"),
                          "APPLIANCE_IDENTITY_ADDRESSES": CLIENT_ADDR}
            server_bind, client_bind = SERVER_ADDR, CLIENT_ADDR
        self.server, sp = appliance(tmp, f"{name}-server", [
            f"inbound.bind={server_bind}", f"inbound.orig_dst_override={HOST}:{nginx_port}",
            *([f"detect.opaque_ports={nginx_port}"] if opaque else [])], env_server)
        # the client proxy's original destination (after the override) is the server
        # proxy's inbound port: that is the port it must treat as opaque
        self.client, cp = appliance(tmp, f"{name}-client", [
            f"inbound.bind={client_bind}",
            f"outbound.orig_dst_override={server_bind}:{sp['inbound']}",
            *([f"detect.opaque_ports={sp['inbound']}"] if opaque else [])], env_client)
        self.ports = {"server": sp, "client": cp}
        self.url = f"http://{HOST}:{cp['outbound']}/small"

    def start(self) -> None:
        for svc, ports in ((self.server, self.ports["server"]),
                           (self.client, self.ports["client"])):
            svc.start()
            svc.wait_ready(lambda p=ports: services.http_get(p["admin"], "/ready")[0] == 200,
                           30.0)
        status, body = services.http_get(self.ports["client"]["outbound"], "/small")
        if status != 200 or body != SMALL_BODY:
            raise BenchError(f"{self.name}: /small through the pair gave {status} {body!r}")

    def pids(self) -> list[int]:
        return [self.server.pid, self.client.pid]

    def stop(self) -> None:
        self.client.stop()
        self.server.stop()


def mesh_tls_in_use(pair: Pair) -> bool:
    """The mtls pair's client proxy counts TLS connections to the server's identity."""
    _, body = services.http_get(pair.ports["client"]["admin"], "/metrics")
    return scrape.total(body.decode(), "tcp_open_total", tls="true") > 0


def make_pki(tmp: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "certs", "init", "--trust-domain", "bench.local",
         "--dir", str(tmp / "ca")], capture_output=True, text=True, timeout=60, cwd=REPO)
    if done.returncode != 0:
        raise BenchError(f"certs init failed: {done.stderr}")
    (tmp / "tokens").write_text("".join(f"{t} default {sa}\n" for sa, t in TOKENS.items()))
    for sa, token in TOKENS.items():
        (tmp / f"token-{sa}").write_text(token + "\n")


def identity(tmp: Path) -> tuple[Service, int]:
    (port,) = services.free_ports(1)
    argv = [sys.executable, "-m", "appliance", "identity", "--dir", str(tmp / "ca"),
            "--tokens", str(tmp / "tokens"), "--listen", f"{HOST}:{port}",
            "--addresses", "csr", "--log-level", "warning"]
    return Service("identity", argv, LOAD_CORE, tmp / "identity.log", REPO), port


def run_case(wrk: str, url: str, case: str, args: argparse.Namespace,
             pids: list[int]) -> dict[str, Any]:
    before = sum(measure.cpu_seconds(p) for p in pids)
    if case == "conn":
        res = run_wrk_close(wrk, url, args.duration, args.connections)
    else:
        res = measure.run_wrk(wrk, url, args.duration, args.connections, LOAD_CORE)
    cpu = sum(measure.cpu_seconds(p) for p in pids) - before
    problems = res.problems()
    return {"rps": res.rps, "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
            "requests": res.requests,
            "cpu_us_per_req": (cpu / res.requests * 1e6) if pids and res.requests else None,
            "problems": problems}


def run_wrk_close(wrk: str, url: str, duration_s: float, connections: int
                  ) -> measure.WrkResult:
    """wrk with ``Connection: close``: one request per connection."""
    argv = ["taskset", "-c", str(LOAD_CORE), wrk, "-t1", f"-c{connections}",
            f"-d{max(1, round(duration_s))}s", "--timeout", "5s", "--latency",
            "-H", "Connection: close", url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    if proc.returncode != 0:
        raise BenchError(f"wrk failed: {proc.stderr.strip() or proc.stdout}")
    return measure.parse_wrk(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = services.require_tools(["wrk", "nginx", "taskset"])
    tmp = Path(tempfile.mkdtemp(prefix="appliance-mtls-bench-"))
    started: list[Any] = []
    try:
        (nginx_port,) = services.free_ports(1)
        nginx = services.nginx(tools["nginx"], tmp, nginx_port, LOAD_CORE)
        services.start_nginx(nginx, nginx_port)
        started.append(nginx)
        make_pki(tmp)
        ident, ident_port = identity(tmp)
        ident.start()
        started.append(ident)
        ident.wait_ready(lambda: _listening(ident_port), 20.0)
        env = {"APPLIANCE_IDENTITY_ADDR": f"{HOST}:{ident_port}",
               "APPLIANCE_TRUST_ANCHORS": str(tmp / "ca" / "trust-anchor.pem")}
        # one pair per variant and case: "conn" pairs treat the traffic as opaque
        pairs: dict[tuple[str, str], Pair] = {}
        for variant, ident_env in (("plaintext", None), ("mtls", env)):
            for case in args.cases:
                pairs[(variant, case)] = Pair(tmp, f"{variant}-{case}", nginx_port, ident_env,
                                              opaque=case == "conn")
        for pair in pairs.values():
            pair.start()
            started.append(pair)
        for (variant, case), pair in pairs.items():
            if variant == "mtls" and not mesh_tls_in_use(pair):
                raise BenchError(f"the mtls pair ({case}) did not use mesh TLS")
        direct = f"http://{HOST}:{nginx_port}/small"
        samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
        if args.warmup > 0:
            for (_, case), pair in pairs.items():
                w = argparse.Namespace(**{**vars(args), "duration": args.warmup})
                run_case(tools["wrk"], pair.url, case, w, [])
        for rnd in range(args.rounds):
            for case in args.cases:
                for variant in VARIANTS:
                    pair = pairs.get((variant, case))
                    url = direct if pair is None else pair.url
                    res = run_case(tools["wrk"], url, case, args,
                                   [] if pair is None else pair.pids())
                    samples.setdefault((case, variant), []).append(res)
                    print(f"round {rnd + 1} {case:5} {variant:9} {res['rps']:9.0f} rps "
                          f"p50 {res['p50_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms"
                          + (f" cpu {res['cpu_us_per_req']:.1f} us/req"
                             if res["cpu_us_per_req"] else "")
                          + (f"  PROBLEMS {res['problems']}" if res["problems"] else ""),
                          flush=True)
        report = summarise(samples, args)
        print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "samples": {
                f"{c}/{v}": s for (c, v), s in samples.items()}, "report": report}, indent=1))
        return 1 if any(s["problems"] for ss in samples.values() for s in ss) else 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for thing in reversed(started):
            thing.stop()
        if os.environ.get("KEEP_TMP") != "1":
            shutil.rmtree(tmp, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarise(samples: dict[tuple[str, str], list[dict[str, Any]]],
              args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for case in args.cases:
        med = {v: {k: _median([s[k] for s in samples[(case, v)]])
                   for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")} for v in VARIANTS}
        plain, mtls, direct = med["plaintext"], med["mtls"], med["direct"]
        for variant in VARIANTS:
            m = med[variant]
            rows.append({"case": case, "variant": variant, **m,
                         "added_p50_ms": None if variant == "direct"
                         else m["p50_ms"] - direct["p50_ms"]})
        rows.append({"case": case, "variant": "mtls/plaintext",
                     "rps": mtls["rps"] / plain["rps"],
                     "p50_ms": mtls["p50_ms"] / plain["p50_ms"],
                     "p99_ms": mtls["p99_ms"] / plain["p99_ms"],
                     "cpu_us_per_req": (mtls["cpu_us_per_req"] / plain["cpu_us_per_req"]
                                        if mtls["cpu_us_per_req"] and plain["cpu_us_per_req"]
                                        else None),
                     "added_p50_ms": (mtls["p50_ms"] - direct["p50_ms"])
                     / max(1e-9, plain["p50_ms"] - direct["p50_ms"])})
    return rows


def _cell(value: float | None, spec: str, ratio: bool) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}x" if ratio else format(value, spec)


def print_report(rows: list[dict[str, Any]]) -> None:
    print("\n| case | variant | rps | p50 ms | p99 ms | added p50 ms | pair CPU µs/req |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = r["variant"] == "mtls/plaintext"
        cells = [_cell(r[k], spec, ratio) for k, spec in (
            ("rps", ".0f"), ("p50_ms", ".2f"), ("p99_ms", ".2f"), ("added_p50_ms", ".2f"),
            ("cpu_us_per_req", ".1f"))]
        print(f"| {r['case']} | {r['variant']} | " + " | ".join(cells) + " |")
    print(f"\n(measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")


if __name__ == "__main__":
    sys.exit(main())
