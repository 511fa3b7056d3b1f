"""The device sends fewer frames while the gateway reports loss, and climbs back when calm."""

from __future__ import annotations

import itertools
from pathlib import Path

from aiortc.stats import RTCRemoteInboundRtpStreamStats, RTCStatsReport
from video_rig import DEVICE, eventually, rig

from device.hal.camera import SyntheticCamera
from device.video.adapt import CALM_S, LinkState, adapt
from device.video.track import CameraTrack


def test_loss_steps_down_to_the_floor_and_calm_steps_back_up_one_at_a_time() -> None:
    state = LinkState()
    state = adapt(state, 0.10, now=0)
    assert state.divisor == 2
    state = adapt(state, 0.10, now=1)
    state = adapt(state, 0.10, now=2)
    assert state.divisor == 3  # the floor: every third frame
    state = adapt(state, 0.02, now=3)  # neither lossy nor calm: stay
    assert state.divisor == 3
    state = adapt(state, 0.0, now=4)
    state = adapt(state, 0.0, now=4 + CALM_S - 1)
    assert state.divisor == 3  # not calm for long enough yet
    state = adapt(state, 0.0, now=4 + CALM_S)
    assert state.divisor == 2
    state = adapt(state, 0.0, now=4 + 2 * CALM_S)
    assert state.divisor == 1
    assert adapt(state, 0.0, now=10**6).divisor == 1


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
