"""Time as the wire counts it: whole milliseconds since the Unix epoch (an envelope's `ts`).

Every part that reads the time takes a `Clock` as a parameter (`clock_ms=`), so tests
pass their own and time-dependent rules are checked without sleeping; `wall_ms` is the
system's, the default.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], int]


def wall_ms() -> int:
    """The system's wall clock, in the wire's unit."""
    return time.time_ns() // 1_000_000
