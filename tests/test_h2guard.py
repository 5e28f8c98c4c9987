"""The HTTP/2 abuse counters, with an injected clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols.h2guard import H2Guard, WindowCounter


def test_limit_is_passed_on_the_event_after_it() -> None:
    """limit=3: the 4th event inside the window trips it."""
    counter = WindowCounter(3, 10.0)
    assert [counter.add(t) for t in (0.0, 1.0, 2.0, 3.0)] == [False, False, False, True]


def test_old_events_leave_the_window() -> None:
    """Events older than the window no longer count."""
    counter = WindowCounter(2, 1.0)
    assert not counter.add(0.0)
    assert not counter.add(0.5)
    assert not counter.add(1.6)  # 0.0 and 0.5 have left
    assert not counter.add(1.7)
    assert counter.add(1.8)


@given(st.lists(st.floats(min_value=0, max_value=100), max_size=60))
def test_trips_exactly_when_more_than_limit_fall_in_the_window(times: list[float]) -> None:
    """For any sorted times, add() agrees with counting the window directly."""
    times = sorted(times)
    counter = WindowCounter(5, 2.0)
    for i, t in enumerate(times):
        in_window = sum(1 for u in times[: i + 1] if u >= t - 2.0)
        assert counter.add(t) == (in_window > 5)


def test_guard_counts_resets_and_control_frames_separately() -> None:
    """Resets and control frames have their own limits."""
    guard = H2Guard(reset_limit=1, control_frame_limit=2)
    assert not guard.stream_reset_early(0.0)
    assert not guard.control_frame(0.0)
    assert not guard.control_frame(0.1)
    assert guard.stream_reset_early(0.2)
    assert guard.control_frame(0.3)
