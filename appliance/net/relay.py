"""Opaque TCP relay between a client transport and an upstream connection.

Theory of operation: two asyncio Protocols, one per side, each writing what it reads to the
other side's transport. Bytes that arrive before the upstream is connected are held (the
client is paused past 64 KiB, so the hold is bounded). Backpressure: when one side's write
buffer passes its high-water mark, asyncio calls ``pause_writing`` on that side's protocol
and we stop reading from the other side until ``resume_writing``. Half-close: an EOF from one
side becomes ``write_eof`` on the other; the relay ends when both directions are done or
either side fails (a reset upstream aborts the client, so errors stay visible).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from appliance.net.addr import OrigDst

if TYPE_CHECKING:
    from appliance.net.listener import Direction

_HOLD_LIMIT = 64 * 1024


class _Side(asyncio.Protocol):
    """One end of the relay; ``other`` is the opposite end."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: Any = None
        self.other: _Side | None = None
        self.eof = False
        self.stats: Any = None
        self.opened_at = 0.0

    def connection_made(self, transport: Any) -> None:
        # Only the upstream side gets here: the client side was accepted earlier.
        self.transport = transport
        self.relay.up_connected()

    def data_received(self, data: bytes) -> None:
        self.stats.read_bytes += len(data)
        other = self.other
        if other is not None and other.transport is not None:
            other.stats.write_bytes += len(data)
            other.transport.write(data)
        else:
            self.relay.hold(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is not None and other.transport is not None:
            if other.eof:
                self.relay.close()
                return False
            if other.transport.can_write_eof():
                other.transport.write_eof()
        return True  # keep our write side open: the other direction may still flow

    def pause_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.side_lost(self, exc)


class Relay:
    """Owns both sides; created for a detected-opaque (or pass-through) connection."""

    def __init__(self, direction: Direction, transport: Any, dst: OrigDst, protocol: str,
                 early: bytes) -> None:
        self.direction = direction
        self.dst = dst
        self.down = _Side(self)
        self.down.transport = transport
        self.down.stats = direction.tcp_stats(protocol, "src")
        self.up = _Side(self)
        self.up.stats = direction.tcp_stats(protocol, "dst")
        self.down.other = self.up
        self.up.other = self.down
        self.down.stats.read_bytes += len(early)  # read while the protocol was detected
        self._held: list[bytes] = [early] if early else []
        self._held_len = len(early)
        self._closed = False
        self._connect: asyncio.Task[Any] | None = None
        direction.relays.add(self)  # so a graceful shutdown can wait for it

    def start(self, early_eof: bool) -> None:
        transport = self.down.transport
        transport.set_protocol(self.down)
        self.down.opened_at = self.down.stats.open()
        self.down.eof = early_eof
        self._connect = self.direction.spawn(self._open())

    def join(self, up_transport: Any, *, to_up: bytes, to_down: bytes) -> None:
        """Relay between two already-connected transports (an HTTP tunnel that opened)."""
        down = self.down.transport
        down.set_protocol(self.down)
        up_transport.set_protocol(self.up)
        self.up.transport = up_transport
        self.down.opened_at = self.down.stats.open()
        self.up.opened_at = self.up.stats.open()
        if to_down:
            self.down.stats.write_bytes += len(to_down)
            down.write(to_down)
        if to_up:
            self.up.stats.write_bytes += len(to_up)
            up_transport.write(to_up)
        down.resume_reading()
        up_transport.resume_reading()

    def hold(self, data: bytes) -> None:
        self._held.append(data)
        self._held_len += len(data)
        if self._held_len > _HOLD_LIMIT:
            self.down.transport.pause_reading()

    async def _open(self) -> None:
        d = self.direction
        try:
            transport, _ = await d.connect(lambda: self.up, self.dst)
        except (TimeoutError, OSError) as exc:
            d.registry.error(d.name, getattr(exc, "kind", None) or (  # TlsConnectError.kind
                "connect_timeout" if isinstance(exc, asyncio.TimeoutError) else "connect_refused"))
            self.close(abort=True)
            return
        if self._closed:
            transport.close()

    def up_connected(self) -> None:
        """Flush what the client sent while we connected, in order, before anything new."""
        transport = self.up.transport
        self.up.opened_at = self.up.stats.open()
        held, self._held = self._held, []
        if held:
            data = b"".join(held)
            self.up.stats.write_bytes += len(data)
            transport.write(data)
        down = self.down.transport
        if down is None:
            return
        down.resume_reading()
        if self.down.eof and transport.can_write_eof():
            transport.write_eof()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        side.stats.close(side.opened_at)
        side.transport = None
        self.close(abort=exc is not None)

    def close(self, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.direction.relays.discard(self)
        if self._connect is not None and not self._connect.done():
            self._connect.cancel()
        for side in (self.down, self.up):
            t = side.transport
            if t is not None:
                # An error on one side resets the other, so the failure is not hidden
                # behind a clean close.
                t.abort() if abort else t.close()
