"""Helpers for the mesh TLS tests: a PKI directory, the identity service as a subprocess,
proxies with identity on (each claiming its own loopback address), and a backend that
answers with the request headers it saw."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from support import ROOT, ProxyProcess, free_port, wait_for

from appliance.identity import tls as mesh_tls
from certs import pki, store

DOMAIN = "example.org"
TOKENS = {"web": "tok-web-0123456789abcdef", "api": "tok-api-0123456789abcdef",
          "other": "tok-oth-0123456789abcdef"}
WEB = f"spiffe://{DOMAIN}/ns/default/sa/web"
API = f"spiffe://{DOMAIN}/ns/default/sa/api"
OTHER = f"spiffe://{DOMAIN}/ns/default/sa/other"


def make_pki(root: Path) -> Path:
    """``appliance certs init`` into ``root/ca``, a tokens file and one token file each."""
    store.init(root / "ca", DOMAIN, now=pki.utc(time.time() - 3600))  # leaves may be backdated
    (root / "tokens").write_text("".join(f"{tok} default {sa}\n" for sa, tok in TOKENS.items()))
    for sa, tok in TOKENS.items():
        (root / f"token-{sa}").write_text(tok + "\n")
    return root


class IdentityProcess:
    """``appliance identity`` on 127.0.0.1 (``--addresses csr`` so each proxy may claim its
    own loopback address)."""

    def __init__(self, root: Path, *extra: str, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.args = [sys.executable, "-m", "appliance", "identity", "--dir", str(root / "ca"),
                     "--tokens", str(root / "tokens"), "--listen", f"127.0.0.1:{self.port}",
                     "--addresses", "csr", *extra]
        self.log = root / f"identity-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT)

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for(listening, timeout=20, what="the identity service")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def identity_env(root: Path, port: int, account: str, address: str) -> dict[str, str]:
    return {"APPLIANCE_IDENTITY_ADDR": f"127.0.0.1:{port}",
            "APPLIANCE_TRUST_ANCHORS": str(root / "ca" / store.ANCHOR_CERT),
            "APPLIANCE_IDENTITY_TOKEN_FILE": str(root / f"token-{account}"),
            "APPLIANCE_IDENTITY_ADDRESSES": address}


def mesh_proxy(root: Path, identity_port: int, account: str, address: str,
               *settings: str) -> ProxyProcess:
    """A proxy with identity ``account`` whose inbound listens on ``address`` (a loopback
    address of its own, which its certificate names)."""
    return ProxyProcess(f"inbound.bind={address}", *settings,
                        env=identity_env(root, identity_port, account, address))


class HeaderEcho:
    """An HTTP/1.1 server answering every request with a JSON object of its headers
    (lowercased names, values as lists) and the body length."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                seen: dict[str, list[str]] = {}
                for name, value in self.headers.items():
                    seen.setdefault(name.lower(), []).append(value)
                outer.requests.append(seen)
                data = json.dumps({"headers": seen, "body": len(body)}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.requests: list[dict[str, list[str]]] = []
        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def running(*things: object) -> Iterator[None]:
    """Stop/close everything given (proxies, identity, servers), even when the test fails."""
    try:
        yield
    finally:
        for thing in reversed(things):
            stop = getattr(thing, "stop", None) or getattr(thing, "close", None)
            if stop is not None:
                stop()


class MemPki:
    """A trust anchor and issuer in memory, and mesh SSL contexts for any identity, with
    lifetimes shifted into the past or future (expired, not yet valid)."""

    def __init__(self, domain: str = DOMAIN) -> None:
        now = pki.utc(time.time() - 3600)
        self.anchor_key, self.issuer_key = pki.new_key(), pki.new_key()
        self.anchor = pki.make_anchor(domain, self.anchor_key, now=now)
        self.issuer = pki.make_issuer(self.issuer_key, self.anchor, self.anchor_key, now=now)
        self.anchors = [self.anchor]

    def leaf(self, identity: str | None, *, start: float = -60.0, lifetime: float = 3600.0,
             dns: tuple[str, ...] = ()) -> tuple[list[object], pki.Key]:
        """A chain (leaf, issuer) and key; ``start`` seconds from now, valid ``lifetime``."""
        key = pki.new_key()
        leaf = pki.issue_leaf(key.public_key(), self.issuer, self.issuer_key,
                              now=pki.utc(time.time() + start),
                              lifetime=timedelta(seconds=lifetime), uri=identity, dns=dns)
        return [leaf, self.issuer], key

    def server_context(self, identity: str, **leaf: float) -> ssl.SSLContext:
        chain, key = self.leaf(identity, **leaf)
        return mesh_tls.server_context(chain, key, self.anchors)  # type: ignore[arg-type]

    def client_context(self, identity: str, *, trust: MemPki | None = None,
                       **leaf: float) -> ssl.SSLContext:
        chain, key = self.leaf(identity, **leaf)
        anchors = (trust or self).anchors
        return mesh_tls.client_context(chain, key, anchors)  # type: ignore[arg-type]
