"""What the dashboard shows over time: a sliding window of counters, quantiles from
histogram buckets, and the page itself.

Theory of operation. The proxy's counters only grow (``request_total``, the latency
histogram...); a rate or a percentile "now" is the difference of two readings. The
:class:`Window` keeps readings (*snapshots*) of every series, taken when ``/api/stats`` is
polled and at least ``min_gap`` seconds apart, for ``span`` seconds. Two things come out:

- :meth:`Window.recent`: current counters minus the oldest snapshot of the last ``span``
  seconds, with the elapsed time: the rates, success rate and p50/p95/p99 that the
  dashboard prints;
- :meth:`Window.history`: for each pair of consecutive snapshots, the difference and the
  time between them, for the last ``history`` snapshots: the points of the small charts.

Nothing runs between polls: with no dashboard open the window costs nothing but the last
few snapshots; the first poll after a quiet spell spans that spell (there is no newer
reading), the next ones only the seconds since. A counter that went down (its series
expired and came back) counts from zero. A series absent from a poll is forgotten. The
clock is a parameter, so tests are exact.

Percentiles come from the bucket counts with linear interpolation inside the bucket, as
Prometheus' ``histogram_quantile`` does: the first bucket starts at 0, and a rank in the
``+Inf`` bucket answers the highest finite bound.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from importlib import resources

from appliance.admin.server import AdminRequest, Route

Counters = tuple[int, ...]
Delta = tuple[float, Counters]
"""Seconds elapsed, and how much each counter grew in that time."""


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q``-quantile (0..1) of a histogram: ``counts[i]`` observations were at most
    ``bounds[i]`` (and above the previous bound); ``counts[-1]`` is the ``+Inf`` bucket.
    None when the histogram is empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be between 0 and 1, got {q!r}")
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"expected {len(bounds) + 1} bucket counts (one per bound and +Inf), "
                         f"got {len(counts)}")
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    below = 0
    for i, n in enumerate(counts):
        if n > 0 and below + n >= rank:
            if i == len(bounds):
                return float(bounds[-1])
            low = float(bounds[i - 1]) if i else 0.0
            return low + (float(bounds[i]) - low) * max(rank - below, 0.0) / n
        below += n
    return float(bounds[-1])  # pragma: no cover - rank <= total always finds a bucket


def growth(now: Counters, then: Counters | None) -> Counters:
    """How much each counter grew; from zero if a counter went down (a reset)."""
    if then is None or len(then) != len(now) or any(a < b for a, b in zip(now, then,
                                                                             strict=True)):
        return now
    return tuple(a - b for a, b in zip(now, then, strict=True))


class Window:
    """Snapshots of counter series (keyed by anything hashable) for rates over time."""

    def __init__(self, clock: Callable[[], float], *, min_gap: float = 0.9,
                 span: float = 10.0, history: int = 60) -> None:
        for name, value in (("min_gap", min_gap), ("span", span)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"Window {name} must be a number of seconds > 0, "
                                 f"got {value!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"Window history must be an int >= 1, got {history!r}")
        self.clock = clock
        self.min_gap = float(min_gap)
        self.span = float(span)
        self.history_len = history
        self._snaps: deque[tuple[float, dict[Hashable, Counters]]] = deque()
        self._history: dict[Hashable, deque[tuple[float, Delta]]] = {}
        self.now = clock()

    def update(self, current: Mapping[Hashable, Counters]) -> float:
        """Read the clock; take a snapshot of ``current`` if ``min_gap`` has passed since
        the last one. Returns the time read (the ``now`` of :meth:`recent`)."""
        now = self.now = self.clock()
        last = self._snaps[-1] if self._snaps else None
        if last is not None and now - last[0] < self.min_gap:
            return now
        snap = dict(current)
        for key in [k for k in self._history if k not in snap]:
            del self._history[key]
        if last is not None:
            elapsed = now - last[0]
            for key, counters in snap.items():
                points = self._history.get(key)
                if points is None:
                    points = self._history[key] = deque(maxlen=self.history_len)
                points.append((now, (elapsed, growth(counters, last[1].get(key)))))
        self._snaps.append((now, snap))
        while len(self._snaps) > 2 and self._snaps[0][0] < now - self.span:
            self._snaps.popleft()
        return now

    def recent(self, key: Hashable, current: Counters) -> Delta | None:
        """Growth of ``current`` since the oldest snapshot of the last ``span`` seconds (or,
        if there is none, the newest one before); None while every snapshot was taken at
        the last :meth:`update`."""
        base = None
        for then, snap in self._snaps:
            if then >= self.now:
                break
            base = (then, snap)
            if then >= self.now - self.span:
                break
        if base is None:
            return None
        return self.now - base[0], growth(current, base[1].get(key))

    def history(self, key: Hashable) -> list[tuple[float, Delta]]:
        """``(age, (elapsed, growth))`` per interval, oldest first; ``age`` is how many
        seconds before the last :meth:`update` the interval ended."""
        return [(self.now - t, delta) for t, delta in self._history.get(key, ())]


# ---------------------------------------------------------------------------- the page

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
PAGES = {"/": "index.html", "/dashboard": "index.html",
         "/dashboard.js": "dashboard.js", "/dashboard.css": "dashboard.css"}
"""Admin paths of the dashboard and the file of ``appliance/admin/static/`` each serves."""


def load_static() -> dict[str, bytes]:
    """The dashboard's files, read from the package (they ship as package data)."""
    folder = resources.files("appliance.admin") / "static"
    return {name: (folder / name).read_bytes() for name in _STATIC}


def static_routes(files: Mapping[str, bytes] | None = None) -> dict[str, Route]:
    """Admin routes serving the dashboard (read once, here). If the files are missing
    from the installation, the proxy still runs and these routes answer 500 saying so."""
    if files is None:
        try:
            files = load_static()
        except OSError as exc:
            text = (f"the dashboard's files are missing from this installation of appliance "
                    f"(appliance/admin/static is package data): {exc}\n").encode()
            return {path: _serve("text/plain; charset=utf-8", text, 500) for path in PAGES}
    return {path: _serve(_STATIC[name], files[name]) for path, name in PAGES.items()}


def _serve(ctype: str, body: bytes, status: int = 200) -> Route:
    def route(req: AdminRequest) -> tuple[int, str, bytes]:
        return status, ctype, body

    return route
