"""Talk-back: an operator's voice reaches the doorbell's speaker only while push-to-talk is
held, each press audited; a device with talk-back off gets no audio; a store bell cannot
have it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiortc import RTCSessionDescription
from video_rig import DEVICE, eventually, listen, loudness, rig, viewer_with_microphone

from device.agent import Agent
from device.config import DeviceConfig, DeviceSection
from device.hal import Hardware
from device.hal.audio import FakeAudioOutput, FakeMicrophone
from device.hal.camera import SyntheticCamera
from device.hal.fakes import FakeIndicator, FakeInputs
from device.video.config import VideoConfig
from device.video.session import VideoManager
from gateway.video import audit
from gateway.video.hub import TalkbackOff
from protocol.jws import Signer
from protocol.keys import generate_key


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
            # frames already in flight (and the decoder's tail) play out, then only silence:
            # half a second of it in a row (25 frames of 20 ms)
            await eventually(
                lambda: (
                    len(speaker.played) >= 25
                    and max(loudness(p) for p in speaker.played[-25:]) == 0.0
                ),
                timeout_s=10,
            )
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


async def test_the_desk_hears_the_door_only_with_the_microphone_on(tmp_path: Path) -> None:
    heard: list[float] = []
    device = VideoConfig(talkback=True, microphone=True)
    speaker = FakeAudioOutput()
    async with rig(tmp_path, device=device, speaker=speaker, microphone=FakeMicrophone()) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams and r.hub.streams[DEVICE].door_audio)
        pc, offer = await viewer_with_microphone()
        tasks: list[asyncio.Task[None]] = []
        pc.on(
            "track",
            lambda t: (
                tasks.append(asyncio.ensure_future(listen(t, heard))) if t.kind == "audio" else None
            ),
        )
        try:
            viewer = await r.hub.add_viewer(DEVICE, offer, operator="kim")
            await pc.setRemoteDescription(RTCSessionDescription(viewer.answer, "answer"))
            await eventually(lambda: sum(1 for x in heard if x > 1000) >= 10, timeout_s=10)
            (entry,) = audit.read(tmp_path / "recordings")
            assert entry["action"] == "listen" and entry["operator"] == "kim"
            # talk-back still works beside it (one audio section, both ways)
            await r.hub.talk(DEVICE, viewer.id, on=True, operator="kim", reason="warn")
            await eventually(lambda: any(loudness(p) > 1000 for p in speaker.played), timeout_s=10)
        finally:
            await pc.close()
            for task in tasks:
                task.cancel()


def test_the_agent_wires_speaker_and_microphone_only_when_switched_on(tmp_path: Path) -> None:
    def manager(video: VideoConfig, name: str) -> VideoManager:
        agent = Agent(
            DeviceConfig(
                device=DeviceSection(id=DEVICE, kind="doorbell", state_dir=tmp_path / name),
                video=video,
            ),
            signer=Signer(DEVICE, generate_key()),
            gateway_key=generate_key().public_key(),
            hardware=Hardware(
                FakeInputs(),
                FakeIndicator(),
                SyntheticCamera(32, 32, 5),
                None,
                FakeAudioOutput(),
                FakeMicrophone(),
            ),
        )
        assert agent.video is not None
        return agent.video

    off = manager(VideoConfig(), "off")  # the defaults: hardware present, both off
    assert off._speaker is None and off._microphone is None
    on = manager(VideoConfig(talkback=True, microphone=True), "on")
    assert on._speaker is not None and on._microphone is not None
