"""Frame rate that follows the link: a simple step-down on loss, step back up when calm.

aiortc's encoder already follows the gateway's congestion feedback (REMB) for the bitrate;
on a weak LTE link that alone leaves many frames broken by loss. So the device also sends
fewer frames (every 2nd, then every 3rd camera frame) while the gateway reports loss in
its RTCP receiver reports, and climbs back one step after a calm spell. A functional core:
the loss and the time are arguments, the decision comes back as a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# send every Nth camera frame: 15, 7.5, 5 fps for a 15 fps camera
DIVISORS: Final = (1, 2, 3)
# RTCP's fraction lost since the last report (0..1) above which the device steps down
STEP_DOWN_LOSS: Final = 0.04
# below which, held for CALM_S seconds, it steps back up
CALM_LOSS: Final = 0.01
CALM_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class LinkState:
    divisor: int = 1
    calm_since: float | None = None


def adapt(state: LinkState, fraction_lost: float, now: float) -> LinkState:
    """The next state, given the latest reported loss (0..1) at time `now` (seconds)."""
    level = DIVISORS.index(state.divisor)
    if fraction_lost > STEP_DOWN_LOSS:
        return LinkState(DIVISORS[min(level + 1, len(DIVISORS) - 1)], None)
    if fraction_lost >= CALM_LOSS:
        return LinkState(state.divisor, None)
    calm_since = now if state.calm_since is None else state.calm_since
    if level > 0 and now - calm_since >= CALM_S:
        return LinkState(DIVISORS[level - 1], now)
    return LinkState(state.divisor, calm_since)
