"""The proxy's identity: get a certificate at start, keep it fresh, hand out SSL contexts.

Theory of operation. One task runs the loop: read the token file, connect to the identity
service (verifying it against the trust anchors), send a CSR for the in-memory key, check
the answer (local.parse_answer), and install it: new server and client SSL contexts are
built for it, ``refresh_count`` goes up, and every ``on_update`` callback is called with the
new credentials. Then it sleeps until 70% of the certificate's life has passed and renews.

A failed attempt (service down, token refused, TLS not verifiable, bad answer) is logged
with its reason and retried after a jittered exponential backoff (``backoff_base`` doubling
up to ``backoff_cap``), never waiting more than half the time the current certificate has
left. Meanwhile the current certificate and its contexts stay in force, so connections keep
working until it expires; ``ready`` is true only while a certificate is held and unexpired.

The key and the token are never logged; error messages name files and reasons only.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.identity import local, settings, tls
from appliance.identity.client import IdentityClient, IdentityServiceError
from appliance.identity.dns import DnsCertificate
from appliance.identity.meshed import MeshedLookup
from appliance.identity.settings import IdentityConfigError, IdentitySettings
from appliance.resilience.backoff import JitteredBackoff
from certs import pki

log = logging.getLogger("appliance.identity")

UpdateCallback = Callable[["Contexts"], None]


class TokenError(Exception):
    """The token file cannot be read or is empty."""


@dataclass(frozen=True, slots=True)
class Contexts:
    """What a new certificate brings: the credentials and the two mesh SSL contexts."""

    credentials: local.Credentials
    server: ssl.SSLContext
    client: ssl.SSLContext


class IdentityManager:
    """Holds the proxy's certificate and renews it."""

    def __init__(self, config: IdentitySettings, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, backoff_base: float = 1.0,
                 backoff_cap: float = 60.0, timeout: float = 10.0,
                 identity: str | None = None) -> None:
        self.settings = config
        self._clock = clock
        self.anchors = local.read_anchors(config.trust_anchors, pki.utc(clock()))
        self._key = pki.new_key()
        self._identity_hint = identity
        name = config.server_name or local.service_name(self.anchors, config.host)
        self.client = IdentityClient(config.host, config.port,
                                     tls.service_context(self.anchors), name, timeout=timeout)
        self.meshed = MeshedLookup(self.client.meshed, clock=clock)
        self._rng = rng or random.Random()
        self._backoff = JitteredBackoff(backoff_base, backoff_cap, self._rng)
        self._backoff_args = (backoff_base, backoff_cap)
        self._dns: dict[tuple[str, ...], DnsCertificate] = {}
        self._current: Contexts | None = None
        self._callbacks: list[UpdateCallback] = []
        self._held = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.refresh_count = 0
        self.failures = 0
        self.last_error: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **kwargs: Any) -> IdentityManager | None:
        """None when the identity variables are not set; IdentityConfigError when they are
        wrong (missing, unreadable anchors, no valid anchor)."""
        config = settings.from_environ(environ)
        return None if config is None else cls(config, **kwargs)

    # -- what the proxy reads ----------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while a certificate is held and has not expired."""
        current = self._current
        return current is not None and self._clock() < current.credentials.not_after

    @property
    def credentials(self) -> local.Credentials | None:
        return self._current.credentials if self._current else None

    @property
    def identity(self) -> str | None:
        return self._current.credentials.identity if self._current else None

    @property
    def server_context(self) -> ssl.SSLContext | None:
        return self._current.server if self._current else None

    @property
    def client_context(self) -> ssl.SSLContext | None:
        return self._current.client if self._current else None

    def expiration_timestamp_seconds(self) -> float | None:
        """``identity_cert_expiration_timestamp_seconds``: when the held certificate expires."""
        return self._current.credentials.not_after if self._current else None

    def on_update(self, callback: UpdateCallback) -> Callable[[], None]:
        """Call ``callback(contexts)`` for every new certificate; returns an unsubscribe."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first certificate."""
        try:
            async with asyncio.timeout(timeout):
                await self._held.wait()
        except TimeoutError:
            return False
        return self.ready

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the certify-and-renew loop in the running event loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="identity")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for cert in list(self._dns.values()):
            await cert.stop()
        await self.meshed.close()

    async def _run(self) -> None:
        while True:
            try:
                creds = await self.refresh_once()
            except (IdentityServiceError, local.AnswerError, TokenError) as exc:
                await self._after_failure(str(exc))
                continue
            except Exception as exc:  # a bug must not end renewals: report and retry
                log.exception("identity: unexpected error")
                await self._after_failure(f"unexpected error: {type(exc).__name__}")
                continue
            self._backoff.reset()
            await asyncio.sleep(local.renewal_delay(creds, self._clock()))

    async def _after_failure(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        held = self.credentials
        delay = local.retry_delay(self._backoff.next(), self._backoff.base, self._clock(), held)
        if held is not None and self.ready:
            state = f"still serving the current certificate until {_iso(held.not_after)}"
        else:
            state = "no certificate yet: not ready" if held is None else \
                "the certificate expired: not ready"
        log.warning("identity: %s; retrying in %.1fs (%s)", reason, delay, state)
        await asyncio.sleep(delay)

    # -- one attempt -------------------------------------------------------------------

    def dns_certificate(self, names: tuple[str, ...]) -> DnsCertificate:
        """The certificate for DNS ``names`` (TLS termination), started on first use; its
        ``context`` is None until the identity service issued it."""
        cert = self._dns.get(names)
        if cert is None:
            base, cap = self._backoff_args
            cert = self._dns[names] = DnsCertificate(self, names, clock=self._clock,
                                                     rng=self._rng, backoff_base=base,
                                                     backoff_cap=cap)
            cert.start()
        return cert

    def read_token(self) -> str:
        """The token, read from its file now (a rotated token is picked up)."""
        return self._read_token()

    def _read_token(self) -> str:
        path = self.settings.token_file
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"{settings.TOKEN_FILE}: {path}: cannot read "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
        if not token:
            raise TokenError(f"{settings.TOKEN_FILE}: {path} is empty")
        return token

    def _csr_for(self, local_address: str) -> str:
        addresses = self.settings.addresses
        return local.build_csr(self._key, [local_address] if addresses is None else addresses,
                               self._identity_hint)

    async def refresh_once(self) -> local.Credentials:
        """One certify round trip; installs and returns the new credentials or raises."""
        token = self._read_token()
        payload = await self.client.certify(self._csr_for, token)
        creds = local.parse_answer(payload, self._key, self.anchors, self._clock())
        self._install(creds)
        return creds

    def _install(self, creds: local.Credentials) -> None:
        before = self.identity
        contexts = Contexts(creds, tls.server_context(creds.chain, creds.key, self.anchors),
                            tls.client_context(creds.chain, creds.key, self.anchors))
        self._current = contexts
        self.refresh_count += 1
        self.last_error = None
        self._held.set()
        if before is not None and before != creds.identity:
            log.warning("identity: changed from %s to %s", before, creds.identity)
        log.info("identity: certified as %s for %s until %s (renewal in %.0fs)",
                 creds.identity, ",".join(creds.addresses), _iso(creds.not_after),
                 local.renewal_delay(creds, self._clock()))
        for callback in list(self._callbacks):
            try:
                callback(contexts)
            except Exception:
                log.exception("identity: an update callback failed")


def _iso(timestamp: float) -> str:
    return pki.utc(timestamp).isoformat()


__all__ = ["Contexts", "IdentityConfigError", "IdentityManager", "TokenError"]
