"""Tracing settings from the standard OpenTelemetry environment variables, the sampler, and
the SDK's OTLP exporter for those settings.

Tracing is on when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is
set (and ``OTEL_SDK_DISABLED`` is not ``true``). The ``_TRACES_`` form of each OTLP variable wins
over the generic one. Where the spec says "warn and use the default" for a bad value, this module
refuses it instead, with a message naming the variable, the value and what is allowed: a
sidecar with a mistyped sampler should fail at start, not trace at 100%.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

MASK64 = (1 << 64) - 1
DEFAULT_SERVICE_NAME = "appliance"


class TraceConfigError(ValueError):
    """An OTEL_* setting is invalid; the message names the variable, the value and the rule."""


# -------------------------------------------------------------------------------- sampling

SAMPLERS = ("always_on", "always_off", "traceidratio",
            "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio")


class Sampler(NamedTuple):
    """``parent_based``: follow the caller's decision when there is one. Otherwise (and for
    every span when not parent-based) sample when ``trace_id & MASK64 < bound``."""

    parent_based: bool
    bound: int

    @classmethod
    def of(cls, name: str, ratio: float = 1.0) -> Sampler:
        """The sampler named as ``OTEL_TRACES_SAMPLER`` names it."""
        if name not in SAMPLERS:
            raise TraceConfigError(f"OTEL_TRACES_SAMPLER: {name!r} is not supported; "
                                   f"use one of {', '.join(SAMPLERS)}")
        root = name.removeprefix("parentbased_")
        rate = 1.0 if root == "always_on" else 0.0 if root == "always_off" else ratio
        return cls(name.startswith("parentbased_"), round(rate * (1 << 64)))

    def root(self, trace_id: int) -> bool:
        """The decision for a span whose caller made none (or any span, not parent-based)."""
        return (trace_id & MASK64) < self.bound


# -------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class TraceConfig:
    """Export settings, from the standard OTEL_* variables (:func:`parse_environ`)."""

    url: str
    """Where to send: the gRPC endpoint, or the full HTTP URL (``.../v1/traces``)."""
    protocol: str = "grpc"
    service_name: str = DEFAULT_SERVICE_NAME
    resource: Mapping[str, str] = field(default_factory=dict)
    sampler: Sampler = Sampler(True, 1 << 64)
    timeout_s: float = 10.0
    headers: Mapping[str, str] = field(default_factory=dict)
    compression: str = "none"
    max_queue: int = 2048
    batch: int = 512
    delay_s: float = 5.0


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _otlp(environ: Mapping[str, str], suffix: str) -> tuple[str, str | None]:
    """The ``_TRACES_`` form of an OTLP variable if set, else the generic one."""
    specific = f"OTEL_EXPORTER_OTLP_TRACES_{suffix}"
    if (value := _get(environ, specific)) is not None:
        return specific, value
    generic = f"OTEL_EXPORTER_OTLP_{suffix}"
    return generic, _get(environ, generic)


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(environ, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise TraceConfigError(f"{name}: {raw!r} is not a positive integer")
    return value


def _pairs(name: str, raw: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` with percent-encoded values (the OTEL list format)."""
    out: dict[str, str] = {}
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise TraceConfigError(f"{name}: {item.strip()!r} is not key=value")
        out[unquote(key.strip())] = unquote(value.strip())
    return out


def _endpoint(environ: Mapping[str, str], protocol: str) -> str | None:
    name, raw = _otlp(environ, "ENDPOINT")
    if raw is None:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TraceConfigError(f"{name}: {raw!r} is not an http:// or https:// URL with a host "
                               "(for example http://localhost:4317)")
    if protocol == "grpc" or name.startswith("OTEL_EXPORTER_OTLP_TRACES_"):
        return raw
    return raw.rstrip("/") + "/v1/traces"  # the generic endpoint is a base URL


def _sampler(environ: Mapping[str, str]) -> Sampler:
    name = (_get(environ, "OTEL_TRACES_SAMPLER") or "parentbased_always_on").lower()
    raw = _get(environ, "OTEL_TRACES_SAMPLER_ARG")
    ratio = 1.0
    if raw is not None and name.endswith("traceidratio"):
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TraceConfigError(f"OTEL_TRACES_SAMPLER_ARG: {raw!r} is not a number in [0, 1]")
    return Sampler.of(name, ratio)


def _protocol(environ: Mapping[str, str]) -> str:
    name, raw = _otlp(environ, "PROTOCOL")
    protocol = raw or "grpc"
    if protocol not in ("grpc", "http/protobuf"):
        raise TraceConfigError(f"{name}: {protocol!r} is not supported; "
                               "use grpc or http/protobuf")
    return protocol


def _batching(environ: Mapping[str, str]) -> dict[str, Any]:
    queue = _int(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    batch = _int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
    if batch > queue:
        raise TraceConfigError(f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE: {batch} is larger than "
                               f"OTEL_BSP_MAX_QUEUE_SIZE ({queue})")
    delay = _int(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000.0
    return {"max_queue": queue, "batch": batch, "delay_s": delay}


def parse_environ(environ: Mapping[str, str]) -> TraceConfig | None:
    """The tracing settings in ``environ``; None (tracing off) when no endpoint is set or
    ``OTEL_SDK_DISABLED=true``. Raises :class:`TraceConfigError` on an invalid value."""
    if (_get(environ, "OTEL_SDK_DISABLED") or "").lower() == "true":
        return None
    protocol = _protocol(environ)
    url = _endpoint(environ, protocol)
    if url is None:
        return None
    compression_name, compression = _otlp(environ, "COMPRESSION")
    if (compression or "none") not in ("none", "gzip"):
        raise TraceConfigError(f"{compression_name}: {compression!r} is not none or gzip")
    resource = _pairs("OTEL_RESOURCE_ATTRIBUTES", _get(environ, "OTEL_RESOURCE_ATTRIBUTES"))
    service = (_get(environ, "OTEL_SERVICE_NAME") or resource.get("service.name")
               or DEFAULT_SERVICE_NAME)
    headers_name, headers = _otlp(environ, "HEADERS")
    return TraceConfig(
        url=url, protocol=protocol, service_name=service, resource=resource,
        sampler=_sampler(environ),
        timeout_s=_int(environ, _otlp(environ, "TIMEOUT")[0], 10000) / 1000.0,
        headers=_pairs(headers_name, headers), compression=compression or "none",
        **_batching(environ))


def preload(config: TraceConfig) -> None:
    """Import the SDK modules the export thread will need for ``config``."""
    import opentelemetry.sdk.trace.export  # noqa: F401
    if config.protocol == "grpc":
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
    else:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401


def otlp_exporter(config: TraceConfig) -> SpanExporter:
    """The SDK's OTLP span exporter for ``config`` (called in the export thread)."""
    if config.protocol == "grpc":
        from grpc import Compression as GrpcCompression
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(
            endpoint=config.url, insecure=config.url.startswith("http:"),
            headers=dict(config.headers) or None, timeout=config.timeout_s,
            compression=GrpcCompression.Gzip if config.compression == "gzip"
            else GrpcCompression.NoCompression)
    import requests
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )
    session = requests.Session()
    session.trust_env = False  # the collector is dialled directly, never via HTTP(S)_PROXY
    return HttpSpanExporter(
        endpoint=config.url, headers=dict(config.headers), timeout=config.timeout_s,
        compression=Compression.Gzip if config.compression == "gzip"
        else Compression.NoCompression, session=session)
