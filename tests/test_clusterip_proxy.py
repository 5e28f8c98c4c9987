"""Transparent traffic to a Kubernetes ClusterIP, end to end: a running proxy, the
``dst`` identifier, the ``io.l5d.k8s.clusterip`` namer, and the local API-server stand-in
(``tests/fakeapis.py``) in a thread of the test.

The app's connections are "redirected" with ``outbound.orig_dst_override``: every
connection to the outbound port has that original destination. 127.0.0.77:80 plays a
ClusterIP: nothing listens there, so any answer proves the request was balanced over the
Service's endpoints (H11 servers on 127.0.0.1, each in its own EndpointSlice since their
ports differ: the Service's named targetPort resolves per slice).
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import h11
import pytest
from fakeapis import FakeK8s, endpoint, service_port
from support import H11Server, ProxyProcess, wait_for

KIND = "io.l5d.k8s.clusterip"
VIP = "127.0.0.77"


class ThreadedK8s:
    """The API stand-in running in its own event loop thread; :meth:`call` runs a
    function (or coroutine function) in that loop and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.api: FakeK8s = self.call(FakeK8s)
        self.call(self.api.start)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def close(self) -> None:
        self.call(self.api.go_down)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def k8s() -> Iterator[ThreadedK8s]:
    server = ThreadedK8s()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def backends() -> Iterator[tuple[H11Server, H11Server, H11Server]]:
    servers = (H11Server(), H11Server(), H11Server())
    try:
        yield servers
    finally:
        for s in servers:
            s.close()


def clusterip_proxy(k8s: ThreadedK8s, orig_dst: str) -> ProxyProcess:
    """The configuration a user writes, plus the API URL and short retry delays."""
    namer = (f"namers=[{{kind: {KIND}, api_url: '{k8s.api.url}', min_delay: 0.02, "
             f"backoff_base: 0.05, backoff_max: 0.3}}]")
    return ProxyProcess(f"outbound.orig_dst_override={orig_dst}", "routing.identifier=dst",
                        f"routing.dtab=/svc => /#/{KIND}", namer, "balancer.kind=round_robin")


def curl(port: int, paths: list[str]) -> list[int]:
    """GET each path on ONE connection to the outbound port; the status codes."""
    done = subprocess.run(["curl", "-sS", "--max-time", "20", "-w", "\x1f%{http_code}\x1e"]
                          + [f"http://127.0.0.1:{port}{p}" for p in paths],
                          capture_output=True, timeout=30, text=True)
    codes = [int(record.rpartition("\x1f")[2]) for record in done.stdout.split("\x1e")[:-1]]
    assert len(codes) == len(paths), (done.stdout, done.stderr)
    return codes


def served(*servers: H11Server) -> list[int]:
    return [len(s.requests) for s in servers]


def slice_for(k8s: ThreadedK8s, name: str, service: str, server: H11Server) -> None:
    k8s.call(k8s.api.apply_slice, "default", name, service, [endpoint("127.0.0.1")],
             [("http", server.port)])


def test_cluster_ip_is_balanced_scaled_and_survives_the_api_going_down(
        k8s: ThreadedK8s, backends: tuple[H11Server, H11Server, H11Server]) -> None:
    """Requests to a ClusterIP spread over the Service's endpoints; a new slice is picked
    up, a deleted one dropped; with the API server down the last good set stays in use."""
    a, b, c = backends
    k8s.call(k8s.api.apply_service, "default", "web", VIP, [service_port(80, "web", "http")])
    slice_for(k8s, "web-a", "web", a)
    slice_for(k8s, "web-b", "web", b)
    p = clusterip_proxy(k8s, f"{VIP}:80")
    try:
        assert curl(p.outbound, [f"/r{i}" for i in range(10)]) == [200] * 10
        assert served(a, b) == [5, 5]

        slice_for(k8s, "web-c", "web", c)  # scaled up
        wait_for(lambda: curl(p.outbound, ["/up"] * 3) == [200] * 3 and c.requests,
                 timeout=10, what="the new endpoint to get requests")
        k8s.call(k8s.api.delete_slice, "default", "web-a")  # scaled down
        wait_for(lambda: _only_these_serve(p, [b, c], [a]), timeout=10,
                 what="the removed endpoint to stop getting requests")

        k8s.call(k8s.api.go_down)
        wait_for(lambda: p.metric("discovery_updates_total", namer=KIND, result="error") >= 2,
                 timeout=10, what="the outage to be counted")
        assert _only_these_serve(p, [b, c], [a])
        assert "keeping the last good addresses" in p.output()
    finally:
        assert p.stop() == 0, p.output()


def _only_these_serve(p: ProxyProcess, serving: list[H11Server],
                      idle: list[H11Server]) -> bool:
    before = served(*serving, *idle)
    assert curl(p.outbound, [f"/n{i}" for i in range(6)]) == [200] * 6
    after = served(*serving, *idle)
    grew = [x > y for x, y in zip(after, before, strict=True)]
    return grew == [True] * len(serving) + [False] * len(idle)


def test_unknown_destination_goes_through_unchanged_until_a_service_owns_it(
        k8s: ThreadedK8s, backends: tuple[H11Server, H11Server, H11Server]) -> None:
    """An address no Service has: the request reaches the original destination as sent.
    Once a Service with that ClusterIP appears it is balanced; deleted, direct again."""
    a, b, direct = backends
    k8s.call(k8s.api.apply_service, "default", "web", VIP, [service_port(80, "web", "http")])
    slice_for(k8s, "other-a", "other", a)
    slice_for(k8s, "other-b", "other", b)
    p = clusterip_proxy(k8s, f"127.0.0.1:{direct.port}")
    try:
        assert curl(p.outbound, ["/direct?q=1"]) == [200]
        request, _ = direct.requests[0]
        assert request.target == b"/direct?q=1" and request.method == b"GET"
        assert _header(request, b"host") == f"127.0.0.1:{p.outbound}".encode()
        assert served(a, b) == [0, 0]

        k8s.call(k8s.api.apply_service, "default", "other", "127.0.0.1",
                 [service_port(direct.port, "web", "http")])
        wait_for(lambda: _only_these_serve(p, [a, b], [direct]), timeout=10,
                 what="the new Service's endpoints to take the traffic")
        k8s.call(k8s.api.delete_service, "default", "other")
        wait_for(lambda: _only_these_serve(p, [direct], [a, b]), timeout=10,
                 what="traffic to go to the original destination again")
    finally:
        assert p.stop() == 0, p.output()


def _header(request: h11.Request, name: bytes) -> bytes | None:
    return next((v for n, v in request.headers if n == name), None)
