"""Frame rate that follows the link: a simple step-down on loss, step back up when calm.

aiortc's encoder already follows the gateway's congestion feedback (REMB) for the bitrate;
on a weak LTE link that alone leaves many frames broken by loss. So the device also sends
fewer frames (every 2nd, then every 3rd camera frame) while the gateway reports loss in
its RTCP receiver reports, and climbs back one step after a calm spell.

A step down is a trial: loss that comes from our own rate (a full uplink) falls once we
send less; loss a weak radio adds at random does not, and then fewer frames only cost the
viewer frames (aiortc keeps the bitrate, so each frame grows and spans more packets). So
if the loss averaged over PROBE_S after a step down is not at most half what made it, the
step is undone and no step down is tried again for HOLD_S. Reports are smoothed first
(RTCP's fraction lost over a second of a few dozen packets is noisy): the device steps down
on the smoothed loss, and judges a step against the smoothed loss that made it.

A functional core: the loss and the time are arguments, the decision comes back as a value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

# send every Nth camera frame: 15, 7.5, 5 fps for a 15 fps camera
DIVISORS: Final = (1, 2, 3)
# RTCP's fraction lost since the last report (0..1) above which the device steps down
STEP_DOWN_LOSS: Final = 0.04
# below which, held for CALM_S seconds, it steps back up
CALM_LOSS: Final = 0.01
CALM_S: Final = 10.0
# how long a step down is tried before judging whether it lowered the loss
PROBE_S: Final = 5.0
# a step down that did not help is not tried again for this long
HOLD_S: Final = 60.0
# weight of the latest report in the smoothed loss (an exponential moving average)
SMOOTHING: Final = 0.3


@dataclass(frozen=True, slots=True)
class LinkState:
    divisor: int = 1
    calm_since: float | None = None
    loss: float = 0.0  # smoothed
    # the trial of the last step down: when, the loss that made it, the loss since
    probe_since: float | None = None
    probe_cause: float = 0.0
    probe_total: float = 0.0
    probe_reports: int = 0
    hold_until: float = 0.0  # no step down before this: the loss does not follow our rate


def adapt(state: LinkState, fraction_lost: float, now: float) -> LinkState:
    """The next state, given the latest reported loss (0..1) at time `now` (seconds)."""
    level = DIVISORS.index(state.divisor)
    loss = state.loss + SMOOTHING * (fraction_lost - state.loss)
    state = dataclasses.replace(state, loss=loss)
    if state.probe_since is not None:
        probe_since = state.probe_since
        state = dataclasses.replace(
            state,
            probe_total=state.probe_total + fraction_lost,
            probe_reports=state.probe_reports + 1,
        )
        if now - probe_since < PROBE_S:
            return state  # the trial goes on: no other step meanwhile
        if state.probe_total / state.probe_reports > state.probe_cause / 2:
            # sending less did not lower the loss: send as before, and stop trying a while
            return LinkState(DIVISORS[level - 1], None, loss, hold_until=now + HOLD_S)
        state = LinkState(state.divisor, state.calm_since, loss, hold_until=state.hold_until)
    if loss > STEP_DOWN_LOSS:
        if level == len(DIVISORS) - 1 or now < state.hold_until:
            return dataclasses.replace(state, calm_since=None)
        return LinkState(
            DIVISORS[level + 1],
            None,
            loss,
            probe_since=now,
            probe_cause=loss,
            hold_until=state.hold_until,
        )
    if fraction_lost >= CALM_LOSS:
        return dataclasses.replace(state, calm_since=None)
    calm_since = now if state.calm_since is None else state.calm_since
    if level > 0 and now - calm_since >= CALM_S:
        return LinkState(DIVISORS[level - 1], now, loss, hold_until=state.hold_until)
    return dataclasses.replace(state, calm_since=calm_since)
