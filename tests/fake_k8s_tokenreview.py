"""A local stand-in for the Kubernetes API server's TokenReview endpoint.

This is NOT Kubernetes (an API server cannot run here). It is a small HTTPS server on
127.0.0.1 that speaks the documented ``authentication.k8s.io/v1`` TokenReview API:
``POST /apis/authentication.k8s.io/v1/tokenreviews`` with a bearer token of the caller
(401 Status if it is not the expected one), a TokenReview body with ``spec.token`` and
optional ``spec.audiences``, and an answer (201) whose ``status`` has ``authenticated``,
``user.username`` (``system:serviceaccount:NS:SA``), ``audiences`` and ``error``.

HTTP/1.1 is spoken through h11 (the server of :mod:`fakeapis`), independent of the client
under test. Tests register tokens, choose the audiences a token is valid for, and can take
the server down.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fakeapis import FakeServer, Reply, Request, json_reply

from certs import pki, sslctx

PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass
class Account:
    namespace: str
    name: str
    audiences: tuple[str, ...] = ("https://kubernetes.default.svc",)


class FakeTokenReview(FakeServer):
    """The TokenReview API with a self-made CA; ``ca_pem`` is what clients trust."""

    def __init__(self, caller_token: str = "identity-service-sa-token",
                 accounts: dict[str, Account] | None = None, port: int = 0) -> None:
        now = datetime.now(UTC)
        ca_key, key = pki.new_key(), pki.new_key()
        ca = pki.make_anchor("kubernetes.test", ca_key, now=now - timedelta(minutes=1))
        cert = pki.issue_leaf(key.public_key(), ca, ca_key, now=now, dns=["localhost"],
                              ips=[ipaddress.ip_address("127.0.0.1")])
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sslctx.load_chain(tls, [cert], key)
        super().__init__(tls)
        self.port = port
        self.ca_pem = pki.cert_pem(ca)
        self.caller_token = caller_token
        self.accounts: dict[str, Account] = {} if accounts is None else accounts
        self.reviews: list[dict[str, Any]] = []

    async def stop(self) -> None:
        await self.go_down()

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

    async def handle(self, request: Request) -> Reply:
        if request.method != "POST" or request.path != PATH:
            return json_reply(404, {"kind": "Status", "code": 404})
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        return json_reply(*self.review(bearer, json.loads(request.body)))
