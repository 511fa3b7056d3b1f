"""Cameras: picamera2 on a Raspberry Pi, or a synthetic moving test pattern anywhere else.

picamera2 is not a PyPI dependency: on Raspberry Pi OS it comes from apt
(`python3-picamera2`), and the venv must be created with `--system-site-packages` to see
it. The PyPI package builds but cannot import, because libcamera has no pip-installable
Python bindings. So picamera2 is imported only when a camera is opened, and "auto" falls
back to the synthetic camera with a warning that says why.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Literal

from device.hal.ports import Camera, CameraUnavailable, Frame

log = logging.getLogger(__name__)

CameraMode = Literal["auto", "picamera2", "synthetic"]

PICAMERA2_FIX = (
    "on Raspberry Pi OS run `sudo apt install python3-picamera2` and create the venv with "
    "`python3 -m venv --system-site-packages` (picamera2 from PyPI cannot import: libcamera "
    'has no pip bindings), or set camera = "synthetic"'
)


def open_camera(mode: CameraMode, width: int, height: int, fps: int) -> Camera:
    """The camera `mode` asks for; "auto" prefers picamera2 and falls back to synthetic."""
    if mode == "synthetic":
        return SyntheticCamera(width, height, fps)
    if mode == "picamera2":
        return Picamera2Camera(width, height, fps)
    try:
        return Picamera2Camera(width, height, fps)
    except CameraUnavailable as exc:
        log.warning("no picamera2 camera, using the synthetic test pattern instead: %s", exc)
        return SyntheticCamera(width, height, fps)


def _check_size(width: int, height: int, fps: int) -> None:
    # 4:2:0 halves both dimensions for U and V: odd sizes have no exact layout.
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"camera size {width}x{height}: width and height must be even, >= 16")
    if fps < 1:
        raise ValueError(f"camera fps {fps}: must be at least 1")


class _Pacer:
    """Hands out frame times `1/fps` apart on the loop clock, without bursts after a stall."""

    def __init__(self, fps: int) -> None:
        self._period = 1.0 / fps
        self._due: float | None = None

    async def wait(self) -> float:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._due is None or now - self._due > self._period:
            # First frame, or the consumer fell behind: restart the schedule from now rather
            # than delivering a burst of stale frames to catch up.
            self._due = now
        if self._due > now:
            await asyncio.sleep(self._due - now)
        taken = self._due
        self._due += self._period
        return taken


# 75 % colour bars (BT.601, limited range), left to right: (Y, U, V).
_BARS = (
    (180, 128, 128),  # white
    (162, 44, 142),  # yellow
    (131, 156, 44),  # cyan
    (112, 72, 58),  # green
    (84, 184, 198),  # magenta
    (65, 100, 212),  # red
    (35, 212, 114),  # blue
    (16, 128, 128),  # black
)
_Y_WHITE, _Y_BLACK, _CHROMA_GREY = 235, 16, 128
_COUNTER_BITS = 16


@functools.lru_cache(maxsize=8)
def _bar_frame(width: int, height: int) -> bytes:
    """The static background (Y, U, V planes), computed once per size and shared.

    Shared because the simulator may run thousands of doorbells: one 640x480 background is
    450 KB, and it never changes.
    """

    def row(w: int, channel: int) -> bytes:
        return bytes(_BARS[min(x * len(_BARS) // w, len(_BARS) - 1)][channel] for x in range(w))

    cw, ch = width // 2, height // 2
    return row(width, 0) * height + row(cw, 1) * ch + row(cw, 2) * ch


class SyntheticCamera:
    """Colour bars with a moving white block and a binary frame counter, in yuv420p.

    Each frame copies the precomputed background and stamps two small regions, so a frame
    costs a few memory copies, not a per-pixel loop. The counter (bottom left, 16 cells,
    most significant bit first, white = 1) lets a viewer or a test see frames advance.
    """

    def __init__(self, width: int = 640, height: int = 480, fps: int = 15) -> None:
        _check_size(width, height, fps)
        self.name = "synthetic"
        self.width = width
        self.height = height
        self.fps = fps
        self._index = 0
        self._started = False
        self._pacer = _Pacer(fps)
        # Even sizes keep the block aligned with the half-resolution chroma planes.
        self._block = max(2, (min(width, height) // 6) & ~1)
        self._cell = max(2, (min(width // (_COUNTER_BITS + 2), height // 12)) & ~1)

    def start(self) -> None:
        self._started = True

    def stop(self) -> None:
        self._started = False

    async def capture(self) -> Frame:
        if not self._started:
            raise CameraUnavailable("synthetic camera is not started: call start() first")
        taken = await self._pacer.wait()
        data = self._render(self._index)
        self._index += 1
        return Frame(self.width, self.height, "yuv420p", data, taken)

    def _render(self, index: int) -> bytes:
        w, h, b, c = self.width, self.height, self._block, self._cell
        frame = bytearray(_bar_frame(w, h))
        u_at = w * h
        v_at = u_at + u_at // 4
        cw = w // 2
        # The block moves 4 pixels a frame left to right and wraps around; grey chroma under
        # it, so it shows white rather than tinted by the bar beneath.
        x0 = ((index * 4) % (w - b)) & ~1
        y0 = ((h - b) // 2) & ~1
        white = bytes([_Y_WHITE]) * b
        for r in range(y0, y0 + b):
            frame[r * w + x0 : r * w + x0 + b] = white
        grey = bytes([_CHROMA_GREY]) * (b // 2)
        for r in range(y0 // 2, (y0 + b) // 2):
            at = r * cw + x0 // 2
            frame[u_at + at : u_at + at + b // 2] = grey
            frame[v_at + at : v_at + at + b // 2] = grey
        counter = b"".join(
            bytes([_Y_WHITE if index >> bit & 1 else _Y_BLACK]) * c
            for bit in reversed(range(_COUNTER_BITS))
        )
        for r in range(h - 2 * c, h - c):
            frame[r * w + c : r * w + c + len(counter)] = counter
        return bytes(frame)


class Picamera2Camera:
    """A Raspberry Pi camera through picamera2 (libcamera), giving yuv420p frames."""

    def __init__(self, width: int = 640, height: int = 480, fps: int = 15) -> None:
        _check_size(width, height, fps)
        try:
            from picamera2 import Picamera2
        except ImportError as exc:
            raise CameraUnavailable(
                f"picamera2 is not importable ({type(exc).__name__}: {exc}). Fix: {PICAMERA2_FIX}"
            ) from exc
        self.name = "picamera2"
        self.width = width
        self.height = height
        self.fps = fps
        self._running = False
        try:
            self._cam: Any = Picamera2()
            config = self._cam.create_video_configuration(
                main={"size": (width, height), "format": "YUV420"},
                controls={"FrameRate": fps},
            )
            self._cam.configure(config)
        except Exception as exc:
            raise CameraUnavailable(
                f"picamera2 could not open a camera ({type(exc).__name__}: {exc}). Fix: check "
                "the ribbon cable and that `rpicam-hello --list-cameras` lists it, and that no "
                "other program holds the camera"
            ) from exc

    def start(self) -> None:
        if not self._running:
            self._cam.start()
            self._running = True

    def stop(self) -> None:
        if self._running:
            self._cam.stop()
            self._running = False

    async def capture(self) -> Frame:
        if not self._running:
            raise CameraUnavailable("picamera2 camera is not started: call start() first")
        # capture_array blocks until the next frame, which also paces us to the frame rate.
        array = await asyncio.to_thread(self._cam.capture_array, "main")
        taken = asyncio.get_running_loop().time()
        return Frame(self.width, self.height, "yuv420p", self._pack(array), taken)

    def _pack(self, array: Any) -> bytes:
        """Drop row padding: libcamera pads rows to its stride, yuv420p has none."""
        w, h = self.width, self.height
        if array.size == w * h * 3 // 2:
            return bytes(array.tobytes())
        # Padded layout: h rows of Y, then U and V with half the stride, two rows per row.
        stride = array.shape[1]
        y = array[:h, :w]
        chroma = array[h:].reshape(-1, stride // 2)
        u = chroma[: h // 2, : w // 2]
        v = chroma[h // 2 : h, : w // 2]
        return bytes(y.tobytes() + u.tobytes() + v.tobytes())
