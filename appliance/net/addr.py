"""Addresses of a proxied connection, read once at accept.

After an iptables nat REDIRECT the accepted socket's local address is the proxy's listener;
the address the client really dialled is kept by conntrack and read with
``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (IPv4) or ``getsockopt(SOL_IPV6,
IP6T_SO_ORIGINAL_DST)`` (IPv6). The call is chosen by the address family of the connection
as seen in ``getsockname()``: an IPv4 client on a dual-stack listener appears as an
IPv4-mapped IPv6 address and needs the IPv4 call.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any, NamedTuple

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


class OrigDst(NamedTuple):
    """Where the client meant to connect."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ClientAddr(NamedTuple):
    """Who connected to the proxy."""

    host: str
    port: int


def _unmap(host: str) -> str:
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def local_addr(sock: Any) -> tuple[str, int]:
    name = sock.getsockname()
    return _unmap(name[0]), name[1]


def original_dst(sock: Any) -> OrigDst | None:
    """The pre-NAT destination, or None when the connection was not redirected."""
    host, _ = local_addr(sock)
    try:
        if ":" not in host:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return OrigDst(socket.inet_ntop(socket.AF_INET, packed), port)
        raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return OrigDst(socket.inet_ntop(socket.AF_INET6, packed), port)
    except OSError:
        # ENOENT: no conntrack NAT entry, i.e. the client connected to the listener itself.
        return None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
