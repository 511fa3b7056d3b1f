"""Talk-back: an operator's voice reaches the doorbell's speaker only while push-to-talk is
held, each press audited; a device with talk-back off gets no audio; a store bell cannot
have it."""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from video_rig import DEVICE, eventually, rig

from ansimi.webrtc import rtc_configuration
from device.config import DeviceConfig
from device.hal.audio import FakeAudioOutput
from device.video.config import VideoConfig
from gateway.video import audit
from gateway.video.hub import TalkbackOff


class Tone(MediaStreamTrack):
    """A 440 Hz tone, as a browser's fake microphone sends it (48 kHz stereo, 20 ms)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pts / 48_000 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (self._pts + np.arange(960)) / 48_000
        wave = (8000 * np.sin(2 * math.pi * 440 * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(
            np.repeat(wave, 2).reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = 48_000
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, 48_000)
        self._pts += 960
        return frame


def loudness(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


async def viewer_with_microphone() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(rtc_configuration([]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTrack(Tone())
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def test_the_operators_voice_plays_only_while_talking(tmp_path: Path) -> None:
    speaker = FakeAudioOutput()
    async with rig(tmp_path, device=VideoConfig(talkback=True), speaker=speaker) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        pc, offer = await viewer_with_microphone()
        try:
            viewer = await r.hub.add_viewer(DEVICE, offer)
            await pc.setRemoteDescription(RTCSessionDescription(viewer.answer, "answer"))
            # before any press: the speaker gets only silence
            await eventually(lambda: len(speaker.played) >= 25, timeout_s=10)
            assert max(loudness(p) for p in speaker.played) == 0.0
            assert (speaker.sample_rate, speaker.channels) == (48_000, 2)
            await r.hub.talk(DEVICE, viewer.id, on=True, operator="kim", reason="warn visitor")
            await eventually(lambda: any(loudness(p) > 1000 for p in speaker.played), timeout_s=10)
            await r.hub.talk(DEVICE, viewer.id, on=False, operator="", reason="")
            await asyncio.sleep(0.5)  # let frames already in flight play out
            after_release = len(speaker.played)
            await eventually(lambda: len(speaker.played) >= after_release + 25, timeout_s=10)
            assert max(loudness(p) for p in speaker.played[after_release:]) == 0.0
            (entry,) = audit.read(tmp_path / "recordings")
            assert entry["action"] == "talkback" and entry["operator"] == "kim"
            assert entry["device"] == DEVICE
        finally:
            await pc.close()


async def test_talkback_off_by_default_means_no_audio_at_all(tmp_path: Path) -> None:
    speaker = FakeAudioOutput()
    async with rig(tmp_path) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        assert r.hub.streams[DEVICE].talk is None
        pc, offer = await viewer_with_microphone()
        try:
            viewer = await r.hub.add_viewer(DEVICE, offer)
            with pytest.raises(TalkbackOff):
                await r.hub.talk(DEVICE, viewer.id, on=True, operator="kim", reason="x")
        finally:
            await pc.close()
    assert speaker.played == [] and audit.read(tmp_path / "recordings") == []


def test_a_store_bell_cannot_have_talkback() -> None:
    with pytest.raises(ValueError, match="store bell is silent"):
        DeviceConfig.model_validate({"device": {"kind": "store"}, "video": {"talkback": True}})
    DeviceConfig.model_validate({"device": {"kind": "doorbell"}, "video": {"talkback": True}})
