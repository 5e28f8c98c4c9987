#!/usr/bin/env python3
"""A stand-in for `appliance proxy` to test the harness: a bare uvloop TCP relay.

Accepts the same flags the harness passes (`proxy --outbound-port ... --set
outbound.orig_dst_override=HOST:PORT ...`), relays every outbound connection to the
override address byte for byte, and answers 200 on admin /ready. Not a benchmark subject:
    .venv/bin/python bench/run.py --appliance bench/fake_appliance.py --duration 2 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

import uvloop


class Relay(asyncio.Protocol):
    """One side of a relayed connection; `peer` is the other side's transport."""

    def __init__(self, peer: Any = None, on_made: Callable[[Relay], None] | None = None) -> None:
        self.peer = peer  # uvloop transports are not asyncio.Transport subclasses
        self.transport: Any = None
        self.early: list[bytes] = []
        self.on_made = on_made

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)  # upstream not connected yet
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


async def relay_to(host: str, port: int, client: Relay) -> None:
    loop = asyncio.get_running_loop()
    try:
        up_t, _ = await loop.create_connection(lambda: Relay(client.transport), host, port)
    except OSError:
        client.transport.close()
        return
    client.peer = up_t
    for chunk in client.early:
        up_t.write(chunk)
    client.early.clear()


async def admin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nready\n")
    await writer.drain()
    writer.close()


async def serve(args: argparse.Namespace) -> None:
    sets = dict(item.partition("=")[::2] for item in args.set)
    host, _, port = sets["outbound.orig_dst_override"].rpartition(":")
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def start_upstream(client: Relay) -> None:
        task = loop.create_task(relay_to(host, int(port), client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def accept() -> Relay:
        return Relay(on_made=start_upstream)

    bind = sets.get("outbound.bind", "127.0.0.1")
    await loop.create_server(accept, bind, args.outbound_port, backlog=4096)
    await asyncio.start_server(admin, sets.get("admin.bind", "127.0.0.1"), args.admin_port)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["proxy"])
    p.add_argument("--outbound-port", type=int, required=True)
    p.add_argument("--inbound-port", type=int)
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--log-level")
    p.add_argument("--set", action="append", default=[])
    uvloop.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
