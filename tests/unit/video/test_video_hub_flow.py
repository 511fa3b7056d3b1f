"""Device session and gateway hub end to end, signalling in memory, media over loopback."""

from __future__ import annotations

from pathlib import Path

import av
import pytest
from video_rig import DEVICE, Watcher, eventually, plaintext, rig

from gateway.video.config import VideoConfig
from gateway.video.evidence import verify_seal
from gateway.video.hub import BadOffer, DeviceOffline
from protocol.messages import Alert, Rtc


async def test_video_start_streams_records_relays_and_seals(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        stream = r.hub.streams[DEVICE]
        await eventually(lambda: stream.frames >= 5)
        assert stream.codec == "H264"  # preferred over VP8

        one, two = Watcher(), Watcher()
        try:
            for w in (one, two):
                viewer = await r.hub.add_viewer(DEVICE, await w.offer())
                await w.answer(viewer.answer)
            await eventually(lambda: one.frames >= 5 and two.frames >= 5)
            # the device learns that people watch, over the data channel
            assert r.manager.session is not None
            await eventually(
                lambda: r.manager.session is not None and r.manager.session.viewers == 2
            )
        finally:
            await one.close()
            await two.close()

        r.command("video_stop")
        await eventually(lambda: DEVICE not in r.hub.streams and len(r.hub.sealed) == 1)
        assert r.manager.history[-1][1] == "operator command"
        (path,) = r.hub.sealed
        with av.open(plaintext(path, r.keyring), format="mp4") as container:
            decoded = sum(1 for _ in container.decode(video=0))
        assert decoded > 0
        facts = verify_seal(path, lambda kid: r.signer.public_key, r.keyring)
        assert facts["device"] == DEVICE and facts["frames"] > 0


async def test_emergency_alert_starts_video_and_a_ring_only_when_configured(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        r.manager.on_alert(Alert(bell="doorbell", trigger="doorbell_ring"))
        r.manager.on_alert(Alert(bell="emergency", trigger="press"))
        await eventually(lambda: DEVICE in r.hub.streams)
        assert r.manager.session is not None
        assert r.manager.session.reason == "emergency (press)"
        assert [m.kind for m in r.to_gateway] == ["offer"]


async def test_too_many_streams_is_answered_with_a_reason_and_no_sdp(tmp_path: Path) -> None:
    config = VideoConfig(recordings_dir=tmp_path, max_streams=0)
    async with rig(tmp_path, gateway=config) as r:
        r.command("video_start")
        await eventually(lambda: bool(r.manager.history))
        (answer,) = r.to_device
        assert answer.kind == "answer" and answer.sdp is None
        assert answer.reason is not None and "too many streams" in answer.reason
        assert "too many streams" in r.manager.history[0][1]
        assert r.hub.streams == {}


async def test_malformed_sdp_is_refused_and_other_streams_go_on(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        await r.hub.handle_rtc(
            "bell-0042", Rtc(kind="offer", session="bogus-session", sdp="v=0\r\nnonsense")
        )
        assert r.to_device[-1].reason == "malformed sdp"  # sent for bell-0042 via the same send
        assert r.hub.refused == {"malformed sdp": 1}
        stream = r.hub.streams[DEVICE]
        before = stream.frames
        await eventually(lambda: stream.frames > before + 3)


async def test_viewer_errors_are_clear(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        w = Watcher()
        try:
            with pytest.raises(DeviceOffline, match="no live stream"):
                await r.hub.add_viewer(DEVICE, await w.offer())
            r.command("video_start")
            await eventually(lambda: DEVICE in r.hub.streams)
            with pytest.raises(BadOffer, match="viewer offer refused"):
                await r.hub.add_viewer(DEVICE, "this is not sdp")
            assert r.hub.stats()["viewers"] == 0
        finally:
            await w.close()
