"""``appliance certs init|inspect|rotate-issuer`` and ``appliance identity``.

Flags are documented in docs/identity.md. Values are checked here (not by argparse
``type=``) so a bad one gives one line naming the flag and the value. Exit codes: 0 done,
1 a problem was found or the service failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from certs import dnsnames, identity_service, inspection, pki, spiffe, store, tokenreview
from certs.auth import Authenticator
from certs.tokens import TokenFile, TokenFileError

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(s|m|h|d)?$")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(Exception):
    """A flag has a bad value; the message names it."""


def parse_duration(flag: str, text: str, *, allow_zero: bool = False) -> timedelta:
    """``30s``, ``90m``, ``24h``, ``365d`` or plain seconds; > 0 unless ``allow_zero``."""
    m = _DURATION.match(text.strip())
    if not m or (float(m.group(1)) == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UsageError(f"{flag}: bad value {text!r} (expected a duration {bound} like 30s, "
                         "90m, 24h or 365d)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def parse_hostport(flag: str, text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``; port 0 means any free port."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{flag}: bad value {text!r} (expected HOST:PORT, e.g. 0.0.0.0:8080)")
    return host, int(port)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``certs`` (with init, inspect, rotate-issuer) on the ``appliance`` parser."""
    certs = sub.add_parser("certs", help="create, inspect and rotate the mesh trust anchor "
                                         "and issuer")
    verbs = certs.add_subparsers(dest="certs_command", metavar="VERB", required=True)
    p = verbs.add_parser("init", help="create a trust anchor and an issuer in DIR")
    p.add_argument("--trust-domain", required=True, metavar="DOMAIN",
                   help="e.g. cluster.local; identities are spiffe://DOMAIN/ns/NS/sa/SA")
    p.add_argument("--dir", required=True, metavar="DIR")
    p.add_argument("--anchor-lifetime", default="365d", metavar="DURATION")
    p.add_argument("--issuer-lifetime", default="365d", metavar="DURATION")
    p.add_argument("--force", action="store_true", help="replace existing files in DIR")
    p.set_defaults(func=run_init)
    p = verbs.add_parser("inspect", help="describe and check certificates")
    p.add_argument("--dir", metavar="DIR", help="a directory written by certs init")
    p.add_argument("files", nargs="*", metavar="FILE", help="PEM certificate files")
    p.set_defaults(func=run_inspect)
    p = verbs.add_parser("rotate-issuer", help="replace the issuer, signed by the anchor")
    p.add_argument("--dir", required=True, metavar="DIR")
    p.add_argument("--anchor-key", metavar="FILE",
                   help="the trust anchor's key if kept outside DIR")
    p.add_argument("--issuer-lifetime", default="365d", metavar="DURATION")
    p.set_defaults(func=run_rotate)


def add_identity_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``identity`` (the identity service) on the ``appliance`` parser."""
    p = sub.add_parser("identity", help="run the identity service that signs workload "
                                        "certificates")
    p.add_argument("--dir", required=True, metavar="DIR", help="written by certs init")
    p.add_argument("--tokens", metavar="FILE", help="TOKEN NAMESPACE ACCOUNT per line")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--leaf-lifetime", default="24h", metavar="DURATION")
    p.add_argument("--clock-skew", default="20s", metavar="DURATION",
                   help="leaves are valid from this long before they are issued")
    p.add_argument("--addresses", choices=("peer", "csr"), default="peer",
                   help="peer: a CSR's IP SANs must be the request's source address; "
                        "csr: trust them (behind NAT)")
    p.add_argument("--server-name", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP in the service's certificate (repeatable)")
    p.add_argument("--allow-dns", action="append", default=[], metavar="NS/SA=PATTERN",
                   help="let workloads NS/SA get certificates for DNS names matching PATTERN "
                        "(TLS termination; repeatable; shell patterns)")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="another replica to ask about unknown addresses (repeatable)")
    p.add_argument("--kube-api", metavar="URL",
                   help="check unknown tokens with TokenReview at URL, or 'in-cluster'")
    p.add_argument("--kube-token-file", metavar="FILE", help="our own bearer token")
    p.add_argument("--kube-ca", metavar="FILE", help="CA bundle of the API server")
    p.add_argument("--kube-audience", action="append", default=[], metavar="AUD")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default="info")
    p.set_defaults(func=run_identity)


def _now() -> datetime:
    return pki.utc(time.time())


def _log(message: str) -> None:
    print(f"appliance: {message}", file=sys.stderr)


def run_init(args: argparse.Namespace) -> int:
    try:
        spiffe.check_trust_domain(args.trust_domain)
        anchor_life = parse_duration("--anchor-lifetime", args.anchor_lifetime)
        issuer_life = parse_duration("--issuer-lifetime", args.issuer_lifetime)
    except (UsageError, spiffe.SpiffeError) as exc:
        _log(f"error: {exc}")
        return EXIT_USAGE
    try:
        paths = store.init(Path(args.dir), args.trust_domain, now=_now(),
                           anchor_lifetime=anchor_life, issuer_lifetime=issuer_life,
                           force=args.force)
    except (store.StoreError, OSError) as exc:
        _log(f"error: {exc}")
        return EXIT_PROBLEM
    _log(f"wrote {', '.join(str(p) for p in paths)}; distribute "
         f"{Path(args.dir) / store.ANCHOR_CERT} to every proxy and keep "
         f"{store.ANCHOR_KEY} offline")
    return EXIT_OK


def run_inspect(args: argparse.Namespace) -> int:
    paths = [Path(f) for f in args.files] + ([Path(args.dir)] if args.dir else [])
    if not paths:
        _log("error: certs inspect: give --dir DIR or certificate files")
        return EXIT_USAGE
    report = inspection.inspect_paths(paths, _now())
    print("\n".join(report.lines))
    for warning in report.warnings:
        print(f"warning: {warning}")
    for problem in report.problems:
        print(f"problem: {problem}")
    return EXIT_PROBLEM if report.problems else EXIT_OK


def run_rotate(args: argparse.Namespace) -> int:
    try:
        lifetime = parse_duration("--issuer-lifetime", args.issuer_lifetime)
    except UsageError as exc:
        _log(f"error: {exc}")
        return EXIT_USAGE
    try:
        issuer = store.rotate_issuer(Path(args.dir), now=_now(), lifetime=lifetime,
                                     anchor_key_path=Path(args.anchor_key)
                                     if args.anchor_key else None)
    except (store.StoreError, pki.PkiError, OSError) as exc:
        _log(f"error: {exc}")
        return EXIT_PROBLEM
    _log(f"new issuer {issuer.serial_number:x} valid until "
         f"{issuer.not_valid_after_utc.isoformat()}; running identity services pick it up "
         "within seconds")
    return EXIT_OK


def _reviewer(args: argparse.Namespace) -> tokenreview.TokenReviewer | None:
    if args.kube_api is None:
        return None
    audiences = tuple(args.kube_audience)
    token_file = Path(args.kube_token_file) if args.kube_token_file else None
    ca = Path(args.kube_ca) if args.kube_ca else None
    try:
        if args.kube_api == "in-cluster":
            settings = tokenreview.KubeSettings.in_cluster(os.environ, audiences,
                                                           token_file, ca)
        else:
            settings = tokenreview.KubeSettings(
                args.kube_api, token_file or tokenreview.SA_DIR / "token", ca, audiences)
        return tokenreview.TokenReviewer(settings)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--kube-api: {exc}") from None


def _grants(texts: list[str]) -> tuple[dnsnames.DnsGrant, ...]:
    try:
        return tuple(dnsnames.parse_grant(t) for t in texts)
    except dnsnames.GrantError as exc:
        raise UsageError(str(exc)) from None


def service_from_args(args: argparse.Namespace) -> tuple[identity_service.IdentityService,
                                                         str, int]:
    """Build the service from flags; UsageError or StoreError name what is wrong."""
    host, port = parse_hostport("--listen", args.listen)
    peers = tuple(parse_hostport("--peer", p) for p in args.peer)
    options = identity_service.ServiceOptions(
        directory=Path(args.dir),
        leaf_lifetime=parse_duration("--leaf-lifetime", args.leaf_lifetime),
        clock_skew=parse_duration("--clock-skew", args.clock_skew, allow_zero=True),
        server_names=tuple(args.server_name), address_policy=args.addresses, peers=peers,
        dns_grants=_grants(args.allow_dns))
    if args.tokens is None and args.kube_api is None:
        raise UsageError("give --tokens FILE, --kube-api URL, or both")
    try:
        tokens = TokenFile(Path(args.tokens)) if args.tokens else None
    except TokenFileError as exc:
        raise UsageError(f"--tokens: {exc}") from None
    auth = Authenticator(tokens, _reviewer(args))
    warning = store.key_mode_problem(Path(args.dir) / store.ISSUER_KEY)
    if warning:
        _log(f"warning: {warning}")
    return identity_service.IdentityService(options, auth), host, port


def run_identity(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        service, host, port = service_from_args(args)
    except UsageError as exc:
        _log(f"error: {exc}")
        return EXIT_USAGE
    except (store.StoreError, pki.PkiError) as exc:
        _log(f"error: {exc}")
        return EXIT_PROBLEM
    try:
        asyncio.run(_serve(service, host, port))
    except OSError as exc:
        _log(f"error: --listen {args.listen}: {exc.strerror or exc}")
        return EXIT_PROBLEM
    return EXIT_OK


async def _serve(service: identity_service.IdentityService, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    bound = await service.start(host, port)
    _log(f"identity service for {service.trust_domain} listening on "
         f"{host}:{bound} (server name {spiffe.service_name(service.trust_domain)})")
    try:
        await stop.wait()
    finally:
        await service.close()
