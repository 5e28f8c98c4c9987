"""Deadlines: the earliest of a route timeout, an ``l5d-ctx-deadline`` and a ``grpc-timeout``.

Theory of operation: a request may arrive with a deadline set by a caller upstream, in
linkerd's ``l5d-ctx-deadline`` header (absolute wall-clock times) or gRPC's ``grpc-timeout``
header (relative), and the route may have its own timeout. :meth:`Deadline.combine` turns
each into a point on the proxy's monotonic clock, measured from when the request arrived,
and keeps the earliest. The proxy then waits at most :meth:`Deadline.remaining`, refuses
to start (or retry) an attempt once :meth:`Deadline.expired`, and writes the same deadline
on the outgoing request so the next hop is at least as strict (linkerd's rule).

Wire formats:

- ``l5d-ctx-deadline: <timestamp> <deadline>``: two decimal integers, nanoseconds since the
  Unix epoch; ``timestamp`` is when the deadline was set, ``deadline`` when it expires
  (Finagle's ``Deadline`` context as linkerd 1 writes it). Several values: the strictest
  wins. Only the ``deadline`` matters for the remaining time, so clocks across hosts must be
  roughly in sync, as in linkerd.
- ``grpc-timeout: <1-8 digits><unit>``, unit ``H``, ``M``, ``S``, ``m``, ``u`` or ``n``.

Errors: header values come from the network, so the parsers return None for a value that is
malformed (it is then ignored, as linkerd ignores it, and its name is listed in
``Deadline.ignored``). Values the proxy itself supplies (a route timeout, a remaining time
to format) raise :class:`DeadlineError`, a ``ValueError`` naming the bad value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

__all__ = [
    "CTX_DEADLINE", "GRPC_TIMEOUT", "Deadline", "DeadlineError", "format_ctx_deadline",
    "format_grpc_timeout", "parse_ctx_deadline", "parse_grpc_timeout",
]

CTX_DEADLINE = "l5d-ctx-deadline"
GRPC_TIMEOUT = "grpc-timeout"

_NS = 1_000_000_000
_INT64_MAX = (1 << 63) - 1
_CTX_RE = re.compile(r"(-?[0-9]{1,19}) (-?[0-9]{1,19})")
_GRPC_RE = re.compile(r"([0-9]{1,8})([HMSmun])")
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_GRPC_UNIT_NS = (("n", 1), ("u", 1_000), ("m", 1_000_000), ("S", _NS), ("M", 60 * _NS),
                 ("H", 3600 * _NS))
_GRPC_MAX = 99_999_999


class DeadlineError(ValueError):
    """A timeout or deadline the proxy was given is not a usable number of seconds."""


def _text(value: str | bytes) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _to_ns(seconds: float) -> int:
    """Whole nanoseconds, without the float rounding of ``seconds * 1e9`` at epoch scale."""
    whole = math.floor(seconds)
    return whole * _NS + round((seconds - whole) * _NS)


def parse_ctx_deadline(value: str | bytes, now_wall: float) -> float | None:
    """Seconds left until the ``l5d-ctx-deadline`` value expires (<= 0 once past), or None
    when the value is malformed. ``now_wall`` is the current Unix time in seconds."""
    deadline = ctx_deadline_ns(value)
    if deadline is None:
        return None
    return (deadline - _to_ns(now_wall)) / _NS


def ctx_deadline_ns(value: str | bytes) -> int | None:
    """The ``deadline`` of an ``l5d-ctx-deadline`` value (Unix ns), or None if malformed."""
    text = _text(value)
    m = _CTX_RE.fullmatch(text.strip()) if text is not None else None
    if m is None:
        return None
    timestamp, deadline = int(m.group(1)), int(m.group(2))
    if abs(timestamp) > _INT64_MAX or abs(deadline) > _INT64_MAX:
        return None
    return deadline


def format_ctx_deadline(remaining: float, now_wall: float) -> str:
    """The ``l5d-ctx-deadline`` value for a deadline ``remaining`` seconds from ``now_wall``."""
    _check_seconds("remaining time", remaining, allow_negative=True)
    _check_seconds("wall-clock time", now_wall, allow_negative=True)
    now_ns = _to_ns(now_wall)
    deadline_ns = now_ns + _to_ns(remaining)
    if abs(now_ns) > _INT64_MAX or abs(deadline_ns) > _INT64_MAX:
        raise DeadlineError(f"deadline {now_wall!r} + {remaining!r} s does not fit in 64-bit "
                            "nanoseconds")
    return f"{now_ns} {deadline_ns}"


def parse_grpc_timeout(value: str | bytes) -> float | None:
    """The ``grpc-timeout`` value in seconds, or None when it is malformed."""
    text = _text(value)
    m = _GRPC_RE.fullmatch(text.strip()) if text is not None else None
    if m is None:
        return None
    return int(m.group(1)) * _GRPC_UNITS[m.group(2)]


def format_grpc_timeout(seconds: float) -> str:
    """The ``grpc-timeout`` value for ``seconds``: the finest unit that fits in 8 digits,
    rounded up (as grpc-go does); times past 99999999 hours are capped there."""
    _check_seconds("grpc timeout", seconds, allow_negative=False)
    ns = math.ceil(seconds * _NS)
    for unit, size in _GRPC_UNIT_NS:
        n = -(-ns // size)
        if n <= _GRPC_MAX:
            return f"{n}{unit}"
    return f"{_GRPC_MAX}H"


def _check_seconds(what: str, value: object, *, allow_negative: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or (value < 0 and not allow_negative):
        bound = "" if allow_negative else " >= 0"
        raise DeadlineError(f"{what} must be a finite number of seconds{bound}, got {value!r}")
    return float(value)


class Deadline:
    """An absolute deadline on a monotonic clock (``at`` is ``inf`` when there is none)."""

    __slots__ = ("_clock", "at", "source", "ignored", "ctx_ns")

    def __init__(self, clock: Callable[[], float], at: float = math.inf, source: str = "",
                 ignored: tuple[str, ...] = (), ctx_ns: int | None = None) -> None:
        self._clock = clock
        self.at = at
        self.source = source
        """What set it: ``timeout``, ``l5d-ctx-deadline``, ``grpc-timeout`` or ``""``."""
        self.ignored = ignored
        """Names of incoming headers that were malformed and so ignored."""
        self.ctx_ns = ctx_ns
        """The strictest incoming ``l5d-ctx-deadline`` (Unix ns), if any: what is sent on
        is never later than it, whatever the drift between the wall and monotonic clocks."""

    @classmethod
    def combine(cls, clock: Callable[[], float], *, timeout: float | None = None,
                ctx_deadline: str | bytes | Iterable[str | bytes] | None = None,
                grpc_timeout: str | bytes | None = None,
                now_wall: float | None = None) -> Deadline:
        """The earliest of a route ``timeout`` (seconds), incoming ``l5d-ctx-deadline``
        value(s) and an incoming ``grpc-timeout`` value, counted from now.

        ``now_wall`` (Unix time, seconds) is required with ``ctx_deadline``. A malformed
        header is ignored and named in ``ignored``; a bad ``timeout`` raises DeadlineError.
        """
        now = clock()
        best, source, ignored = math.inf, "", []
        ctx_ns: int | None = None
        if timeout is not None:
            if _check_seconds("route timeout", timeout, allow_negative=False) == 0.0:
                raise DeadlineError("route timeout must be > 0 seconds, got 0")
            best, source = now + timeout, "timeout"
        if ctx_deadline is not None:
            if now_wall is None:
                raise DeadlineError("now_wall (Unix time) is required to read l5d-ctx-deadline")
            values = ((ctx_deadline,) if isinstance(ctx_deadline, str | bytes)
                      else tuple(ctx_deadline))
            for value in values:
                at_ns = ctx_deadline_ns(value)
                if at_ns is None:
                    ignored.append(CTX_DEADLINE)
                    continue
                left = (at_ns - _to_ns(now_wall)) / _NS
                if ctx_ns is None or at_ns < ctx_ns:
                    ctx_ns = at_ns
                if now + left < best:
                    best, source = now + left, CTX_DEADLINE
        if grpc_timeout is not None:
            grpc_left = parse_grpc_timeout(grpc_timeout)
            if grpc_left is None:
                ignored.append(GRPC_TIMEOUT)
            elif now + grpc_left < best:
                best, source = now + grpc_left, GRPC_TIMEOUT
        return cls(clock, best, source, tuple(dict.fromkeys(ignored)), ctx_ns)

    @property
    def bounded(self) -> bool:
        return self.at != math.inf

    def remaining(self) -> float:
        """Seconds left (0.0 once expired, ``inf`` when unbounded)."""
        left = self.at - self._clock()
        return left if left > 0.0 else 0.0

    def expired(self) -> bool:
        return self._clock() >= self.at

    def ctx_deadline_header(self, now_wall: float) -> str | None:
        """The ``l5d-ctx-deadline`` value to send on, or None when unbounded."""
        if not self.bounded:
            return None
        value = format_ctx_deadline(self.at - self._clock(), now_wall)
        if self.ctx_ns is not None:
            stamp, deadline_ns = value.split(" ")
            if int(deadline_ns) > self.ctx_ns:
                value = f"{stamp} {self.ctx_ns}"
        return value

    def grpc_timeout_header(self) -> str | None:
        """The ``grpc-timeout`` value to send on, or None when unbounded."""
        if not self.bounded:
            return None
        return format_grpc_timeout(self.remaining())

    def __repr__(self) -> str:
        if not self.bounded:
            return "<Deadline none>"
        return f"<Deadline at={self.at:.6f} from {self.source}>"
