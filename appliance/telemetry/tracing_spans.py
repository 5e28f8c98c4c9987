"""What a finished span says: its name, attributes and status, per OpenTelemetry's HTTP and
RPC semantic conventions, and the conversion to the SDK's ``ReadableSpan``.

All of this runs in the export thread, on the raw bytes the data path stored on the handle, so
the hot path never decodes or formats anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from appliance.telemetry.tracing_config import TraceConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

    from appliance.telemetry.tracing import RecordingSpan

INBOUND = "inbound"
OUTBOUND = "outbound"
AttrValue = str | bool | int | float

_KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"))
# gRPC codes that make a server span an error (the RPC semantic conventions' list).
_GRPC_SERVER_ERRORS = frozenset((2, 4, 12, 13, 14, 15))
# Query keys whose values the HTTP semantic conventions ask to redact.
_SECRET_QUERY_KEYS = ("AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature")
GRPC_CODE_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _host_port(authority: str) -> tuple[str, int | None]:
    host, port = authority, None
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[1:end], authority[end + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif authority.count(":") == 1:
        name, _, digits = authority.partition(":")
        if digits.isdigit():
            host, port = name, int(digits)
    return host, port


def _grpc_code(h: RecordingSpan) -> int | None:
    code = h.grpc_status
    if isinstance(code, str):
        return int(code) if code.isdigit() else None
    return code


def is_grpc(h: RecordingSpan) -> bool:
    return h.content_type.startswith(b"application/grpc")


def is_thrift(h: RecordingSpan) -> bool:
    """A Thrift call: the data path says so with ``rpc.system`` in its extra attributes."""
    return (h.attributes or {}).get("rpc.system") == "thrift"


def span_name(h: RecordingSpan) -> str:
    """``pkg.Service/Method`` for gRPC, the method for Thrift, else the HTTP method (``HTTP``
    for unknown ones)."""
    if is_grpc(h) and h.target.count(b"/") == 2:
        return _text(h.target[1:])
    if is_thrift(h):
        return str((h.attributes or {}).get("rpc.method", "thrift"))
    method = _text(h.method)
    return method if method in _KNOWN_METHODS else "HTTP"


def redact_query(query: str) -> str:
    """The query with the values the HTTP conventions name as secrets replaced by REDACTED."""
    if not query or not any(key in query for key in _SECRET_QUERY_KEYS):
        return query
    out = []
    for part in query.split("&"):
        key, eq, _ = part.partition("=")
        out.append(f"{key}=REDACTED" if eq and key in _SECRET_QUERY_KEYS else part)
    return "&".join(out)


def _http_attributes(h: RecordingSpan, a: dict[str, AttrValue]) -> None:
    method = _text(h.method)
    if method in _KNOWN_METHODS:
        a["http.request.method"] = method
    else:
        a["http.request.method"] = "_OTHER"
        a["http.request.method_original"] = method
    target, authority = _text(h.target), _text(h.authority)
    scheme = _text(h.scheme) or "http"
    path, _, query = target.partition("?")
    if "://" in path:  # absolute-form target (a request to an explicit proxy)
        parts = urlsplit(target)
        netloc = parts.netloc.rpartition("@")[2]  # never export credentials
        scheme, path, query = parts.scheme or scheme, parts.path or "/", parts.query
        authority = authority or netloc
    query = redact_query(query)
    a["url.path"] = path
    if query:
        a["url.query"] = query
    if h.server:
        a["url.scheme"] = scheme
    elif authority:
        a["url.full"] = f"{scheme}://{authority}{path}" + (f"?{query}" if query else "")
    if authority:
        host, port = _host_port(authority)
        a["server.address"] = host
        if port is not None:
            a["server.port"] = port
    a["network.protocol.name"] = "http"
    a["network.protocol.version"] = h.version
    if h.user_agent:
        a["user_agent.original"] = _text(h.user_agent)
    if h.status:
        a["http.response.status_code"] = h.status
    if h.retries:
        a["http.request.resend_count"] = h.retries


def span_attributes(h: RecordingSpan) -> dict[str, AttrValue]:
    """The span's attributes: OpenTelemetry HTTP and RPC semantic conventions, plus
    ``appliance.*`` for the mesh (direction, identities) and the caller's extras."""
    a: dict[str, AttrValue] = {}
    if not is_thrift(h):  # Thrift calls carry the RPC attributes the data path gives
        _http_attributes(h, a)
    if h.peer is not None and len(h.peer) >= 2:
        a["network.peer.address"] = str(h.peer[0])
        a["network.peer.port"] = int(h.peer[1])
        if h.server:
            a["client.address"] = str(h.peer[0])
    if is_grpc(h):
        a["rpc.system"] = "grpc"
        service, _, method = _text(h.target).lstrip("/").partition("/")
        a["rpc.service"], a["rpc.method"] = service, method
        if (code := _grpc_code(h)) is not None:
            a["rpc.grpc.status_code"] = code
    if (err := error_type(h)) is not None:
        a["error.type"] = err
    a["appliance.direction"] = INBOUND if h.server else OUTBOUND
    if h.client_id:
        a["appliance.client_id"] = h.client_id
    if h.server_id:
        a["appliance.server_id"] = h.server_id
    for key, value in (h.attributes or {}).items():
        if isinstance(key, str) and isinstance(value, str | bool | int | float):
            a[key] = value
    return a


def error_type(h: RecordingSpan) -> str | None:
    """Why the span failed, or None: the error, else the gRPC code name or HTTP status that
    counts as a failure (server spans: 5xx and the server-fault gRPC codes; client spans: 4xx
    too, and any non-zero gRPC code)."""
    if h.error:
        return h.error
    code = _grpc_code(h) if is_grpc(h) else None
    if code is not None and code != 0:
        if not h.server or code in _GRPC_SERVER_ERRORS:
            return GRPC_CODE_NAMES[code] if code < len(GRPC_CODE_NAMES) else str(code)
        return None
    if h.status >= 500 or (h.status >= 400 and not h.server):
        return str(h.status)
    return None


class Converter:
    """Handle -> SDK ReadableSpan, in the export thread (the SDK is imported there)."""

    def __init__(self, config: TraceConfig, instance_id: str) -> None:
        from opentelemetry import trace as otel_trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan as Readable
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from appliance import __version__
        attrs: dict[str, str] = {
            "telemetry.sdk.name": "opentelemetry", "telemetry.sdk.language": "python",
            **config.resource, "service.name": config.service_name}
        if instance_id:
            attrs["service.instance.id"] = instance_id
        self.resource = Resource(attrs)
        self.scope = InstrumentationScope("appliance", __version__)
        self.otel = otel_trace
        self.readable = Readable
        self.unset = otel_trace.Status(otel_trace.StatusCode.UNSET)

    def __call__(self, h: RecordingSpan) -> ReadableSpan:
        otel = self.otel
        p = h.parent
        state = otel.TraceState.from_header([p.tracestate.decode()]) \
            if p is not None and p.tracestate else None
        ctx = otel.SpanContext(h.trace_id, h.span_id, False, otel.TraceFlags(1), state)
        parent = otel.SpanContext(p.trace_id, p.span_id, True,
                                  otel.TraceFlags(1 if p.sampled else 0)) if p else None
        err = error_type(h)
        return self.readable(
            name=span_name(h), context=ctx, parent=parent, resource=self.resource,
            attributes=span_attributes(h),
            kind=otel.SpanKind.SERVER if h.server else otel.SpanKind.CLIENT,
            status=self.unset if err is None else otel.Status(otel.StatusCode.ERROR, h.error),
            start_time=h.start_ns, end_time=h.end_ns, instrumentation_scope=self.scope)
