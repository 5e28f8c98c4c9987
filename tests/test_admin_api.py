"""The admin JSON APIs: /api/stats, /api/endpoints, /delegate and /dtab, in-process on a
fake clock (exact numbers) and against a running proxy with real traffic."""

from __future__ import annotations

import json
import random
import subprocess
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
from support import H11Server, ProxyProcess, free_port, http_get, wait_for

from appliance.admin import api
from appliance.balance.accrual import accrual_factory
from appliance.balance.balancer import make_balancer
from appliance.discovery.base import NamerContext
from appliance.discovery.registry import build_namers
from appliance.routing.dtab import parse_dtab
from appliance.routing.router import Router
from appliance.telemetry.metrics import LATENCY_BUCKETS_MS, Registry


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_proxy(clock: FakeClock, dtab: str = "", services: dict[str, list[str]] | None = None,
               failures: int = 7) -> Any:
    """A stand-in for Proxy: a registry and an outbound direction with a static router."""
    router = None
    if dtab:
        namers = build_namers([{"kind": "static", "services": services or {}}],
                              NamerContext(spawn=lambda coro: None, clock=clock))
        rng = random.Random(7)
        accrual = accrual_factory("consecutive_failures", rng, n=failures)
        router = Router(dtab=parse_dtab(dtab), identify=lambda view: None, namers=namers,
                        make_balancer=lambda: make_balancer("round_robin", clock, rng,
                                                            accrual=accrual),
                        rng=rng, clock=clock)
    loop = SimpleNamespace(time=clock)
    return SimpleNamespace(
        registry=Registry(), instance_id="test0001",
        directions=[SimpleNamespace(name="outbound", router=router, loop=loop),
                    SimpleNamespace(name="inbound", router=None, loop=loop)])


def call(routes: dict[str, Any], route: str, **query: str) -> tuple[int, Any]:
    status, ctype, body = routes[route](SimpleNamespace(query=query))
    assert ctype == "application/json"
    return status, json.loads(body)


# ---------------------------------------------------------------------------- in-process


@pytest.mark.parametrize(("delta", "expected"), [
    ((2.0, (10, 8, 2, *[0] * 26)),
     {"request_rate": 5.0, "success_rate": 0.8, "p50_ms": None, "p95_ms": None,
      "p99_ms": None}),
    ((1.0, (4, 4, 0, 0, 0, 0, 0, 4, *[0] * 21)),  # all four in (4, 5] ms
     {"request_rate": 4.0, "success_rate": 1.0, "p50_ms": 4.5, "p95_ms": 4.95,
      "p99_ms": 4.99}),
    ((1.0, (0, 0, 0, *[0] * 26)),
     {"request_rate": 0.0, "success_rate": None, "p50_ms": None, "p95_ms": None,
      "p99_ms": None}),
    ((0.0, (1, 0, 1, *[0] * 25, 1)),  # +Inf bucket answers the top bound
     {"request_rate": None, "success_rate": 0.0, "p50_ms": 50000.0, "p95_ms": 50000.0,
      "p99_ms": 50000.0}),
])
def test_http_rates_table(delta: Any, expected: dict[str, Any]) -> None:
    """Rates, success rate and percentiles of one interval, exactly."""
    assert api.http_rates(delta) == expected


def test_stats_counts_and_window_on_a_fake_clock() -> None:
    """Two polls 2 s apart: cumulative counters, then the window's rate, success rate and
    percentiles over exactly the traffic between them, and one history point."""
    clock = FakeClock()
    proxy = fake_proxy(clock)
    routes = api.routes(proxy, clock)
    stats = proxy.registry.http("outbound", "http/1")
    _, first = call(routes, "/api/stats")
    series = first["http"][0]
    assert series["labels"] == {"direction": "outbound", "protocol": "http/1"}
    assert series["window"] is None and series["history"] == []
    assert first["latency_bounds_ms"] == list(LATENCY_BUCKETS_MS)
    for ms in (3, 3, 3, 40):
        stats.requests += 1
        stats.response(200, ms / 1000)
    stats.requests += 1
    stats.response(502, 0.0005, error="connect")
    clock.now += 2.0
    _, second = call(routes, "/api/stats")
    series = second["http"][0]
    assert series["requests"] == 5
    assert series["responses"] == {"success": 4, "failure": 1}
    assert series["status"] == {"2xx": 4, "error": 1}
    assert sum(series["latency"]["counts"]) == series["latency"]["count"] == 5
    window = series["window"]
    assert window["seconds"] == 2.0 and window["request_rate"] == 2.5
    assert window["success_rate"] == 0.8
    assert window["p50_ms"] == 2.5  # rank 2.5 of 5: 1.5 into the 3 in (2, 3] ms
    assert [p["age_s"] for p in series["history"]] == [0.0]
    assert series["history"][0]["request_rate"] == 2.5


def test_stats_tcp_series() -> None:
    """TCP series carry open connections and byte rates over the window."""
    clock = FakeClock()
    proxy = fake_proxy(clock)
    routes = api.routes(proxy, clock)
    tcp = proxy.registry.tcp("inbound", "opaque", "src")
    call(routes, "/api/stats")
    tcp.opened += 3
    tcp.closed += 1
    tcp.read_bytes += 4096
    tcp.write_bytes += 1024
    clock.now += 1.0
    _, body = call(routes, "/api/stats")
    series = body["tcp"][0]
    assert series["labels"] == {"direction": "inbound", "peer": "src", "protocol": "opaque"}
    assert (series["open"], series["opened"], series["closed"]) == (2, 3, 1)
    assert series["window"] == {"seconds": 1.0, "open_rate": 3.0, "read_rate": 4096.0,
                                "write_rate": 1024.0}


def test_endpoints_show_weight_load_latency_and_ejection() -> None:
    """A service's endpoints with weight, pending, EWMA and an ejection with its probe time."""
    clock = FakeClock()
    proxy = fake_proxy(clock, "/svc/web => /#/static/web",
                       {"web": ["10.0.0.1:80*2", "10.0.0.2:80"]}, failures=1)
    router = proxy.directions[0].router
    service = router.service(("#", "static", "web"))
    eps = {ep.key: ep for ep in service.balancer.endpoints()}
    good, bad = eps[("10.0.0.1", 80)], eps[("10.0.0.2", 80)]
    started = service.balancer.start(good)
    clock.now += 0.25
    service.balancer.finish(good, started, True)
    service.balancer.start(good)  # one request in flight
    started = service.balancer.start(bad)
    service.balancer.finish(bad, started, False)  # ejected at once (n=1)
    _, body = call(api.routes(proxy, clock), "/api/endpoints")
    [svc] = body["services"]
    assert svc["id"] == "/#/static/web" and svc["balancer"] == "round_robin"
    assert svc["discovery"]["kind"] == "bound" and not svc["discovery"]["stale"]
    assert [a["address"] for a in svc["discovery"]["addresses"]] == ["10.0.0.1:80",
                                                                    "10.0.0.2:80"]
    shown = {e["address"]: e for e in svc["endpoints"]}
    assert shown["10.0.0.1:80"]["weight"] == 2.0 and shown["10.0.0.1:80"]["pending"] == 1
    assert shown["10.0.0.1:80"]["ewma_ms"] == 250.0 and shown["10.0.0.1:80"]["state"] == "alive"
    assert shown["10.0.0.2:80"]["state"] == "ejected"
    assert shown["10.0.0.2:80"]["ejections"] == 1
    assert shown["10.0.0.2:80"]["probe_in_s"] == round(bad.accrual.until - clock.now, 3) > 0


def test_dtab_lists_dentries_namers_and_bound_names() -> None:
    """/dtab: the active dtab per direction, its namers, and watched names' addresses."""
    clock = FakeClock()
    proxy = fake_proxy(clock, "/svc => /#/static; /svc/api => /svc/web",
                       {"web": ["10.0.0.1:80"]})
    proxy.directions[0].router.service(("#", "static", "web"))
    _, body = call(api.routes(proxy, clock), "/dtab")
    out, inbound = body["directions"]
    assert out["routing"] and out["dtab"] == "/svc=>/#/static;/svc/api=>/svc/web"
    assert out["dentries"] == ["/svc => /#/static", "/svc/api => /svc/web"]
    assert out["namers"] == [{"prefix": "/#/static", "kind": "static", "segments": 1}]
    assert [(b["id"], [a["address"] for a in b["addresses"]]) for b in out["bound"]] == [
        ("/#/static/web", ["10.0.0.1:80"])]
    assert inbound == {"direction": "inbound", "routing": False, "dtab": "", "dentries": [],
                       "namers": [], "bound": []}


def test_delegate_tree_with_base_and_extra_dtab() -> None:
    """The extra dtab takes precedence; the tree names each dentry and the bound leaf."""
    clock = FakeClock()
    proxy = fake_proxy(clock, "/svc/web => /#/static/web", {"web": ["10.0.0.1:80"]})
    routes = api.routes(proxy, clock)
    status, body = call(routes, "/delegate", path="/svc/web/x")
    assert status == 200 and body["result"] == "/#/static/web/x"
    leaf = body["tree"]["delegate"]
    assert leaf["type"] == "leaf" and leaf["dentry"] == "/svc/web => /#/static/web"
    assert leaf["bound"] == {"id": "/#/static/web", "residual": "/x",
                             "addr": {"watched": False}}
    status, body = call(routes, "/delegate", path="/svc/web",
                        dtab="/svc/web => /$/inet/127.0.0.1/9")
    assert status == 200 and body["override"] == "/svc/web=>/$/inet/127.0.0.1/9"
    alt = body["tree"]["delegate"]
    assert alt["type"] == "alt" and alt["alt"][0]["dentry"] == "/svc/web => /$/inet/127.0.0.1/9"
    addr = alt["alt"][0]["bound"]["addr"]
    assert addr["addresses"][0]["address"] == "127.0.0.1:9" and not addr["watched"]
    assert body["result"] == "/$/inet/127.0.0.1/9 | /#/static/web"


@pytest.mark.parametrize(("query", "parameter", "position", "words"), [
    ({}, "path", None, "missing query parameter 'path'"),
    ({"path": "svc/web"}, "path", 1, "invalid path"),
    ({"path": "/svc/a b"}, "path", 8, "invalid path"),
    ({"path": "/svc/web", "dtab": "/svc => &"}, "dtab", 9, "invalid dtab"),
    ({"path": "/svc/web", "dtab": "/svc => /a;\n/b"}, "dtab", 15, "line 2"),
    ({"path": "/svc/web", "direction": "sideways"}, "direction", None,
     "unknown direction 'sideways'"),
])
def test_delegate_bad_input_is_a_400_naming_it(query: dict[str, str], parameter: str,
                                               position: int | None, words: str) -> None:
    """Each bad parameter answers 400 with the parameter, the message and the position."""
    clock = FakeClock()
    proxy = fake_proxy(clock, "/svc => /#/static", {})
    status, body = call(api.routes(proxy, clock), "/delegate", **query)
    assert status == 400 and body["parameter"] == parameter
    assert body.get("position") == position and words in body["error"], body


def test_delegate_loop_is_an_exception_node_not_an_error() -> None:
    """A dtab that loops is shown: the tree holds an exception node, the result says why."""
    clock = FakeClock()
    proxy = fake_proxy(clock)
    status, body = call(api.routes(proxy, clock), "/delegate", path="/a", dtab="/a => /b; /b => /a")
    assert status == 200 and not body["routing"]
    assert body["tree"]["delegate"]["delegate"]["type"] == "exception"
    assert body["result"].startswith("error: delegation loop")


# ---------------------------------------------------------------------------- running proxy


def get_json(p: ProxyProcess, path: str) -> tuple[int, Any]:
    status, body = http_get(f"http://127.0.0.1:{p.admin}{path}")
    return status, json.loads(body)


def curl(port: int, paths: list[str], *headers: str) -> list[int]:
    """GET each path on one connection; the statuses."""
    args = ["curl", "-sS", "--max-time", "20", "-w", "%{http_code}\n"]
    for h in headers:
        args += ["-H", h]
    for p in paths:
        args += ["-o", "/dev/null", f"http://127.0.0.1:{port}{p}"]
    done = subprocess.run(args, capture_output=True, timeout=30, text=True, check=True)
    return [int(line) for line in done.stdout.split()]


def outbound_http(stats: Any) -> Any:
    [series] = [s for s in stats["http"]
                if s["labels"]["direction"] == "outbound" and s["requests"]
                and s["labels"]["protocol"] == "http/1"]
    assert series["labels"]["authority"].startswith("127.0.0.1:")
    return series


def test_stats_of_a_running_proxy(mesh: ProxyProcess) -> None:
    """Traffic between two polls shows up in the counters, the window and the history."""
    status, before = get_json(mesh, "/api/stats")
    assert status == 200 and before["instance_id"] and before["window_s"] == 10.0
    assert curl(mesh.outbound, ["/ok"] * 6 + ["/status?503"] * 2) == [200] * 6 + [503] * 2

    def polled() -> Any:
        series = outbound_http(get_json(mesh, "/api/stats")[1])
        return series if series["history"] else None

    series = wait_for(polled, timeout=10, interval=0.2, what="a history point")
    assert series["requests"] == 8
    assert series["responses"] == {"success": 6, "failure": 2}
    assert series["status"] == {"2xx": 6, "5xx": 2}
    assert series["window"]["success_rate"] == 0.75
    assert series["window"]["request_rate"] > 0 and series["window"]["p50_ms"] is not None
    assert sum(p["request_rate"] for p in series["history"]) > 0
    assert mesh.metric("request_total", direction="outbound") == 8  # same numbers as /metrics


def test_endpoints_and_dtab_of_a_running_proxy(backend: H11Server) -> None:
    """A routed service: its live endpoint, its dead one ejected, and /dtab's bound name."""
    dead = free_port()
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{free_port()}",
                     "routing.dtab=/svc/web => /#/static/web",
                     f"namers=[{{kind: static, services: {{web: ['127.0.0.1:{backend.port}', "
                     f"'127.0.0.1:{dead}']}}}}]",
                     "balancer.kind=round_robin", "balancer.consecutive_failures=1")
    try:
        # The dead endpoint's failure is not the client's: that request goes again, unsent,
        # to the live endpoint.
        assert curl(p.outbound, ["/a", "/b", "/c", "/d"], "Host: web") == [200] * 4
        status, body = get_json(p, "/api/endpoints")
        assert status == 200
        [svc] = body["services"]
        states = {e["address"]: (e["state"], e["ejections"]) for e in svc["endpoints"]}
        assert states == {f"127.0.0.1:{backend.port}": ("alive", 0),
                          f"127.0.0.1:{dead}": ("ejected", 1)}
        _, dtab = get_json(p, "/dtab")
        assert dtab["directions"][0]["dentries"] == ["/svc/web => /#/static/web"]
        assert dtab["directions"][0]["bound"][0]["id"] == "/#/static/web"
        status, tree = get_json(p, "/delegate?path=/svc/web")
        assert status == 200 and tree["tree"]["delegate"]["bound"]["addr"]["watched"]
        bad = quote("/svc/web => 0.5 * /a &")
        status, err = get_json(p, f"/delegate?path=/svc/web&dtab={bad}")
        assert status == 400 and err["parameter"] == "dtab" and err["position"] == 23
    finally:
        assert p.stop() == 0
