"""Fault injection through the running proxy: retries, budgets, timeouts, ejection, shedding.

Backends are tests/faulty.py replicas on loopback (failing a share of requests, slow,
resetting, blackholed); the proxy routes /svc/web to them with a static namer. Assertions
are on outcomes (statuses, what each replica received, /metrics), not on speed; the one
time bound (no request waits past its timeout) has a generous margin.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from faulty import Fault, FaultyBackend, GrpcBackend
from support import ProxyProcess, free_port, wait_for

Answer = tuple[int, bytes, str, float]  # status, body, l5d-proxy-error, seconds


class Client:
    """One keep-alive HTTP/1.1 connection to the proxy (reopened when it closes)."""

    def __init__(self, port: int, host: str = "web", timeout: float = 20.0) -> None:
        self.port, self.host, self.timeout = port, host, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: object = None,
                headers: dict[str, str] | None = None, chunked: bool = False) -> Answer:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        started = time.monotonic()
        try:
            self.conn.request(method, path, body=body,  # type: ignore[arg-type]
                              headers={"Host": self.host, **(headers or {})},
                              encode_chunked=chunked)
            resp = self.conn.getresponse()
            data = resp.read()
        except (ConnectionError, http.client.HTTPException):
            self.close()
            return 0, b"", "connection lost", time.monotonic() - started
        if resp.will_close:
            self.close()
        return (resp.status, data, resp.getheader("l5d-proxy-error") or "",
                time.monotonic() - started)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def static(*backends: FaultyBackend) -> str:
    addrs = ", ".join(f"'{b.address}'" for b in backends)
    return f"namers=[{{kind: static, services: {{web: [{addrs}]}}}}]"


@contextmanager
def routed(*backends: FaultyBackend, settings: tuple[str, ...] = ()) -> Iterator[ProxyProcess]:
    """The proxy with /svc/web delegated to ``backends``."""
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{free_port()}",
                     "routing.dtab=/svc/web => /#/static/web", static(*backends), *settings)
    try:
        yield p
    finally:
        code = p.stop()
        assert code == 0, p.output()


@pytest.fixture
def trio() -> Iterator[tuple[FaultyBackend, FaultyBackend, FaultyBackend]]:
    a, b, c = FaultyBackend("a"), FaultyBackend("b"), FaultyBackend("c")
    try:
        yield a, b, c
    finally:
        for x in (a, b, c):
            x.close()


def endpoints(p: ProxyProcess) -> dict[str, dict[str, object]]:
    """The balancer's view of /#/static/web, by address, from the admin API."""
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin}/api/endpoints", timeout=5) as r:
        data = json.load(r)
    out: dict[str, dict[str, object]] = {}
    for service in data.get("services", []):
        for ep in service.get("endpoints", []):
            out[str(ep.get("address"))] = ep
    return out


# --- retries ----------------------------------------------------------------------------

def test_retries_hide_a_replica_failing_half_its_requests(trio) -> None:  # type: ignore[no-untyped-def]
    """One of three replicas answers 503 to half its GETs; with retryableRead5XX the
    client sees (nearly) only 200s, and every retry is counted."""
    a, b, c = trio
    c.fault = Fault(fail_share=0.5)
    with routed(a, b, c, settings=("service.classifier=io.l5d.http.retryableRead5XX",)) as p:
        client = Client(p.outbound)
        answers = [client.request("GET", f"/r{i}") for i in range(400)]
        ok = sum(1 for s, *_ in answers if s == 200)
        failed_at_c = c.answered.get(503, 0)
        assert failed_at_c > 0, "the failing replica was never picked"
        assert ok >= 398, [x for x in answers if x[0] != 200][:5]
        retries = p.metric("retry_total", direction="outbound", reason="response")
        assert retries >= failed_at_c - (400 - ok)
        assert a.count() + b.count() + c.count() == 400 + retries
        assert p.metric("request_total", dst_service="/#/static/web") == 400


def test_default_classifier_does_not_retry_5xx(trio) -> None:  # type: ignore[no-untyped-def]
    """With zero config (nonRetryable5XX), a 503 reaches the client as it was."""
    a, _, _ = trio
    a.fault = Fault(fail_share=1.0)
    with routed(a) as p:
        status, body, _, _ = Client(p.outbound).request("GET", "/x")
        assert status == 503 and body.startswith(b"a GET /x")
        assert a.count() == 1
        assert p.metric("retry_total") == 0


def test_retries_stay_within_the_budget() -> None:
    """A replica failing every request: retries stop at percent_can_retry of the
    requests (no reserve), and refused retries are counted as budget exhaustion."""
    with FaultyBackend("bad", Fault(fail_share=1.0)) as bad, routed(bad, settings=(
            "service.classifier=io.l5d.http.retryableRead5XX", "service.max_retries=3",
            "service.retry_budget_percent=0.1", "service.retry_budget_min_per_sec=0",
            "balancer.consecutive_failures=100000")) as p:
        client = Client(p.outbound)
        statuses = [client.request("GET", f"/{i}")[0] for i in range(200)]
        assert statuses == [503] * 200
        retries = p.metric("retry_total", reason="response")
        assert 1 <= retries <= 20  # 10 % of 200 requests
        assert bad.count() == 200 + retries
        assert p.metric("retry_budget_exhausted_total", direction="outbound") >= 1


def test_connection_refused_is_retried_on_another_endpoint(trio) -> None:  # type: ignore[no-untyped-def]
    """An endpoint that refuses connections costs no request: it is requeued elsewhere
    (whatever the method and classifier) until accrual ejects the endpoint."""
    a, _, _ = trio
    dead = free_port()
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{free_port()}",
                     "routing.dtab=/svc/web => /#/static/web",
                     f"namers=[{{kind: static, services: {{web: ['{a.address}', "
                     f"'127.0.0.1:{dead}']}}}}]",
                     "balancer.kind=round_robin", "balancer.consecutive_failures=2")
    try:
        client = Client(p.outbound)
        answers = [client.request("POST", f"/{i}", body=b"payload") for i in range(8)]
        assert [s for s, *_ in answers] == [200] * 8
        assert a.count("POST") == 8
        assert p.metric("retry_total", reason="unsent") == 2
        assert p.metric("proxy_errors_total", error="connect_refused") == 2
    finally:
        assert p.stop() == 0


def test_reset_after_request_is_retried_only_for_retryable_methods(trio) -> None:  # type: ignore[no-untyped-def]
    """The upstream resets after reading the request: a GET is retried elsewhere (the
    classifier allows it), a POST gets 502 and was sent exactly once."""
    a, b, _ = trio
    a.fault = Fault(reset_after_request=True)
    with routed(a, b, settings=("service.classifier=io.l5d.http.retryableRead5XX",
                                "balancer.kind=round_robin",
                                "balancer.consecutive_failures=1000")) as p:
        client = Client(p.outbound)
        gets = [client.request("GET", f"/g{i}")[0] for i in range(4)]
        assert gets == [200] * 4
        assert b.count("GET") == 4  # every GET that reached a was retried on b
        assert p.metric("retry_total", reason="connection") == a.count("GET") >= 1
        posts = [client.request("POST", f"/p{i}", body=b"x")[0] for i in range(4)]
        assert sorted(posts) == [200, 200, 502, 502]
        assert a.count("POST") + b.count("POST") == 4  # never sent twice


# --- bodies -----------------------------------------------------------------------------

def test_small_put_is_replayed_intact_when_the_classifier_allows_it(trio) -> None:  # type: ignore[no-untyped-def]
    """retryableIdempotent5XX: a PUT with a 40 KiB body answered 503 is sent again, the
    same bytes, to the other replica; a POST with the same body is not."""
    a, b, _ = trio
    a.fault = Fault(fail_share=1.0)
    body = bytes(range(256)) * 160
    with routed(a, b, settings=("service.classifier=io.l5d.http.retryableIdempotent5XX",
                                "balancer.kind=round_robin",
                                "balancer.consecutive_failures=1000")) as p:
        client = Client(p.outbound)
        puts = [client.request("PUT", f"/put{i}", body=body) for i in range(4)]
        assert [s for s, *_ in puts] == [200] * 4
        digests = {s.digest for s in a.seen + b.seen}
        assert len(digests) == 1 and all(s.body_len == len(body) for s in a.seen + b.seen)
        # Every PUT that reached a (503) was retried on b, never back on a.
        assert b.count("PUT") == 4 and a.count("PUT") >= 1
        assert p.metric("retry_total", reason="response") == a.count("PUT")
        posts = [client.request("POST", f"/post{i}", body=body)[0] for i in range(4)]
        assert sorted(posts) == [200, 200, 503, 503]
        assert a.count("POST") + b.count("POST") == 4


def test_chunked_body_is_replayed_as_sent(trio) -> None:  # type: ignore[no-untyped-def]
    """A chunked PUT is replayed chunk for chunk (the replica reads the same body)."""
    a, b, _ = trio
    a.fault = Fault(fail_share=1.0)
    with routed(a, b, settings=("service.classifier=io.l5d.http.retryableIdempotent5XX",
                                "balancer.kind=round_robin")) as p:
        client = Client(p.outbound)
        for i in range(2):
            pieces = iter([b"alpha-", b"beta-", b"gamma"])
            assert client.request("PUT", f"/c{i}", body=pieces,
                                  headers={"Transfer-Encoding": "chunked"}, chunked=True)[0] == 200
        assert {s.body_len for s in a.seen + b.seen} == {16}
        assert len({s.digest for s in a.seen + b.seen}) == 1


def test_a_1mib_body_is_never_replayed(trio) -> None:  # type: ignore[no-untyped-def]
    """Past retry_buffer_bytes (64 KiB) a body is not kept: a 1 MiB PUT answered 503, or
    reset after it was read, is never sent a second time, whatever the classifier."""
    a, b, _ = trio
    a.fault = Fault(fail_share=1.0)
    b.fault = Fault(reset_after_request=True)
    big = b"\x5a" * (1 << 20)
    with routed(a, b, settings=("service.classifier=io.l5d.http.retryableIdempotent5XX",
                                "balancer.kind=round_robin",
                                "balancer.consecutive_failures=1000")) as p:
        client = Client(p.outbound)
        answers = [client.request("PUT", f"/big{i}", body=big)[0] for i in range(4)]
        assert sorted(answers) == [502, 502, 503, 503]
        assert a.count() == 2 and b.count() == 2
        assert all(s.body_len == len(big) for s in a.seen + b.seen)
        assert p.metric("retry_total") == 0
        assert p.metric("retry_skipped_total", reason="body") == 4


# --- timeouts and deadlines ----------------------------------------------------------------

def test_blackholed_replica_is_ejected_and_nobody_waits_past_the_timeout(trio) -> None:  # type: ignore[no-untyped-def]
    """A replica accepts and never answers: each attempt to it ends at attempt_timeout
    and the GET goes to another replica; after 2 such failures it is ejected, and no
    request took longer than the request timeout (plus a margin)."""
    a, b, c = trio
    c.fault = Fault(blackhole=True)
    with routed(a, b, c, settings=(
            "service.classifier=io.l5d.http.retryableRead5XX", "service.timeout=2s",
            "service.attempt_timeout=300ms", "balancer.kind=round_robin",
            "balancer.consecutive_failures=2")) as p:
        client = Client(p.outbound)
        answers = [client.request("GET", f"/{i}") for i in range(30)]
        assert [s for s, *_ in answers] == [200] * 30
        assert max(t for *_, t in answers) < 2.0 + 0.5
        assert 2 <= c.count() <= 3  # two failures, and at most one probe since
        assert p.metric("retry_total", reason="timeout") == c.count()
        state = endpoints(p)[c.address]
        assert state["state"] in ("ejected", "probing") and state["ejections"] >= 1, state


def test_request_timeout_answers_504_when_no_replica_answers() -> None:
    """Every replica blackholed: the client gets 504 at the request timeout, not later."""
    with FaultyBackend("hole", Fault(blackhole=True)) as hole, routed(hole, settings=(
            "service.timeout=500ms",)) as p:
        status, _, error, took = Client(p.outbound).request("GET", "/")
        assert status == 504 and "deadline exceeded (timeout)" in error
        assert 0.4 < took < 1.5
        assert p.metric("proxy_errors_total", error="deadline_exceeded") == 1


def test_ctx_deadline_is_enforced_and_propagated(trio) -> None:  # type: ignore[no-untyped-def]
    """l5d-ctx-deadline: the remaining time goes on (never more than received); a slow
    replica past it gets the client a 504; a deadline already past is answered 504
    without calling any replica."""
    a, _, _ = trio
    with routed(a) as p:
        client = Client(p.outbound)
        now = time.time_ns()
        sent = f"{now} {now + 5_000_000_000}"
        assert client.request("GET", "/d", headers={"l5d-ctx-deadline": sent})[0] == 200
        forwarded = a.seen[-1].headers["l5d-ctx-deadline"]
        ts, deadline = (int(x) for x in forwarded.split())
        assert ts >= now and deadline <= now + 5_000_000_000 and deadline > ts
        a.fault = Fault(delay=2.0)
        status, _, error, took = client.request(
            "GET", "/late", headers={"l5d-ctx-deadline": f"{now} {time.time_ns() + 300_000_000}"})
        assert status == 504 and "l5d-ctx-deadline" in error and took < 1.5
        before = a.count()
        past = f"{now - 2_000_000_000} {now - 1_000_000_000}"
        status, _, error, _ = Client(p.outbound).request(
            "GET", "/past", headers={"l5d-ctx-deadline": past})
        assert status == 504 and "before the request was sent" in error
        assert a.count() == before


def test_per_service_override_applies_by_prefix() -> None:
    """services: [{prefix: /svc/web, timeout: 300ms}] applies to web, not to others."""
    with FaultyBackend("slow", Fault(delay=1.0)) as slow:
        p = ProxyProcess(
            f"outbound.orig_dst_override=127.0.0.1:{free_port()}",
            "routing.dtab=/svc => /#/static", static_two(slow),
            "services=[{prefix: /svc/web, timeout: 300ms}]")
        try:
            assert Client(p.outbound, host="web").request("GET", "/")[0] == 504
            assert Client(p.outbound, host="api").request("GET", "/")[0] == 200
        finally:
            assert p.stop() == 0


def static_two(backend: FaultyBackend) -> str:
    return (f"namers=[{{kind: static, services: {{web: ['{backend.address}'], "
            f"api: ['{backend.address}']}}}}]")


# --- load shedding ------------------------------------------------------------------------

def test_over_the_limits_requests_are_shed_and_admin_answers() -> None:
    """max_requests=2, max_queue=1: with 2 slow requests in flight a third waits, a
    fourth gets 503 at once; the admin port keeps answering meanwhile."""
    with FaultyBackend("slow", Fault(delay=1.5)) as slow, routed(slow, settings=(
            "limits.max_requests=2", "limits.max_queue=1")) as p:
        results: dict[int, Answer] = {}

        def run(i: int) -> None:
            results[i] = Client(p.outbound).request("GET", f"/{i}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: slow.count() == 2, timeout=5, what="two requests in flight")
        # A request is counted as its head is parsed, and queued in the same step.
        wait_for(lambda: p.metric("request_total", direction="outbound") == 3, timeout=5,
                 what="the third request queued")
        status, _, error, took = Client(p.outbound).request("GET", "/shed")
        assert status == 503 and "load shed" in error and took < 1.0
        with urllib.request.urlopen(f"http://127.0.0.1:{p.admin}/ready", timeout=2) as r:
            assert r.status == 200
        for t in threads:
            t.join(10)
        assert sorted(r[0] for r in results.values()) == [200, 200, 200]
        assert p.metric("proxy_errors_total", error="shed_requests") == 1


def test_queue_timeout_sheds_a_waiting_request() -> None:
    """A request that waits longer than queue_timeout for a slot gets 503."""
    with FaultyBackend("slow", Fault(delay=4.0)) as slow, routed(slow, settings=(
            "limits.max_requests=1", "limits.max_queue=5", "limits.queue_timeout=500ms")) as p:
        first = threading.Thread(target=lambda: Client(p.outbound).request("GET", "/1"))
        first.start()
        wait_for(lambda: slow.count() == 1, timeout=5, what="the first request in flight")
        status, _, error, took = Client(p.outbound).request("GET", "/2")
        assert status == 503 and "queue_timeout" in error and took < 3.0
        first.join(10)


def test_connections_over_the_limit_are_closed() -> None:
    """max_connections=2: a third client connection is closed at once."""
    with FaultyBackend("a") as a, routed(a, settings=("limits.max_connections=2",)) as p:
        c1, c2 = Client(p.outbound), Client(p.outbound)
        assert c1.request("GET", "/1")[0] == 200 and c2.request("GET", "/2")[0] == 200
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        c1.close()
        wait_for(lambda: Client(p.outbound).request("GET", "/3")[0] == 200, timeout=5,
                 what="a slot after one connection closed")
        assert p.metric("proxy_errors_total", error="shed_connections") >= 1


def test_endpoint_limit_sends_the_request_elsewhere(trio) -> None:  # type: ignore[no-untyped-def]
    """max_endpoint_requests=1: while one replica is busy, a second request goes to the
    other replica instead of queueing behind it."""
    a, b, _ = trio
    a.fault = b.fault = Fault(delay=1.0)
    with routed(a, b, settings=("limits.max_endpoint_requests=1",)) as p:
        results: list[int] = []
        threads = [threading.Thread(
            target=lambda i=i: results.append(Client(p.outbound).request("GET", f"/{i}")[0]))
            for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [200, 200]
        assert a.count() == 1 and b.count() == 1


# --- HTTP/2 and gRPC ------------------------------------------------------------------------

def grpc_call(port: int, body: bytes = b"hi", timeout: float = 10.0,
              metadata: tuple[tuple[str, str], ...] = ()) -> tuple[str, bytes | str]:
    """One unary call through the proxy to /svc/web: ("OK", reply) or (code name, details)."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}",
                               options=[("grpc.default_authority", "web")]) as channel:
        try:
            reply = channel.unary_unary("/test.Echo/Unary")(body, timeout=timeout,
                                                            metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""
        return "OK", reply


@pytest.fixture
def grpc_pair() -> Iterator[tuple[GrpcBackend, GrpcBackend]]:
    a, b = GrpcBackend("a"), GrpcBackend("b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_grpc_unavailable_is_retried_with_its_body(grpc_pair) -> None:  # type: ignore[no-untyped-def]
    """A replica answering UNAVAILABLE: the default gRPC classifier retries the call (a
    POST with a small body) on the other replica, the same bytes; with neverRetryable
    the client gets UNAVAILABLE."""
    a, b = grpc_pair
    a.fault = Fault(fail_share=1.0)
    body = bytes(range(256)) * 40
    with routed(a, b, settings=("balancer.kind=round_robin",
                                "balancer.consecutive_failures=1000")) as p:
        results = [grpc_call(p.outbound, body) for _ in range(6)]
        assert all(code == "OK" and reply == b"b:" + body[:32] for code, reply in results)
        assert b.count() == 6 and a.count() >= 1
        assert len({s.digest for s in a.seen + b.seen}) == 1
        assert p.metric("retry_total", reason="response") == a.count()
    with routed(a, b, settings=("balancer.kind=round_robin",
                                "service.grpc_classifier=io.l5d.h2.grpc.neverRetryable")) as p:
        codes = sorted(grpc_call(p.outbound, body)[0] for _ in range(4))
        assert codes == ["OK", "OK", "UNAVAILABLE", "UNAVAILABLE"]
        assert p.metric("retry_total") == 0


def test_grpc_large_message_is_never_replayed(grpc_pair) -> None:  # type: ignore[no-untyped-def]
    """A 1 MiB message answered UNAVAILABLE is not sent again: the client gets it."""
    a, b = grpc_pair
    a.fault = b.fault = Fault(fail_share=1.0)
    with routed(a, b) as p:
        code, _ = grpc_call(p.outbound, b"\x01" * (1 << 20))
        assert code == "UNAVAILABLE"
        assert a.count() + b.count() == 1
        assert p.metric("retry_skipped_total", reason="body") == 1


def test_grpc_unsent_call_is_requeued(grpc_pair) -> None:  # type: ignore[no-untyped-def]
    """An endpoint refusing connections: gRPC calls to it go to the live one."""
    a, _ = grpc_pair
    dead = free_port()
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{free_port()}",
                     "routing.dtab=/svc/web => /#/static/web",
                     f"namers=[{{kind: static, services: {{web: ['{a.address}', "
                     f"'127.0.0.1:{dead}']}}}}]", "balancer.kind=round_robin")
    try:
        assert [grpc_call(p.outbound)[0] for _ in range(4)] == ["OK"] * 4
        assert a.count() == 4
        assert p.metric("retry_total", reason="unsent") >= 1
    finally:
        assert p.stop() == 0


def test_grpc_route_timeout_and_ctx_deadline(grpc_pair) -> None:  # type: ignore[no-untyped-def]
    """service.timeout bounds a gRPC call (DEADLINE_EXCEEDED); grpc-timeout goes on as
    the remaining time, never more than the client gave."""
    a, _ = grpc_pair
    a.fault = Fault(delay=1.5)
    with routed(a, settings=("service.timeout=400ms",)) as p:
        started = time.monotonic()
        code, details = grpc_call(p.outbound)
        assert code == "DEADLINE_EXCEEDED" and "deadline exceeded (timeout)" in str(details)
        assert time.monotonic() - started < 1.4
        now = time.time_ns()
        past = (("l5d-ctx-deadline", f"{now - 2_000_000_000} {now - 1_000_000_000}"),)
        before = a.count()
        code, details = grpc_call(p.outbound, metadata=past)
        assert code == "DEADLINE_EXCEEDED" and "before the request was sent" in str(details)
        assert a.count() == before


def test_grpc_over_the_limit_is_unavailable_at_once(grpc_pair) -> None:  # type: ignore[no-untyped-def]
    """max_requests=1 and no queue: a second concurrent call gets UNAVAILABLE (load shed)
    at once, trailers-only, while the first completes."""
    a, _ = grpc_pair
    a.fault = Fault(delay=1.0)
    with routed(a, settings=("limits.max_requests=1", "limits.max_queue=0")) as p:
        first: list[tuple[str, bytes | str]] = []
        t = threading.Thread(target=lambda: first.append(grpc_call(p.outbound)))
        t.start()
        wait_for(lambda: a.count() == 1, timeout=5, what="the first call in flight")
        started = time.monotonic()
        code, details = grpc_call(p.outbound)
        assert code == "UNAVAILABLE" and "load shed" in str(details)
        assert time.monotonic() - started < 0.9
        t.join(10)
        assert first and first[0][0] == "OK"
        assert p.metric("proxy_errors_total", error="shed_requests") == 1
