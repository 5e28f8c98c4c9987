"""Deadlines: l5d-ctx-deadline and grpc-timeout wire formats, and combining them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.resilience.deadline import (
    Deadline,
    DeadlineError,
    format_ctx_deadline,
    format_grpc_timeout,
    parse_ctx_deadline,
    parse_grpc_timeout,
)

WALL = 1_700_000_000.25  # a Unix time, exact in binary


class FakeClock:
    def __init__(self, t: float = 500.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_ctx_deadline_linkerd_format() -> None:
    """'<timestamp ns> <deadline ns>', both since the epoch, as linkerd 1 writes them."""
    assert format_ctx_deadline(1.5, WALL) == "1700000000250000000 1700000001750000000"
    assert parse_ctx_deadline("1700000000250000000 1700000001750000000", WALL) == 1.5
    assert parse_ctx_deadline(b"1700000000000000000 1700000002000000000", WALL) == 1.75


def test_ctx_deadline_in_the_past_is_negative() -> None:
    """A deadline already past gives a remaining time <= 0."""
    assert parse_ctx_deadline("0 1700000000000000000", WALL) == -0.25


@pytest.mark.parametrize("value", [
    "", "123", "1 2 3", "a b", "1.5 2", "1  2", "+1 2", "1_000 2", "\u0661 2",
    "1 99999999999999999999", "1 9223372036854775808", b"\xff\xfe 1", "0x10 20",
])
def test_ctx_deadline_malformed_is_none(value: str | bytes) -> None:
    """Anything but two decimal int64 fields separated by one space is ignored (None)."""
    assert parse_ctx_deadline(value, WALL) is None


@given(st.floats(-1e6, 1e6), st.floats(0, 4e9))
def test_ctx_deadline_round_trip(remaining: float, now_wall: float) -> None:
    """parse(format(r, now), now) == r to the nanosecond."""
    text = format_ctx_deadline(remaining, now_wall)
    back = parse_ctx_deadline(text, now_wall)
    assert back is not None and abs(back - remaining) <= 1e-9


@pytest.mark.parametrize("remaining, now_wall", [(math.nan, WALL), (1.0, math.inf),
                                                 ("1", WALL), (1e12, WALL)])
def test_format_ctx_deadline_bad_input_raises(remaining: object, now_wall: float) -> None:
    """Bad values the proxy supplies raise DeadlineError (a ValueError)."""
    with pytest.raises(DeadlineError):
        format_ctx_deadline(remaining, now_wall)  # type: ignore[arg-type]
    assert issubclass(DeadlineError, ValueError)


@pytest.mark.parametrize("value, seconds", [
    ("1H", 3600.0), ("2M", 120.0), ("3S", 3.0), ("250m", 0.25), ("1500u", 0.0015),
    ("7n", 7e-9), (b"99999999S", 99999999.0), ("0m", 0.0), (" 5S ", 5.0),
])
def test_parse_grpc_timeout(value: str | bytes, seconds: float) -> None:
    """Each unit of the gRPC spec."""
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "S", "5", "5s", "123456789S", "-5S", "1.5S", "5 S",
                                   "\u0665S", b"\xff"])
def test_parse_grpc_timeout_malformed_is_none(value: str | bytes) -> None:
    """More than 8 digits, unknown units, signs and decimals are ignored (None)."""
    assert parse_grpc_timeout(value) is None


@pytest.mark.parametrize("seconds, text", [
    (0.0, "0n"), (1e-9, "1n"), (0.05, "50000000n"), (0.1, "100000u"), (1.0, "1000000u"),
    (250.0, "250000m"), (100_000.0, "100000S"), (1e9, "16666667M"), (1e20, "99999999H"),
    (1.0000000001, "1000001u"),  # rounded up, as grpc-go does
])
def test_format_grpc_timeout(seconds: float, text: str) -> None:
    """The finest unit that fits in 8 digits, rounded up."""
    assert format_grpc_timeout(seconds) == text


@given(st.floats(0, 99_999_999 * 3600.0))
def test_grpc_timeout_round_trip_never_shortens(seconds: float) -> None:
    """Formatting then parsing never gives less time, and adds under one part in 10^5 (one unit)."""
    back = parse_grpc_timeout(format_grpc_timeout(seconds))
    assert back is not None
    assert back >= seconds * (1 - 1e-12)
    assert back <= seconds * (1 + 1e-5) + 1e-9


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf, None])
def test_format_grpc_timeout_bad_input_raises(seconds: object) -> None:
    """A negative or non-finite timeout is the proxy's bug: DeadlineError."""
    with pytest.raises(DeadlineError, match="grpc timeout"):
        format_grpc_timeout(seconds)  # type: ignore[arg-type]


def test_combine_takes_the_earliest() -> None:
    """Route timeout 5 s, ctx deadline 2 s, grpc-timeout 3 s: 2 s from l5d-ctx-deadline."""
    clock = FakeClock()
    d = Deadline.combine(clock, timeout=5.0, ctx_deadline=format_ctx_deadline(2.0, WALL),
                         grpc_timeout="3S", now_wall=WALL)
    assert d.at == clock.t + 2.0 and d.source == "l5d-ctx-deadline"
    assert d.remaining() == 2.0 and not d.expired()
    clock.t += 2.0
    assert d.expired() and d.remaining() == 0.0


@pytest.mark.parametrize("timeout, ctx, grpc, at, source", [
    (None, None, None, math.inf, ""),
    (1.0, None, None, 1.0, "timeout"),
    (1.0, None, "500m", 0.5, "grpc-timeout"),
    (None, ["1700000000250000000 1700000003250000000",
            "1700000000250000000 1700000001250000000"], None, 1.0, "l5d-ctx-deadline"),
    (0.5, "1700000000250000000 1700000001250000000", "2S", 0.5, "timeout"),
])
def test_combine_table(timeout: float | None, ctx: str | list[str] | None, grpc: str | None,
                       at: float, source: str) -> None:
    """Which input wins, including several ctx values (the strictest)."""
    d = Deadline.combine(FakeClock(0.0), timeout=timeout, ctx_deadline=ctx, grpc_timeout=grpc,
                         now_wall=WALL)
    assert d.at == pytest.approx(at) and d.source == source
    assert d.bounded == (at != math.inf)


def test_combine_ignores_and_names_malformed_headers() -> None:
    """Malformed incoming headers do not count; their names are reported."""
    d = Deadline.combine(FakeClock(0.0), timeout=4.0, ctx_deadline=["junk", "x y"],
                         grpc_timeout="soon", now_wall=WALL)
    assert d.at == 4.0 and d.source == "timeout"
    assert d.ignored == ("l5d-ctx-deadline", "grpc-timeout")


@pytest.mark.parametrize("kwargs, match", [
    ({"timeout": 0}, "route timeout"), ({"timeout": -1.0}, "route timeout"),
    ({"timeout": math.nan}, "route timeout"), ({"timeout": "5"}, "route timeout"),
    ({"ctx_deadline": "1 2"}, "now_wall"),
])
def test_combine_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    """Bad proxy-supplied values raise DeadlineError naming the problem."""
    with pytest.raises(DeadlineError, match=match):
        Deadline.combine(FakeClock(), **kwargs)  # type: ignore[arg-type]


def test_outgoing_headers() -> None:
    """The deadline is written on at least as strictly as it was received."""
    clock = FakeClock()
    d = Deadline.combine(clock, timeout=1.5)
    clock.t += 0.5
    assert d.ctx_deadline_header(WALL) == format_ctx_deadline(1.0, WALL)
    assert d.grpc_timeout_header() == "1000000u"
    none = Deadline.combine(clock)
    assert none.ctx_deadline_header(WALL) is None and none.grpc_timeout_header() is None
    assert none.remaining() == math.inf and not none.expired()
