"""Cameras: the synthetic test pattern, and how picamera2 is chosen or refused."""

from __future__ import annotations

import itertools
import logging
import sys
import time
import types

import pytest

from device.hal.camera import Picamera2Camera, SyntheticCamera, open_camera
from device.hal.ports import CameraUnavailable, Frame


def counter_of(frame: Frame, camera: SyntheticCamera) -> int:
    """Read the binary frame counter back out of the Y plane (16 cells, MSB first)."""
    cell = camera._cell
    row = frame.height - 2 * cell + cell // 2
    value = 0
    for bit in range(16):
        x = cell + bit * cell + cell // 2
        value = value << 1 | (frame.data[row * frame.width + x] > 128)
    return value


async def test_frames_have_the_promised_size_and_format() -> None:
    camera = SyntheticCamera(320, 240, 30)
    camera.start()
    frame = await camera.capture()
    assert (frame.width, frame.height, frame.format) == (320, 240, "yuv420p")
    assert len(frame.data) == 320 * 240 * 3 // 2
    assert (camera.name, camera.width, camera.height, camera.fps) == ("synthetic", 320, 240, 30)


async def test_frames_move_and_count() -> None:
    camera = SyntheticCamera(320, 240, 60)
    camera.start()
    frames = [await camera.capture() for _ in range(4)]
    assert len({f.data for f in frames}) == 4
    assert [counter_of(f, camera) for f in frames] == [0, 1, 2, 3]
    # The block moves in the Y plane; the colour bars underneath stay put.
    y_size = 320 * 240
    assert frames[0].data[:y_size] != frames[1].data[:y_size]
    first_row = slice(0, 320)
    assert frames[0].data[first_row] == frames[3].data[first_row]


async def test_frames_are_paced_to_fps() -> None:
    fps = 20
    camera = SyntheticCamera(64, 48, fps)
    camera.start()
    started = time.monotonic()
    frames = [await camera.capture() for _ in range(6)]
    elapsed = time.monotonic() - started
    assert elapsed >= 5 / fps * 0.95
    assert elapsed < 5 / fps + 0.5
    gaps = [b.timestamp - a.timestamp for a, b in itertools.pairwise(frames)]
    assert gaps == pytest.approx([1 / fps] * 5, abs=0.01)


async def test_capture_before_start_is_refused() -> None:
    camera = SyntheticCamera(64, 48, 10)
    with pytest.raises(CameraUnavailable, match="start"):
        await camera.capture()
    camera.start()
    await camera.capture()
    camera.stop()
    with pytest.raises(CameraUnavailable):
        await camera.capture()


@pytest.mark.parametrize(("width", "height"), [(321, 240), (320, 241), (8, 8)])
def test_odd_or_tiny_sizes_are_refused(width: int, height: int) -> None:
    with pytest.raises(ValueError, match="even"):
        SyntheticCamera(width, height, 15)


def test_auto_falls_back_to_synthetic_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # None in sys.modules makes `import picamera2` fail, as on any machine but a Pi.
    monkeypatch.setitem(sys.modules, "picamera2", None)
    with caplog.at_level(logging.WARNING, logger="device.hal.camera"):
        camera = open_camera("auto", 64, 48, 10)
    assert isinstance(camera, SyntheticCamera)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "synthetic" in message
    assert "not importable" in message  # why
    assert "apt install python3-picamera2" in message  # how
    assert "--system-site-packages" in message


def test_picamera2_mode_refuses_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)
    with pytest.raises(CameraUnavailable) as caught:
        open_camera("picamera2", 64, 48, 10)
    assert isinstance(caught.value, RuntimeError)
    assert "apt install python3-picamera2" in str(caught.value)
    assert "--system-site-packages" in str(caught.value)


def test_picamera2_present_but_no_camera(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class NoCamera:
        def __init__(self) -> None:
            raise IndexError("list index out of range")  # what picamera2 does with no camera

    module = types.ModuleType("picamera2")
    module.Picamera2 = NoCamera  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "picamera2", module)
    with pytest.raises(CameraUnavailable, match="could not open a camera"):
        Picamera2Camera(64, 48, 10)
    with caplog.at_level(logging.WARNING, logger="device.hal.camera"):
        assert isinstance(open_camera("auto", 64, 48, 10), SyntheticCamera)
    assert "ribbon cable" in caplog.text


def test_synthetic_mode_never_touches_picamera2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)
    assert isinstance(open_camera("synthetic", 64, 48, 10), SyntheticCamera)
