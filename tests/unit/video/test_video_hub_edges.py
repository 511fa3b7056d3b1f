"""Hub edge cases: resent and replacing offers, a failing recording, retention."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from video_rig import DEVICE, Watcher, eventually, rig

from ansimi.webrtc import EncodedFrame
from gateway.video.config import VideoConfig
from gateway.video.hub import TooManyViewers, VideoHub
from gateway.video.recorder import Recorder, RecordingThread
from protocol.jws import Signer
from protocol.keys import generate_key
from protocol.messages import Rtc


async def test_a_resent_offer_is_answered_once_and_the_next_session_is_a_new_stream(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        first = r.hub.streams[DEVICE]
        (offer,) = r.to_gateway
        await r.hub.handle_rtc(DEVICE, offer)  # the same offer again: a resend
        assert r.hub.streams[DEVICE] is first
        assert [m.kind for m in r.to_device] == ["answer"]

        # a new session: the old stream is ended and its recording sealed
        await eventually(lambda: first.frames > 3)
        r.command("video_stop")
        await eventually(lambda: len(r.hub.sealed) == 1)
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams and r.hub.streams[DEVICE] is not first)
        await eventually(lambda: r.hub.streams[DEVICE].frames > 3)


async def test_a_failing_recording_does_not_stop_live_video(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        stream = r.hub.streams[DEVICE]
        await eventually(lambda: stream.recorder.frames > 2)

        def broken(frame: object) -> None:
            raise OSError(28, "No space left on device")

        stream.recorder.write = broken  # type: ignore[method-assign]
        w = Watcher()
        try:
            viewer = await r.hub.add_viewer(DEVICE, await w.offer())
            await w.answer(viewer.answer)
            await eventually(lambda: w.frames >= 5)
        finally:
            await w.close()
        assert stream.recorder.closed
        assert DEVICE in r.hub.streams


async def test_a_stalled_disk_stalls_the_recording_not_the_live_video(tmp_path: Path) -> None:
    disk = threading.Event()  # set: the disk answers again
    async with rig(tmp_path) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        stream = r.hub.streams[DEVICE]
        await eventually(lambda: stream.recorder.frames > 2)
        real_write = stream.recorder.write

        def stalled(frame: EncodedFrame) -> None:
            disk.wait(timeout=30)  # as a write() into a full page cache on an SD card
            real_write(frame)

        stream.recorder.write = stalled  # type: ignore[method-assign]
        w = Watcher()
        try:
            viewer = await r.hub.add_viewer(DEVICE, await w.offer())
            await w.answer(viewer.answer)
            # the viewer's frames flow while the recording waits for the disk
            await eventually(lambda: w.frames >= 10)
            assert not disk.is_set() and not stream.recorder.closed
        finally:
            disk.set()
            await w.close()
        recorded = stream.recorder.frames
        await eventually(lambda: stream.recorder.frames > recorded)  # and it catches up


async def test_frames_past_what_the_recording_thread_holds_are_dropped_and_counted(
    tmp_path: Path,
) -> None:
    disk = threading.Event()
    written: list[int] = []

    class SlowRecorder(Recorder):
        def write(self, frame: EncodedFrame) -> None:
            disk.wait(timeout=30)
            written.append(frame.timestamp)

    recorder = SlowRecorder(tmp_path / "rec", None)
    writer = RecordingThread(max_pending=5)
    frames = [EncodedFrame("H264", b"x", i, False) for i in range(20)]
    for frame in frames:
        writer.write(recorder, frame)
    assert writer.dropped >= 20 - 5 - 1  # the thread may hold one frame already
    disk.set()
    await writer.close(recorder)
    assert len(written) == 20 - writer.dropped and written == sorted(written)
    writer.stop()


def test_retention_removes_only_old_files(tmp_path: Path) -> None:
    now = 1_000_000_000.0
    hub = VideoHub(
        VideoConfig(recordings_dir=tmp_path, retention_days=2),
        lambda device, rtc: None,
        Signer("gw-test", generate_key()),
        clock=lambda: now,
    )
    old = tmp_path / DEVICE / "old.mp4"
    old_seal = tmp_path / DEVICE / "old.mp4.seal.json"
    fresh = tmp_path / DEVICE / "fresh.mp4"
    old.parent.mkdir()
    for path, age_days in ((old, 3), (old_seal, 3), (fresh, 1)):
        path.write_bytes(b"x")
        os.utime(path, (now - age_days * 86_400, now - age_days * 86_400))
    assert sorted(hub.sweep_recordings()) == sorted([old, old_seal])
    assert fresh.exists() and not old.exists()
    forever = VideoHub(
        VideoConfig(recordings_dir=tmp_path, retention_days=0),
        lambda device, rtc: None,
        Signer("gw-test", generate_key()),
        clock=lambda: now + 10**9,
    )
    assert forever.sweep_recordings() == []
    assert fresh.exists()


async def test_a_bye_for_another_session_is_ignored(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        await r.hub.handle_rtc(DEVICE, Rtc(kind="bye", session="someone-elses-session"))
        assert DEVICE in r.hub.streams


async def test_the_viewer_cap_refuses_one_more(tmp_path: Path) -> None:
    config = VideoConfig(recordings_dir=tmp_path, max_viewers=1, watch_report_s=0.2)
    async with rig(tmp_path, gateway=config) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        one, two = Watcher(), Watcher()
        try:
            viewer = await r.hub.add_viewer(DEVICE, await one.offer())
            await one.answer(viewer.answer)
            with pytest.raises(TooManyViewers, match="already has 1 viewers"):
                await r.hub.add_viewer(DEVICE, await two.offer())
            await eventually(lambda: one.frames >= 3)
        finally:
            await one.close()
            await two.close()


async def test_a_recording_whose_close_nobody_awaits_any_more_is_still_finished(
    tmp_path: Path,
) -> None:
    disk = threading.Event()
    finished: list[bool] = []

    class SlowRecorder(Recorder):
        def write(self, frame: EncodedFrame) -> None:
            disk.wait(timeout=30)

        def close(self) -> Path | None:
            finished.append(True)
            return super().close()

    writer = RecordingThread()
    first, second = SlowRecorder(tmp_path / "one", None), SlowRecorder(tmp_path / "two", None)
    writer.write(first, EncodedFrame("H264", b"x", 0, True))
    closing = asyncio.ensure_future(writer.close(first))
    await asyncio.sleep(0)
    closing.cancel()  # the gateway stopping while the disk is slow
    disk.set()
    with pytest.raises(asyncio.CancelledError):
        await closing
    # the thread finished the first recording and still serves the next
    async with asyncio.timeout(10):  # a dead thread would never answer
        assert await writer.close(second) is None
    assert finished == [True, True]
    writer.stop()
