"""Per-connection abuse limits for HTTP/2 servers (what the h2 library does not count).

Theory of operation: a client can make a server work hard while staying within the
protocol. Rapid Reset (CVE-2023-44487) opens streams and resets them at once: each one may
cost an upstream request while the client pays nothing. Control-frame floods (PING,
SETTINGS, empty DATA, PRIORITY) make the server queue answers or do work per frame. The
guard counts such events per connection in a sliding window and says when a limit is
passed; the connection then sends GOAWAY ENHANCE_YOUR_CALM and closes.

Pure: the caller passes the time; no sockets, no clock of its own.
"""

from __future__ import annotations

from collections import deque


class WindowCounter:
    """Events in the last ``window`` seconds; True from :meth:`add` once over ``limit``."""

    __slots__ = ("limit", "window", "times")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.times: deque[float] = deque()

    def add(self, now: float) -> bool:
        times = self.times
        times.append(now)
        horizon = now - self.window
        while times and times[0] < horizon:
            times.popleft()
        return len(times) > self.limit


class H2Guard:
    """The limits of one client connection."""

    __slots__ = ("resets", "control")

    def __init__(self, *, reset_limit: int, control_frame_limit: int,
                 window: float = 10.0) -> None:
        self.resets = WindowCounter(reset_limit, window)
        self.control = WindowCounter(control_frame_limit, window)

    def stream_reset_early(self, now: float) -> bool:
        """The client reset a stream before its response started."""
        return self.resets.add(now)

    def control_frame(self, now: float) -> bool:
        """A PING, SETTINGS, PRIORITY or empty DATA frame arrived."""
        return self.control.add(now)
