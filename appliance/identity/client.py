"""Talking to the identity service: ``POST /v1/certify`` and ``GET /v1/meshed``.

One request per TLS connection (requests are rare: one per renewal, one per uncached
meshed lookup). The service's certificate must chain to our trust anchors and name
``identity.<trust domain>``. Every failure is an :class:`IdentityServiceError` whose message
names the service and the reason (refused token, TLS verification, timeout...) and never
contains the token or any key.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from certs import http11
from certs.meshed import Record

CsrMaker = Callable[[str], str]
"""Local address of the connection -> PEM CSR."""


class IdentityServiceError(Exception):
    """A request to the identity service failed; ``status`` is its HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class MeshedPeer:
    """A meshed address: the identity to expect there, until ``expiry``."""

    address: str
    identity: str
    expiry: float


def _error_text(response: http11.Response) -> str:
    try:
        payload = response.json()
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            return payload["error"]
    except ValueError:
        pass
    return "(no error message)"


class IdentityClient:
    """A client of one identity service address."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext, server_name: str, *,
                 timeout: float = 10.0) -> None:
        self.host, self.port = host, port
        self.tls = tls
        self.server_name = server_name
        self.timeout = timeout
        self.where = f"identity service {host}:{port}"

    async def _open(self) -> http11.ClientConnection:
        try:
            return await http11.ClientConnection.open(
                self.host, self.port, ssl=self.tls, server_hostname=self.server_name,
                timeout=self.timeout)
        except http11.ClientError as exc:
            raise IdentityServiceError(f"identity service {exc}") from None

    async def certify(self, csr_for: CsrMaker, token: str,
                      path: str = "/v1/certify") -> dict[str, object]:
        """Send a CSR (made by ``csr_for(local_address)``) with ``token``; return the JSON
        answer of a 200, or raise IdentityServiceError. ``path`` is ``/v1/certify`` or
        ``/v1/certify-dns``."""
        conn = await self._open()
        try:
            body = json.dumps({"csr": csr_for(conn.local_address), "token": token}).encode()
            response = await self._request(conn, "POST", path, body)
        finally:
            conn.close()
        return self._json(response, "certify" if path == "/v1/certify" else "DNS certify")

    async def meshed(self, addresses: Sequence[str]) -> dict[str, MeshedPeer | None]:
        """Which of ``addresses`` are meshed, and with which identity."""
        path = "/v1/meshed?addr=" + quote(",".join(addresses), safe=",:")
        conn = await self._open()
        try:
            response = await self._request(conn, "GET", path, None)
        finally:
            conn.close()
        found = self._json(response, "meshed lookup").get("addresses")
        if not isinstance(found, dict):
            raise IdentityServiceError(f"{self.where}: meshed lookup answer has no addresses")
        result: dict[str, MeshedPeer | None] = {}
        for addr, value in found.items():
            record = Record.from_json(value)
            result[str(addr)] = (MeshedPeer(str(addr), record.identity, record.expiry)
                                 if record else None)
        return result

    async def _request(self, conn: http11.ClientConnection, method: str, path: str,
                       body: bytes | None) -> http11.Response:
        try:
            return await conn.request(method, path, body=body, authority=self.server_name,
                                      timeout=self.timeout)
        except http11.ClientError as exc:
            raise IdentityServiceError(f"identity service {exc}") from None

    def _json(self, response: http11.Response, what: str) -> dict[str, object]:
        if response.status != 200:
            raise IdentityServiceError(
                f"{self.where}: {what} refused (HTTP {response.status}): "
                f"{_error_text(response)}", response.status)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise IdentityServiceError(f"{self.where}: {what} answer is not a JSON object")
        return payload
