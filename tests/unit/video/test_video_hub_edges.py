"""Hub edge cases: resent and replacing offers, a failing recording, retention."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import IO

import pytest
from video_rig import DEVICE, Watcher, eventually, rig

from gateway.video.config import VideoConfig
from gateway.video.encrypted import DiskThread, check
from gateway.video.hub import TooManyViewers, VideoHub
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


class StalledFile:
    """A recording file whose writes wait until `disk` is set (a full page cache on an SD
    card), then reach the real file."""

    def __init__(self, real: IO[bytes], disk: threading.Event) -> None:
        self.real, self.disk, self.name = real, disk, real.name

    def write(self, data: bytes) -> int:
        self.disk.wait(timeout=30)
        return self.real.write(data)

    def flush(self) -> None:
        self.real.flush()

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()


async def test_a_stalled_disk_stalls_the_recording_not_the_live_video(tmp_path: Path) -> None:
    disk = threading.Event()  # set: the disk answers again
    async with rig(tmp_path) as r:
        r.command("video_start")
        await eventually(lambda: DEVICE in r.hub.streams)
        stream = r.hub.streams[DEVICE]
        await eventually(lambda: stream.recorder.frames > 2)
        sink = stream.recorder._sink
        assert sink is not None
        sink._file = StalledFile(sink._file, disk)  # type: ignore[assignment]
        cut = sink.chunks
        await eventually(lambda: sink.chunks > cut)  # a chunk is waiting for the disk
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
        r.command("video_stop")
        await eventually(lambda: len(r.hub.sealed) == 1)  # whole once the disk answers
        assert check(r.hub.sealed[0], r.keyring).complete


async def test_a_disk_that_falls_too_far_behind_ends_the_recording_not_the_loop(
    tmp_path: Path,
) -> None:
    disk = threading.Event()
    writer = DiskThread(max_backlog=1000)
    path = tmp_path / "rec.enc"
    real = path.open("xb")
    stalled = StalledFile(real, disk)
    assert writer.append(stalled, b"x" * 600)  # type: ignore[arg-type]
    assert not writer.append(stalled, b"y" * 600)  # type: ignore[arg-type]
    assert writer.overflows == 1
    disk.set()
    await asyncio.wrap_future(writer.finish(stalled, sync=True))  # type: ignore[arg-type]
    assert path.read_bytes() == b"x" * 600 and real.closed
    writer.stop()


async def test_a_recording_whose_close_nobody_awaits_any_more_is_still_closed(
    tmp_path: Path,
) -> None:
    disk = threading.Event()
    writer = DiskThread()
    first, second = (tmp_path / "one").open("xb"), (tmp_path / "two").open("xb")
    writer.append(StalledFile(first, disk), b"x")  # type: ignore[arg-type]
    closing = asyncio.ensure_future(asyncio.wrap_future(writer.finish(first, sync=True)))
    await asyncio.sleep(0)
    closing.cancel()  # the gateway stopping while the disk is slow
    disk.set()
    with pytest.raises(asyncio.CancelledError):
        await closing
    # the thread closed the first file and still serves the next
    async with asyncio.timeout(10):  # a dead thread would never answer
        await asyncio.wrap_future(writer.finish(second, sync=True))
    assert first.closed and second.closed and (tmp_path / "one").read_bytes() == b"x"
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
