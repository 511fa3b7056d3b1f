"""The pre-alarm buffer: the recording starts seconds before the alarm."""

from __future__ import annotations

import asyncio
from pathlib import Path

import av
from video_rig import DEVICE, eventually, plaintext, rig

from ansimi.privacy import Keyring
from ansimi.webrtc import VIDEO_TIME_BASE, EncodedFrame
from device.hal.camera import SyntheticCamera
from device.video.config import VideoConfig
from device.video.prealarm import Prealarm


def recorded_seconds(path: Path, keyring: Keyring) -> float:
    with av.open(plaintext(path, keyring), format="mp4") as container:
        stream = container.streams.video[0]
        times = [float(frame.pts * stream.time_base) for frame in container.decode(stream)]
    return max(times) - min(times)


async def test_recording_includes_the_seconds_before_the_alarm(tmp_path: Path) -> None:
    async with rig(tmp_path, device=VideoConfig(prealarm_s=2)) as r:
        prealarm = r.manager.prealarm
        assert prealarm is not None
        await eventually(lambda: prealarm.buffered_s >= 2.0)
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        stream = r.hub.streams[DEVICE]
        assert stream.codec == "H264"
        # within half a second of the answer the gateway holds ~2 s of video already
        await asyncio.sleep(0.5)
        await eventually(lambda: stream.recorder.frames >= 2 * 15)
        r.command("video_stop")
        await eventually(lambda: len(r.hub.sealed) == 1)
        (path,) = r.hub.sealed
        assert recorded_seconds(path, r.keyring) >= 2.0


def test_the_buffer_keeps_whole_keyframe_intervals_covering_the_window() -> None:
    prealarm = Prealarm(SyntheticCamera(64, 48, 10), seconds=1.0)
    tick = int(0.1 / VIDEO_TIME_BASE)
    for i in range(100):  # 10 s at 10 fps, a keyframe every 10 frames
        prealarm._keep(EncodedFrame("H264", b"", i * tick, keyframe=i % 10 == 0))
    frames = list(prealarm._frames)
    assert frames[0].keyframe
    # at least the last second, never more than one keyframe interval beyond it
    assert 1.0 <= prealarm.buffered_s < 2.0
    track = prealarm.track()
    assert track._queue.qsize() == len(frames)
