"""When the device stops a stream by itself: nobody watching, too long, no answer."""

from __future__ import annotations

from pathlib import Path

import av
from video_rig import DEVICE, Watcher, eventually, plaintext, rig

from device.video.config import VideoConfig
from gateway.video.config import VideoConfig as GatewayConfig


async def test_unwatched_stream_stops_after_idle_time(tmp_path: Path) -> None:
    now = [1000.0]
    config = VideoConfig(idle_stop_s=30, max_duration_s=600)
    async with rig(tmp_path, device=config, clock=lambda: now[0]) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        now[0] += 29
        r.manager.check_limits()
        assert r.manager.session is not None
        now[0] += 1
        r.manager.check_limits()
        await eventually(lambda: r.manager.session is None and DEVICE not in r.hub.streams)
        assert r.manager.history[-1][1] == "nobody watched for 30 s"
        assert r.to_gateway[-1].kind == "bye"


async def test_a_watched_stream_keeps_going_until_the_maximum(tmp_path: Path) -> None:
    now = [1000.0]
    config = VideoConfig(idle_stop_s=30, max_duration_s=100)
    async with rig(tmp_path, device=config, clock=lambda: now[0]) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        w = Watcher()
        try:
            viewer = await r.hub.add_viewer(DEVICE, await w.offer())
            await w.answer(viewer.answer)
            session = r.manager.session
            assert session is not None
            await eventually(lambda: session.viewers == 1)
            now[0] += 99
            r.manager.check_limits()
            assert r.manager.session is session
            now[0] += 1
            r.manager.check_limits()
            await eventually(lambda: r.manager.session is None)
            assert r.manager.history[-1][1] == "maximum duration (100 s) reached"
        finally:
            await w.close()


async def test_no_answer_gives_up(tmp_path: Path) -> None:
    config = VideoConfig(answer_timeout_s=0.3)
    async with rig(tmp_path, device=config, gateway=GatewayConfig(recordings_dir=tmp_path)) as r:
        r.hub.on_rtc = lambda device_id, rtc: None  # type: ignore[method-assign]  # a gateway that never answers
        r.command("video_start")
        await eventually(lambda: bool(r.manager.history))
        assert r.manager.history[0][1] == "no answer from the gateway"


async def test_vp8_when_h264_is_not_offered(tmp_path: Path) -> None:
    async with rig(tmp_path, device=VideoConfig(codecs=["VP8"])) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        stream = r.hub.streams[DEVICE]
        assert stream.codec == "VP8"
        await eventually(lambda: stream.frames >= 5)
        r.command("video_stop")
        await eventually(lambda: len(r.hub.sealed) == 1)
        (path,) = r.hub.sealed
        assert path.name.endswith(".webm.enc")
        with av.open(plaintext(path, r.keyring), format="webm") as container:
            assert sum(1 for _ in container.decode(video=0)) > 0
