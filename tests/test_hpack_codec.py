"""HPACK: RFC 7541's examples, the limits, the caches, and round trips against the
independent ``hpack`` library in both directions."""

from __future__ import annotations

import hpack
import pytest
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols.hpack_codec import (
    HUFFMAN_CODES,
    HUFFMAN_LENGTHS,
    STATIC_TABLE,
    Decoder,
    Encoder,
    HeaderListTooLarge,
    HpackError,
    NeverIndexed,
    encode_int,
    huffman_decode,
    huffman_encode,
)


def test_static_table_and_huffman_code_match_the_hpack_library() -> None:
    """The static table and the canonical Huffman code derived from bit lengths agree
    with an independent implementation's tables."""
    assert STATIC_TABLE == tuple(HeaderTable.STATIC_TABLE)
    assert HUFFMAN_CODES == list(REQUEST_CODES)
    assert HUFFMAN_LENGTHS == list(REQUEST_CODES_LENGTH)


@pytest.mark.parametrize("value,prefix,first,expected", [
    (10, 5, 0, "0a"),  # RFC 7541 C.1.1
    (1337, 5, 0, "1f9a0a"),  # C.1.2
    (42, 8, 0, "2a"),  # C.1.3
    (31, 5, 0, "1f00"),
    (62, 7, 128, "be"),
])
def test_integer_encoding(value: int, prefix: int, first: int, expected: str) -> None:
    """Integers with an N-bit prefix, as in RFC 7541 Appendix C.1."""
    assert encode_int(value, prefix, first).hex() == expected


# RFC 7541 C.3 (no Huffman) and C.4 (Huffman): three requests on one connection.
_C3 = ["828684410f7777772e6578616d706c652e636f6d",
       "828684be58086e6f2d6361636865",
       "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"]
_C4 = ["828684418cf1e3c2e5f23a6ba0ab90f4ff",
       "828684be5886a8eb10649cbf",
       "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"]
_REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
]


@pytest.mark.parametrize("blocks", [_C3, _C4], ids=["plain", "huffman"])
def test_rfc_7541_request_examples(blocks: list[str]) -> None:
    """Appendix C.3 and C.4: the three requests decode, and the table grows to 164."""
    dec = Decoder()
    for block, expected in zip(blocks, _REQUESTS, strict=True):
        assert dec.decode(bytes.fromhex(block)) == expected
    assert dec.size == 164


def test_huffman_examples_and_errors() -> None:
    """www.example.com codes as in C.4.1; EOS or bad padding inside a string is an error."""
    assert huffman_encode(b"www.example.com").hex() == "f1e3c2e5f23a6ba0ab90f4ff"
    assert huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == b"www.example.com"
    assert huffman_decode(b"") == b""
    with pytest.raises(HpackError, match="EOS"):
        huffman_decode(b"\xff\xff\xff\xff")  # 30 one-bits: EOS itself
    with pytest.raises(HpackError, match="padding"):
        huffman_decode(b"\x00")  # '0' (5 bits) then 000 padding: not ones
    with pytest.raises(HpackError, match="padding"):
        huffman_decode(b"\x07\xff")  # a symbol, then 8+ bits of ones: padding too long


@given(st.binary(max_size=64))
def test_huffman_round_trips_against_hpack(data: bytes) -> None:
    """Our Huffman output decodes with hpack's decoder, and the reverse."""
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_table import decode_huffman
    assert decode_huffman(huffman_encode(data)) == data
    theirs = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(data)
    assert huffman_decode(theirs) == data


@pytest.mark.parametrize("block,message", [
    ("80", "index 0"),
    ("be", "out of range"),  # index 62 with an empty dynamic table
    ("ff", "past the end"),  # an integer that never ends
    ("ffffffffffff7f", "too large"),
    ("4005616263", "past the end"),  # a value string longer than the block
    ("3fe21f", "exceeds"),  # a table size update above 4096
    ("82 20".replace(" ", ""), "after a header field"),
])
def test_bad_blocks_are_compression_errors(block: str, message: str) -> None:
    """Each malformed block raises HpackError naming the problem."""
    with pytest.raises(HpackError, match=message):
        Decoder().decode(bytes.fromhex(block))


def test_header_list_limit_applies_the_block_first() -> None:
    """A list over max_list_size raises, but its insertions reached the table, so the
    next block that refers to them still decodes."""
    enc = Encoder()
    big = [(b"x-big", b"v" * 100)]
    block = enc.encode(big)
    dec = Decoder(max_list_size=100)
    with pytest.raises(HeaderListTooLarge):
        dec.decode(block)
    assert dec.table == [(b"x-big", b"v" * 100)]
    dec.max_list_size = 1000
    assert dec.decode(enc.encode(big)) == big


def test_decoder_cache_returns_the_same_list_until_the_table_changes() -> None:
    """A block that does not touch the table is decoded once; a table change makes the
    same bytes decode afresh (they may now name other entries)."""
    dec = Decoder()
    assert dec.decode(bytes.fromhex("4003616263027879")) == [(b"abc", b"xy")]
    indexed = bytes.fromhex("be")
    first = dec.decode(indexed)
    assert first == [(b"abc", b"xy")] and dec.decode(indexed) is first
    dec.decode(bytes.fromhex("4003646566017a"))  # def: z is now index 62
    assert dec.decode(indexed) == [(b"def", b"z")]


def test_encoder_indexes_then_reuses_the_cached_block() -> None:
    """The second encoding of a list is pure indexes and the same bytes object after."""
    enc = Encoder()
    headers = [(b":status", b"200"), (b"server", b"x"), (b"content-type", b"text/plain")]
    first = enc.encode(headers)
    second = enc.encode(headers)
    assert second == bytes([0x88, 0xbf, 0xbe])
    assert enc.encode(headers) is second
    peer = hpack.Decoder()
    assert peer.decode(first, raw=True) == peer.decode(second, raw=True) == headers


def test_sensitive_and_never_indexed_fields_stay_out_of_the_table() -> None:
    """authorization is never indexed; a field that arrived never-indexed is re-sent so."""
    enc = Encoder()
    block = enc.encode([(b"authorization", b"secret"), NeverIndexed((b"x-token", b"t"))])
    assert block[0] & 0xf0 == 0x10
    dec = hpack.Decoder()
    headers = dec.decode(block, raw=True)
    assert [h.indexable for h in headers] == [False, False]
    assert enc.table == []


_name = st.sampled_from([b"content-type", b"x-a", b"x-b", b":path", b"cookie", b"via",
                         b"authorization", b"x-long-header-name"])
_value = st.binary(min_size=0, max_size=40).map(lambda b: b.replace(b"\x00", b"0"))
_lists = st.lists(st.lists(st.tuples(_name, _value), max_size=8), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(_lists, st.sampled_from([0, 64, 256, 4096]), st.data())
def test_our_encoder_against_hpack_decoder(lists: list, table: int, data: st.DataObject) -> None:
    """Header lists encoded by us decode with hpack's decoder, in sequence, with table
    size updates (sent by SETTINGS) and evictions along the way."""
    enc = Encoder()
    dec = hpack.Decoder()
    for headers in lists:
        if data.draw(st.booleans()):
            size = data.draw(st.sampled_from([table, 0, 4096]))
            dec.max_allowed_table_size = max(size, dec.header_table_size)
            enc.set_max_table_size(size)
        assert dec.decode(enc.encode(headers), raw=True) == headers


@settings(max_examples=200, deadline=None)
@given(_lists, st.sampled_from([0, 64, 256, 4096]), st.booleans())
def test_hpack_encoder_against_our_decoder(lists: list, table: int, huffman: bool) -> None:
    """Header lists encoded by hpack (with or without Huffman, with a size update to a
    small table) decode with our decoder, in sequence."""
    enc = hpack.Encoder()
    enc.header_table_size = table
    dec = Decoder()
    for headers in lists:
        assert dec.decode(enc.encode(headers, huffman=huffman)) == headers


@given(st.binary(max_size=64))
def test_random_blocks_raise_only_hpack_errors(block: bytes) -> None:
    """Any bytes either decode or raise HpackError."""
    try:
        Decoder(max_list_size=1000).decode(block)
    except HpackError:
        pass
