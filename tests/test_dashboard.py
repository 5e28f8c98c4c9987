"""The dashboard: the counter window and quantiles (exact, on a fake clock), the page's
files, and the live page in a real headless Chromium while traffic flows."""

from __future__ import annotations

import http.client
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cdp import Browser, find_chromium
from hypothesis import given
from hypothesis import strategies as st
from support import H11Server, ProxyProcess, free_port

from appliance.admin import dashboard
from appliance.admin.dashboard import PAGES, Window, growth, load_static, quantile, static_routes
from appliance.admin.server import AdminRequest
from appliance.telemetry.metrics import LATENCY_BUCKETS_MS


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------- quantile

BOUNDS = (1, 2, 5, 10)


@pytest.mark.parametrize(("q", "counts", "expected"), [
    (0.5, (0, 0, 0, 0, 0), None),            # empty
    (0.5, (4, 0, 0, 0, 0), 0.5),             # halfway into (0, 1]
    (1.0, (4, 0, 0, 0, 0), 1.0),
    (0.5, (1, 1, 0, 0, 0), 1.0),             # rank 1 ends the first bucket
    (0.75, (1, 1, 0, 0, 0), 1.5),            # rank 1.5: half into (1, 2]
    (0.5, (0, 0, 2, 0, 0), 3.5),             # (2, 5], rank 1 of 2
    (0.99, (0, 0, 0, 1, 1), 10.0),           # rank in +Inf: the top finite bound
    (0.0, (0, 0, 3, 1, 0), 2.0),             # q=0: the start of the first non-empty bucket
])
def test_quantile_table(q: float, counts: tuple[int, ...], expected: float | None) -> None:
    """Linear interpolation inside the bucket, as Prometheus' histogram_quantile."""
    assert quantile(q, BOUNDS, counts) == expected


@pytest.mark.parametrize(("q", "counts", "message"), [
    (1.5, (0, 0, 0, 0, 0), "between 0 and 1"),
    (-0.1, (0, 0, 0, 0, 0), "between 0 and 1"),
    (0.5, (0, 0, 0, 0), "expected 5 bucket counts"),
])
def test_quantile_rejects_bad_input(q: float, counts: tuple[int, ...], message: str) -> None:
    """A q outside [0, 1] or a count list of the wrong length is a clear ValueError."""
    with pytest.raises(ValueError, match=message):
        quantile(q, BOUNDS, counts)


counts_st = st.lists(st.integers(0, 1000), min_size=len(LATENCY_BUCKETS_MS) + 1,
                     max_size=len(LATENCY_BUCKETS_MS) + 1).filter(lambda c: sum(c) > 0)


@given(counts_st, st.floats(0, 1), st.floats(0, 1))
def test_quantile_is_monotonic_and_bounded(counts: list[int], a: float, b: float) -> None:
    """A larger q never gives a smaller value; values stay within [0, top bound]."""
    lo, hi = sorted((a, b))
    x, y = quantile(lo, LATENCY_BUCKETS_MS, counts), quantile(hi, LATENCY_BUCKETS_MS, counts)
    assert x is not None and y is not None
    assert 0.0 <= x <= y <= LATENCY_BUCKETS_MS[-1]


@given(st.integers(0, len(LATENCY_BUCKETS_MS) - 1), st.integers(1, 1000), st.floats(0, 1))
def test_quantile_stays_in_the_only_bucket(index: int, n: int, q: float) -> None:
    """With every observation in one bucket, every quantile lies inside that bucket."""
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    counts[index] = n
    value = quantile(q, LATENCY_BUCKETS_MS, counts)
    low = LATENCY_BUCKETS_MS[index - 1] if index else 0
    assert value is not None and low <= value <= LATENCY_BUCKETS_MS[index]


# ---------------------------------------------------------------------------- window


@pytest.mark.parametrize(("now", "then", "expected"), [
    ((5, 7), (2, 3), (3, 4)),
    ((5, 7), None, (5, 7)),        # a new series counts from zero
    ((5, 1), (2, 3), (5, 1)),      # a counter went down: reset, count from zero
    ((5, 7), (1,), (5, 7)),        # shape changed: from zero
])
def test_growth_table(now: tuple[int, ...], then: tuple[int, ...] | None,
                      expected: tuple[int, ...]) -> None:
    """Differences of counters, with resets and new series counted from zero."""
    assert growth(now, then) == expected


def test_window_recent_uses_the_oldest_snapshot_in_span() -> None:
    """Snapshots every second; the recent delta spans the last 10 s exactly."""
    clock = FakeClock()
    window = Window(clock, span=10.0)
    for i in range(15):
        window.update({"s": (i * 3,)})
        clock.now += 1.0
    clock.now -= 1.0  # the last update's time
    # snapshots at 1000..1014; the oldest within 10 s of 1014 is 1004 (value 12)
    assert window.recent("s", (42,)) == (10.0, (30,))


def test_window_first_poll_has_no_baseline_then_spans_the_gap() -> None:
    """One snapshot only: no rate. After a 300 s quiet spell the first poll spans it, the
    next only the second since."""
    clock = FakeClock()
    window = Window(clock)
    window.update({"s": (0,)})
    assert window.recent("s", (0,)) is None
    clock.now += 300.0
    window.update({"s": (600,)})
    assert window.recent("s", (600,)) == (300.0, (600,))
    clock.now += 1.0
    window.update({"s": (610,)})
    assert window.recent("s", (610,)) == (1.0, (10,))


def test_window_min_gap_skips_early_polls_but_recent_sees_current() -> None:
    """A poll sooner than min_gap takes no snapshot; its recent() still uses current values."""
    clock = FakeClock()
    window = Window(clock, min_gap=0.9)
    window.update({"s": (0,)})
    clock.now += 0.5
    window.update({"s": (5,)})
    assert window.recent("s", (5,)) == (0.5, (5,))
    assert window.history("s") == []
    clock.now += 0.5
    window.update({"s": (9,)})
    assert window.history("s") == [(0.0, (1.0, (9,)))]


def test_window_history_is_bounded_and_aged() -> None:
    """History keeps the last N intervals, each with its age and growth."""
    clock = FakeClock()
    window = Window(clock, history=3)
    for i in range(6):
        window.update({"s": (i * i,)})
        clock.now += 1.0
    clock.now -= 1.0
    assert window.history("s") == [(2.0, (1.0, (5,))), (1.0, (1.0, (7,))),
                                   (0.0, (1.0, (9,)))]


def test_window_forgets_series_that_disappear() -> None:
    """A series missing from a snapshot loses its history; if it returns it starts again."""
    clock = FakeClock()
    window = Window(clock)
    window.update({"a": (1,), "b": (1,)})
    clock.now += 1.0
    window.update({"a": (2,), "b": (3,)})
    clock.now += 1.0
    window.update({"a": (3,)})
    assert window.history("b") == [] and len(window.history("a")) == 2
    clock.now += 1.0
    window.update({"a": (4,), "b": (5,)})
    assert window.history("b") == [(0.0, (1.0, (5,)))]  # its old value was forgotten: reset


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_gap": 0}, "min_gap must be a number of seconds > 0"),
    ({"span": float("inf")}, "span must be"),
    ({"history": 0}, "history must be an int >= 1"),
    ({"history": True}, "history must be an int >= 1"),
])
def test_window_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    """Bad window settings are a ValueError naming the setting."""
    with pytest.raises(ValueError, match=message):
        Window(FakeClock(), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- static files


def test_page_is_self_contained() -> None:
    """No CDN, no external fonts: the files reference nothing outside the admin port."""
    files = load_static()
    for name, body in files.items():
        text = body.decode()
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.\w+", text)
        assert [u for u in urls if u != "http://www.w3.org"] == [], name
        assert "@import" not in text and "<iframe" not in text, name
    html = files["index.html"].decode()
    assert '<script src="/dashboard.js">' in html and 'href="/dashboard.css"' in html


def test_static_routes_serve_each_page_with_its_type() -> None:
    """/, /dashboard, /dashboard.js and /dashboard.css answer 200 with their content type."""
    routes = static_routes({"index.html": b"<html>", "dashboard.js": b"js",
                            "dashboard.css": b"css"})
    assert set(routes) == set(PAGES)
    got = {p: routes[p](AdminRequest("GET", p)) for p in PAGES}
    assert got["/"] == got["/dashboard"] == (200, "text/html; charset=utf-8", b"<html>")
    assert got["/dashboard.js"] == (200, "text/javascript; charset=utf-8", b"js")
    assert got["/dashboard.css"] == (200, "text/css; charset=utf-8", b"css")


def test_missing_static_files_answer_500_and_do_not_stop_the_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An installation without the package data still builds its routes; they say why."""
    def missing() -> dict[str, bytes]:
        raise FileNotFoundError("appliance/admin/static/index.html")

    monkeypatch.setattr(dashboard, "load_static", missing)
    routes = static_routes()
    status, ctype, body = routes["/"](AdminRequest("GET", "/"))
    assert status == 500 and ctype.startswith("text/plain")
    assert b"missing from this installation" in body and b"index.html" in body


# ---------------------------------------------------------------------------- in a browser

CHROMIUM = find_chromium()
TRAFFIC_MAX_REQUESTS = 20_000
TRAFFIC_MAX_SECONDS = 60.0


class Traffic:
    """A bounded request loop (count and time) through the proxy, in a thread."""

    def __init__(self, port: int, host: str) -> None:
        self.port, self.host = port, host
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + TRAFFIC_MAX_SECONDS
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while (not self.stop.is_set() and self.sent < TRAFFIC_MAX_REQUESTS
               and time.monotonic() < deadline):
            i = self.sent
            path = "/slow?0.04" if i % 25 == 0 else "/slow?0.008" if i % 5 == 0 else "/"
            try:
                conn.request("GET", path, headers={"Host": self.host})
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.sent += 1
        conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    b = Browser(CHROMIUM, tmp_path / "profile")
    try:
        yield b
    finally:
        b.close()


OUTBOUND_RATE_CHART = """(() => {
  const rows = [...document.querySelectorAll('#http tbody tr[data-key*="direction=outbound"]')];
  const row = rows.find((r) => Number(r.dataset.rate) > 0);
  const svg = row && row.querySelector('svg.rate');
  if (!svg || Number(svg.dataset.points) < 2 || Number(svg.dataset.max) <= 0) return null;
  return [...svg.querySelectorAll('polyline')].map((p) => p.getAttribute('points')).join('|');
})()"""


def test_dashboard_live_in_headless_chromium(browser: Browser, backend: H11Server,
                                             tmp_path: Path) -> None:
    """The page loads and polls; its charts move while traffic flows; the endpoint list
    shows a live and an ejected endpoint; the delegator draws a tree and points at a bad
    dtab's position; a screenshot is written; the page throws nothing."""
    dead = free_port()
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{free_port()}",
                     "routing.dtab=/svc => /#/static; /svc/web => /#/static/web",
                     f"namers=[{{kind: static, services: {{web: ['127.0.0.1:{backend.port}', "
                     f"'127.0.0.1:{dead}']}}}}]",
                     "balancer.kind=round_robin", "balancer.consecutive_failures=1")
    traffic = None
    try:
        browser.navigate(f"http://127.0.0.1:{p.admin}/")
        assert browser.evaluate("document.title") == "appliance dashboard"
        browser.wait_for("Number(document.getElementById('status').dataset.polls)",
                         accept=lambda n: n >= 1, what="the first poll")
        traffic = Traffic(p.outbound, "web")
        first = browser.wait_for(OUTBOUND_RATE_CHART, timeout=20,
                                 what="the outbound request-rate chart to draw traffic")
        browser.wait_for(OUTBOUND_RATE_CHART, timeout=10, accept=lambda v: v and v != first,
                         what="the chart to move on the next poll")
        browser.wait_for("!!(document.querySelector('#endpoints tr[data-state=\"ejected\"]') "
                         "&& document.querySelector('#endpoints tr[data-state=\"alive\"]'))",
                         what="a live and an ejected endpoint")
        browser.evaluate("""document.getElementById('dlg-path').value = '/svc/web';
            document.getElementById('dlg-dtab').value = '/svc/web => &';
            document.getElementById('delegator').requestSubmit()""")
        error = browser.wait_for("!document.getElementById('dlg-error').hidden && "
                                 "document.getElementById('dlg-error').textContent",
                                 what="the delegator's error")
        assert "position 13" in error and error.rstrip().endswith("^")
        browser.evaluate("""document.getElementById('dlg-dtab').value = '';
            document.getElementById('delegator').requestSubmit()""")
        bound = browser.wait_for("!document.getElementById('dlg-result').hidden && "
                                 "document.getElementById('dlg-bound').textContent",
                                 what="the delegation result")
        assert bound.split(" | ")[0] == "/#/static/web"
        assert browser.evaluate("document.querySelectorAll('#dlg-tree li').length") >= 2
        assert traffic.sent > 0
        png = browser.screenshot(tmp_path / "dashboard.png")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
        assert (tmp_path / "dashboard.png").stat().st_size == len(png)
        if os.environ.get("APPLIANCE_DASHBOARD_PNG"):  # to refresh docs/dashboard.png
            Path(os.environ["APPLIANCE_DASHBOARD_PNG"]).write_bytes(png)
        # Chromium logs the delegator's deliberate 400 as a failed load; nothing else.
        errors = browser.page_errors()
        assert [e for e in errors if "status of 400 (Bad Request)" not in e] == [], errors
    finally:
        if traffic is not None:
            traffic.close()
        assert p.stop() == 0
