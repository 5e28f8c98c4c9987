"""Distributed tracing: one span per request per proxy, exported over OTLP off the hot path.

Theory of operation. The data path asks :meth:`Tracer.start` once per request head. With
tracing off that is one attribute test. With tracing on, :func:`~.propagation.extract` reads
the caller's context and the sampler decides (parent-based by default; for roots a ratio on the
low 64 bits of the trace id, as the OpenTelemetry SDK does, so every proxy that sees the trace
id agrees). The answer is:

- ``None``: nothing to do; forward the request's headers as they are. That is the case when
  tracing is off, when the caller already said "not sampled", and for roots when the root rate
  is 0.
- a *non-recording* :class:`SpanHandle`: not sampled, but the decision must travel (an unsampled
  root, or a decision that differs from the caller's), so that the next proxy does not roll the
  dice again and start an orphan trace. ``headers()`` carries the decision; ``end()`` does
  nothing.
- a *recording* handle: ``headers()`` carries the new span's context; ``end()`` stamps the end
  time and the response fields and appends the handle to a bounded deque. Nothing else happens
  on the hot path: no string is decoded and no attribute dict is built.

An export thread (:class:`ExportPipeline`) wakes every ``OTEL_BSP_SCHEDULE_DELAY`` or when a
batch is full, turns handles into SDK ``ReadableSpan`` objects (attributes per the HTTP and RPC
semantic conventions: :mod:`.tracing_spans`) and hands them to the SDK's OTLP exporter (gRPC
or HTTP/protobuf). The SDK's own tracer is not used on the hot path: it measured ~14 us per span
here against ~5 us for start + headers + end of this handle (bench/trace_cost.py). A full queue
drops the new span; a failed export (collector down, after the exporter's retries within its
timeout) drops the batch; both are counted. Requests never wait for the collector.

The SDK is imported when the tracer is made: an import in the export thread would hold the GIL
for ~0.2 s while requests wait. The exporter and its gRPC channel are created in the export
thread on first use, and a forked child starts with an empty queue, zero counters, a re-seeded
id generator and no thread, so a tracer built before workers fork is safe.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from appliance.telemetry.propagation import (
    NOTHING,
    TRACEPARENT,
    Headers,
    SpanContext,
    extract,
    inject,
    replace,
)
from appliance.telemetry.tracing_config import (
    Sampler,
    TraceConfig,
    TraceConfigError,
    otlp_exporter,
    parse_environ,
    preload,
)
from appliance.telemetry.tracing_spans import INBOUND, OUTBOUND, AttrValue, Converter

__all__ = [
    "INBOUND", "OUTBOUND", "OFF", "ExportPipeline", "RecordingSpan", "Sampler", "SpanHandle",
    "TraceConfig", "TraceConfigError", "Tracer", "from_environ", "parse_environ",
]

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("appliance.tracing")


# -------------------------------------------------------------------------------- spans


class SpanHandle:
    """One request's place in a trace, in one proxy. Made by :meth:`Tracer.start`; the data
    path calls :meth:`headers` (or :meth:`apply`) for what to send on, and :meth:`end` once.
    This base class is the non-recording handle: it only carries a "not sampled" decision."""

    __slots__ = ("trace_id", "span_id", "parent", "formats")
    recording = False

    def __init__(self, trace_id: int, span_id: int, parent: SpanContext | None,
                 formats: int) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        self.formats = formats

    @property
    def context(self) -> SpanContext:
        """This span's context, as the next hop will see it."""
        p, recording = self.parent, self.recording
        if p is None:
            return SpanContext(self.trace_id, self.span_id, recording)
        return SpanContext(self.trace_id, self.span_id, recording, p.debug and recording,
                           p.tracestate, p.short_trace_id)

    @property
    def parent_span_id(self) -> int:
        return self.parent.span_id if self.parent is not None else 0

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The propagation headers to send upstream, replacing every incoming one, in the
        formats the request used (W3C when it used none)."""
        if self.parent is None and not self.formats:
            return [(TRACEPARENT, b"00-%032x-%016x-%s" % (
                self.trace_id, self.span_id, b"01" if self.recording else b"00"))]
        return inject(self.context, self.formats, self.parent_span_id)

    def apply(self, headers: Headers) -> list[tuple[bytes, bytes]]:
        """``headers`` with the incoming propagation headers replaced by :meth:`headers`."""
        return replace(headers, self.headers())

    def end(self, status: int = 0, grpc_status: int | str | None = None, error: str = "", *,
            peer: Sequence[Any] | None = None, retries: int = 0, client_id: str = "",
            server_id: str = "", attributes: Mapping[str, AttrValue] | None = None,
            now_ns: int | None = None) -> None:
        """The response ended (or failed: ``error`` says how). Not recording: nothing to do."""

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.trace_id:032x}/{self.span_id:016x} "
                f"parent={self.parent_span_id:016x}>")


class _CleanRoot(SpanHandle):
    """A root that lost the sampling draw, for a request that carried no propagation header:
    the hot case at low sampling rates, so :meth:`apply` only appends (nothing to strip)."""

    __slots__ = ()

    def apply(self, headers: Headers) -> list[tuple[bytes, bytes]]:
        out = list(headers)
        out.append((TRACEPARENT, b"00-%032x-%016x-00" % (self.trace_id, self.span_id)))
        return out


class RecordingSpan(SpanHandle):
    """A sampled span: :meth:`end` queues it for export. The request and response fields are
    kept as the data path gave them (bytes) and turned into attributes in the export thread."""

    __slots__ = (
        "_pipeline", "_clock", "server", "start_ns", "end_ns", "method", "target", "authority",
        "scheme", "version", "user_agent", "content_type", "peer", "status", "grpc_status",
        "error", "retries", "client_id", "server_id", "attributes",
    )
    recording = True

    def __init__(self, pipeline: ExportPipeline, trace_id: int, span_id: int,
                 parent: SpanContext | None, formats: int, server: bool,
                 clock: Callable[[], int]) -> None:
        super().__init__(trace_id, span_id, parent, formats)
        self._pipeline: ExportPipeline | None = pipeline
        self._clock = clock
        self.server = server
        self.start_ns = self.end_ns = 0
        self.method = self.target = self.authority = self.user_agent = b""
        self.content_type = self.scheme = b""
        self.version = "1.1"
        self.peer: Sequence[Any] | None = None
        self.status = 0
        self.grpc_status: int | str | None = None
        self.error = self.client_id = self.server_id = ""
        self.retries = 0
        self.attributes: Mapping[str, AttrValue] | None = None

    def end(self, status: int = 0, grpc_status: int | str | None = None, error: str = "", *,
            peer: Sequence[Any] | None = None, retries: int = 0, client_id: str = "",
            server_id: str = "", attributes: Mapping[str, AttrValue] | None = None,
            now_ns: int | None = None) -> None:
        """The response ended (or failed: ``error`` says how). Only the first call counts."""
        pipeline = self._pipeline
        if pipeline is None:
            return
        self._pipeline = None
        self.end_ns = self._clock() if now_ns is None else now_ns
        self.status = status
        self.grpc_status = grpc_status
        self.error = error
        if peer is not None:
            self.peer = peer
        self.retries = retries
        self.client_id = client_id
        self.server_id = server_id
        self.attributes = attributes
        pipeline.offer(self)

    def __repr__(self) -> str:
        kind = "server" if self.server else "client"
        return f"{super().__repr__()[:-1]} {kind}>"


def _request_fields(h: RecordingSpan, headers: Headers) -> None:
    """Copy what the span needs from the request headers (recording spans only)."""
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method" and not h.method:
                h.method = value
            elif name == b":path" and not h.target:
                h.target = value
            elif name == b":authority" and not h.authority:
                h.authority = value
            elif name == b":scheme":
                h.scheme = value
            continue
        name = name.lower()
        if name == b"host" and not h.authority:
            h.authority = value
        elif name == b"user-agent":
            h.user_agent = value
        elif name == b"content-type":
            h.content_type = value


# -------------------------------------------------------------------------------- export


class ExportPipeline:
    """A bounded queue of ended spans and the one thread that exports them in batches."""

    def __init__(self, make_exporter: Callable[[], SpanExporter],
                 convert: Callable[[RecordingSpan], ReadableSpan], *, max_queue: int = 2048,
                 batch: int = 512, delay_s: float = 5.0) -> None:
        self._make_exporter = make_exporter
        self._convert = convert
        self.max_queue = max_queue
        self._batch = batch
        self._delay_s = delay_s
        self._reset()
        os.register_at_fork(after_in_child=_weak_call(self, ExportPipeline._reset))

    def _reset(self) -> None:
        self._queue: deque[RecordingSpan] = deque()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._pop_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._exporter: SpanExporter | None = None
        self._closed = self._abandon = self._failing = False
        self._flush_asked = self._flush_done = 0
        self._full_drops = 0  # written by the data-path thread only
        self._failed = self._exported = 0  # written by the export thread only
        self._abandoned = 0  # written by shutdown only

    def offer(self, span: RecordingSpan) -> None:
        """Queue an ended span (hot path: an append, or a counted drop)."""
        q = self._queue
        if len(q) >= self.max_queue or self._closed:
            self._full_drops += 1
            return
        q.append(span)
        if self._thread is None:
            self._start()
        elif len(q) >= self._batch and not self._wake.is_set():
            self._wake.set()

    @property
    def exported(self) -> int:
        return self._exported

    @property
    def dropped(self) -> int:
        return self._full_drops + self._failed + self._abandoned

    def queued(self) -> int:
        return len(self._queue)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="appliance-otlp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            with self._cond:
                target, stopping = self._flush_asked, self._closed
            self._drain()
            with self._cond:
                self._flush_done = max(self._flush_done, target)
                self._cond.notify_all()
            if stopping:
                return

    def _next_batch(self) -> list[RecordingSpan]:
        with self._pop_lock:
            if self._abandon:
                return []
            q = self._queue
            return [q.popleft() for _ in range(min(self._batch, len(q)))]

    def _drain(self) -> None:
        while batch := self._next_batch():
            if self._export(batch):
                self._exported += len(batch)
            else:
                self._failed += len(batch)

    def _export(self, batch: list[RecordingSpan]) -> bool:
        from opentelemetry.sdk.trace.export import SpanExportResult
        problem: Exception | None = None
        try:
            if self._exporter is None:
                self._exporter = self._make_exporter()
            ok = self._exporter.export([self._convert(s) for s in batch]) \
                is SpanExportResult.SUCCESS
        except Exception as exc:
            ok, problem = False, exc
        if ok == self._failing:  # log changes of state only, never each batch
            self._failing = not ok
            if ok:
                log.info("tracing: exporting spans again")
            else:
                log.warning("tracing: cannot export spans (%s); dropping them until the "
                            "collector answers", problem or "the exporter gave up",
                            exc_info=problem)
        return ok

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export everything queued now; False if that did not finish within ``timeout_s``."""
        if self._thread is None:
            return not self._queue
        with self._cond:
            self._flush_asked += 1
            target = self._flush_asked
            self._wake.set()
            return self._cond.wait_for(lambda: self._flush_done >= target, timeout_s)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush for up to ``timeout_s``, then drop (and count) what is left. Idempotent."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout_s
        self._closed = True
        thread = self._thread
        if thread is not None:
            self._wake.set()
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._pop_lock:
            self._abandon = True
            self._abandoned += len(self._queue)
            self._queue.clear()
        if self._exporter is not None:
            try:
                self._exporter.shutdown()
            except Exception:
                log.exception("tracing: exporter shutdown failed")


# -------------------------------------------------------------------------------- tracer


class Tracer:
    """Per-request spans for one proxy process; see the module docstring."""

    def __init__(self, config: TraceConfig | None, *, clock: Callable[[], int] = time.time_ns,
                 rng: random.Random | None = None,
                 exporter: Callable[[TraceConfig], SpanExporter] = otlp_exporter,
                 instance_id: str = "") -> None:
        self.config = config
        self.on = config is not None
        self._clock = clock
        self._rng = rng if rng is not None else _forked_rng()
        self._sampler = config.sampler if config is not None else Sampler(True, 0)
        self._pipeline: ExportPipeline | None = None
        if config is not None:
            preload(config)  # import the SDK now, not in the export thread while serving
            self._pipeline = ExportPipeline(
                lambda: exporter(config), Converter(config, instance_id),
                max_queue=config.max_queue, batch=config.batch, delay_s=config.delay_s)

    def start(self, direction: str, headers: Headers, *, method: bytes = b"",
              target: bytes = b"", authority: bytes = b"", version: str = "1.1",
              peer: Sequence[Any] | None = None, now_ns: int | None = None,
              has_context: bool | None = None, root_id: int = 0) -> SpanHandle | None:
        """A span for a request whose head just arrived (see the module docstring).

        ``direction`` is ``"inbound"`` (server span) or ``"outbound"`` (client span).
        ``headers`` are the request's headers as received; HTTP/2 pseudo-headers fill in
        ``method``, ``target`` and ``authority`` when those are not given, ``Host`` fills in
        ``authority``. ``peer`` is the remote address (the client inbound; outbound, pass the
        chosen endpoint to :meth:`SpanHandle.end` instead).
        """
        if not self.on:
            return None
        server = direction == INBOUND
        if not server and direction != OUTBOUND:
            raise ValueError(f"direction: {direction!r} is not inbound or outbound")
        if has_context is False:
            # The data path saw no propagation header while parsing: a root. Unsampled
            # roots cost one draw and tell nobody (as linkerd2-proxy, which adds no
            # context to requests it does not trace); the next proxy decides for itself.
            trace_id = root_id or self.draw_root()
            if not trace_id:
                return None
            return self._recording(server, trace_id, None, 0, headers, method, target,
                                   authority, version, peer, now_ns)
        ex = extract(headers)
        sampler, told, parent = self._sampler, ex.sampled, ex.context
        if told is None and not sampler.bound or told is False and sampler.parent_based:
            return None  # nothing to record, and nothing new to tell the next hop
        trace_id = parent.trace_id if parent is not None else self._new_id(128)
        sampled = True if told and sampler.parent_based else sampler.root(trace_id)
        if not sampled and told is False:
            return None  # the caller's "not sampled" travels on as it is
        span_id = self._new_id(64)
        if not sampled:
            if ex is NOTHING:  # no propagation header came in: appending ours is enough
                return _CleanRoot(trace_id, span_id, None, 0)
            return SpanHandle(trace_id, span_id, parent, ex.formats)
        return self._recording(server, trace_id, parent, ex.formats, headers, method, target,
                               authority, version, peer, now_ns, span_id)

    def _recording(self, server: bool, trace_id: int, parent: SpanContext | None,
                   formats: int, headers: Headers, method: bytes, target: bytes,
                   authority: bytes, version: str, peer: Sequence[Any] | None,
                   now_ns: int | None, span_id: int = 0) -> RecordingSpan:
        assert self._pipeline is not None
        h = RecordingSpan(self._pipeline, trace_id, span_id or self._new_id(64), parent,
                          formats, server, self._clock)
        h.method, h.target, h.authority, h.version, h.peer = \
            method, target, authority, version, peer
        _request_fields(h, headers)
        h.start_ns = self._clock() if now_ns is None else now_ns
        return h

    def draw_root(self) -> int:
        """The sampling draw for a request with no trace context: its trace id when it is
        sampled, else 0 (the data path's cheap first step; see :meth:`start`)."""
        trace_id = self._new_id(128)
        return trace_id if self._sampler.root(trace_id) else 0

    def _new_id(self, bits: int) -> int:
        getrandbits = self._rng.getrandbits
        while not (value := getrandbits(bits)):
            pass
        return value

    def dropped_spans(self) -> int:
        """Spans lost: queue full, export failed, or left at shutdown."""
        return self._pipeline.dropped if self._pipeline is not None else 0

    def exported_spans(self) -> int:
        """Spans the collector accepted."""
        return self._pipeline.exported if self._pipeline is not None else 0

    def queued_spans(self) -> int:
        return self._pipeline.queued() if self._pipeline is not None else 0

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export what is queued now (blocking; tests, and before stop)."""
        return self._pipeline.flush(timeout_s) if self._pipeline is not None else True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush for up to ``timeout_s`` and stop the export thread (blocking: from the event
        loop, run it in an executor). Spans ended afterwards are dropped and counted."""
        if self._pipeline is not None:
            self._pipeline.shutdown(timeout_s)


def _forked_rng() -> random.Random:
    """A Random seeded from the OS, re-seeded in a forked child so workers never share ids."""
    rng = random.Random()
    os.register_at_fork(after_in_child=_weak_call(rng, random.Random.seed))
    return rng


def _weak_call(obj: Any, method: Callable[[Any], None]) -> Callable[[], None]:
    """``method(obj)`` as long as ``obj`` lives (fork hooks must not keep objects alive)."""
    ref = weakref.ref(obj)

    def call() -> None:
        target = ref()
        if target is not None:
            method(target)
    return call


OFF = Tracer(None)
"""A tracer that never traces."""


def from_environ(environ: Mapping[str, str], *, clock: Callable[[], int] = time.time_ns,
                 rng: random.Random | None = None,
                 exporter: Callable[[TraceConfig], SpanExporter] = otlp_exporter,
                 instance_id: str = "") -> Tracer:
    """The tracer the OTEL_* variables in ``environ`` describe (off without an endpoint)."""
    config = parse_environ(environ)
    if config is None:
        return OFF
    return Tracer(config, clock=clock, rng=rng, exporter=exporter, instance_id=instance_id)
