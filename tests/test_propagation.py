"""W3C Trace Context and B3 propagation: parsing, precedence, injection, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.telemetry import propagation as p
from appliance.telemetry.propagation import B3_MULTI, B3_SINGLE, W3C, SpanContext

TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"
TID_INT, SID_INT = int(TID, 16), int(SID, 16)


def tp(version: str = "00", trace: str = TID, span: str = SID, flags: str = "01",
       rest: str = "") -> bytes:
    return f"{version}-{trace}-{span}-{flags}{rest}".encode()


# ------------------------------------------------------------------------------- traceparent

VALID_TRACEPARENTS = [
    (tp(), True),
    (tp(flags="00"), False),
    (tp(flags="03"), True),   # unknown flag bits are ignored
    (tp(flags="fe"), False),
    (tp(flags="ff"), True),
    (tp(version="01"), True),  # a future version: parse the fields we know
    (tp(version="cc", rest="-what-the-future-holds"), True),
]


@pytest.mark.parametrize("value,sampled", VALID_TRACEPARENTS)
def test_traceparent_valid(value: bytes, sampled: bool) -> None:
    """A valid traceparent gives its trace id, span id and sampled flag."""
    assert p.parse_traceparent(value) == SpanContext(TID_INT, SID_INT, sampled)


INVALID_TRACEPARENTS = [
    b"",
    tp()[:-1],                                # too short
    tp() + b"-",                              # version 00 has exactly four fields
    tp(rest="-extra"),                        # ... and nothing after them
    tp(version="ff"),                         # forbidden version
    tp(version="0g"),
    tp(version="cc", rest="extra"),           # future version: more only after a dash
    tp(trace="0" * 32),                       # all-zero trace id
    tp(span="0" * 16),                        # all-zero span id
    tp(trace=TID.upper()),                    # hex must be lower case
    tp(span=SID.upper()),
    tp(flags="0g"),
    tp(flags="1"),
    tp(trace=TID[:-1]),
    tp(span=SID + "0"),
    tp().replace(b"-", b"_"),
    b" " + tp(),                              # (extract strips OWS; the parser does not)
    tp().replace(b"-", b"-\n", 1),
]


@pytest.mark.parametrize("value", INVALID_TRACEPARENTS)
def test_traceparent_invalid(value: bytes) -> None:
    """An invalid traceparent is no context."""
    assert p.parse_traceparent(value) is None


def test_traceparent_with_optional_whitespace() -> None:
    """Blanks around a header value (HTTP OWS) are not part of it."""
    ex = p.extract([(b"traceparent", b" \t" + tp() + b" ")])
    assert ex.context == SpanContext(TID_INT, SID_INT, True)


def test_traceparent_twice_is_invalid() -> None:
    """Two traceparent headers make the W3C context invalid (the request used W3C)."""
    ex = p.extract([(b"traceparent", tp()), (b"traceparent", tp())])
    assert ex == p.Extracted(None, None, W3C)


# -------------------------------------------------------------------------------- tracestate

TRACESTATES = [
    ([b"congo=t61rcWkgMzE"], b"congo=t61rcWkgMzE"),
    ([b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"], b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
    ([b"rojo=1 , congo=2"], b"rojo=1,congo=2"),              # OWS around members
    ([b"rojo=1,,congo=2,"], b"rojo=1,congo=2"),              # empty members are allowed
    ([b"rojo=1", b"congo=2"], b"rojo=1,congo=2"),            # two lines are one list
    ([b"tenant@system=x"], b"tenant@system=x"),
    ([b"1tenant@sys=x"], b"1tenant@sys=x"),
    ([b"a=" + b"v" * 256], b"a=" + b"v" * 256),
    ([b"a=b c"], b"a=b c"),
    ([b",".join(b"k%d=v" % i for i in range(32))], b",".join(b"k%d=v" % i for i in range(32))),
    ([b""], b""),
    ([b"rojo=1,rojo=2"], b""),                               # duplicate key
    ([b"Rojo=1"], b""),                                      # key must be lower case
    ([b"1rojo=1"], b""),                                     # simple key starts with a letter
    ([b"rojo"], b""),
    ([b"rojo="], b""),                                       # empty value
    ([b"rojo=a,b"], b""),                                    # member without '='
    ([b"rojo=a=b"], b""),                                    # '=' inside a value
    ([b"rojo=end "], b"rojo=end"),                           # a trailing blank is OWS
    ([b"rojo=a\x01b"], b""),                                  # control character
    ([b"a=" + b"v" * 257], b""),                             # value too long
    ([b"a" * 257 + b"=v"], b""),                             # key too long
    ([b"tenant@Sys=x"], b""),
    ([b",".join(b"k%d=v" % i for i in range(33))], b""),     # more than 32 members
    ([b"ok=1", b"bad key=2"], b""),                          # one bad line spoils all
]


@pytest.mark.parametrize("lines,expected", TRACESTATES)
def test_tracestate(lines: list[bytes], expected: bytes) -> None:
    """tracestate lines are validated and re-joined; any invalid member drops the lot."""
    assert p.parse_tracestate(lines) == expected


def test_tracestate_rides_with_a_valid_traceparent() -> None:
    """tracestate is kept with a valid traceparent and joined across header lines."""
    ex = p.extract([(b"tracestate", b"a=1"), (b"traceparent", tp()), (b"TraceState", b"b=2")])
    assert ex.context is not None and ex.context.tracestate == b"a=1,b=2"


def test_tracestate_dropped_with_an_invalid_traceparent() -> None:
    """No valid traceparent, no tracestate; an invalid tracestate leaves traceparent alone."""
    assert p.extract([(b"traceparent", tp(trace="0" * 32)), (b"tracestate", b"a=1")]) \
        == p.Extracted(None, None, W3C)
    ex = p.extract([(b"traceparent", tp()), (b"tracestate", b"A=1")])
    assert ex.context == SpanContext(TID_INT, SID_INT, True)


def test_lone_tracestate_is_not_a_w3c_use() -> None:
    """tracestate without traceparent carries nothing and does not select W3C."""
    assert p.extract([(b"tracestate", b"a=1")]) == p.Extracted(None, None, 0)


# -------------------------------------------------------------------------------------- B3

B3_SINGLE_CASES = [
    (f"{TID}-{SID}", SpanContext(TID_INT, SID_INT, None), None),
    (f"{TID}-{SID}-1", SpanContext(TID_INT, SID_INT, True), True),
    (f"{TID}-{SID}-0", SpanContext(TID_INT, SID_INT, False), False),
    (f"{TID}-{SID}-d", SpanContext(TID_INT, SID_INT, True, debug=True), True),
    (f"{TID}-{SID}-1-05e3ac9a4f6e3b90", SpanContext(TID_INT, SID_INT, True), True),
    (f"{TID[16:]}-{SID}-1",
     SpanContext(int(TID[16:], 16), SID_INT, True, short_trace_id=True), True),
    ("1", None, True),
    ("0", None, False),
    ("d", None, True),
    ("", None, None),
    ("2", None, None),
    (f"{TID}-{SID}-2", None, None),
    (f"{TID}-{SID}-1-0000000000000000", None, None),
    (f"{TID}-{SID}-1-05e3ac9a4f6e3b9", None, None),
    (f"{TID}-{SID}-1-05e3ac9a4f6e3b90-x", None, None),
    (f"{TID}", None, None),
    (f"{TID.upper()}-{SID}-1", None, None),
    (f"{'0' * 32}-{SID}-1", None, None),
    (f"{TID}-{'0' * 16}-1", None, None),
    (f"{TID[:20]}-{SID}-1", None, None),
    (f"{TID}-{SID}-", None, None),
]


@pytest.mark.parametrize("value,ctx,decision", B3_SINGLE_CASES)
def test_b3_single(value: str, ctx: SpanContext | None, decision: bool | None) -> None:
    """The b3 header: ids, sampling state (1, 0, d or deferred), optional parent."""
    assert p.parse_b3(value.encode()) == (ctx, decision)
    assert p.extract([(b"b3", value.encode())]) == p.Extracted(ctx, decision, B3_SINGLE)


def _multi(**fields: str) -> list[tuple[bytes, bytes]]:
    names = {"trace": b"X-B3-TraceId", "span": b"X-B3-SpanId", "parent": b"X-B3-ParentSpanId",
             "sampled": b"X-B3-Sampled", "flags": b"X-B3-Flags"}
    return [(names[k], v.encode()) for k, v in fields.items()]


B3_MULTI_CASES = [
    (_multi(trace=TID, span=SID), SpanContext(TID_INT, SID_INT, None), None),
    (_multi(trace=TID, span=SID, sampled="1"), SpanContext(TID_INT, SID_INT, True), True),
    (_multi(trace=TID, span=SID, sampled="0"), SpanContext(TID_INT, SID_INT, False), False),
    (_multi(trace=TID, span=SID, sampled="true"), SpanContext(TID_INT, SID_INT, True), True),
    (_multi(trace=TID, span=SID, sampled="false"), SpanContext(TID_INT, SID_INT, False), False),
    (_multi(trace=TID, span=SID, sampled="yes"), SpanContext(TID_INT, SID_INT, None), None),
    (_multi(trace=TID, span=SID, flags="1"),
     SpanContext(TID_INT, SID_INT, True, debug=True), True),
    (_multi(trace=TID, span=SID, sampled="0", flags="1"),
     SpanContext(TID_INT, SID_INT, True, debug=True), True),
    (_multi(trace=TID, span=SID, parent="05e3ac9a4f6e3b90", sampled="1"),
     SpanContext(TID_INT, SID_INT, True), True),
    (_multi(trace=TID[16:], span=SID, sampled="1"),
     SpanContext(int(TID[16:], 16), SID_INT, True, short_trace_id=True), True),
    (_multi(sampled="0"), None, False),
    (_multi(flags="1"), None, True),
    (_multi(trace=TID), None, None),
    (_multi(trace="0" * 32, span=SID, sampled="1"), None, True),
    (_multi(trace=TID, span="xyz", sampled="0"), None, False),
    (_multi(trace=TID, span=SID) + _multi(span=SID), None, None),  # X-B3-SpanId twice
]


@pytest.mark.parametrize("headers,ctx,decision", B3_MULTI_CASES)
def test_b3_multi(headers: list[tuple[bytes, bytes]], ctx: SpanContext | None,
                  decision: bool | None) -> None:
    """X-B3-* headers in any case: ids, Sampled (1/0, true/false), Flags 1 = debug."""
    assert p.extract(headers) == p.Extracted(ctx, decision, B3_MULTI)
    lower = [(n.lower(), v) for n, v in headers]
    assert p.extract(lower) == p.Extracted(ctx, decision, B3_MULTI)


# -------------------------------------------------------------------------------- precedence

OTHER_TID = "80f198ee56343ba864fe8b2a57d3eff7"


def test_w3c_wins_over_b3() -> None:
    """With valid W3C and B3 contexts, the W3C one is the parent; all formats are noted."""
    headers = [(b"b3", f"{OTHER_TID}-{SID}-0".encode()), (b"traceparent", tp()),
               *_multi(trace=OTHER_TID, span=SID, sampled="0")]
    assert p.extract(headers) == p.Extracted(SpanContext(TID_INT, SID_INT, True), True,
                                             W3C | B3_SINGLE | B3_MULTI)


def test_invalid_w3c_falls_back_to_b3() -> None:
    """An invalid traceparent is ignored and the B3 context is used."""
    headers = [(b"traceparent", tp(version="ff")), (b"b3", f"{OTHER_TID}-{SID}-1".encode())]
    ex = p.extract(headers)
    assert ex.context == SpanContext(int(OTHER_TID, 16), SID_INT, True)
    assert ex.formats == W3C | B3_SINGLE


def test_b3_single_wins_over_multi() -> None:
    """b3 is read before X-B3-*; an invalid b3 falls back to X-B3-*."""
    multi = _multi(trace=OTHER_TID, span=SID, sampled="1")
    ex = p.extract([(b"b3", f"{TID}-{SID}-0".encode()), *multi])
    assert ex.context == SpanContext(TID_INT, SID_INT, False)
    ex = p.extract([(b"b3", b"garbage"), *multi])
    assert ex.context == SpanContext(int(OTHER_TID, 16), SID_INT, True)


def test_no_propagation_headers() -> None:
    """Ordinary headers carry nothing."""
    assert p.extract([(b"host", b"a"), (b"X-Request-Id", b"1")]) is p.NOTHING


# -------------------------------------------------------------------------------------- inject

CTX = SpanContext(TID_INT, SID_INT, True, tracestate=b"a=1")
PARENT = 0x05E3AC9A4F6E3B90

INJECT_CASES = [
    (CTX, 0, 0, [(b"traceparent", tp()), (b"tracestate", b"a=1")]),
    (CTX._replace(sampled=False, tracestate=b""), W3C, 0, [(b"traceparent", tp(flags="00"))]),
    (CTX._replace(debug=True, sampled=True), W3C, 0, [(b"traceparent", tp()),
                                                      (b"tracestate", b"a=1")]),
    (CTX, B3_SINGLE, PARENT, [(b"b3", f"{TID}-{SID}-1-05e3ac9a4f6e3b90".encode())]),
    (CTX._replace(sampled=False), B3_SINGLE, 0, [(b"b3", f"{TID}-{SID}-0".encode())]),
    (CTX._replace(debug=True), B3_SINGLE, 0, [(b"b3", f"{TID}-{SID}-d".encode())]),
    (CTX._replace(sampled=None), B3_SINGLE, PARENT, [(b"b3", f"{TID}-{SID}".encode())]),
    (CTX._replace(trace_id=int(TID[16:], 16), short_trace_id=True), B3_SINGLE, 0,
     [(b"b3", f"{TID[16:]}-{SID}-1".encode())]),
    (CTX._replace(short_trace_id=True), B3_SINGLE, 0,  # a 128-bit id stays 128-bit
     [(b"b3", f"{TID}-{SID}-1".encode())]),
    (CTX, B3_MULTI, PARENT, [(b"x-b3-traceid", TID.encode()), (b"x-b3-spanid", SID.encode()),
                             (b"x-b3-parentspanid", b"05e3ac9a4f6e3b90"),
                             (b"x-b3-sampled", b"1")]),
    (CTX._replace(debug=True), B3_MULTI, 0, [(b"x-b3-traceid", TID.encode()),
                                             (b"x-b3-spanid", SID.encode()),
                                             (b"x-b3-flags", b"1")]),
    (CTX._replace(sampled=False), B3_MULTI, 0, [(b"x-b3-traceid", TID.encode()),
                                                (b"x-b3-spanid", SID.encode()),
                                                (b"x-b3-sampled", b"0")]),
    (CTX._replace(tracestate=b""), W3C | B3_SINGLE, 0,
     [(b"traceparent", tp()), (b"b3", f"{TID}-{SID}-1".encode())]),
]


@pytest.mark.parametrize("ctx,formats,parent,expected", INJECT_CASES)
def test_inject(ctx: SpanContext, formats: int, parent: int,
                expected: list[tuple[bytes, bytes]]) -> None:
    """inject writes the context in exactly the formats asked (W3C when none)."""
    assert p.inject(ctx, formats, parent) == expected


def test_replace_strips_every_incoming_propagation_header() -> None:
    """replace() drops propagation headers in any case and appends the new ones."""
    headers = [(b"Host", b"a"), (b"TraceParent", tp()), (b"tracestate", b"a=1"),
               (b"B3", b"1"), (b"X-B3-TraceId", TID.encode()), (b"x-b3-flags", b"1"),
               (b"X-B3-ParentSpanId", SID.encode()), (b"Accept", b"*/*")]
    new = [(b"traceparent", tp(flags="00"))]
    assert p.replace(headers, new) == [(b"Host", b"a"), (b"Accept", b"*/*"), *new]


# ------------------------------------------------------------------------------ properties

contexts = st.builds(
    SpanContext,
    trace_id=st.integers(1, (1 << 128) - 1), span_id=st.integers(1, (1 << 64) - 1),
    sampled=st.booleans(), debug=st.booleans(),
    tracestate=st.sampled_from([b"", b"a=1", b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]),
    short_trace_id=st.just(False),
).map(lambda c: c._replace(sampled=c.sampled or c.debug))  # debug implies sampled


@given(contexts, st.sampled_from([W3C, B3_SINGLE, B3_MULTI]), st.integers(0, (1 << 64) - 1))
def test_round_trip(ctx: SpanContext, fmt: int, parent: int) -> None:
    """What inject writes, extract reads back (W3C has no debug flag; only W3C carries
    tracestate)."""
    ex = p.extract(p.inject(ctx, fmt, parent))
    expected = ctx._replace(tracestate=b"") if fmt != W3C else ctx._replace(debug=False)
    assert ex.context == expected
    assert ex.formats == fmt
    assert ex.sampled == ctx.sampled


@given(st.integers(1, (1 << 64) - 1), st.integers(1, (1 << 64) - 1), st.booleans())
def test_round_trip_b3_64bit(trace_id: int, span_id: int, sampled: bool) -> None:
    """64-bit B3 trace ids keep their 16-digit form through extract and inject."""
    value = b"%016x-%016x-%d" % (trace_id, span_id, sampled)
    ex = p.extract([(b"b3", value)])
    assert ex.context is not None
    assert p.inject(ex.context, B3_SINGLE) == [(b"b3", value)]


names = st.sampled_from([b"traceparent", b"TraceParent", b"tracestate", b"b3", b"B3",
                         b"x-b3-traceid", b"X-B3-SpanId", b"x-b3-sampled", b"X-B3-Flags",
                         b"x-b3-parentspanid", b"host"])


@given(st.lists(st.tuples(names, st.binary(max_size=80)), max_size=8))
def test_extract_never_raises(headers: list[tuple[bytes, bytes]]) -> None:
    """Arbitrary values under propagation names give a result, never an exception."""
    ex = p.extract(headers)
    if ex.context is not None:
        assert ex.context.trace_id > 0 and ex.context.span_id > 0
        assert ex.formats
