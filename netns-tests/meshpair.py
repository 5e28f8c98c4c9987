"""A meshed client/server pair for the end-to-end netns tests, and their waiting helpers.

Both hosts get rules by ``appliance init`` and ``appliance proxy`` as UID 2102 (see
``init.mesh``); on failure, ``diag()`` gathers every log so the assertion message says what
happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.telemetry import scrape
from init.mesh import MeshNode
from init.netns import Network


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
