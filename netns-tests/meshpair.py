"""A meshed client/server pair, or a client and two replicas, for the end-to-end netns
tests, and what those tests share: the apps' environment, a raw TCP client, waiting helpers.

Every host gets rules by ``appliance init`` and ``appliance proxy`` as UID 2102 (see
``init.mesh``); on failure, ``diag()`` gathers every log so the assertion message says what
happened.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest

from appliance.telemetry import scrape
from init.mesh import MeshNode
from init.netns import Network

PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "grpc_proxy", "all_proxy",
                             "no_proxy"})

# Sends raw bytes (hex argv) without half-closing; reports what came back and how the
# connection ended: "eof" (closed by the peer), "reset", or "open" (still open at the
# deadline, ``timeout`` s after connecting). Argv: HOST PORT HEX TIMEOUT.
RAW_CLIENT = r"""
import json, socket, sys, time
host, port, data, timeout = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), \
    float(sys.argv[4])
deadline = time.monotonic() + timeout
sock = socket.create_connection((host, port), timeout=timeout)
sock.sendall(data)
reply, end = b"", "open"
try:
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            end = "eof"
            break
        reply += chunk
except ConnectionResetError:
    end = "reset"
except TimeoutError:
    pass
print(json.dumps({"reply": reply.decode("latin-1"), "end": end}))
"""


def app_env(**extra: str) -> dict[str, str]:
    """The apps' environment: this machine's without its proxy settings (curl, urllib and
    grpcio honour ``http_proxy``/``grpc_proxy``, and the apps must dial directly), grpcio
    quiet, then ``extra`` (a test that wants an app to use a proxy sets it here)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}
    return {**env, "GRPC_VERBOSITY": "ERROR", **extra}


@dataclass
class MeshPair:
    mode: str
    net: Network
    client: MeshNode
    server: MeshNode
    work: Path
    app_log: Path
    app_name = "app"

    def diag(self, *extra: object) -> str:
        """What to read when an assertion fails: the given values and every log."""
        parts = [brief(e) for e in extra]
        for node in (self.client, self.server):
            state = "not running" if node.proc is None else f"exit={node.proc.poll()}"
            parts.append(f"--- {node.host.name} proxy ({self.mode}, {state}) log:\n{node.log()}")
        parts.append(f"--- {self.app_name} log:\n{self.app_log.read_text(errors='replace')}")
        return "\n".join(parts)

    def healthy(self) -> None:
        for node in (self.client, self.server):
            assert node.proc is not None and node.proc.poll() is None, self.diag(
                f"{node.host.name} proxy exited")
            assert node.ready(), self.diag(f"{node.host.name} proxy not ready")


@dataclass
class MeshReplicas:
    """A meshed client and two meshed replicas of one service, ``web1`` and ``web2``;
    ``work`` holds the apps' files. A test subclasses it with its own clients."""

    net: Network
    client: MeshNode
    web: list[MeshNode]
    work: Path

    @classmethod
    def start(cls, network: Callable[..., Network], tmp_path: Path,
              files: Mapping[str, str], **fields: Any) -> Self:
        """The three hosts with rules installed and the replicas' proxies running; ``files``
        (name to text) written to ``work``. The apps and the client's proxy, configured
        per test, are left to the caller."""
        net = network("client", "web1", "web2")
        work = tmp_path / "work"
        work.mkdir()
        for name, text in files.items():
            (work / name).write_text(text)
        web = [MeshNode(net["web1"]), MeshNode(net["web2"])]
        client = MeshNode(net["client"])
        for node in (client, *web):
            node.install_rules()
        for node in web:
            node.start_proxy()
        return cls(net, client, web, work, **fields)

    def diag(self, *extra: object) -> str:
        """The given values and every proxy's log."""
        parts = [brief(e) for e in extra]
        for node in (self.client, *self.web):
            parts.append(f"--- {node.host.name} proxy log:\n{node.log()}")
        return "\n".join(parts)


def meshed_pair(network: Callable[..., Network], mode: str) -> tuple[Network, MeshNode,
                                                                      MeshNode]:
    """Two hosts, rules installed and proxies ready in both."""
    net = network("client", "server")
    client = MeshNode(net["client"], iptables_mode=mode)
    server = MeshNode(net["server"], iptables_mode=mode)
    for node in (client, server):
        node.install_rules()
    for node in (client, server):
        node.start_proxy()
    return net, client, server


def brief(value: object) -> str:
    """A metrics exposition shrunk to its counters; anything else as repr."""
    if isinstance(value, str) and value.startswith("# HELP"):
        return "\n".join(line for line in value.splitlines()
                         if "_total{" in line and not line.startswith("#"))
    return repr(value)


def eventually(check: Callable[[], Any], timeout: float,
               explain: Callable[[], str]) -> None:
    """Poll ``check`` until it is true; fail with ``explain()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            pytest.fail(f"condition not met within {timeout}s\n{explain()}")
        time.sleep(0.02)


def delta(before: str, after: str, name: str, **labels: str) -> float:
    return scrape.total(after, name, **labels) - scrape.total(before, name, **labels)
