"""The device sends fewer frames while the gateway reports loss, and climbs back when calm."""

from __future__ import annotations

import itertools
from pathlib import Path

from aiortc.stats import RTCRemoteInboundRtpStreamStats, RTCStatsReport
from video_rig import DEVICE, eventually, rig

from device.hal.camera import SyntheticCamera
from device.video.adapt import CALM_S, HOLD_S, PROBE_S, LinkState, adapt
from device.video.track import CameraTrack


def run(state: LinkState, losses: list[float], start: int = 0) -> tuple[LinkState, list[int]]:
    """One receiver report a second from `start`; the state after, and the divisor after each."""
    divisors = []
    for now, loss in enumerate(losses, start):
        state = adapt(state, loss, now=now)
        divisors.append(state.divisor)
    return state, divisors


def test_loss_that_falls_when_sending_less_steps_down_to_the_floor_then_back_up() -> None:
    trial = round(PROBE_S)
    # a full uplink: the first lossy report steps down, the trial lowers the loss
    state, divisors = run(LinkState(), [0.20] + [0.0] * trial)
    assert divisors == [2] * (trial + 1)  # one step at a time, kept: it helped
    state, divisors = run(state, [0.20] + [0.0] * trial, start=trial + 1)
    assert divisors == [3] * (trial + 1)  # the floor, kept
    state, divisors = run(state, [0.20, 0.20], start=2 * trial + 2)
    assert divisors == [3, 3]  # no step below the floor
    calm = 2 * trial + 4
    state, divisors = run(state, [0.0] * round(CALM_S * 2 + 20), start=calm)
    assert 2 in divisors and divisors[-1] == 1  # back up one step per calm spell
    assert divisors.index(1) - divisors.index(2) >= CALM_S


def test_loss_that_does_not_fall_when_sending_less_is_not_answered_with_fewer_frames() -> None:
    # a weak radio: 5 % lost whatever the rate
    seconds = round(HOLD_S + 3 * PROBE_S + 10)
    _, divisors = run(LinkState(), [0.05] * seconds)
    tried = divisors.index(2)  # a step down is tried...
    undone = divisors.index(1, tried)  # ...and undone after its trial
    assert undone - tried == PROBE_S and 3 not in divisors
    again = divisors.index(2, undone)  # not tried again for HOLD_S
    assert again - undone >= HOLD_S - 1
    assert divisors.count(1) > 0.8 * len(divisors)  # the viewer keeps its frames


async def test_the_camera_track_sends_every_nth_frame() -> None:
    camera = SyntheticCamera(32, 32, 60)
    camera.start()
    track = CameraTrack(camera)
    track.divisor = 3
    stamps = [(await track.recv()).pts for _ in range(4)]
    gaps = {b - a for a, b in itertools.pairwise(stamps)}
    # three camera frames apart at 60 fps and 90 kHz: about 4500 ticks, never one frame
    assert min(gaps) > 2 * 90_000 / 60
    track.stop()


class LossyReport:
    """A peer connection whose getStats says the gateway lost `fraction` of the video."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    async def getStats(self) -> RTCStatsReport:
        report = RTCStatsReport()
        report["remote"] = RTCRemoteInboundRtpStreamStats(
            timestamp=0,
            type="remote-inbound-rtp",
            id="remote",
            ssrc=1,
            kind="video",
            transportId="t",
            packetsReceived=100,
            packetsLost=10,
            jitter=0,
            roundTripTime=0.2,
            fractionLost=int(self.fraction * 256),
        )
        return report


async def test_the_session_follows_the_reported_loss(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        session = r.manager.session
        assert session is not None and isinstance(session.track, CameraTrack)
        real_pc = session.pc
        session.pc = LossyReport(0.2)  # type: ignore[assignment]
        try:
            await r.manager.follow_link()
            assert session.track.divisor == 2
        finally:
            session.pc = real_pc
