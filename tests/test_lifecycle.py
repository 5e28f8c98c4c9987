"""The proxy's lifecycle: config reload without dropping connections, graceful shutdown
under load, and POST /shutdown."""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from support import H11Server, ProxyProcess, free_port, recv_until_eof, wait_for


def get(sock: socket.socket, host: str, path: str) -> bytes:
    """One keep-alive request on ``sock``; the response body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    return body


def config_text(port: int) -> str:
    return ("routing:\n  dtab: /svc/web => /#/static/web\n"
            f"namers:\n  - kind: static\n    services:\n      web: ['127.0.0.1:{port}']\n")


def test_reload_swaps_routes_without_dropping_connections(tmp_path: Path) -> None:
    """Editing the config file re-routes new requests, even on a connection opened before;
    a broken edit is rejected and counted, and the running routes stay."""
    a, b = H11Server(), H11Server()
    cfg = tmp_path / "appliance.yaml"
    cfg.write_text(config_text(a.port))
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{free_port()}",
                     env={"APPLIANCE_CONFIG": str(cfg)})
    try:
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
            assert get(s, "web", "/before") == b"GET /before\n"
            cfg.write_text(config_text(b.port))
            wait_for(lambda: p.metric("config_reloads_total", result="ok") == 1, timeout=10,
                     what="the reload")
            assert get(s, "web", "/after") == b"GET /after\n"  # same connection
            assert [r.target for r, _ in b.requests] == [b"/after"]
            cfg.write_text("routing:\n  dtab: '/svc => &'\n")
            wait_for(lambda: p.metric("config_reloads_total", result="error") == 1,
                     timeout=10, what="the rejected reload")
            assert get(s, "web", "/still") == b"GET /still\n"
            assert [r.target for r, _ in b.requests] == [b"/after", b"/still"]
        assert "rejected, keeping the running config" in p.output()
    finally:
        p.stop()
        a.close()
        b.close()


def test_sighup_reloads(tmp_path: Path) -> None:
    """SIGHUP loads the config again (counted), and says which changes need a restart."""
    backend = H11Server()
    cfg = tmp_path / "appliance.yaml"
    cfg.write_text(config_text(backend.port))
    p = ProxyProcess(env={"APPLIANCE_CONFIG": str(cfg)})
    try:
        p.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: p.metric("config_reloads_total", result="ok") == 1, timeout=10,
                 what="the SIGHUP reload")
    finally:
        p.stop()
        backend.close()


def test_sigterm_loses_no_request_under_load(backend: H11Server) -> None:
    """Requests in flight when SIGTERM arrives all get their responses; the proxy then
    refuses new connections and exits 0."""
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{backend.port}")
    results: list[bytes] = []
    errors: list[BaseException] = []
    started = threading.Barrier(9)

    def client() -> None:
        try:
            with socket.create_connection(("127.0.0.1", p.outbound), timeout=20) as s:
                s.sendall(b"GET /slow?0.8 HTTP/1.1\r\nHost: x\r\n\r\n")
                started.wait(10)
                results.append(recv_until_eof(s))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait(10)
    wait_for(lambda: p.metric("request_total", direction="outbound") == 8, timeout=10,
             what="8 requests in flight")
    p.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: _refused(p.outbound), timeout=5, what="listener closed")
    for t in threads:
        t.join(20)
    assert not errors, errors
    assert len(results) == 8
    for r in results:  # complete, and told the connection closes
        assert r.startswith(b"HTTP/1.1 200"), r
        assert b"connection: close" in r.lower() and r.endswith(b"late\n")
    assert p.proc.wait(20) == 0, p.output()


def test_grace_runs_out(backend: H11Server) -> None:
    """A request longer than shutdown_grace is cut when the grace ends; exit is still 0."""
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{backend.port}",
                     "shutdown_grace=0.5s")
    with socket.create_connection(("127.0.0.1", p.outbound), timeout=20) as s:
        s.sendall(b"GET /slow?10 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: p.metric("request_total", direction="outbound") == 1, timeout=10,
                 what="request in flight")
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        try:
            data = recv_until_eof(s)
        except ConnectionResetError:
            data = b""
        assert not data.startswith(b"HTTP/1.1 200")
    assert "grace of 0.5s is over" in p.output()


def test_post_shutdown_from_loopback() -> None:
    """POST /shutdown stops the proxy (exit 0); GET is not allowed."""
    p = ProxyProcess()
    url = f"http://127.0.0.1:{p.admin}/shutdown"
    try:
        urllib.request.urlopen(url, timeout=5)
        raise AssertionError("GET /shutdown was accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 405
    with urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""),
                                timeout=5) as r:
        assert r.status == 200
    assert p.proc.wait(15) == 0


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_await_runs_the_app_then_stops_the_proxy(tmp_path: Path) -> None:
    """appliance await waits for /ready, runs the command, keeps its exit code, and with
    --shutdown stops the proxy when the command ends."""
    import subprocess
    import sys

    p = ProxyProcess()
    marker = tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "await", "--admin", f"127.0.0.1:{p.admin}",
         "--shutdown", "--", sys.executable, "-c",
         f"open({str(marker)!r}, 'w').write('x'); raise SystemExit(3)"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 3, done.stderr
    assert marker.read_text() == "x"
    assert p.proc.wait(15) == 0


def test_await_gives_up_when_no_proxy() -> None:
    """No proxy answering: await exits 1 after its timeout and never runs the command."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "appliance", "await", "--admin", f"127.0.0.1:{free_port()}",
         "--timeout", "0.5", "--", "false-command-never-run"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "not ready" in done.stderr


def test_access_log_lines(tmp_path: Path, backend: H11Server) -> None:
    """access_log=FILE: one JSON line per request with status, method, path, timing and
    the proxy's own errors; nothing is written when it is off (the default)."""
    import json

    log = tmp_path / "access.jsonl"
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{backend.port}",
                     f"access_log={log}")
    try:
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
            assert get(s, "web.example", "/logged?q=1") == b"GET /logged?q=1\n"
            assert get(s, "web.example", "/status?503") == b"status\n"
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 2, timeout=10,
                 what="two access-log lines")
    finally:
        p.stop()
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert first["method"] == "GET" and first["path"] == "/logged?q=1"
    assert first["status"] == 200 and first["authority"] == "web.example"
    assert first["direction"] == "outbound" and first["upstream"] == f"127.0.0.1:{backend.port}"
    assert first["duration_ms"] >= 0 and first["time"].endswith("Z")
    assert second["status"] == 503 and "error" not in second
