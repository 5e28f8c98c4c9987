#!/usr/bin/env python3
"""Benchmark appliance against HAProxy 2.6 and a direct connection, on one proxy core.

    .venv/bin/python bench/run.py [--duration 10] [--rounds 3] [--only http|tcp|h2c]
                                  [--json out.json]

Layout (2 cores): the proxy under test on core 0; the backend and the load on core 1.
Cases: HTTP/1.1 keep-alive for /small (13-byte body) and /16k, each direct to nginx, through
HAProxy (mode http, nbthread 1) and through appliance; opaque TCP for the same paths:
direct, HAProxy mode tcp, appliance with the backend port marked opaque; and h2c (HTTP/2
with prior knowledge, h2load, 1 and 10 streams per connection) for /small: direct to
nghttpd, HAProxy (proto h2 on both sides) and appliance. Variants are interleaved within
each round; the report is the median over rounds. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import measure, services  # noqa: E402
from bench.services import BenchError, Service  # noqa: E402

PROXY_CORE = 0
LOAD_CORE = 1  # the load (wrk, h2load) and the backend (nginx, nghttpd) share it
VARIANTS = ("direct", "haproxy", "appliance")
GROUPS = ("http", "tcp", "h2c")
PATHS = ("/small", "/16k")
H2C_PATHS = ("/small",)  # h2c measures small responses only; --paths is for http and tcp
STREAMS = (1, 10)  # h2c: concurrent streams per connection (h2load -m)
NOISY_CORES = 0.1  # other processes' CPU during a run above this makes the figures suspect
TARGETS = {  # the project's goals, measured with this harness
    "http_rps_vs_haproxy": 0.6,    # appliance rps >= 0.6 x HAProxy, HTTP/1.1 /small
    "http_cpu_vs_haproxy": 1.7,    # appliance CPU/request <= 1.7 x HAProxy, HTTP/1.1 /small
    "tcp_rps_vs_haproxy": 0.9,     # appliance opaque rps >= 0.9 x HAProxy mode tcp
    "h2c_rps_vs_haproxy": 0.25,    # appliance h2c rps >= 0.25 x HAProxy h2c, -m 1 and -m 10
}

# A case: (group, path, streams). streams is h2load's -m for h2c and 0 for the wrk groups.
Case = tuple[str, str, int]


@dataclass
class Endpoint:
    """Where a variant of a group is reached, and the process whose CPU is the proxy's."""

    group: str  # "http", "tcp" or "h2c"
    variant: str
    port: int
    proxy: Service | None  # None for direct
    error: str | None = None  # set when the proxy could not be started
    backend: Service | None = None  # nginx or nghttpd, whose CPU per request is also read
    # h2c: problems seen in the warm-up run, per (path, streams). A failed request there
    # (the connection burst at the start) fails the variant too.
    warmup_problems: dict[tuple[str, int], list[str]] = field(default_factory=dict)


@dataclass
class Sample:
    group: str
    path: str
    variant: str
    round: int
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    proxy_cpu_us_per_req: float | None
    proxy_sys_us_per_req: float | None  # the kernel's share of proxy_cpu_us_per_req
    backend_cpu_us_per_req: float
    proxy_peak_rss_mib: float | None
    other_load_cores: float = 0.0  # CPU used by processes that are not part of this run
    noisy_attempts: int = 0  # earlier attempts discarded because other load was too high
    steal_cores: float = 0.0  # hypervisor steal during the run
    problems: list[str] = field(default_factory=list)
    wrk: dict[str, Any] = field(default_factory=dict)
    streams: int = 0  # h2c: concurrent streams per connection; 0 for the wrk groups
    mean_ms: float = float("nan")  # h2c (h2load): mean and max time for a request
    max_ms: float = float("nan")
    h2load: dict[str, Any] = field(default_factory=dict)


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; median reported (3)")
    p.add_argument("--only", choices=list(GROUPS),
                   help="run only the HTTP/1.1, the opaque-TCP or the h2c cases")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma-separated (/small,/16k); http and tcp only")
    p.add_argument("--streams", default=",".join(map(str, STREAMS)),
                   help="h2c: concurrent streams per connection, comma-separated (1,10)")
    p.add_argument("--connections", type=int, default=50,
                   help="wrk and h2load connections (50)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target (2)")
    p.add_argument("--json", metavar="FILE", help="write all samples, medians and ratios here")
    p.add_argument("--no-appliance", action="store_true", help="only direct and HAProxy")
    p.add_argument("--appliance", default=str(REPO / ".venv/bin/appliance"),
                   help="appliance executable (.venv/bin/appliance)")
    p.add_argument("--appliance-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `appliance proxy` (repeatable), e.g. "
                        "--appliance-arg=--set --appliance-arg=http.foo=1")
    p.add_argument("--profile", metavar="OUT",
                   help="instead of benchmarking, record a py-spy profile of appliance (HTTP "
                        "/small, or h2c with --only h2c, --duration s) to OUT (.svg flame "
                        "graph, .json speedscope, .txt collapsed stacks)")
    p.add_argument("--profile-native", action="store_true",
                   help="with --profile: include native frames (uvloop, httptools, libc)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for other processes' load to drop below "
                        f"{NOISY_CORES} cores before starting (0: just warn)")
    p.add_argument("--retry-noisy", type=int, default=2, metavar="N",
                   help="rerun a measurement up to N times while other processes' load during "
                        "it exceeded the noise threshold (2)")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs (printed path)")
    args = p.parse_args(argv)
    args.appliance = str(Path(args.appliance).resolve())
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    bad = [x for x in args.paths if x not in services.PATH_BODIES]
    if bad or not args.paths:
        p.error(f"--paths: unknown {bad}; choose from {', '.join(PATHS)}")
    try:
        args.streams = [int(x) for x in args.streams.split(",") if x.strip()]
    except ValueError:
        p.error("--streams: comma-separated integers, such as 1,10")
    if not args.streams or min(args.streams) < 1:
        p.error("--streams: at least one count, each >= 1")
    if args.rounds < 1 or args.duration < 1 or args.connections < 1:
        p.error("--rounds, --duration and --connections must be >= 1")
    return args


def cases_for(groups: list[str], paths: list[str], streams: list[int]) -> list[Case]:
    out: list[Case] = []
    for g in groups:
        if g == "h2c":
            out += [(g, p, m) for p in H2C_PATHS for m in streams]
        else:
            out += [(g, p, 0) for p in paths]
    return out


def case_label(group: str, path: str, streams: int) -> str:
    """"http /small" for the wrk groups, "h2c /small m10" for h2c."""
    return f"{group} {path}" + (f" m{streams}" if group == "h2c" else "")


def required_tools(groups: list[str]) -> list[str]:
    names = ["haproxy", "taskset"]
    if {"http", "tcp"} & set(groups):
        names += ["wrk", "nginx"]
    if "h2c" in groups:
        names += ["h2load", "nghttpd"]
    return names


class Bench:
    """Owns every process it starts; `close()` stops them all."""

    def __init__(self, args: argparse.Namespace, tools: dict[str, str], tmp: Path) -> None:
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.started: list[Service] = []
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        self.backends: dict[str, tuple[Service, int]] = {}  # "nginx"/"nghttpd": (svc, port)

    def close(self) -> None:
        for svc in reversed(self.started):
            svc.stop()
        self.started.clear()

    def _start(self, svc: Service, starter: Any, *a: Any) -> None:
        self.started.append(svc)
        starter(svc, *a)

    # --- setup ---

    def start_all(self, groups: list[str], with_appliance: bool) -> None:
        for group in groups:
            backend, port = self._backend(group)
            self.endpoints[(group, "direct")] = Endpoint(group, "direct", port, None,
                                                         backend=backend)
            self._start_haproxy(group, backend, port)
            if with_appliance:
                self._start_appliance(group, backend, port)

    def _backend(self, group: str) -> tuple[Service, int]:
        """The group's backend, started on first use: nghttpd for h2c, nginx otherwise."""
        kind = "nghttpd" if group == "h2c" else "nginx"
        if kind not in self.backends:
            (port,) = services.free_ports(1)
            make, starter = ((services.nghttpd, services.start_nghttpd) if kind == "nghttpd"
                             else (services.nginx, services.start_nginx))
            svc = make(self.tools[kind], self.tmp, port, LOAD_CORE)
            self._start(svc, starter, port)
            self.backends[kind] = (svc, port)
        return self.backends[kind]

    def _start_haproxy(self, group: str, backend: Service, backend_port: int) -> None:
        (port,) = services.free_ports(1)
        svc = services.haproxy(self.tools["haproxy"], self.tmp, group, port, backend_port,
                               PROXY_CORE)
        self._start(svc, services.start_proxy, port, 10.0, group == "h2c")
        self.endpoints[(group, "haproxy")] = Endpoint(group, "haproxy", port, svc,
                                                      backend=backend)

    def _start_appliance(self, group: str, backend: Service, backend_port: int) -> None:
        outbound, inbound, admin = services.free_ports(3)
        name = {"http": "appliance-http", "tcp": "appliance-opaque"}.get(group, "appliance-h2c")
        svc = services.appliance(self.args.appliance, self.tmp, name, (outbound, inbound, admin),
                                 backend_port, group == "tcp", PROXY_CORE,
                                 self.args.appliance_arg)
        ep = Endpoint(group, "appliance", outbound, svc, backend=backend)
        self.endpoints[(group, "appliance")] = ep
        try:
            self._start(svc, services.start_appliance, outbound, admin, 20.0, group == "h2c")
        except (BenchError, OSError) as exc:
            ep.error = f"did not start: {exc}"
            print(f"\n*** {name} {ep.error}\n", file=sys.stderr)
            svc.stop()

    def check_bodies(self, cases: list[Case]) -> None:
        """Every endpoint must return each of its cases' exact body before we measure it."""
        for ep in self.endpoints.values():
            if ep.error:
                continue
            for path in dict.fromkeys(p for g, p, _ in cases if g == ep.group):
                ep.error = _body_error(ep, path)
                if ep.error:
                    print(f"*** {ep.group} {ep.variant}: {ep.error}", file=sys.stderr)
                    break

    # --- measuring ---

    def url(self, ep: Endpoint, path: str) -> str:
        return f"http://{services.HOST}:{ep.port}{path}"

    def load(self, ep: Endpoint, path: str, streams: int,
             seconds: float) -> measure.WrkResult | measure.H2loadResult:
        """One load run: h2load for h2c, wrk otherwise."""
        if ep.group == "h2c":
            return measure.run_h2load(self.tools["h2load"], self.url(ep, path), seconds,
                                      self.args.connections, streams, LOAD_CORE)
        return measure.run_wrk(self.tools["wrk"], self.url(ep, path), seconds,
                               self.args.connections, LOAD_CORE)

    def warm_up(self, cases: list[Case]) -> None:
        if self.args.warmup <= 0:
            return
        for group, path, streams in cases:
            for variant in VARIANTS:
                ep = self.endpoints.get((group, variant))
                if ep is None or ep.error:
                    continue
                try:
                    res = self.load(ep, path, streams, self.args.warmup)
                    problems = res.problems()
                except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                    problems = [str(exc)]
                if problems:
                    print(f"warning: warm-up {case_label(group, path, streams)} {variant}: "
                          f"{'; '.join(problems)}", file=sys.stderr)
                if problems and group == "h2c":
                    ep.warmup_problems[(path, streams)] = problems

    def one_run(self, ep: Endpoint, case: Case, rnd: int) -> Sample | None:
        if ep.error:
            return None
        proxy = ep.proxy
        if proxy is not None and not proxy.alive():
            ep.error = _death(proxy)
            print(f"*** {ep.error}", file=sys.stderr)
            return None
        before = _snapshot(ep)
        try:
            res = self.load(ep, case[1], case[2], self.args.duration)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            tool = "h2load" if ep.group == "h2c" else "wrk"
            return _failed_sample(ep, case, rnd, f"{tool}: {exc}")
        after = _snapshot(ep)
        delta = {k: after[k] - before[k] for k in before}
        problems = res.problems()
        if proxy is not None and not proxy.alive():
            problems.append(_death(proxy))
        return _sample(ep, case, rnd, res, delta, problems)

    def run_rounds(self, cases: list[Case]) -> list[Sample]:
        samples: list[Sample] = []
        per_round = [(c, v) for c in cases for v in VARIANTS if (c[0], v) in self.endpoints]
        total = self.args.rounds * len(per_round)
        done = 0
        for rnd in range(1, self.args.rounds + 1):
            for case, variant in per_round:
                done += 1
                sample = self._measure(self.endpoints[(case[0], variant)], case, rnd,
                                       (done, total))
                if sample is None:
                    continue
                samples.append(sample)
                _progress(done, total, sample)
                time.sleep(0.5)  # let closed connections drain between runs
        return samples

    def _measure(self, ep: Endpoint, case: Case, rnd: int,
                 progress: tuple[int, int]) -> Sample | None:
        """One run, repeated while it was noisy. For h2c, failures seen in a discarded
        (noisy) attempt stay with the kept sample: a proxy's errors are not noise."""
        sample = self.one_run(ep, case, rnd)
        earlier: list[str] = []
        for attempt in range(1, self.args.retry_noisy + 1):
            if sample is None or sample.other_load_cores <= NOISY_CORES:
                break
            _progress(*progress, sample, note="  -> noisy, retrying")
            if ep.group == "h2c":
                earlier += [f"noisy attempt {attempt}: {p}" for p in sample.problems]
            wait_quiet(self.args.wait_quiet)
            sample = self.one_run(ep, case, rnd)
            if sample is not None:
                sample.noisy_attempts = attempt
        if sample is not None and earlier:
            sample.problems[:0] = earlier
        return sample


def _body_error(ep: Endpoint, path: str) -> str | None:
    """Why ep does not serve path's exact body (over h2c for the h2c group), or None."""
    try:
        status, body = services.get(ep.group, ep.port, path)
    except OSError as exc:
        return f"GET {path} failed: {exc}"
    want = services.PATH_BODIES[path]
    if status != 200 or body != want:
        return f"GET {path}: status {status}, {len(body)} bytes (want 200, {len(want)} bytes)"
    return None


def _snapshot(ep: Endpoint) -> dict[str, float]:
    """CPU seconds so far: the proxy's (and its kernel part), the backend's, the machine's
    busy and steal time, the load tool's (reaped children) and this process's."""
    assert ep.backend is not None
    user, system = measure.cpu_split(ep.proxy.pid) if ep.proxy else (0.0, 0.0)
    busy, steal = measure.system_cpu()
    return {"proxy": user + system, "proxy_sys": system,
            "backend": measure.cpu_seconds(ep.backend.pid), "busy": busy, "steal": steal,
            "load": measure.children_cpu(), "self": _self_cpu(), "wall": time.monotonic()}


def _sample(ep: Endpoint, case: Case, rnd: int, res: measure.WrkResult | measure.H2loadResult,
            d: dict[str, float], problems: list[str]) -> Sample:
    """A Sample from one load run and the CPU deltas (`_snapshot` after minus before)."""
    wall = max(d["wall"], 1e-3)
    ours = d["proxy"] + d["backend"] + d["load"] + d["self"]
    n = max(res.requests, 1)
    has_proxy = ep.proxy is not None
    nan = float("nan")
    h2 = isinstance(res, measure.H2loadResult)
    return Sample(
        group=ep.group, path=case[1], variant=ep.variant, round=rnd, rps=res.rps,
        requests=res.requests, p50_ms=getattr(res, "p50_ms", nan),
        p99_ms=getattr(res, "p99_ms", nan),
        proxy_cpu_us_per_req=d["proxy"] * 1e6 / n if has_proxy else None,
        proxy_sys_us_per_req=d["proxy_sys"] * 1e6 / n if has_proxy else None,
        backend_cpu_us_per_req=d["backend"] * 1e6 / n,
        proxy_peak_rss_mib=measure.peak_rss_kib(ep.proxy.pid) / 1024 if ep.proxy else None,
        other_load_cores=max(0.0, d["busy"] - ours) / wall, steal_cores=d["steal"] / wall,
        problems=problems, wrk={} if h2 else res.summary(), streams=case[2],
        mean_ms=getattr(res, "mean_ms", nan), max_ms=getattr(res, "max_ms", nan),
        h2load=res.summary() if h2 else {},
    )


def _failed_sample(ep: Endpoint, case: Case, rnd: int, why: str) -> Sample:
    nan = float("nan")
    return Sample(ep.group, case[1], ep.variant, rnd, 0.0, 0, nan, nan, None, None, nan, None,
                  problems=[why], streams=case[2])


def _death(proxy: Service) -> str:
    """Why a proxy is gone, in one line, with its log's last lines after it."""
    code = proxy.proc.poll() if proxy.proc else None
    why = f"{proxy.name} (pid {proxy.pid}) exited with status {code} while under test"
    if code == 0:
        why += (" (a clean exit: appliance does that on SIGTERM/SIGINT, and the harness sent"
                " none; look for another process's pkill/killall)")
    elif code is not None and code < 0:
        why += f" (killed by signal {-code})"
    tail = proxy.log_tail(10)
    return why + (f"\n  log:\n{tail}" if tail else "")


def _self_cpu() -> float:
    """This process's own user+system CPU seconds."""
    t = os.times()
    return t.user + t.system


def _progress(done: int, total: int, s: Sample, note: str = "") -> None:
    cpu = " " * 13
    if s.proxy_cpu_us_per_req is not None:
        cpu = f"{s.proxy_cpu_us_per_req:6.1f} us/req"
    flag = f"  !! {'; '.join(s.problems)}" if s.problems else ""
    if s.other_load_cores > NOISY_CORES:
        flag += f"  (noisy: other processes used {s.other_load_cores:.2f} cores)"
    flag += note
    if s.group == "h2c":
        case = f"{s.group:<4} {s.path:<6} m{s.streams:<3}"
        lat = f"mean {s.mean_ms:6.2f} ms"
    else:
        case, lat = f"{s.group:<4} {s.path:<6}", f"p99 {s.p99_ms:7.2f} ms"
    print(f"[{done:>3}/{total}] round {s.round} {case} {s.variant:<9} "
          f"{s.rps:>9.0f} rps  {lat}  {cpu}{flag}", flush=True)


# --- summarising ---------------------------------------------------------------------------

def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return statistics.median(vals) if vals else None


def summarise(samples: list[Sample], endpoints: dict[tuple[str, str], Endpoint],
              cases: list[Case]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for case in cases:
        for variant in VARIANTS:
            ep = endpoints.get((case[0], variant))
            if ep is None:
                continue
            mine = [s for s in samples
                    if (s.group, s.path, s.streams, s.variant) == (*case, variant)]
            rows.append(_summary_row(ep, case, mine))
    return {"rows": rows, "ratios": ratios(rows, cases)}


def _summary_row(ep: Endpoint, case: Case, mine: list[Sample]) -> dict[str, Any]:
    group, path, streams = case
    problems = sorted({p for s in mine for p in s.problems})
    warm = ep.warmup_problems.get((path, streams), [])
    problems[:0] = [f"warm-up: {p}" for p in warm]
    if ep.error:
        problems.insert(0, ep.error.splitlines()[0])
    return {
        "group": group, "path": path, "variant": ep.variant, "runs": len(mine),
        "rps": _median([s.rps for s in mine]),
        "rps_all": [round(s.rps) for s in mine],
        "p50_ms": _median([s.p50_ms for s in mine]),
        "p99_ms": _median([s.p99_ms for s in mine]),
        "proxy_cpu_us_per_req": _median([s.proxy_cpu_us_per_req for s in mine]),
        "proxy_sys_us_per_req": _median([s.proxy_sys_us_per_req for s in mine]),
        "backend_cpu_us_per_req": _median([s.backend_cpu_us_per_req for s in mine]),
        "proxy_peak_rss_mib": max((s.proxy_peak_rss_mib or 0 for s in mine), default=None)
        if ep.variant != "direct" else None,
        "other_load_cores_max": max((s.other_load_cores for s in mine), default=None),
        "steal_cores_max": max((s.steal_cores for s in mine), default=None),
        "ok": bool(mine) and not problems,
        "problems": problems,
        # h2c only (h2load): streams per connection, medians of each run's mean and max
        "streams": streams,
        "mean_ms": _median([s.mean_ms for s in mine]),
        "max_ms": _median([s.max_ms for s in mine]),
    }


def _row(rows: list[dict[str, Any]], case: Case, variant: str) -> dict[str, Any] | None:
    for r in rows:
        if (r["group"], r["path"], r["streams"], r["variant"]) == (*case, variant):
            return r
    return None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(rows: list[dict[str, Any]], cases: list[Case]) -> list[dict[str, Any]]:
    out = []
    for case in cases:
        app, ha, direct = (_row(rows, case, v) for v in ("appliance", "haproxy", "direct"))
        if app is None or ha is None or direct is None:
            continue
        valid = app["ok"] and ha["ok"] and direct["ok"]
        out.append({
            "group": case[0], "path": case[1], "streams": case[2], "valid": valid,
            "rps_appliance_vs_haproxy": _div(app["rps"], ha["rps"]),
            "rps_appliance_vs_direct": _div(app["rps"], direct["rps"]),
            "rps_haproxy_vs_direct": _div(ha["rps"], direct["rps"]),
            "cpu_appliance_vs_haproxy": _div(app["proxy_cpu_us_per_req"],
                                             ha["proxy_cpu_us_per_req"]),
            # Direct has no proxy; its reference cost is what the backend (nginx, or nghttpd
            # for h2c) itself spends per request.
            "cpu_appliance_vs_backend": _div(app["proxy_cpu_us_per_req"],
                                             direct["backend_cpu_us_per_req"]),
        })
    return out


def _target_specs(r: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    if r["group"] == "http" and r["path"] == "/small":
        return [("HTTP/1.1 /small rps vs HAProxy", "rps_appliance_vs_haproxy", ">=",
                 TARGETS["http_rps_vs_haproxy"]),
                ("HTTP/1.1 /small CPU/req vs HAProxy", "cpu_appliance_vs_haproxy", "<=",
                 TARGETS["http_cpu_vs_haproxy"])]
    if r["group"] == "tcp":
        return [(f"opaque TCP {r['path']} rps vs HAProxy", "rps_appliance_vs_haproxy", ">=",
                 TARGETS["tcp_rps_vs_haproxy"])]
    if r["group"] == "h2c":
        return [(f"h2c {r['path']} -m {r['streams']} rps vs HAProxy",
                 "rps_appliance_vs_haproxy", ">=", TARGETS["h2c_rps_vs_haproxy"])]
    return []


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for r in summary["ratios"]:
        for name, key, op, goal in _target_specs(r):
            value = r[key]
            ok = value is not None and (value >= goal if op == ">=" else value <= goal)
            met = bool(ok and r["valid"])
            checks.append({"target": name, "value": value, "op": op, "goal": goal,
                           "met": met, "valid": r["valid"]})
    return checks


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _status(r: dict[str, Any]) -> str:
    return "ok" if r["ok"] else "FAIL: " + "; ".join(r["problems"])[:120]


def _print_rows(rows: list[dict[str, Any]]) -> None:
    """The HTTP/1.1 and opaque-TCP rows (wrk: p50 and p99; backend nginx)."""
    head = (f"{'case':<12} {'variant':<10} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'CPU us/req':>10} {'(kernel)':>8} {'nginx us/req':>12} {'RSS MiB':>8}  status")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['group'] + ' ' + r['path']:<12} {r['variant']:<10} {_f(r['rps'], '9.0f'):>9} "
              f"{_f(r['p50_ms'], '.2f'):>8} {_f(r['p99_ms'], '.2f'):>8} "
              f"{_f(r['proxy_cpu_us_per_req'], '.1f'):>10} "
              f"{_f(r['proxy_sys_us_per_req'], '.1f'):>8} "
              f"{_f(r['backend_cpu_us_per_req'], '.1f'):>12} "
              f"{_f(r['proxy_peak_rss_mib'], '.1f'):>8}  {_status(r)}")


def _print_h2c_rows(rows: list[dict[str, Any]]) -> None:
    """The h2c rows (h2load: mean and max time for a request; backend nghttpd)."""
    head = (f"{'case':<15} {'variant':<10} {'rps':>9} {'mean ms':>8} {'max ms':>8} "
            f"{'CPU us/req':>10} {'(kernel)':>8} {'nghttpd us/req':>14} {'RSS MiB':>8}  status")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{case_label(r['group'], r['path'], r['streams']):<15} {r['variant']:<10} "
              f"{_f(r['rps'], '9.0f'):>9} {_f(r['mean_ms'], '.2f'):>8} "
              f"{_f(r['max_ms'], '.2f'):>8} {_f(r['proxy_cpu_us_per_req'], '.1f'):>10} "
              f"{_f(r['proxy_sys_us_per_req'], '.1f'):>8} "
              f"{_f(r['backend_cpu_us_per_req'], '.1f'):>14} "
              f"{_f(r['proxy_peak_rss_mib'], '.1f'):>8}  {_status(r)}")


def _print_ratios(ratio_rows: list[dict[str, Any]], backend: str, width: int) -> None:
    cpu_backend = f"CPU app/{backend}"
    print(f"\n{'case':<{width}} {'rps app/HAP':>11} {'rps app/direct':>14} "
          f"{'rps HAP/direct':>14} {'CPU app/HAP':>11} {cpu_backend:>13}")
    for r in ratio_rows:
        note = "" if r["valid"] else "  (a variant failed: not valid)"
        case = r["group"] + " " + r["path"]
        if r["group"] == "h2c":
            case = case_label(r["group"], r["path"], r["streams"])
        print(f"{case:<{width}} {_f(r['rps_appliance_vs_haproxy'], '.2f'):>11} "
              f"{_f(r['rps_appliance_vs_direct'], '.2f'):>14} "
              f"{_f(r['rps_haproxy_vs_direct'], '.2f'):>14} "
              f"{_f(r['cpu_appliance_vs_haproxy'], '.2f'):>11} "
              f"{_f(r['cpu_appliance_vs_backend'], '.2f'):>{len(cpu_backend)}}{note}")


def _print_warnings(rows: list[dict[str, Any]]) -> None:
    noisy = [r for r in rows if (r["other_load_cores_max"] or 0) > NOISY_CORES]
    if noisy:
        worst = max(r["other_load_cores_max"] for r in noisy)
        print(f"\nWARNING: other processes on this machine used up to {worst:.2f} cores during "
              f"{len(noisy)} of the cases above; those figures are suspect. Rerun on a quiet "
              "machine (see `top`).")
    steal = max((r["steal_cores_max"] or 0 for r in rows), default=0)
    if steal > NOISY_CORES:
        print(f"WARNING: hypervisor steal reached {steal:.2f} cores during a run.")


def print_report(summary: dict[str, Any], checks: list[dict[str, Any]]) -> None:
    rows = [r for r in summary["rows"] if r["group"] != "h2c"]
    h2c_rows = [r for r in summary["rows"] if r["group"] == "h2c"]
    if rows:
        _print_rows(rows)
    if h2c_rows:
        _print_h2c_rows(h2c_rows)
    ratio_rows = [r for r in summary["ratios"] if r["group"] != "h2c"]
    h2c_ratios = [r for r in summary["ratios"] if r["group"] == "h2c"]
    if ratio_rows:
        _print_ratios(ratio_rows, "nginx", 12)
    if h2c_ratios:
        _print_ratios(h2c_ratios, "nghttpd", 15)
    _print_warnings(summary["rows"])
    if checks:
        print("\nTargets (appliance vs HAProxy, same run):")
        for c in checks:
            verdict = "MET" if c["met"] else ("NOT MET" if c["valid"] else "NOT MET (run invalid)")
            print(f"  {c['target']:<38} {_f(c['value'], '.2f'):>5} (goal {c['op']} {c['goal']})"
                  f"  {verdict}")


# --- environment -------------------------------------------------------------------------

def _version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (p.stdout + p.stderr).strip()
    return text.splitlines()[0] if text else "?"


_VERSION_FLAGS = {"wrk": "--version", "haproxy": "-v", "nginx": "-v", "h2load": "--version",
                  "nghttpd": "--version"}


def environment(tools: dict[str, str]) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "python": platform.python_version(),
        **{name: _version([tools[name], flag]) for name, flag in _VERSION_FLAGS.items()
           if name in tools},
        "git": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }


# --- profiling ---------------------------------------------------------------------------

def profile_group(args: argparse.Namespace) -> str:
    return "h2c" if args.only == "h2c" else "http"


def profile(bench: Bench, out: str) -> int:
    """Run wrk (HTTP /small), or h2load with the first --streams count (--only h2c), against
    appliance while py-spy records it."""
    pyspy = Path(sys.executable).parent / "py-spy"
    if not pyspy.exists():
        raise BenchError(f"py-spy not found at {pyspy}; install it: "
                         f"{sys.executable} -m pip install py-spy")
    group = profile_group(bench.args)
    bench.start_all([group], with_appliance=True)
    ep = bench.endpoints[(group, "appliance")]
    if ep.error or ep.proxy is None:
        raise BenchError(f"appliance {ep.error}")
    formats = {".svg": "flamegraph", ".json": "speedscope", ".txt": "raw"}
    fmt = formats.get(Path(out).suffix, "flamegraph")
    dur = max(1, round(bench.args.duration))
    spy = subprocess.Popen(["taskset", "-c", str(LOAD_CORE), str(pyspy), "record", "--pid",
                            str(ep.proxy.pid), "--duration", str(dur), "--rate", "250",
                            "--format", fmt, "--output", out,
                            *(["--native"] if bench.args.profile_native else [])],
                           start_new_session=True)
    try:
        time.sleep(0.5)
        res = bench.load(ep, "/small", bench.args.streams[0], dur)
        spy.wait(timeout=dur + 60)
    finally:
        if spy.poll() is None:
            os.killpg(spy.pid, signal.SIGKILL)
            spy.wait(timeout=10)
    print(f"appliance under py-spy ({group}): {res.rps:.0f} rps (profiling slows it; do not "
          f"compare){'  !! ' + '; '.join(res.problems()) if res.problems() else ''}")
    print(f"profile ({fmt}) written to {out}")
    return 0 if spy.returncode == 0 else 1


def wait_quiet(limit_s: float) -> float:
    """Other processes' load (cores), after waiting up to `limit_s` for it to fall."""
    end = time.monotonic() + limit_s
    load = measure.foreign_load(1.0)
    while load > NOISY_CORES and time.monotonic() < end:
        print(f"bench: waiting for a quiet machine (other load {load:.2f} cores)", flush=True)
        time.sleep(4.0)
        load = measure.foreign_load(1.0)
    return load


# --- main --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    if (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 cores; proxy and load will share a core", file=sys.stderr)
    groups = [args.only] if args.only else list(GROUPS)
    try:
        tools = services.require_tools(
            required_tools([profile_group(args)] if args.profile else groups))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    with_appliance = not args.no_appliance
    if with_appliance and not Path(args.appliance).exists():
        print(f"bench: {args.appliance} not found; run: .venv/bin/pip install -e '.[test]'",
              file=sys.stderr)
        return 2
    cases = cases_for(groups, args.paths, args.streams)
    tmp = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    os.chmod(tmp, 0o755)
    bench = Bench(args, tools, tmp)
    try:
        if args.profile:
            return profile(bench, args.profile)
        env = environment(tools)
        print(f"bench: {env['cores']} cores ({env['cpu']}); proxy on core {PROXY_CORE}, "
              f"backend+load on core {LOAD_CORE}; {args.rounds} rounds x {args.duration:.0f}s, "
              f"{args.connections} connections; logs in {tmp}", flush=True)
        idle = wait_quiet(args.wait_quiet)
        if idle > NOISY_CORES:
            print(f"WARNING: before starting, other processes use {idle:.2f} cores; results will "
                  "be noisy", file=sys.stderr)
        bench.start_all(groups, with_appliance)
        bench.check_bodies(cases)
        bench.warm_up(cases)
        samples = bench.run_rounds(cases)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        bench.close()
        if not args.keep_tmp:
            _rmtree(tmp)
        else:
            print(f"bench: configs and logs kept in {tmp}")
    summary = summarise(samples, bench.endpoints, cases)
    checks = targets(summary)
    print_report(summary, checks)
    if args.json:
        doc = {"environment": env, "params": {k: v for k, v in vars(args).items()},
               "targets": checks, **summary, "samples": [vars(s) for s in samples]}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    return 0 if all(r["ok"] for r in summary["rows"]) else 1


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
