"""Thrift through the mesh, end to end, with unmodified thriftpy2 apps.

Hosts in namespaces: a client and two replicas of one Thrift service (web1, web2), all
meshed (rules by ``appliance init``, proxies as UID 2102). The client app dials a service
address that no host has (198.18.0.200, on the client's link, so the connection is made and
redirected); the client proxy's dtab sends that name to the static namer's two replicas.
Each replica's ``whoami`` answers with its own name, so the test sees where every call
went, while all of them travel on ONE client connection.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from meshpair import MeshReplicas, app_env, eventually

from init.mesh import MeshNode, start_app
from init.netns import Network

SERVICE_IP = "198.18.0.200"
PORT = 9090
IDL = Path(__file__).resolve().parent.parent / "tests" / "thrift_idl" / "echo.thrift"

_FACTORIES = r"""
import sys, thriftpy2
from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory
echo = thriftpy2.load(sys.argv[1], module_name="echo_thrift")
transport, protocol = sys.argv[2].split("-", 1)
proto = TCompactProtocolFactory() if protocol == "compact" else TBinaryProtocolFactory()
trans = TFramedTransportFactory() if transport == "framed" else TBufferedTransportFactory()
"""

# An unmodified thriftpy2 server whose whoami answers its name: IDL VARIANT PORT NAME.
SERVER = _FACTORIES + r"""
from thriftpy2.rpc import make_server
name = sys.argv[4]
class Handler:
    def whoami(self):
        return name
    def ping(self):
        return "pong"
make_server(echo.Echo, Handler(), "0.0.0.0", int(sys.argv[3]), proto_factory=proto,
            trans_factory=trans, client_timeout=None).serve()
"""

# An unmodified thriftpy2 client: COUNT whoami calls on ONE connection, answers as JSON.
CLIENT = _FACTORIES + r"""
import json
from thriftpy2.rpc import make_client
host, port, count = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
c = make_client(echo.Echo, host, port, proto_factory=proto, trans_factory=trans,
                timeout=10000)
print(json.dumps([c.whoami() for _ in range(count)]))
c.close()
"""


@dataclass
class Replicas(MeshReplicas):
    """The replicas' ``whoami`` answers their name, over Thrift ``variant``."""

    variant: str

    def calls(self, count: int) -> list[str]:
        done = self.client.host.run(
            [sys.executable, str(self.work / "client.py"), str(self.work / "echo.thrift"),
             self.variant, SERVICE_IP, str(PORT), str(count)],
            check=False, timeout=60, env=app_env())
        assert done.returncode == 0, self.diag("thrift client failed", done.stderr)
        return list(json.loads(done.stdout))


def replicas(network: Callable[..., Network], tmp_path: Path, variant: str) -> Replicas:
    r = Replicas.start(network, tmp_path, {"echo.thrift": IDL.read_text(),
                                           "server.py": SERVER, "client.py": CLIENT},
                       variant=variant)
    for node in r.web:
        start_app(node.host, [sys.executable, str(r.work / "server.py"),
                              str(r.work / "echo.thrift"), variant, str(PORT), node.host.name],
                  PORT, env=app_env())
    a, b = (node.host.addr for node in r.web)
    namers = f'[{{kind: static, services: {{echo: ["{a}:{PORT}", "{b}:{PORT}"]}}}}]'
    r.client.start_proxy(f"routing.dtab=/svc/{SERVICE_IP}:{PORT} => /#/static/echo",
                         f"namers={namers}", "balancer.kind=round_robin")
    return r


@pytest.mark.parametrize("variant", ["framed-binary", "buffered-compact"])
def test_thrift_calls_spread_over_replicas_on_one_connection(
        network: Callable[..., Network], tmp_path: Path, variant: str) -> None:
    """An unmodified thriftpy2 client's calls on ONE connection reach both replicas, each
    through its own inbound proxy, and every proxy counts them as Thrift."""
    r = replicas(network, tmp_path, variant)
    answers = r.calls(20)
    seen = Counter(answers)
    assert seen == {"web1": 10, "web2": 10}, r.diag(answers)
    client_metrics = r.client.metrics()
    assert r.client.metric("tcp_open_total", direction="outbound", peer="src",
                           protocol="thrift") == 1, r.diag(client_metrics)
    assert r.client.metric("request_total", direction="outbound",
                           protocol="thrift") == 20, r.diag(client_metrics)
    for node in r.web:
        want = seen[node.host.name]

        def counted(n: MeshNode = node, w: int = want) -> bool:
            return n.metric("request_total", direction="inbound", protocol="thrift") >= w

        def explain(n: MeshNode = node) -> str:
            return r.diag(n.metrics())

        eventually(counted, 5, explain)
