"""gRPC through the mesh, end to end: a client and a server host in namespaces, both meshed
(rules by ``appliance init``, ``appliance proxy`` as UID 2102), and unmodified grpcio
programs (generic handlers, no protoc) that know nothing about the proxies.

Each test builds its own mesh for both iptables backends; counters are compared as
before/after deltas. The apps are separate python processes inside the namespaces, run
from script files; the client reports every call's outcome as JSON, so the assertions
(and their failure messages) are made here, with both proxies' logs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from meshpair import MeshPair, app_env, delta, eventually, meshed_pair

from init.mesh import start_app
from init.netns import Network

MODES = ["legacy", "nft"]
GRPC_PORT = 50051
CLOSED_PORT = 50099  # nothing listens here on the server host
CALL_TIMEOUT = 10.0

# Payloads a careless relay would mangle: every byte value, messages spanning many frames.
UNARY = bytes(range(256)) * 40
STREAM_OUT_COUNT = 500
STREAM_IN = [bytes([i]) * 100_000 + bytes(range(256)) for i in range(30)]
BIDI = [b"alpha", b"\x00\x01 bravo \xff", b"charlie" * 5000]

# The grpcio server: test.Echo with the four call shapes, plus grpc.health.v1.
GRPC_SERVER = r"""
import hashlib, sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

def unary(request, context):
    if request == b"fail":
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
    return b"echo:" + request

def stream_out(request, context):
    for i in range(int(request)):
        yield b"item %d" % i

def stream_in(requests, context):
    digest, count = hashlib.sha256(), 0
    for r in requests:
        digest.update(r)
        count += 1
    return b"%d:%s" % (count, digest.hexdigest().encode())

def bidi(requests, context):
    for r in requests:
        yield r.upper()

server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
handlers = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "StreamOut": grpc.unary_stream_rpc_method_handler(stream_out),
    "StreamIn": grpc.stream_unary_rpc_method_handler(stream_in),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
}
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
servicer = health.HealthServicer()
servicer.set("test.Echo", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port("0.0.0.0:" + sys.argv[1])
server.start()
print("serving", flush=True)
server.wait_for_termination()
"""

# The grpcio client: one channel to argv[1], the calls listed in the file argv[2] (JSON
# list of [name, argument as hex, a list of hex, or a service name]); prints one JSON
# object per call: name, code, details, and the reply (hex, or a list of hex for streams).
GRPC_CLIENT = r"""
import json, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target, timeout = sys.argv[1], float(sys.argv[3])
with open(sys.argv[2]) as fh:
    plan = json.load(fh)
with grpc.insecure_channel(target) as channel:
    calls = {
        "unary": lambda a: channel.unary_unary("/test.Echo/Unary")(
            bytes.fromhex(a), timeout=timeout).hex(),
        "stream_out": lambda a: [m.hex() for m in channel.unary_stream(
            "/test.Echo/StreamOut")(bytes.fromhex(a), timeout=timeout)],
        "stream_in": lambda a: channel.stream_unary("/test.Echo/StreamIn")(
            iter([bytes.fromhex(m) for m in a]), timeout=timeout).hex(),
        "bidi": lambda a: [m.hex() for m in channel.stream_stream("/test.Echo/Bidi")(
            iter([bytes.fromhex(m) for m in a]), timeout=timeout)],
        "health": lambda a: health_pb2.HealthCheckResponse.ServingStatus.Name(
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=a), timeout=timeout).status),
    }
    for name, arg in plan:
        try:
            out = {"name": name, "code": "OK", "details": "", "reply": calls[name](arg)}
        except grpc.RpcError as exc:
            out = {"name": name, "code": exc.code().name, "details": exc.details(),
                   "reply": None}
        print(json.dumps(out), flush=True)
"""

# Every call shape, a server-side abort and the health check, in this order.
ALL_CALLS: list[tuple[str, Any]] = [
    ("unary", UNARY.hex()),
    ("unary", b"fail".hex()),
    ("stream_out", str(STREAM_OUT_COUNT).encode().hex()),
    ("stream_in", [m.hex() for m in STREAM_IN]),
    ("bidi", [m.hex() for m in BIDI]),
    ("health", "test.Echo"),
]


@dataclass
class Call:
    name: str
    code: str
    details: str
    reply: Any

    def __repr__(self) -> str:
        reply = self.reply
        if isinstance(reply, list):
            reply = f"{len(reply)} messages, first {reply[:2]!r}"
        elif isinstance(reply, str) and len(reply) > 80:
            reply = f"{reply[:80]}... ({len(reply) // 2} bytes)"
        return f"Call({self.name}, {self.code}, {self.details!r}, {reply})"


class GrpcMesh(MeshPair):
    app_name = "grpc server"


    def call(self, plan: list[tuple[str, Any]], port: int = GRPC_PORT) -> list[Call]:
        """Run the grpcio client on the client host: ``plan`` on one channel to the
        server host's ``port``; one Call per planned call, in order."""
        plan_file = self.work / f"plan-{time.monotonic_ns()}.json"
        plan_file.write_text(json.dumps(plan))
        try:
            done = self.client.host.run(
                [sys.executable, str(self.work / "client.py"),
                 f"{self.server.host.addr}:{port}", str(plan_file), str(CALL_TIMEOUT)],
                check=False, timeout=CALL_TIMEOUT * len(plan) + 15, env=app_env())
        except subprocess.TimeoutExpired as exc:
            pytest.fail(self.diag(f"grpc client hung: {exc}"))
        assert done.returncode == 0, self.diag("grpc client failed", done.stderr)
        calls = [Call(**json.loads(line)) for line in done.stdout.splitlines()]
        assert [c.name for c in calls] == [n for n, _ in plan], self.diag(calls, done.stderr)
        return calls


@pytest.fixture(params=MODES)
def grpc_mesh(request: pytest.FixtureRequest, network: Callable[..., Network],
              tmp_path: Path) -> GrpcMesh:
    """client and server hosts, both meshed, with a grpcio server on the server host."""
    mode: str = request.param
    net, client, server = meshed_pair(network, mode)
    work = tmp_path / "work"
    work.mkdir()
    (work / "server.py").write_text(GRPC_SERVER)
    (work / "client.py").write_text(GRPC_CLIENT)
    m = GrpcMesh(mode, net, client, server, work, tmp_path / "grpc-server.log")
    with m.app_log.open("w") as log:
        start_app(server.host, [sys.executable, "-u", str(work / "server.py"),
                                str(GRPC_PORT)], GRPC_PORT, stdout=log,
                  stderr=subprocess.STDOUT, env=app_env())
    return m  # the network fixture kills every process and removes the namespaces


def test_grpc_call_shapes_health_and_status_pass_both_proxies(grpc_mesh: GrpcMesh) -> None:
    """Unary, server/client/bidi streaming, an abort's code and health SERVING, all exact."""
    unary, fail, out, into, bidi, health = grpc_mesh.call(ALL_CALLS)

    assert (unary.code, unary.reply) == ("OK", (b"echo:" + UNARY).hex()), grpc_mesh.diag(unary)
    assert (fail.code, fail.details) == ("FAILED_PRECONDITION", "asked to fail"), \
        grpc_mesh.diag(fail)
    want_out = [(b"item %d" % i).hex() for i in range(STREAM_OUT_COUNT)]
    assert (out.code, out.reply) == ("OK", want_out), grpc_mesh.diag(out)
    digest = hashlib.sha256(b"".join(STREAM_IN)).hexdigest().encode()
    want_in = b"%d:%s" % (len(STREAM_IN), digest)
    assert (into.code, into.reply) == ("OK", want_in.hex()), grpc_mesh.diag(into)
    assert (bidi.code, bidi.reply) == ("OK", [m.upper().hex() for m in BIDI]), \
        grpc_mesh.diag(bidi)
    assert (health.code, health.reply) == ("OK", "SERVING"), grpc_mesh.diag(health)
    grpc_mesh.healthy()


def test_grpc_calls_are_counted_by_both_proxies_on_one_upstream_connection(
        grpc_mesh: GrpcMesh) -> None:
    """Six calls, one channel: counted h2 by both proxies, one upstream h2 connection."""
    m = grpc_mesh
    c0, s0 = m.client.metrics(), m.server.metrics()

    calls = m.call(ALL_CALLS)

    codes = [c.code for c in calls]
    assert codes == ["OK", "FAILED_PRECONDITION", "OK", "OK", "OK", "OK"], m.diag(calls)
    n = len(ALL_CALLS)

    def counted() -> bool:
        c1, s1 = m.client.metrics(), m.server.metrics()
        return (delta(c0, c1, "request_total", direction="outbound", protocol="h2") == n
                and delta(s0, s1, "request_total", direction="inbound", protocol="h2") == n)

    eventually(counted, 5.0, lambda: m.diag(m.client.metrics(), m.server.metrics()))
    c1, s1 = m.client.metrics(), m.server.metrics()
    assert delta(c0, c1, "tcp_open_total", direction="outbound", protocol="h2",
                 peer="dst") == 1, m.diag(c1)
    assert delta(c0, c1, "tcp_open_total", direction="outbound", protocol="h2",
                 peer="src") == 1, m.diag(c1)  # one channel: one client connection
    assert delta(c0, c1, "request_total", direction="inbound") == 0, m.diag(c1)
    assert delta(s0, s1, "request_total", direction="outbound") == 0, m.diag(s1)


def test_grpc_call_to_a_closed_port_is_unavailable_and_the_mesh_stays_up(
        grpc_mesh: GrpcMesh) -> None:
    """A call to a port nobody listens on ends UNAVAILABLE; both proxies stay ready."""
    m = grpc_mesh
    c0, s0 = m.client.metrics(), m.server.metrics()

    [call] = m.call([("unary", b"anyone?".hex())], port=CLOSED_PORT)

    assert call.code == "UNAVAILABLE" and call.reply is None, m.diag(call)
    # Answered by the mesh (the server proxy cannot reach the port), naming the cause.
    assert "upstream unreachable" in call.details, m.diag(call)
    c1, s1 = m.client.metrics(), m.server.metrics()
    assert delta(c0, c1, "request_total", direction="outbound", protocol="h2") == 1, \
        m.diag(call, c1)
    # UNAVAILABLE is retryable (gRPC's default classifier): the client proxy tried again
    # within its budget, and every try reached the server proxy.
    retries = delta(c0, c1, "retry_total", direction="outbound")
    assert retries >= 1, m.diag(call, c1)
    assert delta(s0, s1, "request_total", direction="inbound", protocol="h2") == 1 + retries, \
        m.diag(call, s1)
    m.healthy()
    [after] = m.call([("unary", b"still there".hex())])
    assert (after.code, after.reply) == ("OK", b"echo:still there".hex()), m.diag(after)
