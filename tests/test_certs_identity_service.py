"""The identity service over real TLS on loopback: certify, meshed lookups, replicas,
issuer rotation, HTTP edge cases, and the ``appliance identity`` command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from identity_fixtures import TOKEN, make_dir, service, wait_for

from appliance.identity import local, tls
from certs import http11, identity_service, pki, store

NAME = "identity.example.org"
WEB = "spiffe://example.org/ns/default/sa/web"


def _client_tls(root: Path) -> ssl.SSLContext:
    return tls.service_context(pki.load_certs((root / "ca" / store.ANCHOR_CERT).read_bytes(),
                                              "anchor"))


async def _call(root: Path, port: int, method: str, path: str,
                body: object = None) -> http11.Response:
    data = None if body is None else json.dumps(body).encode()
    return await http11.call("127.0.0.1", port, method, path, body=data,
                             ssl=_client_tls(root), server_hostname=NAME, timeout=5.0)


def _certify_body(key: pki.Key, token: str = TOKEN, addresses: tuple[str, ...] = (),
                  identity: str | None = None) -> dict[str, str]:
    return {"csr": local.build_csr(key, addresses, identity), "token": token}


def _run(root: Path, scenario: Callable[[identity_service.IdentityService],
                                        Awaitable[None]], **kw: object) -> None:
    async def main() -> None:
        async with service(root, **kw) as svc:  # type: ignore[arg-type]
            await scenario(svc)

    asyncio.run(main())


def test_certify_issues_verifiable_leaf(tmp_path: Path) -> None:
    """A CSR with a good token gets a chain (leaf, issuer) for the token's identity and the
    caller's address, valid for the configured lifetime, that chains to the anchor."""
    make_dir(tmp_path)
    key = pki.new_key()

    async def scenario(svc: identity_service.IdentityService) -> None:
        before = time.time()
        resp = await _call(tmp_path, svc.port, "POST", "/v1/certify", _certify_body(key))
        assert resp.status == 200, resp.body
        answer = resp.json()
        assert answer["identity"] == WEB and answer["addresses"] == ["127.0.0.1"]
        anchors = pki.load_certs((tmp_path / "ca" / store.ANCHOR_CERT).read_bytes(), "a")
        creds = local.parse_answer(answer, key, anchors, time.time())
        assert creds.identity == WEB and len(creds.chain) == 2
        assert before + 29 <= answer["expiry"] <= time.time() + 30

    _run(tmp_path, scenario, leaf_lifetime=timedelta(seconds=30))


def test_refusals_are_logged_without_token(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """A bad token gets 401, a CSR for another identity 403, garbage 400; the log says why
    and never shows the token."""
    make_dir(tmp_path)
    key = pki.new_key()
    bad_token = "guessed-token-0123456789"

    async def scenario(svc: identity_service.IdentityService) -> None:
        resp = await _call(tmp_path, svc.port, "POST", "/v1/certify",
                           _certify_body(key, bad_token))
        assert (resp.status, resp.json()) == (401, {"error": "unknown token"})
        resp = await _call(tmp_path, svc.port, "POST", "/v1/certify", _certify_body(
            key, identity="spiffe://example.org/ns/prod/sa/api"))
        assert resp.status == 403 and "the token is for " + WEB in resp.json()["error"]
        resp = await _call(tmp_path, svc.port, "POST", "/v1/certify", {"csr": "x", "token": 1})
        assert resp.status == 401
        resp = await _call(tmp_path, svc.port, "POST", "/v1/certify",
                           {"csr": "junk", "token": TOKEN})
        assert resp.status == 400 and "not a PEM" in resp.json()["error"]

    with caplog.at_level(logging.INFO):
        _run(tmp_path, scenario)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused a certificate request from 127.0.0.1: unknown token" in text
    assert bad_token not in text and TOKEN not in text


def test_meshed_lookup(tmp_path: Path) -> None:
    """After certifying, the caller's address is meshed with its identity; others are
    null; bad queries are 400 naming the problem."""
    make_dir(tmp_path)

    async def scenario(svc: identity_service.IdentityService) -> None:
        resp = await _call(tmp_path, svc.port, "GET", "/v1/meshed?addr=127.0.0.1")
        assert resp.json() == {"addresses": {"127.0.0.1": None}}
        await _call(tmp_path, svc.port, "POST", "/v1/certify", _certify_body(pki.new_key()))
        resp = await _call(tmp_path, svc.port, "GET",
                           "/v1/meshed?addr=127.0.0.1,198.18.0.9&addr=::ffff:127.0.0.1")
        found = resp.json()["addresses"]
        assert found["127.0.0.1"]["identity"] == WEB
        assert found["198.18.0.9"] is None and len(found) == 2
        for path, fragment in (("/v1/meshed", "give one or more"),
                               ("/v1/meshed?addr=web", "'web' is not an IP address"),
                               ("/v1/meshed?addr=" + ",".join(
                                   f"10.0.{i // 250}.{i % 250}" for i in range(257)),
                                "at most 256")):
            resp = await _call(tmp_path, svc.port, "GET", path)
            assert resp.status == 400 and fragment in resp.json()["error"]

    _run(tmp_path, scenario)


def test_replicas_answer_for_each_other(tmp_path: Path) -> None:
    """Replica B does not know an address certified by A; it asks A (its --peer) and then
    keeps the answer, even after A goes away."""
    make_dir(tmp_path)

    async def main() -> None:
        async with service(tmp_path) as a:
            async with service(tmp_path, peers=(("127.0.0.1", a.port),)) as b:
                await _call(tmp_path, a.port, "POST", "/v1/certify",
                            _certify_body(pki.new_key()))
                local_only = await _call(tmp_path, b.port, "GET",
                                         "/v1/meshed?addr=127.0.0.1&local=1")
                assert local_only.json()["addresses"]["127.0.0.1"] is None
                resp = await _call(tmp_path, b.port, "GET", "/v1/meshed?addr=127.0.0.1")
                assert resp.json()["addresses"]["127.0.0.1"]["identity"] == WEB
                await a.close()
                resp = await _call(tmp_path, b.port, "GET", "/v1/meshed?addr=127.0.0.1")
                assert resp.json()["addresses"]["127.0.0.1"]["identity"] == WEB
                resp = await _call(tmp_path, b.port, "GET", "/v1/meshed?addr=10.9.9.9")
                assert resp.json()["addresses"]["10.9.9.9"] is None

    asyncio.run(main())


async def _server_leaf(root: Path, port: int) -> x509.Certificate:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_tls(root),
                                                   server_hostname=NAME)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der)


def _aki(cert: x509.Certificate) -> bytes | None:
    return cert.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier).value.key_identifier


def test_issuer_rotation_without_restart(tmp_path: Path) -> None:
    """After rotate-issuer, the next leaf and the service's own certificate come from the
    new issuer, with no restart."""
    make_dir(tmp_path)

    async def scenario(svc: identity_service.IdentityService) -> None:
        old = svc.issuer.cert
        assert NAME in pki.dns_names(await _server_leaf(tmp_path, svc.port))
        store.rotate_issuer(tmp_path / "ca", now=pki.utc(time.time()))
        resp = await _call(tmp_path, svc.port, "POST", "/v1/certify",
                           _certify_body(pki.new_key()))
        leaf = pki.load_certs(resp.json()["chain"].encode(), "chain")[0]
        assert svc.issuer.cert != old
        new_ski = x509.SubjectKeyIdentifier.from_public_key(
            svc.issuer.cert.public_key()).digest  # type: ignore[arg-type]
        assert _aki(leaf) == new_ski
        svc.maintain()
        assert _aki(await _server_leaf(tmp_path, svc.port)) == new_ski

    _run(tmp_path, scenario)


async def _raw(root: Path, port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_tls(root),
                                                   server_hostname=NAME)
    writer.write(data)
    await writer.drain()
    out = b""
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            out += chunk
    writer.close()
    return out


def test_http_edges(tmp_path: Path) -> None:
    """Two pipelined keep-alive requests get two answers; unknown paths 404, wrong methods
    405, malformed requests 400 and oversized bodies 413, then the connection closes."""
    make_dir(tmp_path)

    async def scenario(svc: identity_service.IdentityService) -> None:
        two = await _raw(tmp_path, svc.port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert two.count(b"HTTP/1.1 200 OK") == 1 and two.count(b"HTTP/1.1 404") == 1
        assert (await _call(tmp_path, svc.port, "GET", "/v1/certify")).status == 405
        assert (await _call(tmp_path, svc.port, "POST", "/v1/meshed", {})).status == 405
        bad = await _raw(tmp_path, svc.port, b"GARBAGE\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400")
        big = await _raw(tmp_path, svc.port, b"POST /v1/certify HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 70000\r\n\r\n" + b"x" * 70000)
        assert big.startswith(b"HTTP/1.1 413")
        head = await _raw(tmp_path, svc.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)
        assert head.startswith(b"HTTP/1.1 431")

    _run(tmp_path, scenario)


_MAIN = """
import argparse, sys
from certs import cli
p = argparse.ArgumentParser(prog="appliance")
sub = p.add_subparsers()
cli.add_parser(sub)
cli.add_identity_parser(sub)
args = p.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_identity_command(tmp_path: Path) -> None:
    """``appliance identity --dir --tokens --listen`` serves certificates and exits 0 on
    SIGTERM; a missing directory exits 1 with the file named."""
    make_dir(tmp_path)
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    argv = [sys.executable, "-c", _MAIN, "identity", "--dir", str(tmp_path / "ca"),
            "--tokens", str(tmp_path / "tokens"), "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + 20
        while "listening on" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "identity service exited early"
        port = int(line.rsplit(":", 1)[1].split()[0])
        resp = asyncio.run(_call(tmp_path, port, "POST", "/v1/certify",
                                 _certify_body(pki.new_key())))
        assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.run([*argv[:5], str(tmp_path / "missing"), *argv[6:]],
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 1 and "missing/trust-anchor.pem: cannot read" in done.stderr


def test_wait_for_reports_deadline() -> None:
    """The polling helper fails with the awaited condition named."""
    with pytest.raises(AssertionError, match="timed out after 0.05s waiting for never"):
        asyncio.run(wait_for(lambda: False, 0.05, "never"))


def test_handler_bug_answers_500(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failing handler answers 500, is logged with its traceback, and the service keeps
    serving."""
    make_dir(tmp_path)

    async def scenario(svc: identity_service.IdentityService) -> None:
        async def broken(query: dict[str, list[str]]) -> tuple[int, dict[str, object]]:
            raise RuntimeError("boom")

        svc.meshed = broken  # type: ignore[method-assign]
        resp = await _call(tmp_path, svc.port, "GET", "/v1/meshed?addr=10.0.0.1")
        assert resp.status == 500 and "internal error" in resp.json()["error"]
        assert (await _call(tmp_path, svc.port, "GET", "/ready")).status == 200

    with caplog.at_level(logging.ERROR):
        _run(tmp_path, scenario)
    assert any("GET /v1/meshed failed" in r.getMessage() and r.exc_info
               for r in caplog.records)
