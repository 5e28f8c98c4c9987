"""The proxy with identity on, as a user sets it up: `appliance certs init`, `appliance
identity`, and the three environment variables. /ready waits for the certificate; the
identity metrics appear."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT, ProxyProcess, free_port, http_get, wait_for

TOKEN = "tok-0123456789abcdef0123"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    done = run("certs", "init", "--trust-domain", "example.org", "--dir", str(tmp_path / "ca"))
    assert done.returncode == 0, done.stderr
    (tmp_path / "tokens").write_text(f"{TOKEN} default web\n")
    (tmp_path / "token").write_text(TOKEN + "\n")
    return tmp_path


@pytest.fixture
def identity(pki: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "identity", "--dir",
                             str(pki / "ca"), "--tokens", str(pki / "tokens"), "--listen",
                             f"127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def env(pki: Path, port: int) -> dict[str, str]:
    return {"APPLIANCE_IDENTITY_ADDR": f"127.0.0.1:{port}",
            "APPLIANCE_TRUST_ANCHORS": str(pki / "ca" / "trust-anchor.pem"),
            "APPLIANCE_IDENTITY_TOKEN_FILE": str(pki / "token")}


def test_proxy_gets_a_certificate_and_reports_it(pki: Path, identity: int) -> None:
    """With the three variables set the proxy becomes ready once it holds a certificate,
    and /metrics shows when it expires."""
    p = ProxyProcess(env=env(pki, identity))
    try:
        wait_for(lambda: p.metric("identity_cert_refresh_count") >= 1, timeout=20,
                 what="a certificate")
        expiry = p.metric("identity_cert_expiration_timestamp_seconds")
        assert time.time() + 3600 < expiry < time.time() + 25 * 3600
        assert http_get(f"http://127.0.0.1:{p.admin}/ready")[0] == 200
        assert TOKEN not in p.output()
    finally:
        p.stop()


def test_not_ready_while_the_identity_service_is_down(pki: Path) -> None:
    """No identity service: the proxy runs but /ready says why it is not ready."""
    down = free_port()
    args = [sys.executable, "-m", "appliance", "proxy", "--outbound-port", str(free_port()),
            "--inbound-port", str(free_port()), "--admin-port", str(free_port())]
    admin = int(args[-1])
    proc = subprocess.Popen(args, cwd=ROOT, env={**env(pki, down), "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def answered() -> bool:
            try:
                return http_get(f"http://127.0.0.1:{admin}/ready", timeout=1)[0] == 503
            except OSError:
                return False
        wait_for(answered, timeout=15, what="/ready answering 503")
        status, body = http_get(f"http://127.0.0.1:{admin}/ready")
        assert status == 503 and b"certificate" in body
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


def test_partial_identity_config_is_a_config_error(pki: Path) -> None:
    """Only some of the variables set: exit 2 naming what is missing."""
    done = subprocess.run([sys.executable, "-m", "appliance", "proxy"], cwd=ROOT,
                          env={"APPLIANCE_IDENTITY_ADDR": "127.0.0.1:1", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "APPLIANCE_TRUST_ANCHORS" in done.stderr
