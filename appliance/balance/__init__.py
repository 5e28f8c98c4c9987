"""Load balancing: peak-EWMA cost, P2C and round-robin balancers, failure accrual.

Pure code: every class takes a clock (monotonic seconds) and a ``random.Random``; nothing
here does I/O. See docs/reliability.md.
"""

from __future__ import annotations

from appliance.balance.accrual import (
    ALIVE,
    EJECTED,
    PROBING,
    Accrual,
    ConsecutiveFailures,
    NoAccrual,
    SuccessRate,
    accrual_factory,
)
from appliance.balance.balancer import (
    KINDS,
    Balancer,
    EndpointState,
    P2CLeastLoaded,
    P2CPeakEwma,
    RoundRobin,
    make_balancer,
)
from appliance.balance.ewma import PeakEwma

__all__ = [
    "ALIVE", "EJECTED", "KINDS", "PROBING", "Accrual", "Balancer", "ConsecutiveFailures",
    "EndpointState", "NoAccrual", "P2CLeastLoaded", "P2CPeakEwma", "PeakEwma", "RoundRobin",
    "SuccessRate", "accrual_factory", "make_balancer",
]
