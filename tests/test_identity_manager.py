"""The proxy's identity manager against a running identity service, over real TLS on
loopback: first certificate, renewal with no gap, refusals, outages, and what it logs."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from identity_fixtures import (
    TOKEN,
    handshake,
    make_dir,
    service,
    settings,
    unused_socket,
    wait_for,
)

from appliance.identity import (
    Contexts,
    IdentityConfigError,
    IdentityManager,
    check_peer_identity,
    tls,
)
from appliance.identity import settings as env
from certs import pki

WEB = "spiffe://example.org/ns/default/sa/web"


def _manager(root: Path, port: int, token_file: Path | None = None,
             **kw: object) -> IdentityManager:
    options: dict[str, object] = {"rng": random.Random(7), "backoff_base": 0.05,
                                  "backoff_cap": 0.4, "timeout": 2.0}
    options.update(kw)
    config = settings(root, port)
    if token_file is not None:
        config = dataclasses.replace(config, token_file=token_file)
    return IdentityManager(config, **options)  # type: ignore[arg-type]


def _run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


def _works(m: IdentityManager, peer: IdentityManager | None = None) -> str:
    """A mesh handshake between the manager's server context and a client context (its
    own or a peer's) succeeds; returns the identity the client saw."""
    client_ctx = (peer or m).client_context
    assert client_ctx is not None and m.server_context is not None
    client, _ = handshake(client_ctx, m.server_context)
    assert m.identity is not None
    return check_peer_identity(client, m.identity)


def test_first_certificate(tmp_path: Path) -> None:
    """At start the proxy is not ready; with a good token it gets a certificate for its
    identity, becomes ready, reports the metrics values, calls back, and its contexts work
    for mesh TLS; its address is then meshed in the service."""
    make_dir(tmp_path)

    async def main() -> None:
        async with service(tmp_path) as svc:
            m = _manager(tmp_path, svc.port)
            seen: list[Contexts] = []
            m.on_update(seen.append)
            assert not m.ready and m.expiration_timestamp_seconds() is None
            assert m.refresh_count == 0 and m.server_context is None
            m.start()
            try:
                assert await m.wait_ready(10)
                assert m.identity == WEB and m.refresh_count == 1
                expiry = m.expiration_timestamp_seconds()
                assert expiry is not None and 3500 < expiry - time.time() <= 3600
                assert [c.credentials.identity for c in seen] == [WEB]
                assert seen[0].server is m.server_context
                assert _works(m) == WEB
                peer = await m.meshed.lookup("127.0.0.1")
                assert peer is not None and peer.identity == WEB
                assert await m.meshed.lookup("198.18.0.99") is None
            finally:
                await m.stop()

    _run(main)


def test_renewal_has_no_gap(tmp_path: Path) -> None:
    """With 3-second certificates, over 6 seconds the proxy renews at least twice and at
    every sample it is ready and a mesh handshake with its current contexts succeeds."""
    make_dir(tmp_path)

    async def main() -> None:
        async with service(tmp_path, leaf_lifetime=timedelta(seconds=3)) as svc:
            m = _manager(tmp_path, svc.port)
            expiries: list[float] = []
            m.on_update(lambda c: expiries.append(c.credentials.not_after))
            m.start()
            try:
                assert await m.wait_ready(10)
                end = time.monotonic() + 6.0
                samples = 0
                while time.monotonic() < end:
                    assert m.ready, f"not ready at {time.time()} (expiries {expiries})"
                    assert _works(m) == WEB
                    samples += 1
                    await asyncio.sleep(0.05)
                assert m.refresh_count >= 3 and samples > 50
                assert expiries == sorted(expiries)
                assert m.failures == 0
            finally:
                await m.stop()

    _run(main)


def test_bad_token_fails_cleanly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A token the service does not know: not ready, retried with backoff, the reason
    logged (401, unknown token) and never the token itself."""
    make_dir(tmp_path)
    (tmp_path / "token").write_text("not-a-known-token-000000\n")

    async def main() -> None:
        async with service(tmp_path) as svc:
            m = _manager(tmp_path, svc.port)
            m.start()
            try:
                await wait_for(lambda: m.failures >= 3, 10, "three failed attempts")
                assert not m.ready and not await m.wait_ready(0.01)
                assert m.last_error is not None and "HTTP 401" in m.last_error
                assert "unknown token" in m.last_error
            finally:
                await m.stop()

    with caplog.at_level(logging.DEBUG):
        _run(main)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "no certificate yet: not ready" in text
    assert "not-a-known-token" not in text


def test_untrusted_service_fails_cleanly(tmp_path: Path) -> None:
    """Trust anchors that did not sign the service's certificate: the TLS handshake fails,
    the proxy says so, stays not ready and keeps retrying."""
    make_dir(tmp_path)
    make_dir(tmp_path / "other")

    async def main() -> None:
        async with service(tmp_path) as svc:
            config = dataclasses.replace(
                settings(tmp_path, svc.port),
                trust_anchors=tmp_path / "other" / "ca" / "trust-anchor.pem")
            m = IdentityManager(config, backoff_base=0.05, backoff_cap=0.2)
            m.start()
            try:
                await wait_for(lambda: m.failures >= 2, 10, "two failed attempts")
                assert not m.ready
                assert m.last_error is not None
                assert "TLS handshake failed" in m.last_error
                assert "certificate verify failed: unable to get local issuer" in m.last_error
            finally:
                await m.stop()

    _run(main)


def test_expired_anchor_is_a_config_error(tmp_path: Path) -> None:
    """An anchors file whose only certificate has expired stops the proxy at start with the
    variable and the expiry named."""
    make_dir(tmp_path, now=time.time() - 3 * 86400, anchor_lifetime=timedelta(days=1))
    with pytest.raises(IdentityConfigError, match="APPLIANCE_TRUST_ANCHORS: .*trust-anchor"
                                                  ".pem holds no CA certificate valid now"):
        _manager(tmp_path, 1)


def test_service_down_at_start(tmp_path: Path) -> None:
    """Nothing listens yet: the proxy retries and is not ready; when the service comes up
    on that address the proxy gets its certificate without a restart."""
    make_dir(tmp_path)

    async def main() -> None:
        sock = unused_socket()
        port = sock.getsockname()[1]
        m = _manager(tmp_path, port)
        m.start()
        try:
            await wait_for(lambda: m.failures >= 3, 10, "three refused connections")
            assert not m.ready and m.last_error is not None
            assert "connect failed" in m.last_error
            async with service(tmp_path, sock=sock):
                assert await m.wait_ready(10)
                assert m.identity == WEB
        finally:
            await m.stop()
            sock.close()

    _run(main)


def test_service_down_during_renewal(tmp_path: Path) -> None:
    """The service goes away after the first certificate: the old certificate keeps serving
    (ready, handshakes work) until it expires, then the proxy is not ready; when the service
    returns, the proxy recovers."""
    make_dir(tmp_path)

    async def main() -> None:
        sock = unused_socket()
        port = sock.getsockname()[1]
        m = _manager(tmp_path, port)
        async with service(tmp_path, sock=sock, leaf_lifetime=timedelta(seconds=3)):
            m.start()
            assert await m.wait_ready(10)
        try:
            held = m.expiration_timestamp_seconds()
            assert held is not None
            server_ctx = m.server_context
            while time.time() < held - 0.2:
                assert m.ready and m.server_context is server_ctx
                assert _works(m) == WEB
                await asyncio.sleep(0.05)
            assert m.failures >= 1, "renewal was attempted while the service was down"
            await wait_for(lambda: not m.ready, 3, "the certificate to expire")
            assert m.refresh_count == 1
            async with service(tmp_path, port=port):
                await wait_for(lambda: m.ready, 10, "recovery after the service returns")
                assert m.refresh_count == 2 and _works(m) == WEB
        finally:
            await m.stop()

    _run(main)


def test_token_file_appears_later(tmp_path: Path) -> None:
    """A missing token file is reported (naming the variable and file) and retried; once
    the file appears the proxy gets its certificate."""
    make_dir(tmp_path)
    token = (tmp_path / "token").read_text()
    (tmp_path / "token").unlink()

    async def main() -> None:
        async with service(tmp_path) as svc:
            m = _manager(tmp_path, svc.port)
            m.start()
            try:
                await wait_for(lambda: m.failures >= 2, 10, "two failed attempts")
                assert m.last_error is not None
                assert m.last_error.startswith(f"{env.TOKEN_FILE}: {tmp_path / 'token'}")
                (tmp_path / "token").write_text(token)
                assert await m.wait_ready(10)
            finally:
                await m.stop()

    _run(main)


def test_two_proxies_mutual_tls(tmp_path: Path) -> None:
    """Two proxies with different tokens get different identities and authenticate each
    other with their contexts."""
    make_dir(tmp_path)
    (tmp_path / "token-api").write_text("tok-api-0123456789abcdef\n")

    async def main() -> None:
        async with service(tmp_path) as svc:
            api = _manager(tmp_path, svc.port, tmp_path / "token-api")
            api.start()
            try:
                assert await api.wait_ready(10)
                web = _manager(tmp_path, svc.port)
                web.start()
                try:
                    assert await web.wait_ready(10)
                    assert api.identity == "spiffe://example.org/ns/prod/sa/api"
                    assert _works(api, peer=web) == api.identity
                    assert _works(web, peer=api) == WEB
                finally:
                    await web.stop()
            finally:
                await api.stop()

    _run(main)


def test_no_key_material_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Through certification, renewal and failures, at DEBUG, no log record holds the
    proxy's private key (PEM, DER or its scalar), any PEM block, or the token."""
    make_dir(tmp_path)
    keys: list[pki.Key] = []

    async def main() -> None:
        async with service(tmp_path, leaf_lifetime=timedelta(seconds=2)) as svc:
            m = _manager(tmp_path, svc.port)
            keys.append(m._key)
            m.start()
            try:
                await wait_for(lambda: m.refresh_count >= 2, 10, "a renewal")
            finally:
                await m.stop()
        bad = _manager(tmp_path, 1)
        bad.start()
        await wait_for(lambda: bad.failures >= 1, 10, "a failure")
        await bad.stop()

    with caplog.at_level(logging.DEBUG):
        _run(main)
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    key = keys[0]
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    scalar = key.private_numbers().private_value
    assert "certified as " + WEB in text  # the logs are there...
    for secret in (base64.b64encode(der).decode()[20:60], der.hex()[40:100],
                   f"{scalar:x}", str(scalar), "PRIVATE KEY", "BEGIN", TOKEN):
        assert secret not in text  # ...and hold none of these


def test_from_environ(tmp_path: Path) -> None:
    """No identity variables: no manager; all three: a manager for that service."""
    make_dir(tmp_path)
    assert IdentityManager.from_environ({}) is None
    m = IdentityManager.from_environ({
        env.ADDR: "127.0.0.1:4444",
        env.TRUST_ANCHORS: str(tmp_path / "ca" / "trust-anchor.pem"),
        env.TOKEN_FILE: str(tmp_path / "token")})
    assert m is not None and (m.settings.host, m.settings.port) == ("127.0.0.1", 4444)
    assert m.client.server_name == "identity.example.org"
    assert tls.MESH_ALPN == "appliance.mesh/1"
