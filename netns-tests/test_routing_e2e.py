"""Per-request routing and balancing through the mesh, end to end.

Hosts in namespaces: a client and two replicas of one service (web1, web2), all meshed
(rules by ``appliance init``, proxies as UID 2102). The client's apps dial a service address
that no host has (198.18.0.200, on the client's link, so the connection is made and
redirected); the client proxy's dtab sends that name to the static namer's two replicas.
Each replica answers with its own name, so the tests see where every request went.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from meshpair import MeshReplicas, app_env, eventually

from init.mesh import start_app
from init.netns import Network

SERVICE_IP = "198.18.0.200"
HTTP_PORT = 8080
GRPC_PORT = 50051

# An HTTP/1.1 server (keep-alive) that answers every GET with its name, after an optional
# delay in seconds (argv[3]).
NAMED_HTTP = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, delay = sys.argv[2], float(sys.argv[3])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        time.sleep(delay)
        body = name.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""

# A grpcio server whose unary method answers with its name.
NAMED_GRPC = r"""
import sys
from concurrent import futures
import grpc
name = sys.argv[2].encode()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
handler = grpc.unary_unary_rpc_method_handler(lambda request, context: name)
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "test.Who", {"Am": handler}),))
server.add_insecure_port("0.0.0.0:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""

# The grpcio client: N unary calls on ONE channel; prints the answers as a JSON list.
GRPC_CALLS = r"""
import json, sys
import grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    call = channel.unary_unary("/test.Who/Am")
    print(json.dumps([call(b"", timeout=10).decode() for _ in range(int(sys.argv[2]))]))
"""


class Replicas(MeshReplicas):
    """The replicas answer HTTP and gRPC with their name."""

    def curl(self, count: int, *headers: str) -> list[str]:
        """``count`` GETs to the service address on one curl connection; the bodies."""
        urls = [f"http://{SERVICE_IP}:{HTTP_PORT}/{i}" for i in range(count)]
        args = ["curl", "-sS", "--max-time", "30", "-w", "|%{http_code}\\n"]
        for h in headers:
            args += ["-H", h]
        done = self.client.host.run(args + urls, check=False, timeout=60, env=app_env())
        assert done.returncode == 0, self.diag("curl failed", done.stderr)
        answers = [line.rpartition("|") for line in done.stdout.splitlines()]
        assert all(code == "200" for _, _, code in answers), self.diag(done.stdout)
        return [body for body, _, _ in answers]

    def grpc(self, count: int) -> list[str]:
        done = self.client.host.run(
            [sys.executable, str(self.work / "grpc_calls.py"), f"{SERVICE_IP}:{GRPC_PORT}",
             str(count)], check=False, timeout=60, env=app_env())
        assert done.returncode == 0, self.diag("grpc client failed", done.stderr)
        return json.loads(done.stdout)


def replicas(network: Callable[..., Network], tmp_path: Path, *, balancer: str,
             web2_delay: float = 0.0) -> Replicas:
    r = Replicas.start(network, tmp_path, {"named_http.py": NAMED_HTTP,
                                           "named_grpc.py": NAMED_GRPC,
                                           "grpc_calls.py": GRPC_CALLS})
    for node, delay in zip(r.web, (0.0, web2_delay), strict=True):
        name = node.host.name
        start_app(node.host, [sys.executable, str(r.work / "named_http.py"), str(HTTP_PORT),
                              name, str(delay)], HTTP_PORT, env=app_env())
        start_app(node.host, [sys.executable, str(r.work / "named_grpc.py"), str(GRPC_PORT),
                              name], GRPC_PORT, env=app_env())
    a, b = (node.host.addr for node in r.web)
    namers = (f'[{{kind: static, services: {{web: ["{a}:{HTTP_PORT}", "{b}:{HTTP_PORT}"], '
              f'greeter: ["{a}:{GRPC_PORT}", "{b}:{GRPC_PORT}"]}}}}]')
    dtab = (f"/svc/{SERVICE_IP}:{HTTP_PORT} => /#/static/web ; "
            f"/svc/{SERVICE_IP}:{GRPC_PORT} => /#/static/greeter")
    r.client.start_proxy(f"routing.dtab={dtab}", f"namers={namers}",
                         f"balancer.kind={balancer}")
    return r


@pytest.fixture
def round_robin(network: Callable[..., Network], tmp_path: Path) -> Iterator[Replicas]:
    yield replicas(network, tmp_path, balancer="round_robin")


def test_http_requests_spread_over_replicas_on_one_connection(round_robin: Replicas) -> None:
    """curl's keep-alive requests to one service address reach both replicas, each
    through its own inbound proxy."""
    bodies = round_robin.curl(20)
    seen = Counter(bodies)
    assert set(seen) == {"web1", "web2"}, round_robin.diag(bodies)
    assert min(seen.values()) >= 5, round_robin.diag(seen)
    for node in round_robin.web:
        want = seen[node.host.name]
        eventually(lambda n=node, w=want: n.metric("request_total", direction="inbound") >= w,
                   5, lambda n=node: round_robin.diag(n.metrics()))


def test_grpc_calls_spread_over_replicas_on_one_channel(round_robin: Replicas) -> None:
    """An unmodified grpcio client's calls on ONE channel (one HTTP/2 connection) are
    balanced per request over both replicas."""
    answers = round_robin.grpc(20)
    seen = Counter(answers)
    assert set(seen) == {"web1", "web2"}, round_robin.diag(answers)
    assert min(seen.values()) >= 5, round_robin.diag(seen)
    assert round_robin.client.metric("tcp_open_total", direction="outbound",
                                     peer="src", protocol="h2") == 1, \
        round_robin.diag(round_robin.client.metrics())


def test_per_request_override_pins_one_replica(round_robin: Replicas) -> None:
    """An l5d-dtab header on the request re-routes just that request."""
    web2 = round_robin.web[1].host.addr
    bodies = round_robin.curl(
        6, f"l5d-dtab: /svc/{SERVICE_IP}:{HTTP_PORT} => /$/inet/{web2}/{HTTP_PORT}")
    assert bodies == ["web2"] * 6, round_robin.diag(bodies)


def test_peak_ewma_prefers_the_fast_replica(network: Callable[..., Network],
                                            tmp_path: Path) -> None:
    """With the default balancer, a replica that answers 150 ms slower gets few requests."""
    r = replicas(network, tmp_path, balancer="p2c_peak_ewma", web2_delay=0.15)
    seen = Counter(r.curl(40))
    assert seen["web1"] >= 32, r.diag(seen)
