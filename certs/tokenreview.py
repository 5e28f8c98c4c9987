"""Authenticate a Kubernetes ServiceAccount token with the TokenReview API.

The identity service POSTs ``authentication.k8s.io/v1`` ``TokenReview`` objects to
``/apis/authentication.k8s.io/v1/tokenreviews`` with its own ServiceAccount token as the
bearer (it needs RBAC ``create`` on ``tokenreviews``; docs/identity.md has the rule). An
authenticated review's ``status.user.username`` is ``system:serviceaccount:NS:SA``; that is
the identity the workload may claim. When audiences are configured, they are sent in
``spec.audiences`` and the answer's ``status.audiences`` must include one of them.

A real API server cannot run in this project's test environment: the tests use a local
stand-in that speaks this API (tests/fake_k8s_tokenreview.py). Two kinds of failure are
kept apart: :class:`Rejected` (the API server said no: the workload gets 401) and
:class:`Unavailable` (we could not ask: the workload gets 503 and retries).
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from certs import http11, spiffe
from certs.tokens import Subject

PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_PREFIX = "system:serviceaccount:"


class Rejected(Exception):
    """The API server did not authenticate the token."""


class Unavailable(Exception):
    """The API server could not be asked (down, TLS, bad answer)."""


@dataclass(frozen=True)
class KubeSettings:
    """Where the API server is and how the identity service authenticates to it."""

    url: str
    token_file: Path
    ca_file: Path | None = None
    audiences: tuple[str, ...] = ()
    timeout: float = 5.0

    @classmethod
    def in_cluster(cls, environ: Mapping[str, str], audiences: Sequence[str] = (),
                   token_file: Path | None = None,
                   ca_file: Path | None = None) -> KubeSettings:
        """The API server as a pod sees it (KUBERNETES_SERVICE_HOST/PORT and the mounted
        ServiceAccount files)."""
        host = environ.get("KUBERNETES_SERVICE_HOST")
        port = environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ValueError("--kube-api in-cluster: KUBERNETES_SERVICE_HOST is not set "
                             "(not running in a pod?)")
        authority = f"[{host}]" if ":" in host else host
        return cls(f"https://{authority}:{port}", token_file or SA_DIR / "token",
                   ca_file or SA_DIR / "ca.crt", tuple(audiences))


def subject_of(username: str) -> Subject:
    """``system:serviceaccount:NS:SA`` -> Subject; Rejected for any other user."""
    if not username.startswith(_PREFIX) or username.count(":") != 3:
        raise Rejected(f"{username!r} is not a ServiceAccount")
    namespace, account = username[len(_PREFIX):].split(":")
    try:
        return Subject(spiffe.check_namespace(namespace), spiffe.check_account(account))
    except spiffe.SpiffeError as exc:
        raise Rejected(str(exc)) from None


def review_body(token: str, audiences: Sequence[str]) -> bytes:
    spec: dict[str, object] = {"token": token}
    if audiences:
        spec["audiences"] = list(audiences)
    return json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                       "spec": spec}).encode()


def interpret(status: int, payload: object, audiences: Sequence[str]) -> Subject:
    """Turn the API server's answer into a subject, or raise Rejected/Unavailable."""
    if status in (401, 403):
        raise Unavailable(f"the API server refused our own credentials (HTTP {status}); "
                          "check the identity service's RBAC for tokenreviews")
    if status not in (200, 201) or not isinstance(payload, dict):
        raise Unavailable(f"unexpected TokenReview answer (HTTP {status})")
    result = payload.get("status")
    if not isinstance(result, dict):
        raise Unavailable("TokenReview answer has no status")
    if result.get("authenticated") is not True:
        raise Rejected(str(result.get("error") or "token not authenticated"))
    user = result.get("user")
    username = user.get("username") if isinstance(user, dict) else None
    if not isinstance(username, str):
        raise Unavailable("authenticated TokenReview without status.user.username")
    if audiences:
        granted = result.get("audiences")
        if not isinstance(granted, list) or not set(granted) & set(audiences):
            raise Rejected(f"token not valid for the audience(s) {', '.join(audiences)}")
    return subject_of(username)


class TokenReviewer:
    """Asks the API server who a token belongs to."""

    def __init__(self, settings: KubeSettings) -> None:
        parts = urlsplit(settings.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--kube-api {settings.url!r}: expected https://HOST[:PORT]")
        self.settings = settings
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._tls = ssl.create_default_context(
                cafile=os.fspath(settings.ca_file) if settings.ca_file else None)

    def _bearer(self) -> str:
        """Re-read each time: projected ServiceAccount tokens are rotated by the kubelet."""
        try:
            return self.settings.token_file.read_text().strip()
        except OSError as exc:
            raise Unavailable(f"{self.settings.token_file}: cannot read our own token "
                              f"({exc.strerror or exc})") from None

    async def review(self, token: str) -> Subject:
        body = review_body(token, self.settings.audiences)
        conn = await self._open()
        try:
            response = await conn.request(
                "POST", PATH, body=body, authority=self._host, timeout=self.settings.timeout,
                headers={"Authorization": f"Bearer {self._bearer()}"})
        except http11.ClientError as exc:
            raise Unavailable(str(exc)) from None
        finally:
            conn.close()
        try:
            payload = response.json()
        except ValueError:
            raise Unavailable(f"TokenReview answer is not JSON (HTTP {response.status})") \
                from None
        return interpret(response.status, payload, self.settings.audiences)

    async def _open(self) -> http11.ClientConnection:
        try:
            return await http11.ClientConnection.open(
                self._host, self._port, ssl=self._tls, server_hostname=self._host,
                timeout=self.settings.timeout)
        except http11.ClientError as exc:
            raise Unavailable(str(exc)) from None
