"""Proxy configuration: frozen, keyword-only dataclasses, loaded and validated once.

Sources, later ones overriding earlier ones:

1. the defaults below (zero-config: proxy transparently and safely with no file at all),
2. a YAML file (``appliance proxy --config FILE``),
3. ``APPLIANCE_*`` environment variables (names in :mod:`appliance.env`),
4. command-line flags.

Every field is documented where it is defined; ``docs/config.md`` mirrors these docstrings.
An invalid value is rejected at load with :class:`ConfigError`, whose message names the
field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})


class ConfigError(ValueError):
    """A configuration value is not acceptable; the message names field, value and rule."""


@dataclass(frozen=True, kw_only=True)
class HostPort:
    """An IP address and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class OutboundConfig:
    port: int = 4140
    """Port of the outbound listener; the app's outgoing TCP is redirected here."""
    bind: str = "0.0.0.0"
    """Address the outbound listener binds. The default, 0.0.0.0, also listens on "::"
    (IPv6 only) when the host has IPv6, so redirected IPv6 connections are served too."""
    connect_timeout: float = 1.0
    """Seconds allowed to connect to an upstream endpoint before 502 / close."""
    orig_dst_override: HostPort | None = None
    """Destination used when a connection has no original destination (it was not
    redirected by iptables). Off by default, so such a connection is refused; set it to
    run the outbound listener as a plain forwarding proxy (tests, benchmarks)."""
    explicit_proxy: bool = True
    """Also serve requests that apps send to this listener on purpose, as to an HTTP proxy
    (``http_proxy=http://127.0.0.1:4140``): absolute-URI requests and CONNECT tunnels.
    Only from clients on loopback, so the listener is never an open proxy."""
    h2_upstream_ports: frozenset[int] = frozenset()
    """Ports (of the original destination or endpoint) whose servers speak HTTP/2 with
    prior knowledge (h2c): HTTP/1.1 requests to them are translated to HTTP/2."""
    http1_upstream_ports: frozenset[int] = frozenset()
    """Ports whose servers speak only HTTP/1.1: HTTP/2 requests to them (not gRPC) are
    translated to HTTP/1.1."""
    tls_originate: str = ""
    """Destinations the app speaks plaintext to that get TLS on the wire:
    ``DEST=sni:NAME[,ca:FILE][,port:N]`` entries separated by ``;``, DEST being ``IP:PORT``,
    ``[IPv6]:PORT`` or a bare ``PORT`` (docs/mtls.md). The server's certificate is verified
    against the system store (or ``ca:FILE``) and ``sni:NAME``."""

    def __post_init__(self) -> None:
        from appliance.identity import policy

        policy.parse_origination(self.tls_originate, "outbound.tls_originate")


@dataclass(frozen=True, kw_only=True)
class InboundConfig:
    port: int = 4143
    """Port of the inbound listener; peers' TCP to the workload is redirected here."""
    bind: str = "0.0.0.0"
    """Address the inbound listener binds (0.0.0.0: IPv6 too, as for outbound)."""
    connect_timeout: float = 0.1
    """Seconds allowed to connect to the local workload."""
    forward_to_loopback: bool = False
    """Connect to the workload at 127.0.0.1:<original port> instead of the original
    address (for apps that listen on loopback only)."""
    orig_dst_override: HostPort | None = None
    """As for outbound: where to send connections that have no original destination."""
    h2_upstream_ports: frozenset[int] = frozenset()
    """Ports of the local workload that speak HTTP/2 with prior knowledge (h2c): HTTP/1.1
    requests to them are translated to HTTP/2."""
    http1_upstream_ports: frozenset[int] = frozenset()
    """Ports of the local workload that speak only HTTP/1.1: HTTP/2 requests to them are
    translated to HTTP/1.1."""
    tls_mode: str = "permissive"
    """``permissive``: ports not listed in ``authorization`` accept any client, plaintext
    included. ``strict``: they accept only clients with a mesh identity (mutual TLS);
    plaintext connections to them are closed (docs/mtls.md)."""
    authorization: str = ""
    """Who may connect, per port: ``PORTS=CLIENTS`` entries separated by ``;``; CLIENTS are
    ``unauthenticated``, ``meshed``, ``deny``, SPIFFE IDs and ``spiffe://...*`` prefixes,
    comma-separated (docs/mtls.md)."""
    tls_terminate: str = ""
    """Ports that terminate TLS from clients outside the mesh: ``PORTS=NAME[,NAME...]`` (a
    certificate for these DNS names from the mesh issuer) or ``PORTS=@CERT[,@KEY]`` (given
    PEM files), entries separated by ``;`` (docs/mtls.md)."""

    def __post_init__(self) -> None:
        from appliance.identity import policy

        mode = policy.parse_mode("inbound.tls_mode", self.tls_mode)
        policy.parse_authorization(self.authorization, mode, "inbound.authorization")
        policy.parse_termination(self.tls_terminate, "inbound.tls_terminate")


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    port: int = 4191
    """Port of the admin server (/metrics, /ready, /live)."""
    bind: str = "0.0.0.0"
    """Address the admin server binds (0.0.0.0: IPv6 too, as for outbound)."""
    metrics: bool = True
    """Record metrics. Turning them off (HTTP and TCP families stay empty) exists to
    measure what they cost; leave it on."""


@dataclass(frozen=True, kw_only=True)
class DetectConfig:
    timeout: float = 10.0
    """Seconds to wait for the client's first bytes before treating the connection as
    opaque TCP (server-speaks-first protocols on ports not listed as opaque)."""
    max_bytes: int = 4096
    """Most bytes held while sniffing the protocol; past this the stream is opaque."""
    opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS
    """Original-destination ports that skip detection and are relayed as opaque TCP."""


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    max_header_bytes: int = 65536
    """Largest request head (request line and headers) accepted; larger gets 431."""
    max_uri_bytes: int = 8192
    """Longest request target accepted; longer gets 414."""
    header_timeout: float = 10.0
    """Seconds a client may take to send a complete request head (slowloris guard);
    then the connection gets 408 and is closed."""
    response_timeout: float = 60.0
    """Seconds to wait for the upstream's response head after the request was sent;
    then the client gets 504. 0 disables it."""
    idle_timeout: float = 300.0
    """Seconds a client connection may sit idle between requests before it is closed (and
    a request body may stall before the request gets 408)."""
    pool_idle_timeout: float = 60.0
    """Seconds an idle upstream connection is kept in the pool."""
    pool_max_idle: int = 64
    """Most idle connections kept per upstream endpoint."""


@dataclass(frozen=True, kw_only=True)
class H2Config:
    max_concurrent_streams: int = 100
    """Streams a client may have open at once on one HTTP/2 connection (SETTINGS)."""
    max_header_list_size: int = 65536
    """Largest header list a client may send (SETTINGS_MAX_HEADER_LIST_SIZE)."""
    reset_limit: int = 100
    """Streams a client may reset before their response started, within 10 s, before the
    connection is closed with GOAWAY ENHANCE_YOUR_CALM (the Rapid Reset guard)."""
    control_frame_limit: int = 1000
    """PING, SETTINGS, PRIORITY and empty DATA frames a client may send within 10 s before
    the connection is closed with GOAWAY ENHANCE_YOUR_CALM."""
    keepalive_interval: float = 20.0
    """Seconds of silence on an upstream HTTP/2 connection before the proxy PINGs it."""
    keepalive_timeout: float = 10.0
    """Seconds a keepalive PING may go unanswered before the connection is closed."""


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    dtab: str = ""
    """Base dtab for outbound HTTP and HTTP/2 requests (linkerd syntax, docs/routing.md).
    Empty: no logical routing, every request goes to its original destination."""
    identifier: str = "host,dst"
    """How a request gets its logical name, tried in order until one gives a name:
    ``host`` (``/svc/<authority>``), ``method_and_host``, ``path``, ``header:<name>``
    (the value is a path), ``header_token:<name>`` (``/svc/<value>``), ``dst`` (the
    original destination, ``/svc/<ip>:<port>``)."""
    prefix: str = "/svc"
    """Path prefix of the logical names the identifiers make."""
    path_segments: int = 1
    """For the ``path`` identifier: how many leading path segments name the service."""
    allow_overrides: bool = True
    """Honour per-request dtab overrides (``l5d-dtab``, ``l5d-ctx-dtab`` headers). Turn off
    on proxies that take requests from outside the mesh."""
    fallback: str = "orig_dst"
    """When a name delegates to nothing (no dentry matches, or every branch is negative):
    ``orig_dst`` sends the request to its original destination, as with no dtab;
    ``fail`` answers 502 with ``l5d-proxy-error``."""
    bind_timeout: float = 10.0
    """Seconds a request waits for service discovery to answer for a name it is the first
    to use; then 503."""


@dataclass(frozen=True, kw_only=True)
class BalancerConfig:
    kind: str = "p2c_peak_ewma"
    """Load balancer per service: ``p2c_peak_ewma`` (linkerd's default: power of two
    choices over peak-EWMA latency), ``p2c_least_loaded`` or ``round_robin``."""
    decay: float = 10.0
    """Peak-EWMA decay time in seconds."""
    default_rtt: float = 0.03
    """Latency assumed for an endpoint with no measurement yet, in seconds."""
    consecutive_failures: int = 7
    """Failures in a row that eject an endpoint (failure accrual); it is probed again after
    a jittered backoff from 1 s to 60 s."""


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """The request policy of a service (docs/reliability.md): these are the defaults, and
    ``services`` overrides any of them per logical-name prefix."""

    classifier: str = "io.l5d.http.nonRetryable5XX"
    """Response classifier of HTTP requests (linkerd's names): ``io.l5d.http.nonRetryable5XX``
    (5xx is a failure, never retried), ``io.l5d.http.retryableRead5XX`` (retries GET, HEAD,
    OPTIONS, TRACE), ``io.l5d.http.retryableIdempotent5XX`` (adds PUT, DELETE),
    ``io.l5d.http.allSuccessful``; the ``io.l5d.h2.`` spellings are accepted too."""
    grpc_classifier: str = "io.l5d.h2.grpc.default"
    """Response classifier of gRPC requests: ``io.l5d.h2.grpc.default`` or
    ``io.l5d.h2.grpc.retryableStatusCodes`` (retry the ``retryable_grpc_codes``),
    ``io.l5d.h2.grpc.alwaysRetryable``, ``io.l5d.h2.grpc.neverRetryable``,
    ``io.l5d.h2.grpc.compliant``."""
    retryable_grpc_codes: str = "UNAVAILABLE"
    """gRPC status codes (names or numbers, comma-separated) that the ``default`` and
    ``retryableStatusCodes`` gRPC classifiers retry."""
    timeout: float = 0.0
    """Request timeout in seconds, retries included: without a response head by then the
    client gets 504. 0: none (``http.response_timeout`` still bounds each attempt)."""
    attempt_timeout: float = 0.0
    """Timeout of each attempt (a per-try timeout): a timed-out attempt is retried when the
    classifier allows it, as a connection lost after sending. 0: none."""
    max_retries: int = 2
    """Most retries of one request, connection failures included; each retry after a
    request was sent also needs the retry budget. 0: no retries."""
    retry_budget_percent: float = 0.2
    """Retry budget: retries may add this fraction of the requests sent in the last
    ``retry_budget_ttl`` seconds (0 to 1000), ..."""
    retry_budget_min_per_sec: float = 10.0
    """... plus this many retries per second of ``retry_budget_ttl``."""
    retry_budget_ttl: float = 10.0
    """The retry budget's window in seconds."""
    retry_backoff_base: float = 0.01
    """First delay before a retry (seconds; jittered, doubling per retry of a request)."""
    retry_backoff_cap: float = 0.25
    """Longest delay before a retry."""
    retry_buffer_bytes: int = 65536
    """Largest request body kept for replay; a request with a larger body is never retried
    once sent."""

    def __post_init__(self) -> None:
        from appliance.resilience.policy import check_service

        try:
            check_service(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True, kw_only=True)
class ServiceOverride:
    """One entry of ``services``: the fields it sets for logical names under ``prefix``."""

    prefix: str
    """A path such as ``/svc/web``; a ``*`` segment matches any one segment."""
    fields: Mapping[str, Any]
    """ServiceConfig field -> value (already converted and checked)."""


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """Load shedding, per listener (outbound and inbound each have these limits)."""

    max_connections: int = 10000
    """Client connections open at once; one accepted past this is closed at once.
    0: no limit."""
    max_requests: int = 100000
    """HTTP requests in flight at once (HTTP/1 exchanges and HTTP/2 streams); past this a
    request waits in the queue. 0: no limit."""
    max_queue: int = 10000
    """Requests that may wait for an in-flight slot; one more gets 503 at once (gRPC:
    UNAVAILABLE). 0: no queue."""
    queue_timeout: float = 3.0
    """Seconds a request may wait in the queue before it gets 503."""
    max_endpoint_requests: int = 0
    """Requests in flight to one endpoint at once; past this a routed request goes to
    another endpoint, else gets 503 at once. 0: no limit."""


@dataclass(frozen=True, kw_only=True)
class ThriftConfig:
    max_frame_bytes: int = 16 * 1024 * 1024
    """Largest Thrift message (framed or buffered) accepted; larger closes the connection
    (counted as ``thrift_too_large``)."""
    method_in_dst: bool = False
    """Append the method to the logical name (``/svc/<authority>/<method>``), as linkerd's
    ``thriftMethodInDst``, so a dtab can route per method."""
    idempotent_methods: frozenset[str] = frozenset()
    """Methods that may be retried after an exception or a lost connection (a list, or
    names separated by commas)."""
    response_timeout: float = 60.0
    """Seconds to wait for a call's reply; then the caller gets a TApplicationException.
    0 turns it off."""
    max_retries: int = 2
    """Retries of one call (idempotent methods, or calls never sent); 0 turns them off."""
    max_pending_per_connection: int = 1
    """Calls of one client connection sent upstream before the earlier ones are answered
    (1: in order, one at a time, the safe default for servers that do not pipeline)."""


@dataclass(frozen=True, kw_only=True)
class TracingConfig:
    """The same settings as the standard OpenTelemetry variables, for the config file; an
    ``OTEL_*`` variable that is set wins over the field. Tracing is on when an endpoint is
    set (docs/observability.md)."""

    endpoint: str = ""
    """OTLP collector, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` (e.g. http://jaeger:4317)."""
    protocol: str = ""
    """``grpc`` (default) or ``http/protobuf``, as ``OTEL_EXPORTER_OTLP_PROTOCOL``."""
    service_name: str = ""
    """``service.name`` of the spans, as ``OTEL_SERVICE_NAME`` (default: appliance)."""
    sampler: str = ""
    """As ``OTEL_TRACES_SAMPLER``: parentbased_traceidratio (default), always_on, ..."""
    sampler_arg: str = ""
    """As ``OTEL_TRACES_SAMPLER_ARG``: the ratio for root spans (default 1.0)."""

    def environ(self, environ: Mapping[str, str]) -> dict[str, str]:
        """``environ`` with these fields filled in where the variable is not set."""
        merged = dict(environ)
        for name, var in (("endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
                          ("protocol", "OTEL_EXPORTER_OTLP_PROTOCOL"),
                          ("service_name", "OTEL_SERVICE_NAME"),
                          ("sampler", "OTEL_TRACES_SAMPLER"),
                          ("sampler_arg", "OTEL_TRACES_SAMPLER_ARG")):
            value = getattr(self, name)
            if value and var not in merged:
                merged[var] = value
        return merged


@dataclass(frozen=True, kw_only=True)
class Config:
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    h2: H2Config = field(default_factory=H2Config)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    services: tuple[ServiceOverride, ...] = ()
    """Per-service overrides of ``service``, by logical-name prefix: a list of mappings with
    ``prefix`` and any ``service`` fields, e.g. ``[{prefix: /svc/web, timeout: 2s,
    classifier: io.l5d.http.retryableRead5XX}]``; the longest matching prefix wins."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    thrift: ThriftConfig = field(default_factory=ThriftConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    namers: tuple[Mapping[str, Any], ...] = ()
    """Service-discovery sources, each a mapping with ``kind`` (``static``, ``io.l5d.fs``,
    ``dns``, ``dns-srv``, ``io.l5d.consul``, ``io.l5d.k8s``, ``io.l5d.k8s.clusterip``) and its
    options
    (docs/discovery.md). A dtab reaches one as ``/#/<kind>`` (or its ``prefix``)."""
    log_level: str = "info"
    """One of debug, info, warning, error."""
    access_log: str = ""
    """Where to write one JSON line per request: empty (off), ``stderr``, or a file path
    (docs/observability.md lists the fields)."""
    shutdown_grace: float = 30.0
    """Seconds that in-flight requests, streams and tunnels get to finish after SIGTERM
    (or POST /shutdown) before the proxy closes them and exits."""
    instance_id: str = ""
    """Name of this proxy in Via headers and logs; empty means a random 8-hex id."""


# --- loading ---------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}
_DURATION_FIELDS = {"connect_timeout", "timeout", "header_timeout", "response_timeout",
                    "idle_timeout", "pool_idle_timeout", "keepalive_interval",
                    "keepalive_timeout", "decay", "default_rtt", "bind_timeout",
                    "shutdown_grace"}
_LOG_LEVELS = ("debug", "info", "warning", "error")
_DURATION_FIELDS |= {"attempt_timeout", "retry_budget_ttl", "retry_backoff_base",
                     "retry_backoff_cap", "queue_timeout"}
_ZERO_OK = {"max_retries", "retry_buffer_bytes", "max_connections", "max_requests",
            "max_queue", "max_endpoint_requests"}  # integers where 0 means "none"
_CHOICES = {
    "fallback": ("orig_dst", "fail"),
    "kind": ("p2c_peak_ewma", "p2c_least_loaded", "round_robin"),
}


def parse_duration(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} is not a duration (use e.g. 10s, 100ms, 1.5)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ConfigError(f"{name}: {value!r} is not a duration (use e.g. 10s, 100ms, 1.5)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise ConfigError(f"{name}: {value!r} must not be negative")
    return seconds


def parse_port(name: str, value: Any, *, allow_zero: bool = False) -> int:
    try:
        port = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not a port number (1-65535)") from None
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{name}: {value!r} is not a port number ({low}-65535)")
    return port


def parse_port_set(name: str, value: Any) -> frozenset[int]:
    """A set of ports from a list or a string like "25,587,8000-8010"."""
    items: list[Any]
    if isinstance(value, str):
        items = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    elif isinstance(value, list | tuple | set | frozenset):
        items = list(value)
    else:
        raise ConfigError(f"{name}: {value!r} is not a list of ports")
    ports: set[int] = set()
    for item in items:
        text = str(item)
        if "-" in text:
            lo_s, _, hi_s = text.partition("-")
            lo, hi = parse_port(name, lo_s), parse_port(name, hi_s)
            if lo > hi:
                raise ConfigError(f"{name}: range {text!r} is reversed")
            ports.update(range(lo, hi + 1))
        else:
            ports.add(parse_port(name, text))
    return frozenset(ports)


def parse_hostport(name: str, value: Any) -> HostPort | None:
    if value is None or value == "":
        return None
    text = str(value).strip()
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", text) or re.match(r"^([^:]+):(\d+)$", text)
    if not m:
        raise ConfigError(f"{name}: {value!r} is not HOST:PORT (IPv6 as [addr]:port)")
    try:
        host = str(ipaddress.ip_address(m.group(1)))
    except ValueError:
        raise ConfigError(f"{name}: {m.group(1)!r} is not an IP address") from None
    return HostPort(host=host, port=parse_port(name, m.group(2)))


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: {value!r} is not a boolean (true/false)")


def _parse_int(name: str, value: Any, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not an integer") from None
    if number < minimum:
        raise ConfigError(f"{name}: {value!r} must be at least {minimum}")
    return number


def _parse_bind(name: str, value: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not an IP address to bind") from None


def _convert(name: str, leaf: str, hint: Any, value: Any) -> Any:
    if leaf == "port":
        return parse_port(name, value, allow_zero=True)
    if leaf == "bind":
        return _parse_bind(name, value)
    if leaf in _DURATION_FIELDS:
        return parse_duration(name, value)
    if leaf in ("opaque_ports", "h2_upstream_ports", "http1_upstream_ports"):
        return parse_port_set(name, value)
    if leaf == "log_level":
        text = str(value).strip().lower()
        if text not in _LOG_LEVELS:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(_LOG_LEVELS)}")
        return text
    if leaf in _CHOICES:
        text = str(value).strip()
        if text not in _CHOICES[leaf]:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(_CHOICES[leaf])}")
        return text
    if leaf == "namers":
        return parse_namers(name, value)
    if leaf == "idempotent_methods":
        return _parse_names(name, value)
    if leaf == "max_retries":
        return _parse_int(name, value, 0)
    if leaf == "dtab":
        return _check_dtab(name, str(value))
    if leaf == "identifier":
        return _check_identifier(name, str(value))
    if leaf == "services":
        return parse_services(name, value)
    if leaf in ("classifier", "grpc_classifier", "retryable_grpc_codes"):
        return _check_service_field(name, leaf, str(value).strip())
    if hint is float:
        return _parse_float(name, value)
    if hint is bool:
        return parse_bool(name, value)
    if hint is int:
        return _parse_int(name, value, 0 if leaf in _ZERO_OK else 1)
    if _is_hostport(hint):
        return parse_hostport(name, value)
    if hint is str:
        return str(value)
    raise ConfigError(f"{name}: unsupported field type")  # a bug, not user input


def _list_text(name: str, value: Any) -> Any:
    """``value``; if it is text (an environment variable), the YAML or JSON it holds, and
    blank text is an empty list."""
    if not isinstance(value, str):
        return value
    import yaml

    try:
        return yaml.safe_load(value) if value.strip() else []
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: not valid YAML/JSON ({exc})") from None


def parse_namers(name: str, value: Any) -> tuple[Mapping[str, Any], ...]:
    """A list of namer mappings; from an environment variable, YAML or JSON text."""
    value = _list_text(name, value)
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{name}: expected a list of namers, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or not isinstance(item.get("kind"), str):
            raise ConfigError(f"{name}[{i}]: expected a mapping with a 'kind', got {item!r}")
    namers = tuple(dict(item) for item in value)
    _check_namers(name, namers)
    return namers


def _parse_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} is not a number")
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not a number") from None
    if not number >= 0 or number == float("inf"):
        raise ConfigError(f"{name}: {value!r} must be a finite number >= 0")
    return number


def _check_service_field(name: str, leaf: str, text: str) -> str:
    from appliance.resilience.policy import check_field

    try:
        check_field(leaf, text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return text


def parse_services(name: str, value: Any) -> tuple[ServiceOverride, ...]:
    """The ``services`` list: each item a mapping with ``prefix`` and ``service`` fields;
    from YAML, or from YAML/JSON text (an environment variable)."""
    value = _list_text(name, value)
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{name}: expected a list of {{prefix: ..., <service fields>}}, "
                          f"got {value!r}")
    return tuple(_parse_override(f"{name}[{i}]", item) for i, item in enumerate(value))


def _parse_override(name: str, item: Any) -> ServiceOverride:
    from appliance.resilience.policy import check_prefix

    if not isinstance(item, Mapping) or not isinstance(item.get("prefix"), str):
        raise ConfigError(f"{name}: expected a mapping with a 'prefix' path, got {item!r}")
    try:
        prefix = check_prefix(item["prefix"])
    except ValueError as exc:
        raise ConfigError(f"{name}.prefix: {exc}") from None
    hints = typing.get_type_hints(ServiceConfig)
    fields: dict[str, Any] = {}
    for key, raw in item.items():
        if key == "prefix":
            continue
        if key not in hints:
            raise ConfigError(f"{name}.{key}: unknown field (allowed here: prefix, "
                              + ", ".join(sorted(hints)) + ")")
        fields[key] = _convert(f"{name}.{key}", key, hints[key], raw)
    try:
        dataclasses.replace(ServiceConfig(), **fields)
    except ConfigError as exc:
        raise ConfigError(f"{name}.{str(exc).removeprefix('service.')}") from None
    return ServiceOverride(prefix=prefix, fields=types.MappingProxyType(fields))


def _check_namers(name: str, namers: tuple[Mapping[str, Any], ...]) -> None:
    """Build the namers once to check their options (building starts no source)."""
    from appliance.discovery.base import NamerContext
    from appliance.discovery.registry import build_namers

    def no_spawn(coro: Any) -> None:
        coro.close()
        raise RuntimeError("a namer started a source while being checked")

    try:
        built = build_namers(list(namers), NamerContext(spawn=no_spawn))
    except ValueError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(name) else f"{name}: {text}") from None
    for namer in built.values():
        namer.close()


def _parse_names(name: str, value: Any) -> frozenset[str]:
    """A set of names from a list or a string like "get, list"."""
    items = re.split(r"[,\s]+", value.strip()) if isinstance(value, str) else value
    if not isinstance(items, list | tuple | set | frozenset) or \
            not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{name}: {value!r} is not a list of names")
    return frozenset(i for i in items if i)


def _check_dtab(name: str, text: str) -> str:
    from appliance.routing.dtab import parse_dtab
    from appliance.routing.path import RoutingSyntaxError

    try:
        parse_dtab(text)
    except RoutingSyntaxError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return text


def _check_identifier(name: str, text: str) -> str:
    from appliance.routing.identify import make_identifier

    items = [i.strip() for i in text.split(",") if i.strip()]
    if not items:
        raise ConfigError(f"{name}: {text!r} names no identifier")
    for item in items:
        kind, _, arg = item.partition(":")
        try:
            make_identifier(kind, **({"name": arg} if arg else {}))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return text


def _is_hostport(hint: Any) -> bool:
    return hint is HostPort or (
        isinstance(hint, types.UnionType) and HostPort in typing.get_args(hint)
    )


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"{prefix}{key}: unknown field (allowed here: {allowed})")
    kwargs: dict[str, Any] = {}
    for fname, value in data.items():
        hint = hints[fname]
        full = f"{prefix}{fname}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full}: expected a mapping of fields, got {value!r}")
            kwargs[fname] = _build(hint, value, full + ".")  # type: ignore[arg-type]
        else:
            kwargs[fname] = _convert(full, fname, hint, value)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def field_paths(cls: type = Config, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field, e.g. ``outbound.port``."""
    hints = typing.get_type_hints(cls)
    paths: list[str] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            paths.extend(field_paths(hint, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            paths.append(prefix + f.name)
    return paths


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def load(
    *,
    file_data: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build a validated Config from a parsed YAML mapping, an environment and flags.

    ``overrides`` maps dotted field names (``outbound.port``) to values.
    """
    from appliance import env as envnames

    merged: dict[str, Any] = {}
    if file_data is not None:
        if not isinstance(file_data, Mapping):
            raise ConfigError(f"config file: expected a mapping at the top, got {file_data!r}")
        merged = _merge(merged, file_data)
    if environ is not None:
        merged = _merge(merged, nest(envnames.from_environ(environ)))
    if overrides:
        merged = _merge(merged, nest(overrides))
    return _build(Config, merged, "")


def load_file(path: str) -> Mapping[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
    return data or {}
