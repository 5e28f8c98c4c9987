"""Trace-context propagation: W3C Trace Context and B3 (single and multi header), pure.

Theory of operation. :func:`extract` makes one pass over a request's header list
(``(name, value)`` byte pairs; HTTP/1 names in any case, HTTP/2 names in lower case) and keeps
only the propagation headers. It answers an :class:`Extracted`: the parent context, if one
header set was valid, the sampling decision the caller sent (which B3 can send without any ids:
``b3: 0``), and the set of formats the request *used* (a header of the format was present,
valid or not). The proxy replaces the incoming propagation headers with its own, in the same
formats (:func:`inject`), or W3C when the request used none.

Invalid values are treated as absent, as both specs ask: a malformed ``traceparent`` means "no
W3C context" (and its ``tracestate`` is dropped with it); a malformed ``tracestate`` alone is
dropped while the ``traceparent`` stands. When several formats carry a valid context, W3C wins,
then B3 single, then B3 multi. A header that must appear once (``traceparent``, ``b3``, each
``X-B3-*``) and appears twice is invalid; ``tracestate`` lines are joined with commas
(RFC 9110 list semantics), as the W3C spec says.

B3 sampling states: ``1`` (accept), ``0`` (deny), ``d`` / ``X-B3-Flags: 1`` (debug, which
implies accept), or absent (deferred: the receiver decides). ``true``/``false`` in
``X-B3-Sampled`` are accepted as the B3 spec asks of instrumentation. 64-bit B3 trace ids are
widened to 128 bits with zeros and written back in their 16-hex-digit form.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

Headers = Sequence[tuple[bytes, bytes]]

W3C = 1
B3_SINGLE = 2
B3_MULTI = 4
ALL_FORMATS = W3C | B3_SINGLE | B3_MULTI

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3 = b"b3"
B3_TRACE_ID = b"x-b3-traceid"
B3_SPAN_ID = b"x-b3-spanid"
B3_PARENT_SPAN_ID = b"x-b3-parentspanid"
B3_SAMPLED = b"x-b3-sampled"
B3_FLAGS = b"x-b3-flags"

_FORMAT_OF: dict[bytes, int] = {
    TRACEPARENT: W3C, TRACESTATE: W3C, B3: B3_SINGLE, B3_TRACE_ID: B3_MULTI,
    B3_SPAN_ID: B3_MULTI, B3_PARENT_SPAN_ID: B3_MULTI, B3_SAMPLED: B3_MULTI, B3_FLAGS: B3_MULTI,
}
PROPAGATION_HEADERS = frozenset(_FORMAT_OF)
"""Lower-case names of every header this module reads or writes."""

_OWS = b" \t"
_TRACEPARENT_RE = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?",
                             re.DOTALL)
_ODD_HEX = b"13579bdf"  # the last flags digit has the sampled bit set
_HEX16_RE = re.compile(rb"[0-9a-f]{16}")
_TRACE_ID_RE = re.compile(rb"[0-9a-f]{32}|[0-9a-f]{16}")
_TS_KEY_RE = re.compile(
    rb"[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}")
_TS_VALUE_RE = re.compile(rb"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_TS_MAX_MEMBERS = 32
_B3_STATES: dict[bytes, bool] = {b"1": True, b"0": False, b"d": True}
_B3_SAMPLED: dict[bytes, bool] = {b"1": True, b"0": False, b"true": True, b"false": False}


class SpanContext(NamedTuple):
    """The part of a span that crosses process boundaries."""

    trace_id: int
    """128 bits, never 0."""
    span_id: int
    """64 bits, never 0."""
    sampled: bool | None
    """The sender's decision; None when B3 deferred it."""
    debug: bool = False
    """B3 debug (``d`` / ``X-B3-Flags: 1``); implies sampled."""
    tracestate: bytes = b""
    """The W3C ``tracestate``, validated and re-joined, or empty."""
    short_trace_id: bool = False
    """The B3 trace id came as 16 hex digits (64 bits)."""


class Extracted(NamedTuple):
    """What a request carried."""

    context: SpanContext | None
    sampled: bool | None
    """The caller's decision: from the context, or a bare B3 sampling state; None if none."""
    formats: int
    """Bit set of the formats whose headers were present (W3C, B3_SINGLE, B3_MULTI)."""


NOTHING = Extracted(None, None, 0)


# ----------------------------------------------------------------------------------- extract


def extract(headers: Headers) -> Extracted:
    """The propagation context of a request's headers (see the module docstring)."""
    found: dict[bytes, list[bytes]] | None = None
    fmt_of = _FORMAT_OF
    for name, value in headers:
        if name not in fmt_of:
            name = name.lower()
            if name not in fmt_of:
                continue
        if found is None:
            found = {}
        found.setdefault(name, []).append(value.strip(_OWS))
    if found is None:
        return NOTHING
    return _decide(found)


def _decide(found: dict[bytes, list[bytes]]) -> Extracted:
    if len(found) == 1 and TRACEPARENT in found:  # the common case, made quick
        values = found[TRACEPARENT]
        ctx = parse_traceparent(values[0]) if len(values) == 1 else None
        return Extracted(ctx, None if ctx is None else ctx.sampled, W3C)
    formats = 0
    for name in found:
        formats |= _FORMAT_OF[name]
    if TRACEPARENT not in found:
        formats &= ~W3C  # a lone tracestate is not a use of W3C
    ctx = _w3c(found) if formats & W3C else None
    hint: bool | None = None
    if ctx is None and formats & B3_SINGLE:
        ctx, hint = _b3_single(found)
    if ctx is None and hint is None and formats & B3_MULTI:
        ctx, hint = _b3_multi(found)
    if ctx is not None:
        hint = True if ctx.debug else ctx.sampled
    return Extracted(ctx, hint, formats)


def _once(found: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    values = found.get(name)
    if values is None or len(values) != 1:
        return None
    return values[0]


def _w3c(found: dict[bytes, list[bytes]]) -> SpanContext | None:
    value = _once(found, TRACEPARENT)
    ctx = parse_traceparent(value) if value is not None else None
    if ctx is None:
        return None
    state = parse_tracestate(found.get(TRACESTATE, ()))
    return ctx._replace(tracestate=state) if state else ctx


def parse_traceparent(value: bytes) -> SpanContext | None:
    """A W3C ``traceparent`` value, or None when it is not valid."""
    if _TRACEPARENT_RE.fullmatch(value) is None:
        return None
    version = value[:2]
    if version == b"ff" or (version == b"00" and len(value) != 55):
        return None
    trace_id, span_id = int(value[3:35], 16), int(value[36:52], 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, value[54] in _ODD_HEX)


def parse_tracestate(values: Iterable[bytes]) -> bytes:
    """The W3C ``tracestate`` lines re-joined without blanks, or b"" when invalid or empty."""
    members: list[bytes] = []
    keys: set[bytes] = set()
    for line in values:
        for member in line.split(b","):
            member = member.strip(_OWS)
            if not member:
                continue
            key, eq, val = member.partition(b"=")
            if (not eq or key in keys or _TS_KEY_RE.fullmatch(key) is None
                    or _TS_VALUE_RE.fullmatch(val) is None):
                return b""
            keys.add(key)
            members.append(member)
    if len(members) > _TS_MAX_MEMBERS:
        return b""
    return b",".join(members)


def _ids(trace_hex: bytes, span_hex: bytes) -> SpanContext | None:
    if _TRACE_ID_RE.fullmatch(trace_hex) is None or _HEX16_RE.fullmatch(span_hex) is None:
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, None, short_trace_id=len(trace_hex) == 16)


def _b3_single(found: dict[bytes, list[bytes]]) -> tuple[SpanContext | None, bool | None]:
    value = _once(found, B3)
    if value is None:
        return None, None
    return parse_b3(value)


def parse_b3(value: bytes) -> tuple[SpanContext | None, bool | None]:
    """A B3 single-header value: (context, decision); (None, None) when invalid."""
    parts = value.split(b"-")
    if len(parts) == 1:
        return None, _B3_STATES.get(parts[0])
    if len(parts) > 4:
        return None, None
    ctx = _ids(parts[0], parts[1])
    if ctx is None:
        return None, None
    if len(parts) >= 3:
        state = _B3_STATES.get(parts[2])
        if state is None:
            return None, None
        if len(parts) == 4 and (_HEX16_RE.fullmatch(parts[3]) is None or parts[3] == b"0" * 16):
            return None, None
        ctx = ctx._replace(sampled=state, debug=parts[2] == b"d")
    return ctx, ctx.sampled


def _b3_multi(found: dict[bytes, list[bytes]]) -> tuple[SpanContext | None, bool | None]:
    debug = _once(found, B3_FLAGS) == b"1"
    sampled_raw = _once(found, B3_SAMPLED)
    sampled = True if debug else _B3_SAMPLED.get(sampled_raw.lower()) if sampled_raw else None
    trace_hex, span_hex = _once(found, B3_TRACE_ID), _once(found, B3_SPAN_ID)
    ctx = _ids(trace_hex, span_hex) if trace_hex is not None and span_hex is not None else None
    if ctx is None:
        return None, sampled
    return ctx._replace(sampled=sampled, debug=debug), sampled


# ------------------------------------------------------------------------------------ inject


def inject(ctx: SpanContext, formats: int, parent_span_id: int = 0) -> list[tuple[bytes, bytes]]:
    """The headers that carry ``ctx`` (the proxy's own span) in ``formats`` (W3C when 0).

    ``parent_span_id`` (the span ``ctx`` continues, 0 for a root) goes into B3's optional
    parent field. Names are lower case, valid in HTTP/1 and HTTP/2.
    """
    if not formats & ALL_FORMATS:
        formats = W3C
    out: list[tuple[bytes, bytes]] = []
    if formats & W3C:
        out.append((TRACEPARENT, format_traceparent(ctx)))
        if ctx.tracestate:
            out.append((TRACESTATE, ctx.tracestate))
    if formats & (B3_SINGLE | B3_MULTI):
        trace_hex = _trace_hex(ctx)
        span_hex = b"%016x" % ctx.span_id
        parent_hex = b"%016x" % parent_span_id if parent_span_id else b""
        if formats & B3_SINGLE:
            out.append((B3, _format_b3(trace_hex, span_hex, ctx, parent_hex)))
        if formats & B3_MULTI:
            out.extend(_b3_multi_headers(trace_hex, span_hex, ctx, parent_hex))
    return out


def format_traceparent(ctx: SpanContext) -> bytes:
    """``00-<trace>-<span>-<flags>``; only the sampled flag is set (debug counts as sampled)."""
    flags = 1 if ctx.sampled or ctx.debug else 0
    return b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, flags)


def _trace_hex(ctx: SpanContext) -> bytes:
    if ctx.short_trace_id and ctx.trace_id < 1 << 64:
        return b"%016x" % ctx.trace_id
    return b"%032x" % ctx.trace_id


def _b3_state(ctx: SpanContext) -> bytes:
    if ctx.debug:
        return b"d"
    if ctx.sampled is None:
        return b""
    return b"1" if ctx.sampled else b"0"


def _format_b3(trace_hex: bytes, span_hex: bytes, ctx: SpanContext, parent_hex: bytes) -> bytes:
    value = trace_hex + b"-" + span_hex
    state = _b3_state(ctx)
    if state:
        value += b"-" + state
        if parent_hex:
            value += b"-" + parent_hex
    return value


def _b3_multi_headers(trace_hex: bytes, span_hex: bytes, ctx: SpanContext,
                      parent_hex: bytes) -> list[tuple[bytes, bytes]]:
    out = [(B3_TRACE_ID, trace_hex), (B3_SPAN_ID, span_hex)]
    if parent_hex:
        out.append((B3_PARENT_SPAN_ID, parent_hex))
    if ctx.debug:
        out.append((B3_FLAGS, b"1"))  # debug implies accept: no X-B3-Sampled beside it
    elif ctx.sampled is not None:
        out.append((B3_SAMPLED, b"1" if ctx.sampled else b"0"))
    return out


def strip(headers: Headers) -> list[tuple[bytes, bytes]]:
    """``headers`` without any propagation header (any case)."""
    names = PROPAGATION_HEADERS
    return [(n, v) for n, v in headers if n not in names and n.lower() not in names]


def replace(headers: Headers, new: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with every propagation header removed and ``new`` appended."""
    out = strip(headers)
    out.extend(new)
    return out
