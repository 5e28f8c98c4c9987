"""The Thrift codec against thriftpy2: sniffing, framing, seqid rewriting, exceptions,
limits, and fuzzing with random splits and mutations."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thrift_idl.echo_service import echo
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.protocol.compact import CompactType, TCompactProtocol
from thriftpy2.thrift import TApplicationException, TMessageType, TType
from thriftpy2.transport import TMemoryBuffer

from appliance.protocols import thrift, thrift_skip
from appliance.protocols.thrift import (
    CALL,
    EXCEPTION,
    NEED_MORE_BYTES,
    ONEWAY,
    REPLY,
    Decoder,
    Encoding,
    Message,
    ThriftError,
    Transport,
    Variant,
    encode_exception,
    sniff,
    with_seqid,
)

PROTOCOLS: dict[Encoding, Callable[[Any], Any]] = {
    Encoding.BINARY: lambda t: TBinaryProtocol(t),
    Encoding.BINARY_NONSTRICT: lambda t: TBinaryProtocol(t, strict_read=False,
                                                         strict_write=False),
    Encoding.COMPACT: lambda t: TCompactProtocol(t),
}
VARIANTS = [Variant(t, e) for t in Transport for e in Encoding]
IDS = [str(v) for v in VARIANTS]

ITEM = echo.Item(
    id=7, name="héllo", weights=[1.5, -2.25], counts={"a": 1, "b": -5 << 40},
    tags=[1, 2, 300], flag=True, blob=b"\x00\xff" * 40,  # a set reads back as a list
    child=echo.Item(id=1, bits=[True, False]), children=[echo.Item(id=2), echo.Item()],
    small=-3, bits=[True, False, True], nested={1: ["a", "b"], -2: []},
)


def message(encoding: Encoding, mtype: int, name: str, seqid: int, payload: Any) -> bytes:
    """A message as thriftpy2 writes it (unframed)."""
    buf = TMemoryBuffer()
    proto = PROTOCOLS[encoding](buf)
    proto.write_message_begin(name, mtype, seqid)
    payload.write(proto)
    proto.write_message_end()
    return bytes(buf.getvalue())


def on_wire(variant: Variant, *messages: bytes) -> bytes:
    if variant.framed:
        return b"".join(struct.pack(">i", len(m)) + m for m in messages)
    return b"".join(messages)


def read_back(encoding: Encoding, data: bytes, payload: Any) -> tuple[str, int, int, Any]:
    """thriftpy2 reads one unframed message: (name, type, seqid, payload)."""
    proto = PROTOCOLS[encoding](TMemoryBuffer(data))
    name, mtype, seqid = proto.read_message_begin()
    proto.read_struct(payload)
    return name, mtype, seqid, payload


def unframe(variant: Variant, data: bytes) -> bytes:
    if variant.framed:
        assert struct.unpack(">i", data[:4])[0] == len(data) - 4
        return data[4:]
    return data


def three_calls(encoding: Encoding) -> list[bytes]:
    return [
        message(encoding, CALL, "roundtrip", 1, echo.Echo.roundtrip_args(item=ITEM)),
        message(encoding, ONEWAY, "note", 2, echo.Echo.note_args(text="n" * 300)),
        message(encoding, CALL, "ping", 70000, echo.Echo.ping_args()),
    ]


def feed_all(decoder: Decoder, pieces: list[bytes]) -> list[Message]:
    out: list[Message] = []
    for piece in pieces:
        out += decoder.feed(piece)
    return out


# --- constants and sniffing --------------------------------------------------------------

def test_type_ids_are_thriftpy2s() -> None:
    """The ids written out in the codec are the ones thriftpy2 defines."""
    for name in ("STOP", "BOOL", "BYTE", "DOUBLE", "I16", "I32", "I64", "STRING", "STRUCT",
                 "MAP", "SET", "LIST"):
        assert getattr(thrift_skip.TType, name) == getattr(TType, name), name
    compact = {"TRUE": "C_TRUE", "FALSE": "C_FALSE", "BYTE": "C_BYTE", "I16": "C_I16",
               "I32": "C_I32", "I64": "C_I64", "DOUBLE": "C_DOUBLE", "BINARY": "C_BINARY",
               "LIST": "C_LIST", "SET": "C_SET", "MAP": "C_MAP", "STRUCT": "C_STRUCT"}
    for theirs, ours in compact.items():
        assert getattr(thrift_skip, ours) == getattr(CompactType, theirs), theirs
    assert (thrift.CALL, thrift.REPLY, thrift.EXCEPTION, thrift.ONEWAY) == (
        TMessageType.CALL, TMessageType.REPLY, TMessageType.EXCEPTION, TMessageType.ONEWAY)
    assert thrift.UNKNOWN_METHOD == TApplicationException.UNKNOWN_METHOD
    assert thrift.INTERNAL_ERROR == TApplicationException.INTERNAL_ERROR


SNIFF_CASES: list[tuple[bytes, Variant | None]] = [
    *[(on_wire(v, message(v.encoding, CALL, "ping", 1, echo.Echo.ping_args())), v)
      for v in VARIANTS],
    *[(on_wire(v, message(v.encoding, ONEWAY, "note", 1, echo.Echo.note_args(text="x"))), v)
      for v in VARIANTS],
    (b"\x80\x01\x00\x02\x00\x00\x00\x04ping", None),  # a REPLY is not a client's start
    (b"\x82\x41\x01\x04ping", None),  # compact REPLY
    (b"\x80\x02\x00\x01", None),  # binary version 2
    (b"\x00\x00\x00\x20\x0f\xff\x00\x00", None),  # THeader (framed, 0x0FFF magic)
    (b"\x00\x00\x00\x00\x80\x01\x00\x01", None),  # an empty frame
    (b"\x00\x00\x01\x01" + b"a" * 257 + b"\x01", None),  # non-strict name too long
    (b"\x00\x00\x00\x04pi g\x01", None),  # a space is not in a method name
    (b"\x01\x00\x00\x10\x80\x01\x00\x01", None),  # a frame of 16 MiB or more
    (b"GET / HTTP/1.1\r\n", None),
]


@pytest.mark.parametrize("stream,expected", SNIFF_CASES)
def test_sniff_table(stream: bytes, expected: Variant | None) -> None:
    """Each start gives its variant (or None); no shorter prefix says otherwise."""
    assert sniff(stream) == expected
    for i in range(1, len(stream)):
        verdict = sniff(stream[:i])
        assert verdict is NEED_MORE_BYTES or verdict == expected, (i, verdict)


# --- framing -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_decoder_splits_thriftpy2_messages(variant: Variant) -> None:
    """Three messages in one read: each comes out whole, with name, type and seqid."""
    calls = three_calls(variant.encoding)
    wire = on_wire(variant, *calls)
    out = Decoder(variant).feed(wire)
    assert [(m.name, m.type, m.seqid) for m in out] == [
        ("roundtrip", CALL, 1), ("note", ONEWAY, 2), ("ping", CALL, 70000)]
    assert [unframe(variant, m.data) for m in out] == calls
    assert b"".join(m.data for m in out) == wire


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_every_split_point_gives_the_same_messages(variant: Variant) -> None:
    """Cut the stream at every byte (and feed byte by byte): same messages, none early."""
    wire = on_wire(variant, *three_calls(variant.encoding))
    whole = [m.data for m in Decoder(variant).feed(wire)]
    for i in range(len(wire)):
        decoder = Decoder(variant)
        assert [m.data for m in feed_all(decoder, [wire[:i], wire[i:]])] == whole, i
        assert decoder.buffered == 0
    decoder = Decoder(variant)
    one_by_one = feed_all(decoder, [wire[i:i + 1] for i in range(len(wire))])
    assert [m.data for m in one_by_one] == whole


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_reply_result_field_tells_success_from_declared_exception(variant: Variant) -> None:
    """A REPLY's first result field: 0 for success and void, the exception's id else."""
    enc = variant.encoding
    replies = [
        message(enc, REPLY, "echo", 1, echo.Echo.echo_result(success="hi")),
        message(enc, REPLY, "fail", 2,
                echo.Echo.fail_result(unavailable=echo.Unavailable(why="down"))),
        message(enc, REPLY, "ping", 3, echo.Echo.ping_result(success="pong")),
        message(enc, EXCEPTION, "add", 4, TApplicationException(6, "boom")),
    ]
    out = Decoder(variant).feed(on_wire(variant, *replies))
    assert [(m.type, m.result_field) for m in out] == [
        (REPLY, 0), (REPLY, 1), (REPLY, 0), (EXCEPTION, -1)]


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("seqid", [0, 1, 127, 128, 2**31 - 1, -1, -(2**31)])
def test_with_seqid_is_read_back_by_thriftpy2(variant: Variant, seqid: int) -> None:
    """A rewritten seqid (whatever its varint length) is what thriftpy2 reads; the
    arguments are untouched and the frame length follows."""
    data = on_wire(variant, message(variant.encoding, CALL, "roundtrip", 5,
                                    echo.Echo.roundtrip_args(item=ITEM)))
    (msg,) = Decoder(variant).feed(data)
    new = with_seqid(msg, seqid)
    (again,) = Decoder(variant).feed(new)
    assert again.seqid == seqid and again.name == "roundtrip"
    name, mtype, got, args = read_back(variant.encoding, unframe(variant, new),
                                       echo.Echo.roundtrip_args())
    # thriftpy2's compact reader gives the varint unsigned; Apache casts it to i32
    assert (name, mtype, got & 0xFFFFFFFF) == ("roundtrip", CALL, seqid & 0xFFFFFFFF)
    assert args.item == ITEM


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_encode_exception_is_a_tapplicationexception_for_thriftpy2(variant: Variant) -> None:
    """The proxy's own error reply reads as an EXCEPTION with type and message."""
    data = encode_exception(variant, "add", 41, "appliance: no route", thrift.INTERNAL_ERROR)
    (msg,) = Decoder(variant).feed(data)
    assert (msg.name, msg.type, msg.seqid) == ("add", EXCEPTION, 41)
    name, mtype, seqid, exc = read_back(variant.encoding, unframe(variant, data),
                                        TApplicationException())
    assert (name, mtype, seqid) == ("add", EXCEPTION, 41)
    assert (exc.type, exc.message) == (TApplicationException.INTERNAL_ERROR,
                                       "appliance: no route")


# --- errors ------------------------------------------------------------------------------

def _nested(depth: int) -> bytes:
    """A strict binary CALL whose argument is a struct nested ``depth`` deep."""
    head = b"\x80\x01\x00\x01\x00\x00\x00\x01m\x00\x00\x00\x01"
    return head + b"\x0c\x00\x01" * depth + b"\x00" * (depth + 1)


B = Variant(Transport.BUFFERED, Encoding.BINARY)
F = Variant(Transport.FRAMED, Encoding.BINARY)
BC = Variant(Transport.BUFFERED, Encoding.COMPACT)
BN = Variant(Transport.BUFFERED, Encoding.BINARY_NONSTRICT)
BAD: list[tuple[str, Variant, bytes, str, str]] = [
    ("wrong binary version", B, b"\x80\x02\x00\x01\x00\x00\x00\x01m\x00\x00\x00\x01\x00",
     "malformed", "0x8001"),
    ("message type 5", B, b"\x80\x01\x00\x05\x00\x00\x00\x01m\x00\x00\x00\x01\x00",
     "malformed", "message type 5"),
    ("negative name length", B, b"\x80\x01\x00\x01\xff\xff\xff\xff", "malformed",
     "name length"),
    ("name too long", BN, b"\x00\x01\x00\x00" + b"m" * 8, "malformed", "name length"),
    ("empty name", B, b"\x80\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00", "malformed",
     "empty method name"),
    ("unknown field type", B, b"\x80\x01\x00\x01\x00\x00\x00\x01m\x00\x00\x00\x01\x63\x00\x01",
     "malformed", "field type 99"),
    ("negative string", B, b"\x80\x01\x00\x01\x00\x00\x00\x01m\x00\x00\x00\x01"
     b"\x0b\x00\x01\xff\xff\xff\xfe", "malformed", "string length"),
    ("negative list size", B, b"\x80\x01\x00\x01\x00\x00\x00\x01m\x00\x00\x00\x01"
     b"\x0f\x00\x01\x08\xff\xff\xff\xff", "malformed", "container size"),
    ("list of unknown type", B, b"\x80\x01\x00\x01\x00\x00\x00\x01m\x00\x00\x00\x01"
     b"\x0f\x00\x01\x01\x00\x00\x00\x02", "malformed", "element type 1"),
    ("65 levels deep", B, _nested(64), "malformed", "nesting deeper than 64"),
    ("empty frame", F, b"\x00\x00\x00\x00", "malformed", "frame length 0"),
    ("negative frame", F, b"\xff\xff\xff\xf0", "malformed", "frame length"),
    ("frame over the limit", F, struct.pack(">i", 16 * 1024 * 1024 + 1), "too_large",
     "over the limit"),
    ("frame shorter than its header", F, b"\x00\x00\x00\x06\x80\x01\x00\x01\x00\x00",
     "malformed", "shorter than its message header"),
    ("string over the limit", B, b"\x80\x01\x00\x01\x00\x00\x00\x01m\x00\x00\x00\x01"
     b"\x0b\x00\x01\x7f\x00\x00\x00", "too_large", "frame size limit"),
    ("list over the limit", B, b"\x80\x01\x00\x01\x00\x00\x00\x01m\x00\x00\x00\x01"
     b"\x0f\x00\x01\x0b\x7f\x00\x00\x00", "too_large", "frame size limit"),
    ("compact version 2", BC, b"\x82\x22\x01\x01m\x00", "malformed", "version 1"),
    ("compact varint too long", BC, b"\x82\x21\x01\x01m\x16" + b"\xff" * 10, "malformed",
     "varint longer"),
    ("compact field type 14", BC, b"\x82\x21\x01\x01m\x1e", "malformed", "field type 14"),
]


@pytest.mark.parametrize("name,variant,data,kind,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(name: str, variant: Variant, data: bytes, kind: str,
                                    text: str) -> None:
    """Each bad shape raises ThriftError of its kind, naming what is wrong, whole or
    byte by byte."""
    with pytest.raises(ThriftError) as caught:
        Decoder(variant).feed(data)
    assert caught.value.kind == kind and text in str(caught.value), str(caught.value)
    decoder = Decoder(variant)
    with pytest.raises(ThriftError) as caught:
        for i in range(len(data)):
            decoder.feed(data[i:i + 1])
    assert caught.value.kind == kind


def test_64_levels_are_fine() -> None:
    """The nesting limit is thriftpy2's: the body struct and 63 levels inside pass."""
    (msg,) = Decoder(B).feed(_nested(63))
    assert msg.name == "m"


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_message_over_a_small_limit_is_too_large(variant: Variant) -> None:
    """With max_frame_bytes=64, a 300-byte message is refused, in one read or many."""
    wire = on_wire(variant, message(variant.encoding, CALL, "echo", 1,
                                    echo.Echo.echo_args(text="x" * 280)))
    for pieces in ([wire], [wire[i:i + 7] for i in range(0, len(wire), 7)]):
        decoder = Decoder(variant, max_frame_bytes=64)
        with pytest.raises(ThriftError) as caught:
            feed_all(decoder, pieces)
        assert caught.value.kind == "too_large"


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_eof_inside_a_message_is_truncated(variant: Variant) -> None:
    """The connection ends mid-message: TRUNCATED; at a boundary: fine."""
    wire = on_wire(variant, message(variant.encoding, CALL, "ping", 1, echo.Echo.ping_args()))
    decoder = Decoder(variant)
    decoder.feed(wire)
    decoder.eof()
    decoder.feed(wire[:-1])
    with pytest.raises(ThriftError) as caught:
        decoder.eof()
    assert caught.value.kind == "truncated" and "inside a message" in str(caught.value)


def test_max_frame_bytes_must_be_sane() -> None:
    """A limit too small to hold any message is a programming error, named."""
    with pytest.raises(ValueError, match="max_frame_bytes"):
        Decoder(B, max_frame_bytes=3)


def test_a_large_buffered_message_byte_by_byte_is_linear(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 40k-element set sent in 1-byte reads is walked once, not once per read."""
    args = echo.Echo.roundtrip_args(item=echo.Item(weights=[0.5] * 1000,
                                                   tags=set(range(-20000, 20000))))
    steps = 0
    original = thrift_skip.Skipper._value_binary, thrift_skip.Skipper._value_compact

    def counting(index: int) -> Any:
        def step(self: thrift_skip.Skipper, buf: Any, n: int, t: int) -> bool:
            nonlocal steps
            steps += 1
            return bool(original[index](self, buf, n, t))
        return step

    monkeypatch.setattr(thrift_skip.Skipper, "_value_binary", counting(0))
    monkeypatch.setattr(thrift_skip.Skipper, "_value_compact", counting(1))
    for encoding in (Encoding.BINARY, Encoding.COMPACT):
        wire = message(encoding, CALL, "roundtrip", 1, args)
        decoder = Decoder(Variant(Transport.BUFFERED, encoding))
        steps = 0
        out = feed_all(decoder, [wire[i:i + 1] for i in range(len(wire))])
        assert [m.data for m in out] == [wire]
        # each value is tried at most once per read that ends inside it, plus once more
        assert steps < 2 * len(wire), (encoding, steps, len(wire))


# --- fuzzing -----------------------------------------------------------------------------

_i16 = st.integers(-(2**15), 2**15 - 1)
_i32 = st.integers(-(2**31), 2**31 - 1)
_text = st.text(max_size=20)


@st.composite
def items(draw: st.DrawFn, depth: int = 2) -> Any:
    child = draw(st.none() | (items(depth=depth - 1) if depth else st.none()))
    return echo.Item(
        id=draw(st.none() | _i32), name=draw(st.none() | _text),
        weights=draw(st.none() | st.lists(st.floats(allow_nan=False), max_size=5)),
        counts=draw(st.none() | st.dictionaries(_text, st.integers(-(2**63), 2**63 - 1),
                                                max_size=4)),
        tags=draw(st.none() | st.sets(_i16, max_size=5)),
        flag=draw(st.none() | st.booleans()), blob=draw(st.none() | st.binary(max_size=30)),
        child=child, small=draw(st.none() | st.integers(-128, 127)),
        bits=draw(st.none() | st.lists(st.booleans(), max_size=20)),
        nested=draw(st.none() | st.dictionaries(_i32, st.lists(_text, max_size=3),
                                                max_size=3)),
    )


def _splits(draw: Callable[..., Any], data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VARIANTS), st.lists(items(), min_size=1, max_size=3), st.data())
def test_random_messages_in_random_splits(variant: Variant, values: list[Any],
                                          data: st.DataObject) -> None:
    """thriftpy2-written messages of random Items, cut anywhere: exactly those messages."""
    calls = [message(variant.encoding, CALL, "roundtrip", i,
                     echo.Echo.roundtrip_args(item=v)) for i, v in enumerate(values)]
    wire = on_wire(variant, *calls)
    out = feed_all(Decoder(variant), _splits(data.draw, wire))
    assert [unframe(variant, m.data) for m in out] == calls
    assert [m.seqid for m in out] == list(range(len(values)))


def _outcome(variant: Variant, pieces: list[bytes]) -> tuple[list[bytes], str]:
    decoder = Decoder(variant, max_frame_bytes=512)
    got: list[bytes] = []
    try:
        for piece in pieces:
            got += [m.data for m in decoder.feed(piece)]
        decoder.eof()
    except ThriftError as exc:
        return got, exc.kind
    return got, ""


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VARIANTS), st.data())
def test_mutated_streams_fail_only_with_thrift_errors(variant: Variant,
                                                      data: st.DataObject) -> None:
    """Flip, drop or insert bytes in a valid stream: the decoder answers messages or a
    ThriftError (never another exception), and any split agrees with byte-by-byte."""
    wire = bytearray(on_wire(variant, *three_calls(variant.encoding)))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(wire) - 1))
        op = data.draw(st.sampled_from(("flip", "drop", "insert")))
        if op == "flip":
            wire[at] = data.draw(st.integers(0, 255))
        elif op == "drop":
            del wire[at]
        else:
            wire.insert(at, data.draw(st.integers(0, 255)))
    stream = bytes(wire)
    reference, ref_error = _outcome(variant, [stream[i:i + 1] for i in range(len(stream))])
    got, error = _outcome(variant, _splits(data.draw, stream))
    assert error == ref_error
    assert got == reference[:len(got)]
    if not error:
        assert got == reference


@given(st.binary(max_size=64))
def test_sniff_never_raises(data: bytes) -> None:
    """Any bytes give a variant, NEED_MORE_BYTES or None."""
    verdict = sniff(data)
    assert verdict is NEED_MORE_BYTES or verdict is None or isinstance(verdict, Variant)
