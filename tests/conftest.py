from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from support import H11Server, ProxyProcess, proxy  # noqa: E402


@pytest.fixture
def backend() -> Iterator[H11Server]:
    server = H11Server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def mesh(backend: H11Server) -> Iterator[ProxyProcess]:
    """The proxy, forwarding its outbound listener to the backend."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{backend.port}") as p:
        yield p
