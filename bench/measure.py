"""Measuring one run: wrk's output, and a process tree's CPU time and peak RSS from /proc."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- /proc ------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces or ')')."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _children(pid: int) -> list[int]:
    """Direct children of pid, from /proc/<pid>/task/*/children (all threads)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            kids += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return kids


def process_tree(pid: int, limit: int = 256) -> list[int]:
    """pid and its live descendants (bounded), so a proxy that forks workers is counted whole."""
    seen: list[int] = []
    todo = [pid]
    while todo and len(seen) < limit:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += _children(p)
    return seen


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of pid and its live descendants, all threads, in seconds."""
    user = system = 0
    for p in process_tree(pid):
        fields = _stat_fields(p)
        if fields:
            # After "pid (comm) ", field 3 (state) is index 0; utime=14, stime=15 -> 11, 12.
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime+stime (all threads) of pid and its live descendants, in seconds."""
    return sum(cpu_split(pid))


def peak_rss_kib(pid: int) -> int:
    """Sum of VmHWM (peak resident set) over pid and its live descendants, in KiB."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def system_cpu() -> tuple[float, float]:
    """(busy, steal) seconds summed over all CPUs, from /proc/stat.

    busy counts irq and softirq time: the kernel also charges a tick spent in softirq to
    the stime of the task it interrupted, and loopback traffic is mostly softirq work done
    in the sending process's context. Leaving it out would make our own processes look
    bigger than the machine's total and hide other load.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def children_cpu() -> float:
    """utime+stime of this process's reaped children (wrk runs) so far, in seconds."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def foreign_load(seconds: float = 1.0) -> float:
    """Cores' worth of CPU used by other processes on the machine over `seconds`."""
    b0, _ = system_cpu()
    own0 = cpu_seconds(os.getpid())
    time.sleep(seconds)
    b1, _ = system_cpu()
    own1 = cpu_seconds(os.getpid())
    return max(0.0, (b1 - b0) - (own1 - own0)) / seconds


# --- wrk --------------------------------------------------------------------------------

class _Summarised:
    """What the JSON report keeps of a load generator's result: all but its raw output."""

    def summary(self) -> dict[str, object]:
        d = asdict(self)  # type: ignore[call-overload]
        d.pop("raw")
        return d


@dataclass
class WrkResult(_Summarised):
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    socket_errors: dict[str, int]
    non_2xx_3xx: int
    raw: str

    def problems(self) -> list[str]:
        """Why this run cannot be trusted as a success (empty when fine)."""
        out = []
        if self.non_2xx_3xx:
            out.append(f"{self.non_2xx_3xx} non-2xx/3xx responses")
        errs = {k: v for k, v in self.socket_errors.items() if v}
        if errs:
            out.append("socket errors " + ", ".join(f"{k} {v}" for k, v in errs.items()))
        if self.requests == 0:
            out.append("no requests completed")
        return out


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def _seconds(text: str) -> float:
    return _ms(text) / 1e3


def parse_wrk(out: str) -> WrkResult:
    """Parse `wrk --latency` output; raises ValueError if the main figures are missing."""
    m = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", out, re.M)
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", out, re.M)
    if not m or not rps:
        raise ValueError("wrk output has no 'requests in' / 'Requests/sec' line")
    pct = {int(p): _ms(v) for p, v in re.findall(r"^\s*(50|75|90|99)%\s+(\S+)", out, re.M)}
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    names = ("connect", "read", "write", "timeout")
    counts = [int(v) for v in errs.groups()] if errs else [0] * len(names)
    socket_errors = dict(zip(names, counts, strict=True))
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    nan = float("nan")
    return WrkResult(
        requests=int(m.group(1)), seconds=_seconds(m.group(2)), rps=float(rps.group(1)),
        p50_ms=pct.get(50, nan), p75_ms=pct.get(75, nan), p90_ms=pct.get(90, nan),
        p99_ms=pct.get(99, nan), socket_errors=socket_errors,
        non_2xx_3xx=int(bad.group(1)) if bad else 0, raw=out,
    )


def run_wrk(wrk: str, url: str, duration_s: float, connections: int, core: int) -> WrkResult:
    """One wrk run (1 thread, keep-alive, --latency) pinned to `core`; bounded by a timeout."""
    argv = ["taskset", "-c", str(core), wrk, "-t1", f"-c{connections}",
            f"-d{max(1, round(duration_s))}s", "--timeout", "5s", "--latency", url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    return parse_wrk(proc.stdout)


# --- h2load (h2c) ---------------------------------------------------------------------------

@dataclass
class H2loadResult(_Summarised):
    requests: int  # done: completed with a response or an error, in the measured time
    seconds: float
    rps: float
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status: dict[str, int]  # "2xx".."5xx"
    min_ms: float
    max_ms: float
    mean_ms: float
    sd_ms: float
    header_savings_pct: float  # HPACK space savings h2load saw on response headers
    raw: str

    def problems(self) -> list[str]:
        """Why this run cannot be trusted as a success (empty when fine)."""
        counts = {"failed": self.failed, "errored": self.errored, "timeout": self.timeout}
        out = [f"{v} {k}" for k, v in counts.items() if v]
        bad = {k: v for k, v in self.status.items() if k != "2xx" and v}
        if bad:
            out.append("status " + ", ".join(f"{k} {v}" for k, v in bad.items()))
        if self.requests == 0:
            out.append("no requests completed")
        return out


_H2_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout", re.M)


def parse_h2load(out: str) -> H2loadResult:
    """Parse h2load's summary; raises ValueError if the main figures are missing."""
    fin = re.search(r"^finished in ([\d.]+\w+), ([\d.]+) req/s", out, re.M)
    req = _H2_REQUESTS.search(out)
    lat = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    if not fin or not req or not lat:
        raise ValueError("h2load output has no 'finished in' / 'requests:' / "
                         "'time for request:' line")
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    status = dict(zip(("2xx", "3xx", "4xx", "5xx"),
                      (int(x) for x in (codes.groups() if codes else (0, 0, 0, 0))), strict=True))
    saving = re.search(r"headers \(space savings ([\d.]+)%\)", out)
    _total, _started, done, ok, failed, errored, timeout = (int(x) for x in req.groups())
    lo, hi, mean, sd = (_ms(x) for x in lat.groups())
    return H2loadResult(
        requests=done, seconds=_seconds(fin.group(1)), rps=float(fin.group(2)), succeeded=ok,
        failed=failed, errored=errored, timeout=timeout, status=status, min_ms=lo, max_ms=hi,
        mean_ms=mean, sd_ms=sd,
        header_savings_pct=float(saving.group(1)) if saving else float("nan"), raw=out,
    )


def run_h2load(h2load: str, url: str, duration_s: float, connections: int, streams: int,
               core: int) -> H2loadResult:
    """One h2load run (h2c prior knowledge, 1 thread, `streams` concurrent streams per
    connection, for `duration_s`) pinned to `core`; bounded by a timeout.

    No --warm-up-time: the caller reads CPU from /proc around the whole process, so the
    requests it divides by must span the same time (the harness warms up separately)."""
    argv = ["taskset", "-c", str(core), h2load, "-t1", f"-c{connections}", f"-m{streams}",
            f"-D{max(1, round(duration_s))}", url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout[-500:]}")
    return parse_h2load(proc.stdout)
