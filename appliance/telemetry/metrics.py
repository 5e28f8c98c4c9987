"""Every metric family the proxy exports, and their Prometheus text exposition.

Hot-path rule: recording is a plain integer add on an object the connection already holds
(``stats.requests += 1``); label sets are resolved once per connection, not per request, and
the text is built only when /metrics is scraped. Names, labels and latency buckets follow
linkerd2-proxy so existing dashboards and queries work.
"""

from __future__ import annotations

import os
import resource
import time
from bisect import bisect_left
from typing import Any

# linkerd2-proxy's response_latency_ms bucket bounds.
LATENCY_BUCKETS_MS = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
)


def classify(status: int, grpc_status: str = "") -> str:
    """linkerd's default classification: gRPC by grpc-status (0 is success), HTTP by status
    (5xx is a failure, everything else success)."""
    if grpc_status:
        return "success" if grpc_status == "0" else "failure"
    return "failure" if status >= 500 else "success"


MAX_SERIES = 1000
"""Most HTTP label sets per direction; past it, new authorities and services are counted
under ``authority="overflow"``, ``dst_service="overflow"`` (bounded cardinality)."""
SERIES_TTL = 600.0
"""Seconds a label set may see no request before it is dropped from /metrics."""


class HttpStats:
    """Request/response counters for one label set (direction, protocol, authority,
    dst_service)."""

    __slots__ = ("labels", "requests", "responses", "buckets", "latency_sum", "latency_count",
                 "seen", "seen_at")

    def __init__(self, labels: tuple[tuple[str, str], ...]) -> None:
        self.labels = labels
        self.seen = -1  # requests at the last scrape that saw a change, and when
        self.seen_at = 0.0
        self.requests = 0
        self.responses: dict[tuple[int, str, str], int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def response(self, status: int, latency_s: float, error: str = "",
                 grpc_status: str = "") -> None:
        key = (status, error, grpc_status)
        responses = self.responses
        responses[key] = responses.get(key, 0) + 1
        ms = latency_s * 1000.0
        self.buckets[bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.latency_sum += ms
        self.latency_count += 1


class _DiscardHttp(HttpStats):
    """What ``Registry.http`` hands out when metrics are off: counts nothing."""

    __slots__ = ()

    def response(self, status: int, latency_s: float, error: str = "",
                 grpc_status: str = "") -> None:
        pass


# Buckets of tcp_connection_duration_ms (as linkerd2-proxy's: decades from 1 ms).
DURATION_BUCKETS_MS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)


class TcpStats:
    """Connection counters for one label set (direction, protocol, peer)."""

    __slots__ = ("labels", "opened", "closed", "read_bytes", "write_bytes", "durations",
                 "duration_sum")

    def __init__(self, labels: tuple[tuple[str, str], ...]) -> None:
        self.labels = labels
        self.opened = 0
        self.closed = 0
        self.read_bytes = 0
        self.write_bytes = 0
        self.durations = [0] * (len(DURATION_BUCKETS_MS) + 1)
        self.duration_sum = 0.0

    def open(self) -> float:
        """Count a connection opened; returns when, for :meth:`close`."""
        self.opened += 1
        return time.monotonic()

    def close(self, opened_at: float) -> None:
        """Count a connection closed, and how long it was open."""
        self.closed += 1
        ms = (time.monotonic() - opened_at) * 1000.0
        self.durations[bisect_left(DURATION_BUCKETS_MS, ms)] += 1
        self.duration_sum += ms


class AuthzStats:
    """Authorization decisions for one label set (port, tls, client_id): requests for
    HTTP, connections for TCP."""

    __slots__ = ("labels", "allow", "deny")

    def __init__(self, labels: tuple[tuple[str, str], ...]) -> None:
        self.labels = labels
        self.allow = 0
        self.deny = 0


class Registry:
    """Holds every stats object; builds the exposition on scrape."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # off: nothing is recorded (to measure what metrics cost)
        self._discard_http = _DiscardHttp((("direction", "none"),))
        self._discard_tcp = TcpStats((("direction", "none"),))
        self._http: dict[tuple[str, str, str, str, str], HttpStats] = {}
        self._series: dict[str, int] = {}  # label sets per direction
        self.generation = 0  # goes up whenever expire() drops a label set (for caches)
        self._tcp: dict[tuple[tuple[str, str], ...], TcpStats] = {}
        self._authz: dict[tuple[str, tuple[tuple[str, str], ...]], AuthzStats] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.discovery_results: dict[tuple[str, str], int] = {}
        self.retries: dict[tuple[str, str, str], int] = {}  # see the "retries" section
        self.config_reloads = {"ok": 0, "error": 0}
        self.tracer: Any = None  # set by the proxy; its span counters are rendered
        self.identity: Any = None  # the IdentityManager, when identity is on
        self.routers: Any = None  # () -> [(direction, Router)], set by the proxy
        self.start_time = time.time()

    def http(self, direction: str, protocol: str = "http/1", authority: str = "",
             dst_service: str = "", method: str = "") -> HttpStats:
        """The counters of one label set (made on first use; a dict lookup after that).
        ``method`` is an RPC method name (Thrift), not an HTTP method."""
        if not self.enabled:
            return self._discard_http
        key = (direction, protocol, authority, dst_service, method)
        stats = self._http.get(key)
        if stats is None:
            if self._series.get(direction, 0) >= MAX_SERIES \
                    and (authority or dst_service or method) and authority != "overflow":
                return self.http(direction, protocol, "overflow", "overflow")
            labels: tuple[tuple[str, str], ...] = (("direction", direction),
                                                   ("protocol", protocol))
            if authority:
                labels += (("authority", authority),)
            if dst_service:
                labels += (("dst_service", dst_service),)
            if method:
                labels += (("method", method),)
            stats = self._http[key] = HttpStats(labels)
            self._series[direction] = self._series.get(direction, 0) + 1
        return stats

    def http_series(self) -> list[HttpStats]:
        """Every live HTTP label set (for the admin APIs)."""
        return list(self._http.values())

    def tcp_series(self) -> list[TcpStats]:
        return list(self._tcp.values())

    def expire(self, now: float) -> None:
        """Drop label sets with an authority or service that saw no request for
        ``SERIES_TTL`` seconds and have none in flight (called at scrape)."""
        for key, stats in list(self._http.items()):
            if stats.requests != stats.seen:
                stats.seen, stats.seen_at = stats.requests, now
            elif (key[2] or key[3] or key[4]) and now - stats.seen_at > SERIES_TTL \
                    and stats.requests <= stats.latency_count:
                del self._http[key]
                self._series[key[0]] -= 1
                self.generation += 1

    def tcp(self, direction: str, protocol: str, peer: str,
            tls: tuple[tuple[str, str], ...] = ()) -> TcpStats:
        """``tls``: the ``tls``, ``client_id``, ``server_id`` labels of mesh connections."""
        if not self.enabled:
            return self._discard_tcp
        labels = (("direction", direction), ("peer", peer), ("protocol", protocol)) + tls
        stats = self._tcp.get(labels)
        if stats is None:
            stats = self._tcp[labels] = TcpStats(labels)
        return stats

    def authz(self, kind: str, labels: tuple[tuple[str, str], ...]) -> AuthzStats:
        """Inbound authorization counters; ``kind`` is ``http`` (per request) or ``tcp``
        (per connection)."""
        key = (kind, labels)
        stats = self._authz.get(key)
        if stats is None:
            stats = self._authz[key] = AuthzStats(labels)
        return stats

    def error(self, direction: str, kind: str) -> None:
        """Count a connection-level error (detection failure, refused loop, ...)."""
        key = (direction, kind)
        self.errors[key] = self.errors.get(key, 0) + 1

    def discovery(self, namer: str, ok: bool) -> None:
        """Count one answer (or failure) of a service-discovery source."""
        key = (namer, "ok" if ok else "error")
        self.discovery_results[key] = self.discovery_results.get(key, 0) + 1

    def config_reload(self, ok: bool) -> None:
        self.config_reloads["ok" if ok else "error"] += 1

    # --- exposition ----------------------------------------------------------------------
    def render(self) -> str:
        self.expire(time.monotonic())
        out: list[str] = []
        self._render_http(out)
        self._render_tcp(out)
        self._render_errors(out)
        self._render_retries(out)
        self._render_authz(out)
        self._render_discovery(out)
        _render_process(out, self.start_time)
        return "\n".join(out) + "\n"

    def _render_http(self, out: list[str]) -> None:
        http = list(self._http.values())
        _family(out, "request_total", "counter", "Total count of HTTP requests.")
        for s in http:
            out.append(f"request_total{_fmt(s.labels)} {s.requests}")
        _family(out, "response_total", "counter", "Total count of HTTP responses.")
        for s in http:
            for (status, error, grpc_status), n in sorted(s.responses.items()):
                extra = [("status_code", str(status)),
                         ("classification", classify(status, grpc_status))]
                if grpc_status:
                    extra.append(("grpc_status", grpc_status))
                if error:
                    extra.append(("error", error))
                out.append(f"response_total{_fmt(s.labels + tuple(extra))} {n}")
        _family(out, "response_latency_ms", "histogram",
                "Elapsed times between a request's headers being received and its response "
                "stream completing.")
        for s in http:
            cumulative = 0
            for bound, n in zip((*LATENCY_BUCKETS_MS, "+Inf"), s.buckets, strict=True):
                cumulative += n
                labels = s.labels + (("le", str(bound)),)
                out.append(f"response_latency_ms_bucket{_fmt(labels)} {cumulative}")
            out.append(f"response_latency_ms_sum{_fmt(s.labels)} {s.latency_sum:.3f}")
            out.append(f"response_latency_ms_count{_fmt(s.labels)} {s.latency_count}")

    def _render_tcp(self, out: list[str]) -> None:
        tcp = list(self._tcp.values())
        rows = (
            ("tcp_open_total", "counter", "Total count of opened connections.",
             lambda s: s.opened),
            ("tcp_open_connections", "gauge", "Number of currently-open connections.",
             lambda s: s.opened - s.closed),
            ("tcp_close_total", "counter", "Total count of closed connections.",
             lambda s: s.closed),
            ("tcp_read_bytes_total", "counter", "Total count of bytes read from peers.",
             lambda s: s.read_bytes),
            ("tcp_write_bytes_total", "counter", "Total count of bytes written to peers.",
             lambda s: s.write_bytes),
        )
        for name, kind, help_text, value in rows:
            _family(out, name, kind, help_text)
            for s in tcp:
                out.append(f"{name}{_fmt(s.labels)} {value(s)}")
        _family(out, "tcp_connection_duration_ms", "histogram",
                "How long closed connections were open.")
        for s in tcp:
            cumulative = 0
            for bound, n in zip((*DURATION_BUCKETS_MS, "+Inf"), s.durations, strict=True):
                cumulative += n
                out.append(f"tcp_connection_duration_ms_bucket"
                           f"{_fmt(s.labels + (('le', str(bound)),))} {cumulative}")
            out.append(f"tcp_connection_duration_ms_sum{_fmt(s.labels)} {s.duration_sum:.3f}")
            out.append(f"tcp_connection_duration_ms_count{_fmt(s.labels)} {cumulative}")

    def _render_errors(self, out: list[str]) -> None:
        _family(out, "proxy_errors_total", "counter",
                "Connections or requests the proxy refused or failed, by cause.")
        for (direction, kind), n in sorted(self.errors.items()):
            out.append(f"proxy_errors_total{_fmt((('direction', direction), ('error', kind)))}"
                       f" {n}")

    def _render_balancers(self, out: list[str]) -> None:
        from appliance.routing.path import show_path

        _family(out, "balancer_endpoints", "gauge",
                "Endpoints of each routed service's balancer, by failure-accrual state "
                "(alive, probing, ejected).")
        for direction, router in self.routers():
            for id, service in sorted(router.services.items()):
                counts = {"alive": 0, "probing": 0, "ejected": 0}
                for ep in service.balancer.endpoints():
                    state = ep.accrual.state
                    counts[state] = counts.get(state, 0) + 1
                for state, n in counts.items():
                    labels = (("direction", direction), ("dst_service", show_path(id)),
                              ("state", state))
                    out.append(f"balancer_endpoints{_fmt(labels)} {n}")

    def _render_authz(self, out: list[str]) -> None:
        for kind, unit in (("http", "requests"), ("tcp", "connections")):
            rows = [s for (k, _), s in self._authz.items() if k == kind]
            for verdict in ("allow", "deny"):
                name = f"inbound_{kind}_authz_{verdict}_total"
                _family(out, name, "counter",
                        f"Inbound {unit} {'allowed' if verdict == 'allow' else 'denied'} "
                        "by the port's authorization policy.")
                for s in rows:
                    out.append(f"{name}{_fmt(s.labels)} {getattr(s, verdict)}")

    # --- retries (docs/reliability.md) ---------------------------------------------------
    def retry(self, direction: str, reason: str) -> None:
        """One retry sent; ``reason`` is what failed: ``unsent`` (connect refused or timed
        out), ``response`` (a retryable response), ``connection`` (lost after sending),
        ``timeout`` (attempt timeout) or ``stale`` (a reused idle connection was closed)."""
        key = ("retry_total", direction, reason)
        self.retries[key] = self.retries.get(key, 0) + 1

    def retry_skipped(self, direction: str, reason: str) -> None:
        """A retryable failure that was not retried: ``budget``, ``limit`` (max_retries),
        ``body`` (too large to replay) or ``deadline``."""
        key = (("retry_budget_exhausted_total" if reason == "budget"
                else "retry_skipped_total"), direction, reason)
        self.retries[key] = self.retries.get(key, 0) + 1

    def _render_retries(self, out: list[str]) -> None:
        rows = sorted(self.retries.items())
        for name, help_text in (
                ("retry_total", "Retries sent, by what failed (reason)."),
                ("retry_budget_exhausted_total",
                 "Retryable failures not retried because the retry budget was spent."),
                ("retry_skipped_total", "Retryable failures not retried for another reason "
                                        "(max_retries, body too large to replay, deadline).")):
            _family(out, name, "counter", help_text)
            for (family, direction, reason), n in rows:
                if family != name:
                    continue
                labels: tuple[tuple[str, str], ...] = (("direction", direction),)
                if name != "retry_budget_exhausted_total":
                    labels += (("reason", reason),)
                out.append(f"{name}{_fmt(labels)} {n}")

    def _render_discovery(self, out: list[str]) -> None:
        _family(out, "discovery_updates_total", "counter",
                "Answers (result=ok) and failures (result=error) of service-discovery "
                "sources; while a source fails, its last good addresses stay in use.")
        for (namer, result), n in sorted(self.discovery_results.items()):
            out.append(f"discovery_updates_total{_fmt((('namer', namer), ('result', result)))}"
                       f" {n}")
        if self.tracer is not None and self.tracer.on:
            _family(out, "trace_spans_exported_total", "counter",
                    "Spans the OTLP collector accepted.")
            out.append(f"trace_spans_exported_total {self.tracer.exported_spans()}")
            _family(out, "trace_spans_dropped_total", "counter",
                    "Spans dropped: export queue full, collector unreachable, or shutdown.")
            out.append(f"trace_spans_dropped_total {self.tracer.dropped_spans()}")
        if self.routers is not None:
            self._render_balancers(out)
        identity = self.identity
        if identity is not None:
            expiry = identity.expiration_timestamp_seconds()
            _family(out, "identity_cert_expiration_timestamp_seconds", "gauge",
                    "When the proxy's current certificate expires (Unix time; 0 if none).")
            out.append(f"identity_cert_expiration_timestamp_seconds {expiry or 0:.0f}")
            _family(out, "identity_cert_refresh_count", "counter",
                    "Certificates received from the identity service (the first included).")
            out.append(f"identity_cert_refresh_count {identity.refresh_count}")
        _family(out, "config_reloads_total", "counter",
                "Config reloads (SIGHUP or a changed file) applied (ok) or rejected (error).")
        for result, n in self.config_reloads.items():
            out.append(f"config_reloads_total{_fmt((('result', result),))} {n}")


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _render_process(out: list[str], start_time: float) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _family(out, "process_cpu_seconds_total", "counter",
            "Total user and system CPU time spent in seconds.")
    out.append(f"process_cpu_seconds_total {usage.ru_utime + usage.ru_stime:.3f}")
    _family(out, "process_start_time_seconds", "gauge",
            "Start time of the process since unix epoch in seconds.")
    out.append(f"process_start_time_seconds {start_time:.3f}")
    rss = _rss_bytes()
    if rss is not None:
        _family(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
        out.append(f"process_resident_memory_bytes {rss}")
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        return
    _family(out, "process_open_fds", "gauge", "Number of open file descriptors.")
    out.append(f"process_open_fds {fds}")


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
