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

@dataclass
class WrkResult:
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

    def summary(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("raw")
        return d


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
