"""Thrift reliability in a proxy run in this process (so ``thrift.*`` settings can be
given as Python values): failure accrual and retries for idempotent methods, deadlines,
per-method names, and the frame size limit."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop
from support import free_port
from thrift_idl.echo_service import EchoServer, client
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TTransportException

from appliance.config import Config, load
from appliance.net.thrift_upstream import close_all
from appliance.proxy import Proxy
from appliance.telemetry import scrape


class _WithThrift:
    """A Config with a ``thrift`` section, for as long as Config has none of its own."""

    def __init__(self, base: Config, thrift: Any) -> None:
        self._base = base
        self.thrift = thrift

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def with_thrift(base: Config, **fields: Any) -> Any:
    current: Any = getattr(base, "thrift", None)
    if current is not None and dataclasses.is_dataclass(current):
        replace: Any = dataclasses.replace  # Config's own thrift section, once it has one
        return replace(base, thrift=replace(current, **fields))
    return _WithThrift(base, SimpleNamespace(**fields))


class InProcessProxy:
    """The real Proxy on its own uvloop loop in a thread, on free loopback ports."""

    def __init__(self, thrift: dict[str, Any], **overrides: Any) -> None:
        settings = {"outbound.port": 0, "inbound.port": 0, "admin.port": 0,
                    "outbound.bind": "127.0.0.1", "inbound.bind": "127.0.0.1",
                    "admin.bind": "127.0.0.1", **overrides}
        self.config = with_thrift(load(overrides=settings), **thrift)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = self.run(self._make())
        self.outbound = self.proxy.bound_ports()["outbound"]

    async def _make(self) -> Proxy:
        proxy = Proxy(self.config)
        await proxy.start()
        return proxy

    def run(self, coro: Any, timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def inside() -> Any:
            return fn()
        return self.run(inside())

    def metric(self, name: str, **labels: str) -> float:
        return scrape.total(self.call(self.proxy.registry.render), name, **labels)

    def stop(self) -> None:
        for d in self.proxy.directions:
            self.call(partial(close_all, d))
        self.run(self.proxy.stop(drain=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def routed(a: EchoServer, b: EchoServer, thrift: dict[str, Any],
           **overrides: Any) -> InProcessProxy:
    port = free_port()
    return InProcessProxy(
        thrift, **{"outbound.orig_dst_override": f"127.0.0.1:{port}",
                   "routing.dtab": f"/svc/127.0.0.1:{port} => /#/static/echo",
                   "namers": [{"kind": "static", "services": {
                       "echo": [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]}}],
                   **overrides})


@pytest.fixture
def good_and_broken() -> Iterator[tuple[EchoServer, EchoServer]]:
    """Replica a answers; replica b raises TApplicationException for every call."""
    a = EchoServer("framed-compact", "a")
    b = EchoServer("framed-compact", "b", broken=True)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_failing_replica_is_retried_around_and_ejected_for_idempotent_methods(
        good_and_broken: tuple[EchoServer, EchoServer]) -> None:
    """whoami is idempotent: every call succeeds (b's exceptions are retried on a), and
    after 3 failures in a row failure accrual ejects b."""
    a, b = good_and_broken
    p = routed(a, b, {"idempotent_methods": frozenset({"whoami"})},
               **{"balancer.kind": "round_robin", "balancer.consecutive_failures": 3})
    try:
        c = client("framed-compact", p.outbound)
        try:
            answers = Counter(c.whoami() for _ in range(30))
        finally:
            c.close()
        assert answers == {"a": 30}
        assert b.calls["whoami"] == 3, b.calls  # then ejected (probed again after >= 1 s)
        assert p.metric("proxy_errors_total", error="thrift_retry") == 3
        assert p.metric("response_total", protocol="thrift", status_code="200") == 30
        assert p.metric("response_total", protocol="thrift", status_code="500") == 0
    finally:
        p.stop()


def test_failing_replica_exceptions_reach_callers_of_other_methods(
        good_and_broken: tuple[EchoServer, EchoServer]) -> None:
    """ping is not idempotent: b's exceptions go back to the caller (as the server wrote
    them) and count as failures, until accrual ejects b."""
    a, b = good_and_broken
    p = routed(a, b, {"idempotent_methods": frozenset({"whoami"})},
               **{"balancer.kind": "round_robin", "balancer.consecutive_failures": 3})
    try:
        c = client("framed-compact", p.outbound)
        errors = []
        try:
            for _ in range(20):
                try:
                    c.ping()
                except TApplicationException as exc:
                    errors.append(str(exc))
        finally:
            c.close()
        assert errors == ["b is broken"] * 3
        assert a.calls["ping"] == 17
        assert p.metric("response_total", protocol="thrift", status_code="500",
                        classification="failure") == 3
        assert p.metric("proxy_errors_total", error="thrift_retry") == 0
    finally:
        p.stop()


def test_deadline_answers_a_slow_call_and_the_connection_goes_on() -> None:
    """response_timeout 0.3 s: a 3 s call gets INTERNAL_ERROR in well under 3 s (504 in
    /metrics); the next call on the same client connection works."""
    server = EchoServer("buffered-binary")
    p = InProcessProxy({"response_timeout": 0.3},
                       **{"outbound.orig_dst_override": f"127.0.0.1:{server.port}"})
    try:
        c = client("buffered-binary", p.outbound)
        try:
            started = time.monotonic()
            with pytest.raises(TApplicationException) as caught:
                c.slow(3.0)
            elapsed = time.monotonic() - started
            assert 0.3 <= elapsed < 1.5, elapsed
            assert "no reply from" in str(caught.value) and "within 0.3s" in str(caught.value)
            assert c.add(20, 22) == 42
        finally:
            c.close()
        assert p.metric("response_total", protocol="thrift", status_code="504") == 1
        assert p.metric("proxy_errors_total", error="response_timeout") == 1
    finally:
        p.stop()
        server.close()


def test_method_in_dst_routes_each_method_by_its_own_name() -> None:
    """With method_in_dst, /svc/<dst>/whoami has its own dentry; other methods follow
    the service's."""
    a, b = EchoServer("framed-binary", "a"), EchoServer("framed-binary", "b")
    port = free_port()
    dtab = (f"/svc/127.0.0.1:{port} => /$/inet/127.0.0.1/{b.port} ; "
            f"/svc/127.0.0.1:{port}/whoami => /$/inet/127.0.0.1/{a.port}")
    p = InProcessProxy({"method_in_dst": True},
                       **{"outbound.orig_dst_override": f"127.0.0.1:{port}",
                          "routing.dtab": dtab})
    try:
        c = client("framed-binary", p.outbound)
        try:
            assert [c.whoami() for _ in range(3)] == ["a"] * 3
            assert [c.slow(0.0) for _ in range(3)] == ["b"] * 3
        finally:
            c.close()
    finally:
        p.stop()
        a.close()
        b.close()


def test_max_frame_bytes_setting_is_enforced() -> None:
    """max_frame_bytes=1024: a 500-byte argument passes, a 2000-byte one closes the
    connection (thrift_too_large)."""
    server = EchoServer("framed-binary")
    p = InProcessProxy({"max_frame_bytes": 1024},
                       **{"outbound.orig_dst_override": f"127.0.0.1:{server.port}"})
    try:
        c = client("framed-binary", p.outbound)
        try:
            assert c.echo("x" * 500) == "x" * 500
            with pytest.raises(TTransportException):
                c.echo("x" * 2000)
        finally:
            c.close()
        assert p.metric("proxy_errors_total", error="thrift_too_large") == 1
        assert server.calls["echo"] == 1
    finally:
        p.stop()
        server.close()


def test_unreachable_endpoint_is_routed_around_for_any_method() -> None:
    """One of two endpoints refuses connections: nothing was sent there, so every call,
    idempotent or not, is routed again and succeeds."""
    a = EchoServer("framed-binary", "a")
    dead = free_port()
    port = free_port()
    p = InProcessProxy({}, **{"outbound.orig_dst_override": f"127.0.0.1:{port}",
                              "routing.dtab": f"/svc/127.0.0.1:{port} => /#/static/echo",
                              "balancer.kind": "round_robin",
                              "namers": [{"kind": "static", "services": {
                                  "echo": [f"127.0.0.1:{a.port}", f"127.0.0.1:{dead}"]}}]})
    try:
        c = client("framed-binary", p.outbound)
        try:
            assert [c.add(i, 1) for i in range(10)] == [i + 1 for i in range(10)]
        finally:
            c.close()
        assert p.metric("proxy_errors_total", error="connect_refused") >= 1
        assert p.metric("response_total", protocol="thrift", status_code="200") == 10
    finally:
        p.stop()
        a.close()


def test_idle_pooled_upstreams_close_after_the_pool_timeout() -> None:
    """http.pool_idle_timeout=0.3 s: once the client has gone, its upstream connection
    is closed within a few ticks."""
    server = EchoServer("framed-binary")
    p = InProcessProxy({}, **{"outbound.orig_dst_override": f"127.0.0.1:{server.port}",
                              "http.pool_idle_timeout": "300ms"})
    try:
        c = client("framed-binary", p.outbound)
        try:
            assert c.ping() == "pong"
        finally:
            c.close()
        assert p.metric("tcp_open_total", protocol="thrift", peer="dst") == 1
        deadline = time.monotonic() + 5
        while p.metric("tcp_close_total", protocol="thrift", peer="dst") < 1:
            assert time.monotonic() < deadline, "the idle upstream was never closed"
            time.sleep(0.05)
    finally:
        p.stop()
        server.close()
