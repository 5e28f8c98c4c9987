"""Certificates for DNS names, for inbound ports that terminate TLS from outside the mesh.

Theory of operation. One :class:`DnsCertificate` per set of names: a key made in memory
(never written), a CSR naming only those DNS names, sent to the identity service's
``POST /v1/certify-dns`` with the workload's token. The answer must hold our key, name every
name we asked for, and chain to our trust anchors. It is loaded into one server SSLContext
per ALPN list asked for (TLS 1.2+); each stays the same object across renewals, so new
handshakes get the new certificate. Renewal and retries follow the workload certificate
(manager.py): at 70% of the lifetime, jittered backoff on failure, never waiting past half
the time left. The service grants names only per ``--allow-dns`` (certs/dnsnames.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from appliance.identity import local
from appliance.identity.client import IdentityServiceError
from appliance.resilience.backoff import JitteredBackoff
from certs import pki, sslctx

if TYPE_CHECKING:
    from appliance.identity.manager import IdentityManager

log = logging.getLogger("appliance.identity")

def build_csr(key: pki.Key, names: Sequence[str]) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def parse_answer(payload: object, key: pki.Key, names: Sequence[str],
                 anchors: Sequence[x509.Certificate], now: float) -> local.Credentials:
    """Check a ``/v1/certify-dns`` answer: our key, every name, a chain to an anchor."""
    if not isinstance(payload, dict) or not isinstance(payload.get("chain"), str):
        raise local.AnswerError("the answer has no certificate chain")
    try:
        chain = pki.load_certs(payload["chain"].encode("ascii"), "the answer's chain")
        leaf = chain[0]
        if leaf.public_key() != key.public_key():
            raise local.AnswerError("the certificate is not for our key")
        missing = set(names) - set(pki.dns_names(leaf))
        if missing:
            raise local.AnswerError(f"the certificate lacks {', '.join(sorted(missing))}")
        pki.check_chain(chain, anchors, pki.utc(now))
    except (pki.PkiError, UnicodeEncodeError) as exc:
        raise local.AnswerError(str(exc)) from None
    return local.Credentials("dns:" + ",".join(names), tuple(chain), key, now,
                             leaf.not_valid_after_utc.timestamp(), ())


class DnsCertificate:
    """A renewed certificate for ``names``; no context until the first arrives."""

    def __init__(self, manager: IdentityManager, names: Sequence[str], *,
                 clock: Callable[[], float], rng: random.Random,
                 backoff_base: float = 1.0, backoff_cap: float = 60.0) -> None:
        self.manager = manager
        self.names = tuple(names)
        self._clock = clock
        self._key = pki.new_key()
        self._backoff = JitteredBackoff(backoff_base, backoff_cap, rng)
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self.credentials: local.Credentials | None = None
        self.last_error: str | None = None
        self.refresh_count = 0
        self._held = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"dns-certificate {','.join(self.names)}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def wait(self) -> None:
        await self._held.wait()

    async def refresh_once(self) -> local.Credentials:
        token = self.manager.read_token()
        csr = build_csr(self._key, self.names)
        payload = await self.manager.client.certify(lambda _addr: csr, token,
                                                    "/v1/certify-dns")
        creds = parse_answer(payload, self._key, self.names, self.manager.anchors,
                             self._clock())
        self._install(creds)
        return creds

    def context(self, alpn: tuple[str, ...]) -> ssl.SSLContext | None:
        """A server context offering ``alpn``, None until the first certificate."""
        creds = self.credentials
        if creds is None:
            return None
        ctx = self._contexts.get(alpn)
        if ctx is None:
            ctx = self._contexts[alpn] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(list(alpn))
            sslctx.load_chain(ctx, creds.chain, creds.key)
        return ctx

    def _install(self, creds: local.Credentials) -> None:
        for ctx in self._contexts.values():
            sslctx.load_chain(ctx, creds.chain, creds.key)
        self.credentials = creds
        self.refresh_count += 1
        self.last_error = None
        self._held.set()
        log.info("identity: certificate for %s until %s", ",".join(self.names),
                 pki.utc(creds.not_after).isoformat())

    async def _run(self) -> None:
        from appliance.identity.manager import TokenError

        while True:
            try:
                creds = await self.refresh_once()
            except (IdentityServiceError, local.AnswerError, TokenError) as exc:
                self.last_error = str(exc)
                delay = local.retry_delay(self._backoff.next(), self._backoff.base,
                                          self._clock(), self.credentials)
                log.warning("identity: certificate for %s: %s; retrying in %.1fs",
                            ",".join(self.names), exc, delay)
                await asyncio.sleep(delay)
                continue
            self._backoff.reset()
            await asyncio.sleep(local.renewal_delay(creds, self._clock()))
