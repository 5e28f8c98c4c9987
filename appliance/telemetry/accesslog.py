"""The access log: one JSON object per request, per line, off by default.

Fields (absent when unknown): ``time`` (RFC 3339, UTC, ms), ``direction``, ``protocol``,
``method``, ``authority``, ``path``, ``status``, ``grpc_status``, ``duration_ms``,
``upstream`` (the endpoint), ``dst_service`` (the bound name, when routed), ``error`` (why
the proxy failed or cut the request), ``retries``, ``trace_id`` (when traced), and
``client_id`` (the peer's mesh identity, inbound, when known).

``access_log`` in the config names where it goes: empty (off), ``stderr``, or a file path
(appended to, one write per line).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any


class AccessLog:
    def __init__(self, target: str) -> None:
        self._own = target not in ("stderr", "-")
        self._out: IO[str] = sys.stderr if not self._own else \
            open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, **fields: Any) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + \
            f".{int(now % 1 * 1000):03d}Z"
        record = {"time": stamp, **{k: v for k, v in fields.items() if v not in (None, "")}}
        try:
            self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
        except OSError:
            pass  # a full disk must not fail requests

    def close(self) -> None:
        if self._own:
            self._out.close()


def open_access_log(target: str) -> AccessLog | None:
    """The access log ``target`` names, or None when off; ValueError if it cannot open."""
    if not target:
        return None
    try:
        return AccessLog(target)
    except OSError as exc:
        raise ValueError(f"access_log: cannot open {target!r}: {exc.strerror}") from None
