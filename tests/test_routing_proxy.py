"""Logical routing in the running proxy: dtabs, namers, balancing, overrides, failures."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import H11Server, ProxyProcess, free_port, wait_for


def curl(port: int, paths: list[str], *headers: str) -> list[tuple[int, str, str]]:
    """GET each path on ONE connection; (status, body, l5d-proxy-error) per request."""
    args = ["curl", "-sS", "--max-time", "20",
            "-w", "\x1f%{http_code}\x1f%header{l5d-proxy-error}\x1e"]
    for h in headers:
        args += ["-H", h]
    done = subprocess.run(args + [f"http://127.0.0.1:{port}{p}" for p in paths],
                          capture_output=True, timeout=30, text=True)
    out = []
    for record in done.stdout.split("\x1e")[:-1]:
        body, code, error = record.split("\x1f")
        out.append((int(code), body, error))
    assert len(out) == len(paths), (done.stdout, done.stderr)
    return out


@pytest.fixture
def replicas() -> Iterator[tuple[H11Server, H11Server]]:
    a, b = H11Server(), H11Server()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def static(**services: list[str]) -> str:
    body = ", ".join(f"{name}: [{', '.join(repr(a) for a in addrs)}]"
                     for name, addrs in services.items())
    return f"namers=[{{kind: static, services: {{{body}}}}}]"


def routed(dtab: str, *settings: str, fallback_port: int | None = None) -> ProxyProcess:
    port = fallback_port or free_port()  # the "original destination" of every request
    return ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{port}",
                        f"routing.dtab={dtab}", *settings)


def test_requests_on_one_connection_spread_over_replicas(
        replicas: tuple[H11Server, H11Server]) -> None:
    """Host web is delegated to two replicas; keep-alive requests go to both (round robin)."""
    a, b = replicas
    p = routed("/svc/web => /#/static/web",
               static(web=[f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]),
               "balancer.kind=round_robin")
    try:
        answers = curl(p.outbound, [f"/r{i}" for i in range(10)], "Host: web")
        assert [s for s, _, _ in answers] == [200] * 10
        assert len(a.requests) == 5 and len(b.requests) == 5
        assert p.metric("request_total", authority="web", dst_service="/#/static/web") == 10
        headers = dict(a.requests[0][0].headers)  # linkerd's informational headers
        assert headers[b"l5d-dst-service"] == b"/svc/web"
        assert headers[b"l5d-dst-client"] == b"/#/static/web"
        assert p.metric("response_total", dst_service="/#/static/web",
                        classification="success") == 10
    finally:
        p.stop()


def test_weighted_split_is_a_canary(replicas: tuple[H11Server, H11Server]) -> None:
    """A 9:1 union sends about a tenth of the requests to the canary."""
    a, b = replicas
    p = routed("/svc/web => 0.9 * /#/static/stable & 0.1 * /#/static/canary",
               static(stable=[f"127.0.0.1:{a.port}"], canary=[f"127.0.0.1:{b.port}"]))
    try:
        answers = curl(p.outbound, ["/x"] * 200, "Host: web")
        assert all(s == 200 for s, _, _ in answers)
        assert 5 <= len(b.requests) <= 40, (len(a.requests), len(b.requests))
        assert len(a.requests) + len(b.requests) == 200
    finally:
        p.stop()


def test_override_header_reroutes_one_request(replicas: tuple[H11Server, H11Server]) -> None:
    """l5d-dtab re-routes that request only, and goes on as l5d-ctx-dtab."""
    a, b = replicas
    p = routed("/svc/web => /#/static/web", static(web=[f"127.0.0.1:{a.port}"]))
    try:
        override = f"l5d-dtab: /svc/web => /$/inet/127.0.0.1/{b.port}"
        assert curl(p.outbound, ["/o"], "Host: web", override)[0][0] == 200
        assert curl(p.outbound, ["/plain"], "Host: web")[0][0] == 200
        assert [r.target for r, _ in b.requests] == [b"/o"]
        assert [r.target for r, _ in a.requests] == [b"/plain"]
        headers = dict(b.requests[0][0].headers)
        assert headers[b"l5d-ctx-dtab"] == f"/svc/web=>/$/inet/127.0.0.1/{b.port}".encode()
        assert b"l5d-dtab" not in headers
    finally:
        p.stop()


def test_overrides_can_be_refused(replicas: tuple[H11Server, H11Server]) -> None:
    """With routing.allow_overrides=false the header is dropped and ignored."""
    a, b = replicas
    p = routed("/svc/web => /#/static/web", static(web=[f"127.0.0.1:{a.port}"]),
               "routing.allow_overrides=false")
    try:
        assert curl(p.outbound, ["/o"], "Host: web",
                    f"l5d-dtab: /svc/web => /$/inet/127.0.0.1/{b.port}")[0][0] == 200
        assert b.requests == [] and len(a.requests) == 1
        assert b"l5d-dtab" not in dict(a.requests[0][0].headers)
    finally:
        p.stop()


def test_bad_override_is_a_400(replicas: tuple[H11Server, H11Server]) -> None:
    """An override that does not parse is the client's error, with the position."""
    a, _ = replicas
    p = routed("/svc/web => /#/static/web", static(web=[f"127.0.0.1:{a.port}"]))
    try:
        status, _, error = curl(p.outbound, ["/"], "Host: web", "l5d-dtab: /svc/web => &")[0]
        assert status == 400 and "invalid dtab override" in error and "position" in error
        assert a.requests == []
        assert curl(p.outbound, ["/"], "Host: web")[0][0] == 200  # the proxy is fine
    finally:
        p.stop()


def test_unknown_name_falls_back_to_the_original_destination(backend: H11Server) -> None:
    """A name no dentry matches goes where the app was connecting (transparent default)."""
    p = routed("/svc/web => /#/static/web", static(web=["127.0.0.1:9"]),
               fallback_port=backend.port)
    try:
        assert curl(p.outbound, ["/fb"], "Host: other")[0][0] == 200
        assert [r.target for r, _ in backend.requests] == [b"/fb"]
    finally:
        p.stop()


def test_fallback_fail_answers_502() -> None:
    """With routing.fallback=fail, an unroutable name gets 502 naming the path."""
    p = routed("/svc/web => /#/static/web", static(web=["127.0.0.1:9"]), "routing.fallback=fail")
    try:
        status, _, error = curl(p.outbound, ["/"], "Host: other")[0]
        assert status == 502 and "no route" in error and "/svc/other" in error
    finally:
        p.stop()


def test_alternation_falls_back_when_a_service_has_no_addresses(backend: H11Server) -> None:
    """'/#/static/empty | /#/static/web': the first has no addresses, the second serves."""
    p = routed("/svc/web => /#/static/empty | /#/static/web",
               static(empty=[], web=[f"127.0.0.1:{backend.port}"]))
    try:
        assert curl(p.outbound, ["/alt"], "Host: web")[0][0] == 200
    finally:
        p.stop()


def test_failing_endpoint_is_ejected(replicas: tuple[H11Server, H11Server]) -> None:
    """An endpoint refusing connections costs no request (each is sent again, unsent, to
    the live one) and is ejected after 2 failures; with every endpoint ejected the answer
    is a fast 503."""
    a, _ = replicas
    dead = free_port()
    p = routed("/svc/web => /#/static/web",
               static(web=[f"127.0.0.1:{a.port}", f"127.0.0.1:{dead}"]),
               "balancer.kind=round_robin", "balancer.consecutive_failures=2")
    try:
        first = curl(p.outbound, [f"/{i}" for i in range(6)], "Host: web")
        assert all(s == 200 for s, _, _ in first), first
        assert p.metric("retry_total", reason="unsent") == 2  # then ejected: no more tries
        after = curl(p.outbound, [f"/{i}" for i in range(10)], "Host: web")
        assert all(s == 200 for s, _, _ in after), after
        assert p.metric("retry_total", reason="unsent") == 2
        assert p.metric("balancer_endpoints", dst_service="/#/static/web", state="alive") == 1
        assert p.metric("balancer_endpoints", dst_service="/#/static/web",
                        state="ejected") == 1
        assert len(a.requests) == 16
    finally:
        p.stop()
    p = routed("/svc/web => /#/static/web", static(web=[f"127.0.0.1:{dead}"]),
               "balancer.consecutive_failures=1")
    try:
        answers = curl(p.outbound, ["/a", "/b"], "Host: web")
        assert answers[0][0] == 502
        assert answers[1][0] == 503 and "ejected" in answers[1][2], answers
    finally:
        p.stop()


def test_service_file_appearing_later_is_picked_up(tmp_path: Path,
                                                    backend: H11Server) -> None:
    """A files-namer service without a file is negative (the request falls back); once its
    file appears, requests go to the addresses in it."""
    root = tmp_path / "disco"
    root.mkdir()
    p = routed("/svc/web => /#/io.l5d.fs/web",
               f"namers=[{{kind: io.l5d.fs, rootDir: '{root}'}}]", "routing.fallback=fail")
    try:
        status, _, error = curl(p.outbound, ["/x"], "Host: web")[0]
        assert status == 502 and "no route" in error
        (root / "web").write_text(f"127.0.0.1 {backend.port}\n")
        wait_for(lambda: curl(p.outbound, ["/y"], "Host: web")[0][0] == 200, timeout=10,
                 interval=0.2, what="the new service file is used")
    finally:
        p.stop()


def test_request_waits_for_discovery_then_503() -> None:
    """A DNS name whose server never answers: the first request waits routing.bind_timeout
    for discovery, then gets 503 saying so."""
    silent = free_port()  # nothing answers UDP here
    p = routed("/svc/web => /#/dns/web.test/80",
               f"namers=[{{kind: dns, nameservers: ['127.0.0.1:{silent}'], timeout: 5}}]",
               "routing.bind_timeout=0.5")
    try:
        status, _, error = curl(p.outbound, ["/"], "Host: web")[0]
        assert status == 503 and "discovery has not answered" in error
        assert p.metric("proxy_errors_total", error="discovery_timeout") == 1
    finally:
        p.stop()


def test_discovery_outage_is_counted(tmp_path: Path, backend: H11Server) -> None:
    """A service file that turns to garbage keeps the last good set and is counted."""
    root = tmp_path / "disco"
    root.mkdir()
    (root / "web").write_text(f"127.0.0.1 {backend.port}\n")
    p = routed("/svc/web => /#/io.l5d.fs/web",
               f"namers=[{{kind: io.l5d.fs, rootDir: '{root}'}}]")
    try:
        assert curl(p.outbound, ["/1"], "Host: web")[0][0] == 200
        (root / "web").write_text("this is not an address\n")
        wait_for(lambda: p.metric("discovery_updates_total", result="error") >= 1, timeout=10,
                 what="discovery error counted")
        assert curl(p.outbound, ["/2"], "Host: web")[0][0] == 200
        assert "keeping the last good" in p.output()
    finally:
        p.stop()


def test_no_dtab_means_no_router(backend: H11Server) -> None:
    """Zero config: l5d-dtab is passed through untouched and ignored (no router at all)."""
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{backend.port}")
    try:
        assert curl(p.outbound, ["/"], "l5d-dtab: /svc => /x")[0][0] == 200
        assert dict(backend.requests[0][0].headers)[b"l5d-dtab"] == b"/svc => /x"
    finally:
        p.stop()
