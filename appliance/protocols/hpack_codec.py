"""HPACK (RFC 7541): header compression for HTTP/2, written for a proxy's hot path.

Theory of operation: each direction of an HTTP/2 connection has one :class:`Encoder` (ours)
and one :class:`Decoder` (the peer's blocks), each with its own dynamic table. Both are
pure: bytes in, header lists out, or the reverse.

Speed comes from doing the same work once:

- **Decoding** a block that does not touch the dynamic table (every field indexed, or a
  literal without indexing) gives the same headers for as long as the table is unchanged.
  The decoder keeps such results keyed by the block's bytes, with the table's generation
  (a counter bumped on every insertion, eviction or size change). A hit is one dict lookup
  and returns the same list object, which callers must not change.
- **Encoding** indexes a (name, value) pair the first time it is seen, so the next list
  made of known pairs is pure indexes; that output is kept per header list with the
  table's generation and reused while nothing was inserted since.
- Huffman strings are decoded a byte at a time with a state table (the states are the 256
  inner nodes of the code tree), built once on first use.

Limits: integers are capped (no unbounded continuation bytes), string lengths must fit the
block, a table size update may not exceed what we allowed, and a decoded list larger than
``max_list_size`` raises :class:`HeaderListTooLarge` only after the whole block was
processed, so the dynamic table stays in step with the peer's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = tuple(
    (n.encode(), v.encode()) for n, v in (
        (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
        (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"),
        (":status", "200"), (":status", "204"), (":status", "206"), (":status", "304"),
        (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""),
        ("accept", ""), ("access-control-allow-origin", ""), ("age", ""), ("allow", ""),
        ("authorization", ""), ("cache-control", ""), ("content-disposition", ""),
        ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
        ("content-location", ""), ("content-range", ""), ("content-type", ""),
        ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""),
        ("from", ""), ("host", ""), ("if-match", ""), ("if-modified-since", ""),
        ("if-none-match", ""), ("if-range", ""), ("if-unmodified-since", ""),
        ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
        ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""),
        ("referer", ""), ("refresh", ""), ("retry-after", ""), ("server", ""),
        ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
        ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
    ))
_STATIC_LEN = len(STATIC_TABLE)  # 61: dynamic entries start at index 62
_STATIC_PAIR = {pair: i + 1 for i, pair in enumerate(STATIC_TABLE) if pair[1]}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(STATIC_TABLE):
    _STATIC_NAME.setdefault(_n, _i + 1)

DEFAULT_TABLE_SIZE = 4096
_MAX_INT = 1 << 24  # no header field needs more; bigger values are an attack
_CACHE_ENTRIES = 64
_CACHE_BLOCK = 1024  # blocks (and encoded outputs) longer than this are not kept
_CACHE_FIELDS = 32

# Headers whose values must never enter a table (RFC 7541 7.1.3): credentials, and cookies
# short enough to guess. Headers that change on every message are not indexed either.
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"set-cookie"})
_NO_INDEX = frozenset({
    b":path", b"content-length", b"grpc-timeout", b"etag", b"if-none-match",
    b"if-modified-since", b"age", b"location", b"x-request-id", b"traceparent",
    b"x-b3-traceid", b"x-b3-spanid", b"l5d-ctx-trace",
})


class HpackError(ValueError):
    """A header block that does not decode (a COMPRESSION_ERROR in HTTP/2)."""


class HeaderListTooLarge(HpackError):
    """The decoded list exceeds ``max_list_size``; the block itself was valid and applied."""


class NeverIndexed(tuple):  # type: ignore[type-arg]
    """A (name, value) pair that arrived as never-indexed; re-encoded the same way."""

    __slots__ = ()


# --- Huffman (RFC 7541 Appendix B) ----------------------------------------------------------
# The code is canonical: codes of each length follow in symbol order. So the bit lengths of
# the 257 symbols (256 bytes and EOS), here as letters (a = 5 bits), define it completely.
_LENGTHS = [ord(c) - ord("a") + 5 for c in (
    "isxxxxxxxtzxxzxxxxxxxxzxxxxxxxxxbffhibdgffdgdbbbaaabbbbbbbcdkbhf"
    "ibccccccccccccccccccccccdcdioijbkabababbbaccbbbabcbaabccccckgjix"
    "prpprrrsrssssststtrstssssqrsrsstrqprrssqsrrtqrssqqrqsrssprrrsrrs"
    "vvporsruvvvwwvtuoqvwwvwtqqvvxwwwptpqrqqsrruuttvsvwvvwwwwwxwwwwwv"
    "z")]
_EOS = 256


def _canonical_codes(lengths: list[int]) -> list[int]:
    codes = [0] * len(lengths)
    code, prev = -1, lengths[min(range(len(lengths)), key=lambda s: (lengths[s], s))]
    for sym in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
        code = (code + 1) << (lengths[sym] - prev)
        prev = lengths[sym]
        codes[sym] = code
    return codes


HUFFMAN_CODES = _canonical_codes(_LENGTHS)
HUFFMAN_LENGTHS = _LENGTHS


def huffman_encode(data: bytes) -> bytes:
    acc = nbits = 0
    codes, lengths = HUFFMAN_CODES, HUFFMAN_LENGTHS
    for b in data:
        n = lengths[b]
        acc = (acc << n) | codes[b]
        nbits += n
    pad = -nbits % 8
    acc = (acc << pad) | ((1 << pad) - 1)
    return acc.to_bytes((nbits + pad) // 8, "big")


def huffman_length(data: bytes) -> int:
    """Bytes the Huffman encoding of ``data`` takes."""
    lengths = HUFFMAN_LENGTHS
    return (sum([lengths[b] for b in data]) + 7) // 8


class _HuffmanTable:
    """Byte-at-a-time decoding: ``next[s << 8 | byte]`` is the state after that byte
    (-1: the input decoded EOS, an error), ``emit[...]`` the bytes it completed."""

    def __init__(self) -> None:
        # The code tree: node 0 is the root; children[node] = [zero, one]; a leaf is
        # stored as ~symbol (negative).
        children: list[list[int]] = [[0, 0]]
        for sym, (code, length) in enumerate(zip(HUFFMAN_CODES, _LENGTHS, strict=True)):
            node = 0
            for i in range(length - 1, -1, -1):
                bit = (code >> i) & 1
                if i == 0:
                    children[node][bit] = ~sym
                else:
                    if children[node][bit] == 0:
                        children.append([0, 0])
                        children[node][bit] = len(children) - 1
                    node = children[node][bit]
        nibble: list[tuple[int, bytes]] = []
        for state in range(len(children)):
            for nib in range(16):
                nibble.append(self._walk(children, state, nib))
        self.next = [0] * (len(children) << 8)
        self.emit = [b""] * (len(children) << 8)
        for state in range(len(children)):
            for byte in range(256):
                mid, first = nibble[(state << 4) | (byte >> 4)]
                if mid < 0:
                    end, second = -1, b""
                else:
                    end, second = nibble[(mid << 4) | (byte & 15)]
                self.next[(state << 8) | byte] = end
                self.emit[(state << 8) | byte] = first + second
        # A string may end at a symbol boundary, or inside the all-ones path (the EOS
        # prefix used as padding) if that is at most 7 bits deep.
        accept = {0}
        node = 0
        for _ in range(7):
            node = children[node][1]
            accept.add(node)
        self.accept = frozenset(accept)

    @staticmethod
    def _walk(children: list[list[int]], state: int, nib: int) -> tuple[int, bytes]:
        out = bytearray()
        node = state
        for i in (3, 2, 1, 0):
            node = children[node][(nib >> i) & 1]
            if node < 0:
                sym = ~node
                if sym == _EOS:
                    return -1, b""
                out.append(sym)
                node = 0
        return node, bytes(out)


_huffman: _HuffmanTable | None = None


def huffman_decode(data: bytes) -> bytes:
    global _huffman
    table = _huffman
    if table is None:
        table = _huffman = _HuffmanTable()
    nxt, emit = table.next, table.emit
    state = 0
    out = []
    for b in data:
        i = (state << 8) | b
        state = nxt[i]
        if state < 0:
            raise HpackError("Huffman string contains EOS")
        e = emit[i]
        if e:
            out.append(e)
    if state not in table.accept:
        raise HpackError("Huffman string has invalid padding")
    return b"".join(out)


# --- integers and strings ---------------------------------------------------------------

def encode_int(value: int, prefix_bits: int, first: int) -> bytes:
    """``value`` with an N-bit prefix; ``first`` holds the representation's flag bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _decode_int(block: bytes, pos: int, prefix_mask: int) -> tuple[int, int]:
    value = block[pos] & prefix_mask
    pos += 1
    if value < prefix_mask:
        return value, pos
    shift = 0
    end = len(block)
    while True:
        if pos >= end:
            raise HpackError("integer runs past the end of the block")
        b = block[pos]
        pos += 1
        value += (b & 127) << shift
        if value > _MAX_INT:
            raise HpackError("integer too large")
        if not b & 128:
            return value, pos
        shift += 7


def _decode_str(block: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(block):
        raise HpackError("string runs past the end of the block")
    huffman = block[pos] & 128
    length, pos = _decode_int(block, pos, 127)
    end = pos + length
    if end > len(block):
        raise HpackError("string runs past the end of the block")
    raw = block[pos:end]
    return (huffman_decode(raw) if huffman else raw), end


def encode_str(data: bytes) -> bytes:
    """A string literal, Huffman-coded when that is shorter."""
    n = len(data)
    if n > 4:
        h = huffman_length(data)
        if h < n:
            return encode_int(h, 7, 128) + huffman_encode(data)
    return encode_int(n, 7, 0) + data


# --- the decoder ------------------------------------------------------------------------

class Decoder:
    """Decodes a peer's header blocks; one per connection direction."""

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE,
                 max_list_size: int = 65536) -> None:
        self.allowed_size = max_table_size  # the most we let the peer use (our SETTINGS)
        self.max_size = max_table_size  # what the peer currently uses
        self.max_list_size = max_list_size
        self.table: list[tuple[bytes, bytes]] = []  # newest last
        self.size = 0
        self.gen = 0
        self.cache: dict[bytes, list[Any]] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The header list of ``block``. The result may be shared: do not change it."""
        return self.decode_entry(block)[1]  # type: ignore[no-any-return]

    def decode_entry(self, block: bytes) -> list[Any]:
        """``[generation, headers, None, None]``: the same list object for every hit on a
        cached block, so a caller may keep what it derives from the headers (say, a
        validation verdict) in the two free slots."""
        entry = self.cache.get(block)
        if entry is not None and entry[0] == self.gen:
            return entry
        gen = self.gen
        headers, total = self._decode(block)
        if total > self.max_list_size:
            raise HeaderListTooLarge(
                f"header list of {total} bytes exceeds the limit of {self.max_list_size}")
        entry = [gen, headers, None, None]
        if gen == self.gen and len(block) <= _CACHE_BLOCK and len(headers) <= _CACHE_FIELDS:
            cache = self.cache
            if len(cache) >= _CACHE_ENTRIES:
                cache.clear()
            cache[block] = entry
        return entry

    def _decode(self, block: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
        headers: list[tuple[bytes, bytes]] = []
        append = headers.append
        total = 0
        limit = self.max_list_size
        pos, end = 0, len(block)
        fields = False
        while pos < end:
            b = block[pos]
            if b & 128:  # indexed field
                if b != 255:
                    idx, pos = b & 127, pos + 1
                else:
                    idx, pos = _decode_int(block, pos, 127)
                pair = self._entry(idx)
            elif b & 64:  # literal with incremental indexing
                pair, pos = self._literal(block, pos, 63)
                self._insert(pair)
            elif b & 32:  # dynamic table size update
                if fields:
                    raise HpackError("table size update after a header field")
                size, pos = _decode_int(block, pos, 31)
                if size > self.allowed_size:
                    raise HpackError(f"table size update to {size} exceeds {self.allowed_size}")
                self.max_size = size
                self._evict(size)
                self.gen += 1
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                pair, pos = self._literal(block, pos, 15)
                if b & 16:
                    pair = NeverIndexed(pair)
            fields = True
            total += len(pair[0]) + len(pair[1]) + 32
            if total <= limit:
                append(pair)
        return headers, total

    def _entry(self, idx: int) -> tuple[bytes, bytes]:
        if 0 < idx <= _STATIC_LEN:
            return STATIC_TABLE[idx - 1]
        table = self.table
        pos = len(table) - (idx - _STATIC_LEN)
        if idx == 0 or pos < 0:
            raise HpackError(f"header index {idx} is out of range")
        return table[pos]

    def _literal(self, block: bytes, pos: int, mask: int) -> tuple[tuple[bytes, bytes], int]:
        idx, pos = _decode_int(block, pos, mask)
        if idx:
            name = self._entry(idx)[0]
        else:
            name, pos = _decode_str(block, pos)
        value, pos = _decode_str(block, pos)
        return (name, value), pos

    def _insert(self, pair: tuple[bytes, bytes]) -> None:
        size = len(pair[0]) + len(pair[1]) + 32
        self.gen += 1
        if size > self.max_size:  # an entry larger than the table empties it (4.4)
            self.table.clear()
            self.size = 0
            return
        self._evict(self.max_size - size)
        self.table.append(pair)
        self.size += size

    def _evict(self, room: int) -> None:
        table = self.table
        while self.size > room:
            name, value = table.pop(0)
            self.size -= len(name) + len(value) + 32


# --- the encoder ------------------------------------------------------------------------

class Encoder:
    """Encodes our header lists for one peer; one per connection direction."""

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self.max_size = max_table_size
        self.pending_sizes: list[int] = []  # size updates to announce in the next block
        self.table: list[tuple[bytes, bytes]] = []  # newest last
        self.size = 0
        self.inserted = 0  # entries ever inserted; entry k has index 62 + inserted - 1 - k
        self.dropped = 0  # entries ever evicted (the oldest ones)
        self.pairs: dict[tuple[bytes, bytes], int] = {}  # pair -> its latest k
        self.names: dict[bytes, int] = {}  # name -> latest k
        self.gen = 0
        self.cache: dict[tuple[tuple[bytes, bytes], ...], tuple[int, bytes]] = {}

    def set_max_table_size(self, size: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE changed: use at most that (and at most
        the default, to bound our memory), announced at the start of the next block."""
        size = min(size, DEFAULT_TABLE_SIZE)
        if size == self.max_size and not self.pending_sizes:
            return
        self.pending_sizes.append(size)
        self.max_size = size
        self._evict(size)
        self.gen += 1

    def encode(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        key = tuple(headers)
        hit = self.cache.get(key)
        if hit is not None and hit[0] == self.gen:
            return hit[1]
        out: list[bytes] = []
        if self.pending_sizes:
            # The smallest size since the last block first, then the current one (4.2).
            sizes = self.pending_sizes
            low = min(sizes)
            out.append(encode_int(low, 5, 32))
            if sizes[-1] != low:
                out.append(encode_int(sizes[-1], 5, 32))
            self.pending_sizes = []
        gen = self.gen
        for pair in key:
            out.append(self._field(pair))
        data = b"".join(out)
        if gen == self.gen and len(data) <= _CACHE_BLOCK and len(key) <= _CACHE_FIELDS:
            cache = self.cache
            if len(cache) >= _CACHE_ENTRIES:
                cache.clear()
            cache[key] = (gen, data)
        return data

    def _field(self, pair: tuple[bytes, bytes]) -> bytes:
        idx = _STATIC_PAIR.get(pair)
        if idx is not None:
            return _INDEXED[idx]
        k = self.pairs.get(pair)
        if k is not None and k >= self.dropped:
            idx = _STATIC_LEN + self.inserted - k
            return _INDEXED[idx] if idx < 127 else encode_int(idx, 7, 128)
        name, value = pair
        name_idx = _STATIC_NAME.get(name)
        if name_idx is None:
            k = self.names.get(name)
            if k is not None and k >= self.dropped:
                name_idx = _STATIC_LEN + self.inserted - k
        if pair.__class__ is NeverIndexed or name in _SENSITIVE or (
                name == b"cookie" and len(value) < 20):
            head = encode_int(name_idx, 4, 16) if name_idx else b"\x10" + encode_str(name)
            return head + encode_str(value)
        size = len(name) + len(value) + 32
        if name in _NO_INDEX or size > self.max_size // 2:
            head = encode_int(name_idx, 4, 0) if name_idx else b"\x00" + encode_str(name)
            return head + encode_str(value)
        head = encode_int(name_idx, 6, 64) if name_idx else b"\x40" + encode_str(name)
        self._insert((name, value), size)
        return head + encode_str(value)

    def _insert(self, pair: tuple[bytes, bytes], size: int) -> None:
        self._evict(self.max_size - size)
        k = self.inserted
        self.inserted += 1
        self.table.append(pair)
        self.size += size
        self.pairs[pair] = k
        self.names[pair[0]] = k
        self.gen += 1

    def _evict(self, room: int) -> None:
        table = self.table
        while self.size > room and table:
            name, value = pair = table.pop(0)
            k = self.dropped
            self.dropped += 1
            self.size -= len(name) + len(value) + 32
            if self.pairs.get(pair) == k:
                del self.pairs[pair]
            if self.names.get(name) == k:
                del self.names[name]
        if self.size > room:  # nothing left to evict (room < 0)
            self.size = 0


_INDEXED = [bytes((128 | i,)) for i in range(127)]
