"""The identity service: signs workload CSRs over TLS and knows which addresses are meshed.

Theory of operation. One asyncio server speaks HTTP/1.1 over TLS (protocol in
docs/identity.md):

* ``POST /v1/certify`` ``{"csr": PEM, "token": str}`` -> ``{"identity", "chain", "expiry",
  "addresses"}``. The token is looked up in the tokens file, else (if configured) checked
  with a Kubernetes TokenReview; signing.py decides what may be signed.
* ``POST /v1/certify-dns`` (same body) -> ``{"names", "chain", "expiry"}``: a server-only
  certificate for the CSR's DNS names, for proxies that terminate TLS, where an
  ``--allow-dns`` grant allows it (dnsnames.py). Not recorded as meshed.
* ``GET /v1/meshed?addr=IP[,IP...]`` -> ``{"addresses": {IP: {"identity", "expiry"} |
  null}}``. Unauthenticated: the answer is public knowledge inside the mesh.
* ``GET /ready`` and ``GET /live`` for probes.

Its own TLS certificate is a leaf from the issuer naming ``identity.<trust-domain>`` (which
proxies verify, whatever address they dial) plus any ``--server-name``. A maintenance task
re-reads the issuer files when they change (``appliance certs rotate-issuer`` needs no
restart) and re-issues the service's own certificate after a rotation or at 70% of its life;
it is loaded into the same SSLContext, so new handshakes get it.

Replicas: the meshed registry is in memory. A replica that does not know an address asks
its ``--peer`` replicas (``local=1``, so they do not ask further) and keeps what they say;
a replica that restarted relearns addresses as workloads renew. Nothing else is shared, so
any number of replicas can sign behind one address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from cryptography import x509

from certs import dnsnames, http11, meshed, pki, signing, spiffe, sslctx, store
from certs.auth import Authenticator, AuthError
from certs.tokens import Subject

log = logging.getLogger("appliance.identity.service")

OWN_LIFETIME = timedelta(hours=24)
MAINTENANCE_INTERVAL = 5.0
MAX_LOOKUP = 256


@dataclass(frozen=True, kw_only=True)
class ServiceOptions:
    """How the service signs and serves; every field has a CLI flag (see cli.py)."""

    directory: Path
    leaf_lifetime: timedelta = pki.LEAF_LIFETIME
    clock_skew: timedelta = timedelta(seconds=20)
    server_names: tuple[str, ...] = ()
    address_policy: signing.AddressPolicy = "peer"
    peers: tuple[tuple[str, int], ...] = ()
    dns_grants: tuple[dnsnames.DnsGrant, ...] = ()
    peer_timeout: float = 2.0
    idle_timeout: float = 60.0
    request_timeout: float = 10.0


class IdentityService:
    """One replica of the identity service."""

    def __init__(self, options: ServiceOptions, auth: Authenticator, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self.auth = auth
        self.clock = clock
        self.registry = meshed.Registry(clock)
        self.issuer = store.load_issuer(options.directory, now=pki.utc(clock()))
        self._issuer_stamp = self._stamp()
        self._own_renew_at = 0.0
        self._own_issuer = self.issuer.cert
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self.tls.set_alpn_protocols(["http/1.1"])
        self._peer_tls = self._client_context()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._issue_own()

    @property
    def trust_domain(self) -> str:
        return self.issuer.trust_domain

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0: any); return the bound port."""
        self._server = await asyncio.start_server(self._serve, host, port, ssl=self.tls)
        self._maintenance = asyncio.create_task(self._maintain())
        return self.port

    async def start_on(self, sock: socket.socket) -> int:
        """Listen on an already bound socket (systemd-style activation, tests)."""
        self._server = await asyncio.start_server(self._serve, sock=sock, ssl=self.tls)
        self._maintenance = asyncio.create_task(self._maintain())
        return self.port

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    # -- issuer and own certificate -------------------------------------------------

    def _stamp(self) -> tuple[int, ...]:
        stamps: list[int] = []
        for name in (store.ANCHOR_CERT, store.ISSUER_CERT, store.ISSUER_KEY):
            try:
                st = os.stat(self.options.directory / name)
                stamps += [st.st_mtime_ns, st.st_size, st.st_ino]
            except OSError:
                stamps += [0, 0, 0]
        return tuple(stamps)

    def reload_issuer(self) -> bool:
        """Re-read the issuer if its files changed; True if a new one is in force."""
        stamp = self._stamp()
        if stamp == self._issuer_stamp:
            return False
        self._issuer_stamp = stamp
        try:
            issuer = store.load_issuer(self.options.directory, now=pki.utc(self.clock()))
        except (store.StoreError, pki.PkiError) as exc:
            log.error("issuer not reloaded, keeping the previous one: %s", exc)
            return False
        self.issuer = issuer
        self._peer_tls = self._client_context()
        log.info("issuer reloaded: %s, expires %s", pki.describe(issuer.cert),
                 issuer.cert.not_valid_after_utc.isoformat())
        return True

    def _issue_own(self) -> None:
        key = pki.new_key()
        now = self.clock()
        names = [spiffe.service_name(self.trust_domain)]
        ips: list[pki.IPAddress] = []
        for name in self.options.server_names:
            try:
                ips.append(ipaddress.ip_address(name))
            except ValueError:
                names.append(name)
        leaf = pki.issue_leaf(key.public_key(), self.issuer.cert, self.issuer.key,
                              now=pki.utc(now), lifetime=OWN_LIFETIME,
                              backdate=self.options.clock_skew, dns=names, ips=ips)
        sslctx.load_chain(self.tls, [leaf, self.issuer.cert], key)
        expiry = leaf.not_valid_after_utc.timestamp()
        self._own_renew_at = now + 0.7 * (expiry - now)
        self._own_issuer = self.issuer.cert

    def _client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=sslctx.anchors_pem(self.issuer.anchors))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            try:
                self.maintain()
            except Exception:  # keep serving with what we have; say why
                log.exception("identity service maintenance failed")

    def maintain(self) -> None:
        """Reload the issuer if it changed; renew our own certificate when due."""
        self.reload_issuer()
        if self._own_issuer != self.issuer.cert or self.clock() >= self._own_renew_at:
            self._issue_own()
        self.registry.purge()

    # -- HTTP ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        peer = str(writer.get_extra_info("peername")[0])
        requests = http11.RequestReader(reader, max_body=signing.MAX_BODY)
        try:
            while True:
                req = await requests.next(self.options.idle_timeout,
                                          self.options.request_timeout)
                if req is None:
                    break
                try:
                    status, payload = await self.route(req, peer)
                except Exception:  # a bug answers 500 and is reported; the service lives on
                    log.exception("identity service: %s %s failed", req.method, req.path)
                    status, payload = 500, {"error": "internal error (see the service log)"}
                writer.write(http11.json_response(status, payload, keep_alive=req.keep_alive))
                await writer.drain()
                if not req.keep_alive:
                    break
        except http11.BadRequest as exc:
            writer.write(http11.json_response(exc.status, {"error": str(exc)},
                                              keep_alive=False))
        except (OSError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def route(self, req: http11.Request, peer: str) -> tuple[int, dict[str, object]]:
        """Dispatch one request; answer (status, JSON object)."""
        if req.path == "/v1/certify":
            if req.method != "POST":
                return 405, {"error": "use POST for /v1/certify"}
            return await self.certify(req.body, peer)
        if req.path == "/v1/certify-dns":
            if req.method != "POST":
                return 405, {"error": "use POST for /v1/certify-dns"}
            return await self.certify_dns(req.body, peer)
        if req.path == "/v1/meshed":
            if req.method != "GET":
                return 405, {"error": "use GET for /v1/meshed"}
            return await self.meshed(req.query)
        if req.path in ("/ready", "/live"):
            return 200, {"status": "ok"}
        return 404, {"error": f"no such path {req.path!r} (try /v1/certify, /v1/meshed)"}

    async def _authorize(self, body: bytes
                         ) -> tuple[x509.CertificateSigningRequest, Subject, store.Issuer]:
        """A signing request's CSR, whose token it carries and the issuer to sign with
        (re-read if it changed on disk); CertifyError or AuthError when refused."""
        request = signing.parse_body(body)
        csr = signing.load_csr(request.csr_pem)
        subject = await self.auth.authenticate(request.token)
        self.reload_issuer()
        return csr, subject, self.issuer

    async def certify(self, body: bytes, peer: str) -> tuple[int, dict[str, object]]:
        """Authenticate, check and sign one CSR."""
        try:
            csr, subject, issuer = await self._authorize(body)
            signed = signing.sign(
                csr, subject, issuer.key, issuer.cert, trust_domain=issuer.trust_domain,
                peer=peer, policy=self.options.address_policy, now=pki.utc(self.clock()),
                lifetime=self.options.leaf_lifetime, backdate=self.options.clock_skew)
        except (signing.CertifyError, AuthError) as exc:
            log.warning("refused a certificate request from %s: %s", peer, exc)
            return exc.status, {"error": str(exc)}
        expiry = signed.leaf.not_valid_after_utc.timestamp()
        self.registry.record(signed.addresses, signed.identity, expiry)
        log.info("certified %s for %s until %s (serial %x)", signed.identity,
                 ",".join(signed.addresses), signed.leaf.not_valid_after_utc.isoformat(),
                 signed.leaf.serial_number)
        return 200, signing.answer(signed, issuer.cert)

    async def certify_dns(self, body: bytes, peer: str) -> tuple[int, dict[str, object]]:
        """Authenticate and sign a CSR for DNS names (TLS termination), when granted."""
        try:
            csr, subject, issuer = await self._authorize(body)
            leaf = signing.sign_dns(
                csr, subject, issuer.key, issuer.cert, trust_domain=issuer.trust_domain,
                grants=self.options.dns_grants, now=pki.utc(self.clock()),
                lifetime=self.options.leaf_lifetime, backdate=self.options.clock_skew)
        except (signing.CertifyError, AuthError) as exc:
            log.warning("refused a DNS certificate request from %s: %s", peer, exc)
            return exc.status, {"error": str(exc)}
        names = pki.dns_names(leaf)
        log.info("certified DNS names %s for %s/%s until %s (serial %x)", ",".join(names),
                 subject.namespace, subject.account, leaf.not_valid_after_utc.isoformat(),
                 leaf.serial_number)
        return 200, {"names": names,
                     "chain": pki.chain_pem([leaf, issuer.cert]).decode("ascii"),
                     "expiry": int(leaf.not_valid_after_utc.timestamp())}

    async def meshed(self, query: dict[str, list[str]]) -> tuple[int, dict[str, object]]:
        """Look addresses up; ask the peers about the ones we do not know."""
        try:
            addrs = list(dict.fromkeys(
                meshed.normalize_ip(a) for v in query.get("addr", []) for a in v.split(",")
                if a.strip()))
        except ValueError as exc:
            return 400, {"error": f"addr: {exc}"}
        if not addrs:
            return 400, {"error": "addr: give one or more IP addresses (addr=IP[,IP...])"}
        if len(addrs) > MAX_LOOKUP:
            return 400, {"error": f"addr: at most {MAX_LOOKUP} addresses per request"}
        unknown = [a for a in addrs if self.registry.get(a) is None]
        if unknown and self.options.peers and query.get("local") != ["1"]:
            await self._ask_peers(unknown)
        answers: dict[str, object] = {}
        for addr in addrs:
            record = self.registry.get(addr)
            answers[addr] = record.to_json() if record else None
        return 200, {"addresses": answers}

    async def _ask_peers(self, addrs: list[str]) -> None:
        path = "/v1/meshed?local=1&addr=" + quote(",".join(addrs), safe=",:")
        name = spiffe.service_name(self.trust_domain)
        calls = [http11.call(host, port, "GET", path, ssl=self._peer_tls, server_hostname=name,
                             timeout=self.options.peer_timeout)
                 for host, port in self.options.peers]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("peer replica did not answer a meshed lookup: %s", result)
                continue
            self._learn(result)

    def _learn(self, response: http11.Response) -> None:
        try:
            found = response.json().get("addresses", {}) if response.status == 200 else {}
        except (ValueError, AttributeError):
            return
        if not isinstance(found, dict):
            return
        now = self.clock()
        for addr, value in found.items():
            record = meshed.Record.from_json(value)
            if record is not None and record.expiry > now:
                try:
                    self.registry.merge(addr, record)
                except ValueError:
                    continue
