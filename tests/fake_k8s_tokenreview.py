"""A local stand-in for the Kubernetes API server's TokenReview endpoint.

This is NOT Kubernetes (an API server cannot run here). It is a small HTTPS server on
127.0.0.1 that speaks the documented ``authentication.k8s.io/v1`` TokenReview API:
``POST /apis/authentication.k8s.io/v1/tokenreviews`` with a bearer token of the caller
(401 Status if it is not the expected one), a TokenReview body with ``spec.token`` and
optional ``spec.audiences``, and an answer (201) whose ``status`` has ``authenticated``,
``user.username`` (``system:serviceaccount:NS:SA``), ``audiences`` and ``error``.

HTTP/1.1 is spoken through h11, independent of the client under test. Tests register
tokens, choose the audiences a token is valid for, and can take the server down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import h11

from certs import pki, sslctx

PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass
class Account:
    namespace: str
    name: str
    audiences: tuple[str, ...] = ("https://kubernetes.default.svc",)


@dataclass
class FakeTokenReview:
    """The TokenReview API with a self-made CA; ``ca_pem`` is what clients trust."""

    caller_token: str = "identity-service-sa-token"
    accounts: dict[str, Account] = field(default_factory=dict)
    reviews: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        now = datetime.now(UTC)
        ca_key, key = pki.new_key(), pki.new_key()
        ca = pki.make_anchor("kubernetes.test", ca_key, now=now - timedelta(minutes=1))
        cert = pki.issue_leaf(key.public_key(), ca, ca_key, now=now, dns=["localhost"],
                              ips=[ipaddress.ip_address("127.0.0.1")])
        self.ca_pem = pki.cert_pem(ca)
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sslctx.load_chain(self._tls, [cert], key)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def review(self, bearer: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The API server's decision, as (HTTP status, object)."""
        if bearer != self.caller_token:
            return 401, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
        self.reviews.append(body)
        spec = body.get("spec", {})
        wanted = spec.get("audiences") or ["https://kubernetes.default.svc"]
        account = self.accounts.get(spec.get("token", ""))
        status: dict[str, Any] = {"authenticated": False}
        if account is None:
            status["error"] = "[invalid bearer token, token lookup failed]"
        elif not set(wanted) & set(account.audiences):
            status["error"] = "[invalid bearer token, token audiences are invalid]"
        else:
            status = {"authenticated": True, "audiences": sorted(set(wanted)
                                                                   & set(account.audiences)),
                      "user": {"username": f"system:serviceaccount:{account.namespace}:"
                                           f"{account.name}",
                               "uid": "0000", "groups": ["system:serviceaccounts"]}}
        return 201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                     "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        head: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if head is None:
                return
            headers = {k.decode().lower(): v.decode() for k, v in head.headers}
            bearer = headers.get("authorization", "").removeprefix("Bearer ")
            if head.method != b"POST" or head.target != PATH.encode():
                status, obj = 404, {"kind": "Status", "code": 404}
            else:
                status, obj = self.review(bearer, json.loads(body))
            data = json.dumps(obj).encode()
            writer.write(conn.send(h11.Response(status_code=status, headers=[
                ("content-type", "application/json"), ("content-length", str(len(data)))])))
            writer.write(conn.send(h11.Data(data=data)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        except (h11.ProtocolError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
