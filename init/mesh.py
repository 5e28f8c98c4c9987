"""A meshed host: rules installed by ``appliance init``, ``appliance proxy`` as UID 2102.

Used by the demo and the netns tests, so both exercise exactly what a user runs: the same
CLI commands, as the same user, inside the workload's own network namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Any

from appliance.telemetry import scrape
from init.netns import Host

PROXY_UID = 2102
ADMIN_PORT = 4191


class MeshNode:
    """The sidecar half of a host: iptables rules and a proxy process."""

    def __init__(self, host: Host, *, iptables_mode: str = "auto",
                 instance_id: str | None = None) -> None:
        self.host = host
        self.mode = iptables_mode
        self.instance_id = instance_id or host.name
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None

    def appliance(self, *args: str, uid: int | None = None,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run([sys.executable, "-m", "appliance", *args], uid=uid, check=check)

    def install_rules(self, *extra: str) -> str:
        """``appliance init`` in this namespace; returns what it printed."""
        done = self.appliance("init", "--iptables-mode", self.mode, *extra)
        return done.stdout

    def uninstall_rules(self) -> None:
        self.appliance("init", "--iptables-mode", self.mode, "--uninstall")

    def start_proxy(self, *settings: str, timeout: float = 15.0,
                    env: dict[str, str] | None = None) -> None:
        """Run the proxy as the proxy user and wait until /ready answers 200. ``env`` adds
        variables (identity, tracing) to the proxy's environment."""
        argv = [sys.executable, "-m", "appliance", "proxy",
                "--set", f"instance_id={self.instance_id}"]
        for s in settings:
            argv += ["--set", s]
        self._log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
        self.proc = self.host.popen(argv, uid=PROXY_UID, stdout=self._log,
                                    stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.host.name}: proxy exited "
                                   f"({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.host.name}: proxy not ready after {timeout}s:\n"
                                   f"{self.log()}")
            time.sleep(0.05)

    def admin_get(self, path: str) -> tuple[int, str]:
        """GET a path of the admin server from inside the namespace (loopback)."""
        done = self.host.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}",
                              f"http://127.0.0.1:{ADMIN_PORT}{path}"], check=False, timeout=10)
        body, _, code = done.stdout.rpartition("\n")
        return int(code or 0), body

    def ready(self) -> bool:
        return self.admin_get("/ready")[0] == 200

    def metrics(self) -> str:
        status, body = self.admin_get("/metrics")
        if status != 200:
            raise RuntimeError(f"{self.host.name}: /metrics answered {status}")
        return body

    def metric(self, name: str, **labels: str) -> float:
        return scrape.total(self.metrics(), name, **labels)

    def log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()

    def stop_proxy(self, timeout: float = 15.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


def start_app(host: Host, argv: Sequence[str], port: int, **kw: Any) -> subprocess.Popen[Any]:
    """An unmodified application in the host's namespace, waited for until it listens."""
    proc = host.popen(list(argv), **kw)
    host.wait_for_port(port, proc=proc)
    return proc


ECHO_SERVER = """
import socket, sys, threading
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
"""A plain TCP echo server (an 'unmodified app' for opaque TCP), run with ``python -c``."""
