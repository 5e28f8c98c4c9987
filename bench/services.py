"""The processes a benchmark run starts: nginx and nghttpd backends, HAProxy, appliance.

Each is a `Service`: a command pinned to one core with `taskset`, started in its own
session (so stopping it also stops anything it spawned), its output captured in a log file
in the run's temporary directory, and a readiness check with a deadline. Configs are
generated here; only 127.0.0.1 is ever bound.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
SMALL_BODY = b"Hello, World!"  # 13 bytes
BODY_16K = bytes(ord("a") + i % 26 for i in range(16 * 1024))
PATH_BODIES = {"/small": SMALL_BODY, "/16k": BODY_16K}

INSTALL_HINT = "apt-get install wrk haproxy nginx-light nghttp2-client nghttp2-server"


class BenchError(RuntimeError):
    """A setup problem the user must fix; the message says how."""


def require_tools(names: list[str]) -> dict[str, str]:
    """Absolute paths of the external tools, or a loud error naming what is missing."""
    sbin = "/usr/sbin:/sbin"
    found = {name: shutil.which(name) or shutil.which(name, path=sbin) for name in names}
    missing = [name for name, path in found.items() if not path]
    if missing:
        raise BenchError(f"missing tool(s): {', '.join(missing)}; install with: {INSTALL_HINT}")
    return {name: path for name, path in found.items() if path}


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One HTTP/1.1 GET to 127.0.0.1:port; (status, body). Raises OSError on failure."""
    url = f"http://{HOST}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Service:
    """One started process, pinned to `core`, logging to `log_path`."""

    name: str
    argv: list[str]
    core: int
    log_path: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            # taskset execs the command, so proc.pid is the service's own pid.
            self.proc = subprocess.Popen(
                ["taskset", "-c", str(self.core), *self.argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.cwd, start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, check: Callable[[], bool], deadline_s: float) -> None:
        """Poll `check()` (True when ready) until the deadline; raise with the log if not."""
        end = time.monotonic() + deadline_s
        last: object = None
        while time.monotonic() < end:
            if not self.alive():
                raise BenchError(self._failure(f"exited with {self.proc and self.proc.returncode}"))
            try:
                if check():
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise BenchError(self._failure(f"not ready after {deadline_s:.0f}s (last: {last})"))

    def _failure(self, what: str) -> str:
        cmd = " ".join(self.argv)
        return f"{self.name} {what}\n  command: {cmd}\n  log ({self.log_path}):\n{self.log_tail()}"

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the service's process group, SIGKILL after `grace_s`; always reaps."""
        proc = self.proc
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # its own session: pgid == pid
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            print(f"warning: {self.name} (pid {proc.pid}) did not exit", file=sys.stderr)
        # Any survivor in the group (a child that outlived its parent) gets SIGKILL too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def h2c_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One HTTP/2 GET with prior knowledge (h2c) to 127.0.0.1:port; (status, body).

    Raises OSError on a connection failure, invalid HTTP/2 or no complete response in time."""
    import h2.connection  # appliance's own dependency, in the same venv

    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "http"),
                          (":authority", f"{HOST}:{port}"), (":path", path)], end_stream=True)
    got: dict[str, Any] = {"status": 0, "body": b"", "ended": False}
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(conn.data_to_send())
        for _ in range(1000):  # frames come in a few reads; bounded all the same
            data = sock.recv(65536)
            if not data:
                break
            _h2c_receive(conn, data, got)
            if got["ended"]:
                return got["status"], got["body"]
            sock.sendall(conn.data_to_send())
    raise OSError(f"h2c GET {path}: the response did not end (status {got['status']})")


def _h2c_receive(conn: Any, data: bytes, got: dict[str, Any]) -> None:
    """Feed `data` to the h2 client connection; record status, body and the stream's end."""
    import h2.events
    import h2.exceptions

    try:
        events = conn.receive_data(data)
    except h2.exceptions.ProtocolError as exc:
        raise OSError(f"invalid HTTP/2 from the server: {exc}") from exc
    for ev in events:
        if isinstance(ev, h2.events.ResponseReceived):
            got["status"] = int(dict(ev.headers)[b":status"])
        elif isinstance(ev, h2.events.DataReceived):
            got["body"] += ev.data
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
            got["ended"] = True


def _serves(port: int, path: str, body: bytes) -> bool:
    status, got = http_get(port, path)
    return status == 200 and got == body


def _serves_h2c(port: int, path: str, body: bytes) -> bool:
    status, got = h2c_get(port, path)
    return status == 200 and got == body


def get(group: str, port: int, path: str) -> tuple[int, bytes]:
    """A GET as the group's load speaks it: h2c for "h2c", HTTP/1.1 otherwise."""
    return h2c_get(port, path) if group == "h2c" else http_get(port, path)


# --- nginx -------------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    sendfile off;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    open_file_cache max=16 inactive=3600s;
    open_file_cache_valid 3600s;
    default_type text/plain;
    client_body_temp_path {tmp}/ngx-body;
    proxy_temp_path {tmp}/ngx-proxy;
    fastcgi_temp_path {tmp}/ngx-fastcgi;
    uwsgi_temp_path {tmp}/ngx-uwsgi;
    scgi_temp_path {tmp}/ngx-scgi;
    server {{
        listen {host}:{port} backlog=4096;
        root {tmp}/www;
        location = /small {{ }}
        location = /16k {{ }}
    }}
}}
"""


def nginx(binary: str, tmp: Path, port: int, core: int) -> Service:
    www = tmp / "www"
    www.mkdir(exist_ok=True)
    for path, body in PATH_BODIES.items():
        (www / path.lstrip("/")).write_bytes(body)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, host=HOST, port=port))
    argv = [binary, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]
    return Service("nginx", argv, core, tmp / "nginx.log", tmp)


def start_nginx(svc: Service, port: int, deadline_s: float = 10.0) -> None:
    svc.start()
    svc.wait_ready(lambda: _serves(port, "/small", SMALL_BODY), deadline_s)


# --- nghttpd (the h2c backend) ----------------------------------------------------------

def nghttpd(binary: str, tmp: Path, port: int, core: int) -> Service:
    """nghttpd, HTTP/2 cleartext only (prior knowledge), one worker thread, serving the
    same files as nginx from its own directory; no per-request logging (no -v)."""
    www = tmp / "www-h2"
    www.mkdir(exist_ok=True)
    for path, body in PATH_BODIES.items():
        (www / path.lstrip("/")).write_bytes(body)
    argv = [binary, "--no-tls", "--address", HOST, "--htdocs", str(www), "--workers", "1",
            str(port)]
    return Service("nghttpd", argv, core, tmp / "nghttpd.log", tmp)


def start_nghttpd(svc: Service, port: int, deadline_s: float = 10.0) -> None:
    svc.start()
    svc.wait_ready(lambda: _serves_h2c(port, "/small", SMALL_BODY), deadline_s)


# --- HAProxy -----------------------------------------------------------------------------

HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn 4000

defaults
    mode {mode}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""

HAPROXY_HTTP = """\
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse always

frontend fe_http
    bind {host}:{port}
    default_backend be_nginx

backend be_nginx
    server nginx {host}:{backend_port}
"""

HAPROXY_TCP = """\

frontend fe_tcp
    bind {host}:{port}
    default_backend be_nginx

backend be_nginx
    server nginx {host}:{backend_port}
"""


# h2c on both sides: HTTP/2 with prior knowledge from the client and to the server,
# streams multiplexed over idle backend connections (`http-reuse always`).
HAPROXY_H2C = """\
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse always

frontend fe_h2c
    bind {host}:{port} proto h2
    default_backend be_nghttpd

backend be_nghttpd
    server nghttpd {host}:{backend_port} proto h2
"""

HAPROXY_BODIES = {"http": HAPROXY_HTTP, "tcp": HAPROXY_TCP, "h2c": HAPROXY_H2C}


def haproxy(binary: str, tmp: Path, mode: str, port: int, backend_port: int, core: int) -> Service:
    """`mode` is the benchmark group: "http", "tcp" or "h2c" (HAProxy mode http)."""
    text = HAPROXY_GLOBAL.format(mode="tcp" if mode == "tcp" else "http") + HAPROXY_BODIES[
        mode].format(host=HOST, port=port, backend_port=backend_port)
    conf = tmp / f"haproxy-{mode}.cfg"
    conf.write_text(text)
    # -db: stay in the foreground, no master process; the pid we hold is the one serving.
    return Service(f"haproxy-{mode}", [binary, "-db", "-f", str(conf)], core,
                   tmp / f"haproxy-{mode}.log", tmp)


def start_proxy(svc: Service, port: int, deadline_s: float = 10.0, h2c: bool = False) -> None:
    """Start a proxy in front of the backend; ready when /small comes back intact through
    it (over h2c if `h2c`)."""
    svc.start()
    serves = _serves_h2c if h2c else _serves
    svc.wait_ready(lambda: serves(port, "/small", SMALL_BODY), deadline_s)


# --- appliance ---------------------------------------------------------------------------

def appliance_argv(binary: str, ports: tuple[int, int, int], backend_port: int,
                   opaque: bool, extra: list[str]) -> list[str]:
    outbound, inbound, admin = ports
    # A .py file (such as bench/fake_appliance.py) runs under this interpreter.
    argv = [sys.executable, binary] if binary.endswith(".py") else [binary]
    argv += [
        "proxy",
        "--outbound-port", str(outbound), "--inbound-port", str(inbound),
        "--admin-port", str(admin), "--log-level", "warning",
        "--set", f"outbound.bind={HOST}", "--set", f"inbound.bind={HOST}",
        "--set", f"admin.bind={HOST}",
        "--set", f"outbound.orig_dst_override={HOST}:{backend_port}",
    ]
    if opaque:
        argv += ["--set", f"detect.opaque_ports={backend_port}"]
    return argv + extra


def appliance(binary: str, tmp: Path, name: str, ports: tuple[int, int, int],
              backend_port: int, opaque: bool, core: int, extra: list[str]) -> Service:
    argv = appliance_argv(binary, ports, backend_port, opaque, extra)
    return Service(name, argv, core, tmp / f"{name}.log", tmp)


def start_appliance(svc: Service, outbound_port: int, admin_port: int,
                    deadline_s: float = 20.0, h2c: bool = False) -> None:
    """Ready when admin /ready says 200 and /small comes back intact through outbound
    (over h2c if `h2c`)."""
    svc.start()
    svc.wait_ready(lambda: http_get(admin_port, "/ready")[0] == 200, deadline_s)
    serves = _serves_h2c if h2c else _serves
    svc.wait_ready(lambda: serves(outbound_port, "/small", SMALL_BODY), deadline_s)
