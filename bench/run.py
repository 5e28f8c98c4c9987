#!/usr/bin/env python3
"""Benchmark appliance against HAProxy 2.6 and a direct connection, on one proxy core.

    .venv/bin/python bench/run.py [--duration 10] [--rounds 3] [--only http|tcp] [--json out.json]

Layout (2 cores): the proxy under test on core 0; nginx (backend) and wrk (load) on core 1.
Cases: HTTP/1.1 keep-alive for /small (13-byte body) and /16k, each direct to nginx, through
HAProxy (mode http, nbthread 1) and through appliance; and opaque TCP for the same paths:
direct, HAProxy mode tcp, appliance with the backend port marked opaque. Variants are
interleaved within each round; the report is the median over rounds. See bench/README.md.
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
LOAD_CORE = 1  # wrk and nginx share it
VARIANTS = ("direct", "haproxy", "appliance")
PATHS = ("/small", "/16k")
NOISY_CORES = 0.1  # other processes' CPU during a run above this makes the figures suspect
TARGETS = {  # the project's goals, measured with this harness
    "http_rps_vs_haproxy": 0.6,    # appliance rps >= 0.6 x HAProxy, HTTP/1.1 /small
    "http_cpu_vs_haproxy": 1.7,    # appliance CPU/request <= 1.7 x HAProxy, HTTP/1.1 /small
    "tcp_rps_vs_haproxy": 0.9,     # appliance opaque rps >= 0.9 x HAProxy mode tcp
}


@dataclass
class Endpoint:
    """Where a variant of a group is reached, and the process whose CPU is the proxy's."""

    group: str  # "http" or "tcp"
    variant: str
    port: int
    proxy: Service | None  # None for direct
    error: str | None = None  # set when the proxy could not be started


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


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; median reported (3)")
    p.add_argument("--only", choices=["http", "tcp"],
                   help="run only the HTTP or the opaque-TCP cases")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated (/small,/16k)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
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
                        "/small, --duration s) to OUT (.svg flame graph, .json speedscope, "
                        ".txt collapsed stacks)")
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
    if args.rounds < 1 or args.duration < 1 or args.connections < 1:
        p.error("--rounds, --duration and --connections must be >= 1")
    return args


class Bench:
    """Owns every process it starts; `close()` stops them all."""

    def __init__(self, args: argparse.Namespace, tools: dict[str, str], tmp: Path) -> None:
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.started: list[Service] = []
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        self.backend: Service | None = None
        self.backend_port = 0

    def close(self) -> None:
        for svc in reversed(self.started):
            svc.stop()
        self.started.clear()

    def _start(self, svc: Service, starter: Any, *a: Any) -> None:
        self.started.append(svc)
        starter(svc, *a)

    # --- setup ---

    def start_all(self, groups: list[str], with_appliance: bool) -> None:
        (self.backend_port,) = services.free_ports(1)
        self.backend = services.nginx(self.tools["nginx"], self.tmp, self.backend_port, LOAD_CORE)
        self._start(self.backend, services.start_nginx, self.backend_port)
        for group in groups:
            self.endpoints[(group, "direct")] = Endpoint(group, "direct", self.backend_port, None)
            self._start_haproxy(group)
            if with_appliance:
                self._start_appliance(group)

    def _start_haproxy(self, group: str) -> None:
        (port,) = services.free_ports(1)
        svc = services.haproxy(self.tools["haproxy"], self.tmp, group, port, self.backend_port,
                               PROXY_CORE)
        self._start(svc, services.start_proxy, port)
        self.endpoints[(group, "haproxy")] = Endpoint(group, "haproxy", port, svc)

    def _start_appliance(self, group: str) -> None:
        outbound, inbound, admin = services.free_ports(3)
        name = "appliance-http" if group == "http" else "appliance-opaque"
        svc = services.appliance(self.args.appliance, self.tmp, name, (outbound, inbound, admin),
                                 self.backend_port, group == "tcp", PROXY_CORE,
                                 self.args.appliance_arg)
        ep = Endpoint(group, "appliance", outbound, svc)
        self.endpoints[(group, "appliance")] = ep
        try:
            self._start(svc, services.start_appliance, outbound, admin)
        except (BenchError, OSError) as exc:
            ep.error = f"did not start: {exc}"
            print(f"\n*** {name} {ep.error}\n", file=sys.stderr)
            svc.stop()

    def check_bodies(self, paths: list[str]) -> None:
        """Every endpoint must return each path's exact body before we measure it."""
        for ep in self.endpoints.values():
            if ep.error:
                continue
            for path in paths:
                try:
                    status, body = services.http_get(ep.port, path)
                except OSError as exc:
                    ep.error = f"GET {path} failed: {exc}"
                    break
                want = services.PATH_BODIES[path]
                if status != 200 or body != want:
                    ep.error = (f"GET {path}: status {status}, {len(body)} bytes "
                                f"(want 200, {len(want)} bytes)")
                    break
            if ep.error:
                print(f"*** {ep.group} {ep.variant}: {ep.error}", file=sys.stderr)

    # --- measuring ---

    def url(self, ep: Endpoint, path: str) -> str:
        return f"http://{services.HOST}:{ep.port}{path}"

    def warm_up(self, cases: list[tuple[str, str]]) -> None:
        if self.args.warmup <= 0:
            return
        for group, path in cases:
            for variant in VARIANTS:
                ep = self.endpoints.get((group, variant))
                if ep is None or ep.error:
                    continue
                try:
                    measure.run_wrk(self.tools["wrk"], self.url(ep, path), self.args.warmup,
                                    self.args.connections, LOAD_CORE)
                except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                    print(f"warning: warm-up {group} {path} {variant}: {exc}", file=sys.stderr)

    def one_run(self, ep: Endpoint, path: str, rnd: int) -> Sample | None:
        if ep.error:
            return None
        proxy = ep.proxy
        assert self.backend is not None
        if proxy is not None and not proxy.alive():
            ep.error = _death(proxy)
            print(f"*** {ep.error}", file=sys.stderr)
            return None
        p0, sys0 = measure.cpu_split(proxy.pid) if proxy else (0.0, 0.0)
        p0 += sys0
        b0 = measure.cpu_seconds(self.backend.pid)
        (s0, st0), w0, me0 = measure.system_cpu(), measure.children_cpu(), _self_cpu()
        t0 = time.monotonic()
        try:
            res = measure.run_wrk(self.tools["wrk"], self.url(ep, path), self.args.duration,
                                  self.args.connections, LOAD_CORE)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            return self._failed_sample(ep, path, rnd, f"wrk: {exc}")
        p1, sys1 = measure.cpu_split(proxy.pid) if proxy else (0.0, 0.0)
        p1 += sys1
        b1 = measure.cpu_seconds(self.backend.pid)
        (s1, st1), w1, me1 = measure.system_cpu(), measure.children_cpu(), _self_cpu()
        wall = max(time.monotonic() - t0, 1e-3)
        ours = (p1 - p0) + (b1 - b0) + (w1 - w0) + (me1 - me0)
        n = max(res.requests, 1)
        problems = res.problems()
        if proxy is not None and not proxy.alive():
            problems.append(_death(proxy))
        return Sample(
            group=ep.group, path=path, variant=ep.variant, round=rnd, rps=res.rps,
            requests=res.requests, p50_ms=res.p50_ms, p99_ms=res.p99_ms,
            proxy_cpu_us_per_req=(p1 - p0) * 1e6 / n if proxy else None,
            proxy_sys_us_per_req=(sys1 - sys0) * 1e6 / n if proxy else None,
            backend_cpu_us_per_req=(b1 - b0) * 1e6 / n,
            proxy_peak_rss_mib=measure.peak_rss_kib(proxy.pid) / 1024 if proxy else None,
            other_load_cores=max(0.0, (s1 - s0) - ours) / wall, steal_cores=(st1 - st0) / wall,
            problems=problems, wrk=res.summary(),
        )

    @staticmethod
    def _failed_sample(ep: Endpoint, path: str, rnd: int, why: str) -> Sample:
        nan = float("nan")
        return Sample(ep.group, path, ep.variant, rnd, 0.0, 0, nan, nan, None, None, nan, None,
                      problems=[why])

    def run_rounds(self, cases: list[tuple[str, str]]) -> list[Sample]:
        samples: list[Sample] = []
        per_round = [(g, p, v) for g, p in cases for v in VARIANTS if (g, v) in self.endpoints]
        total = self.args.rounds * len(per_round)
        done = 0
        for rnd in range(1, self.args.rounds + 1):
            for group, path, variant in per_round:
                done += 1
                sample = self.one_run(self.endpoints[(group, variant)], path, rnd)
                for attempt in range(1, self.args.retry_noisy + 1):
                    if sample is None or sample.other_load_cores <= NOISY_CORES:
                        break
                    _progress(done, total, sample, note="  -> noisy, retrying")
                    wait_quiet(self.args.wait_quiet)
                    sample = self.one_run(self.endpoints[(group, variant)], path, rnd)
                    if sample is not None:
                        sample.noisy_attempts = attempt
                if sample is None:
                    continue
                samples.append(sample)
                _progress(done, total, sample)
                time.sleep(0.5)  # let closed connections drain between runs
        return samples


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
    print(f"[{done:>3}/{total}] round {s.round} {s.group:<4} {s.path:<6} {s.variant:<9} "
          f"{s.rps:>9.0f} rps  p99 {s.p99_ms:7.2f} ms  {cpu}{flag}", flush=True)


# --- summarising ---------------------------------------------------------------------------

def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return statistics.median(vals) if vals else None


def summarise(samples: list[Sample], endpoints: dict[tuple[str, str], Endpoint],
              cases: list[tuple[str, str]]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for group, path in cases:
        for variant in VARIANTS:
            ep = endpoints.get((group, variant))
            if ep is None:
                continue
            mine = [s for s in samples if (s.group, s.path, s.variant) == (group, path, variant)]
            problems = sorted({p for s in mine for p in s.problems})
            if ep.error:
                problems.insert(0, ep.error.splitlines()[0])
            rows.append({
                "group": group, "path": path, "variant": variant, "runs": len(mine),
                "rps": _median([s.rps for s in mine]),
                "rps_all": [round(s.rps) for s in mine],
                "p50_ms": _median([s.p50_ms for s in mine]),
                "p99_ms": _median([s.p99_ms for s in mine]),
                "proxy_cpu_us_per_req": _median([s.proxy_cpu_us_per_req for s in mine]),
                "proxy_sys_us_per_req": _median([s.proxy_sys_us_per_req for s in mine]),
                "backend_cpu_us_per_req": _median([s.backend_cpu_us_per_req for s in mine]),
                "proxy_peak_rss_mib": max((s.proxy_peak_rss_mib or 0 for s in mine), default=None)
                if variant != "direct" else None,
                "other_load_cores_max": max((s.other_load_cores for s in mine), default=None),
                "steal_cores_max": max((s.steal_cores for s in mine), default=None),
                "ok": bool(mine) and not problems,
                "problems": problems,
            })
    return {"rows": rows, "ratios": ratios(rows, cases)}


def _row(rows: list[dict[str, Any]], group: str, path: str, variant: str) -> dict[str, Any] | None:
    for r in rows:
        if (r["group"], r["path"], r["variant"]) == (group, path, variant):
            return r
    return None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(rows: list[dict[str, Any]], cases: list[tuple[str, str]]) -> list[dict[str, Any]]:
    out = []
    for group, path in cases:
        app, ha, direct = (_row(rows, group, path, v) for v in ("appliance", "haproxy", "direct"))
        if app is None or ha is None or direct is None:
            continue
        valid = app["ok"] and ha["ok"] and direct["ok"]
        out.append({
            "group": group, "path": path, "valid": valid,
            "rps_appliance_vs_haproxy": _div(app["rps"], ha["rps"]),
            "rps_appliance_vs_direct": _div(app["rps"], direct["rps"]),
            "rps_haproxy_vs_direct": _div(ha["rps"], direct["rps"]),
            "cpu_appliance_vs_haproxy": _div(app["proxy_cpu_us_per_req"],
                                             ha["proxy_cpu_us_per_req"]),
            # Direct has no proxy; its reference cost is what nginx itself spends per request.
            "cpu_appliance_vs_backend": _div(app["proxy_cpu_us_per_req"],
                                             direct["backend_cpu_us_per_req"]),
        })
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for r in summary["ratios"]:
        specs = []
        if r["group"] == "http" and r["path"] == "/small":
            specs = [("HTTP/1.1 /small rps vs HAProxy", "rps_appliance_vs_haproxy", ">=",
                      TARGETS["http_rps_vs_haproxy"]),
                     ("HTTP/1.1 /small CPU/req vs HAProxy", "cpu_appliance_vs_haproxy", "<=",
                      TARGETS["http_cpu_vs_haproxy"])]
        elif r["group"] == "tcp":
            specs = [(f"opaque TCP {r['path']} rps vs HAProxy", "rps_appliance_vs_haproxy", ">=",
                      TARGETS["tcp_rps_vs_haproxy"])]
        for name, key, op, goal in specs:
            value = r[key]
            ok = value is not None and (value >= goal if op == ">=" else value <= goal)
            met = bool(ok and r["valid"])
            checks.append({"target": name, "value": value, "op": op, "goal": goal,
                           "met": met, "valid": r["valid"]})
    return checks


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_report(summary: dict[str, Any], checks: list[dict[str, Any]]) -> None:
    head = (f"{'case':<12} {'variant':<10} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'CPU us/req':>10} {'(kernel)':>8} {'nginx us/req':>12} {'RSS MiB':>8}  status")
    print("\n" + head + "\n" + "-" * len(head))
    for r in summary["rows"]:
        status = "ok" if r["ok"] else "FAIL: " + "; ".join(r["problems"])[:120]
        print(f"{r['group'] + ' ' + r['path']:<12} {r['variant']:<10} {_f(r['rps'], '9.0f'):>9} "
              f"{_f(r['p50_ms'], '.2f'):>8} {_f(r['p99_ms'], '.2f'):>8} "
              f"{_f(r['proxy_cpu_us_per_req'], '.1f'):>10} "
              f"{_f(r['proxy_sys_us_per_req'], '.1f'):>8} "
              f"{_f(r['backend_cpu_us_per_req'], '.1f'):>12} "
              f"{_f(r['proxy_peak_rss_mib'], '.1f'):>8}  {status}")
    if summary["ratios"]:
        print(f"\n{'case':<12} {'rps app/HAP':>11} {'rps app/direct':>14} {'rps HAP/direct':>14} "
              f"{'CPU app/HAP':>11} {'CPU app/nginx':>13}")
        for r in summary["ratios"]:
            note = "" if r["valid"] else "  (a variant failed: not valid)"
            case = r["group"] + " " + r["path"]
            print(f"{case:<12} {_f(r['rps_appliance_vs_haproxy'], '.2f'):>11} "
                  f"{_f(r['rps_appliance_vs_direct'], '.2f'):>14} "
                  f"{_f(r['rps_haproxy_vs_direct'], '.2f'):>14} "
                  f"{_f(r['cpu_appliance_vs_haproxy'], '.2f'):>11} "
                  f"{_f(r['cpu_appliance_vs_backend'], '.2f'):>13}{note}")
    noisy = [r for r in summary["rows"] if (r["other_load_cores_max"] or 0) > NOISY_CORES]
    if noisy:
        worst = max(r["other_load_cores_max"] for r in noisy)
        print(f"\nWARNING: other processes on this machine used up to {worst:.2f} cores during "
              f"{len(noisy)} of the cases above; those figures are suspect. Rerun on a quiet "
              "machine (see `top`).")
    steal = max((r["steal_cores_max"] or 0 for r in summary["rows"]), default=0)
    if steal > NOISY_CORES:
        print(f"WARNING: hypervisor steal reached {steal:.2f} cores during a run.")
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
        "wrk": _version([tools["wrk"], "--version"]),
        "haproxy": _version([tools["haproxy"], "-v"]),
        "nginx": _version([tools["nginx"], "-v"]),
        "git": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }


# --- profiling ---------------------------------------------------------------------------

def profile(bench: Bench, out: str) -> int:
    """Run wrk against appliance (HTTP /small) while py-spy records it."""
    pyspy = Path(sys.executable).parent / "py-spy"
    if not pyspy.exists():
        raise BenchError(f"py-spy not found at {pyspy}; install it: "
                         f"{sys.executable} -m pip install py-spy")
    bench.start_all(["http"], with_appliance=True)
    ep = bench.endpoints[("http", "appliance")]
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
        res = measure.run_wrk(bench.tools["wrk"], bench.url(ep, "/small"), dur,
                              bench.args.connections, LOAD_CORE)
        spy.wait(timeout=dur + 60)
    finally:
        if spy.poll() is None:
            os.killpg(spy.pid, signal.SIGKILL)
            spy.wait(timeout=10)
    print(f"appliance under py-spy: {res.rps:.0f} rps (profiling slows it; do not compare)")
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
    try:
        tools = services.require_tools(["wrk", "haproxy", "nginx", "taskset"])
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    with_appliance = not args.no_appliance
    if with_appliance and not Path(args.appliance).exists():
        print(f"bench: {args.appliance} not found; run: .venv/bin/pip install -e '.[test]'",
              file=sys.stderr)
        return 2
    groups = [args.only] if args.only else ["http", "tcp"]
    cases = [(g, p) for g in groups for p in args.paths]
    tmp = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    os.chmod(tmp, 0o755)
    bench = Bench(args, tools, tmp)
    try:
        if args.profile:
            return profile(bench, args.profile)
        env = environment(tools)
        print(f"bench: {env['cores']} cores ({env['cpu']}); proxy on core {PROXY_CORE}, nginx+wrk "
              f"on core {LOAD_CORE}; {args.rounds} rounds x {args.duration:.0f}s, "
              f"{args.connections} connections; logs in {tmp}", flush=True)
        idle = wait_quiet(args.wait_quiet)
        if idle > NOISY_CORES:
            print(f"WARNING: before starting, other processes use {idle:.2f} cores; results will "
                  "be noisy", file=sys.stderr)
        bench.start_all(groups, with_appliance)
        bench.check_bodies(args.paths)
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
