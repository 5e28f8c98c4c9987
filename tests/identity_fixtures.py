"""Helpers for the identity tests: certificate directories, a running identity service,
in-memory TLS handshakes, and waiting on a condition with a deadline."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

from appliance.identity.settings import IdentitySettings
from certs import identity_service, pki, signing, store, tokenreview
from certs.auth import Authenticator
from certs.tokens import TokenFile

DOMAIN = "example.org"
TOKEN = "tok-web-0123456789abcdef"
TOKENS = f"# test tokens\n{TOKEN} default web\ntok-api-0123456789abcdef prod api\n"


def make_dir(root: Path, domain: str = DOMAIN, *, now: float | None = None,
             anchor_lifetime: timedelta = pki.ANCHOR_LIFETIME) -> Path:
    """A certificate directory as ``appliance certs init`` writes it, plus tokens files."""
    directory = root / "ca"
    store.init(directory, domain, now=pki.utc(time.time() if now is None else now),
               anchor_lifetime=anchor_lifetime)
    (root / "tokens").write_text(TOKENS)
    (root / "token").write_text(TOKEN + "\n")
    return directory


def settings(root: Path, port: int) -> IdentitySettings:
    return IdentitySettings(host="127.0.0.1", port=port,
                            trust_anchors=root / "ca" / store.ANCHOR_CERT,
                            token_file=root / "token")


def unused_socket() -> socket.socket:
    """A bound socket that does not listen yet: connections to it are refused until a
    server is started on it (no race for the port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def service(root: Path, *, leaf_lifetime: timedelta = timedelta(hours=1),
                  peers: tuple[tuple[str, int], ...] = (),
                  policy: signing.AddressPolicy = "peer",
                  reviewer: tokenreview.TokenReviewer | None = None,
                  tokens: bool = True, sock: socket.socket | None = None,
                  port: int = 0) -> AsyncIterator[identity_service.IdentityService]:
    """A running identity service on 127.0.0.1 for the directory under ``root``."""
    options = identity_service.ServiceOptions(
        directory=root / "ca", leaf_lifetime=leaf_lifetime, clock_skew=timedelta(0),
        peers=peers, address_policy=policy)
    auth = Authenticator(TokenFile(root / "tokens") if tokens else None, reviewer)
    svc = identity_service.IdentityService(options, auth)
    if sock is not None:
        await svc.start_on(sock)
    else:
        await svc.start("127.0.0.1", port)
    try:
        yield svc
    finally:
        await svc.close()


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
                   interval: float = 0.02) -> None:
    """Poll ``predicate`` until it holds; fail the test naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext,
              server_hostname: str | None = None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A complete TLS handshake in memory (no sockets), then one byte each way so that a
    late alert (e.g. a rejected client certificate in TLS 1.3) surfaces as SSLError."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False,
                                 server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            _pump(c_out, s_in, s_out, c_in)
        if all(done.values()):
            break
    assert all(done.values()), "handshake did not finish"
    client.write(b"x")
    _pump(c_out, s_in, s_out, c_in)
    assert server.read(1) == b"x"
    server.write(b"y")
    _pump(c_out, s_in, s_out, c_in)
    assert client.read(1) == b"y"
    return client, server


def _pump(c_out: ssl.MemoryBIO, s_in: ssl.MemoryBIO, s_out: ssl.MemoryBIO,
          c_in: ssl.MemoryBIO) -> None:
    if c_out.pending:
        s_in.write(c_out.read())
    if s_out.pending:
        c_in.write(s_out.read())
