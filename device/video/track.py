"""The camera port as an aiortc video track.

A `Frame` is already planar yuv420p, the layout the encoders want, so a frame becomes an
`av.VideoFrame` by three plane copies (no colour conversion, no numpy).
"""

from __future__ import annotations

import fractions

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from ansimi.webrtc import VIDEO_TIME_BASE
from device.hal.ports import AudioInput, Camera, CameraUnavailable, Frame, HalError


def to_video_frame(frame: Frame) -> av.VideoFrame:
    w, h = frame.width, frame.height
    video = av.VideoFrame(w, h, "yuv420p")
    y_size, c_size = w * h, (w // 2) * (h // 2)
    data = memoryview(frame.data)
    offsets = (0, y_size, y_size + c_size)
    for plane, start, size, width in zip(
        video.planes, offsets, (y_size, c_size, c_size), (w, w // 2, w // 2), strict=True
    ):
        if plane.line_size == width:
            plane.update(bytes(data[start : start + size]))
        else:
            # FFmpeg pads rows of some widths: copy row by row into the padded plane
            rows = bytearray(plane.buffer_size)
            for r in range(size // width):
                rows[r * plane.line_size : r * plane.line_size + width] = data[
                    start + r * width : start + (r + 1) * width
                ]
            plane.update(bytes(rows))
    return video


class CameraTrack(MediaStreamTrack):
    """Frames from a `Camera`, timestamped on the camera's own clock (90 kHz).

    The camera paces itself (`capture()` waits for the next frame), so unlike aiortc's
    VideoStreamTrack this track adds no pacing of its own.
    """

    kind = "video"

    def __init__(self, camera: Camera) -> None:
        super().__init__()
        self._camera = camera
        self._t0: float | None = None
        self.frames = 0
        self._captured = 0
        # send every `divisor`-th camera frame (device/video/adapt.py lowers the rate on loss)
        self.divisor = 1

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            while True:
                frame = await self._camera.capture()
                self._captured += 1
                if self._captured % self.divisor == 0:
                    break
        except CameraUnavailable:
            self.stop()
            raise MediaStreamError from None
        if self._t0 is None:
            self._t0 = frame.timestamp
        video = to_video_frame(frame)
        video.pts = int((frame.timestamp - self._t0) / VIDEO_TIME_BASE)
        video.time_base = VIDEO_TIME_BASE
        self.frames += 1
        return video


class MicrophoneTrack(MediaStreamTrack):
    """The door's microphone as an audio track (16-bit mono, 20 ms frames, paced by it)."""

    kind = "audio"

    def __init__(self, microphone: AudioInput) -> None:
        super().__init__()
        self._microphone = microphone
        self._pts = 0
        self._time_base = fractions.Fraction(1, microphone.sample_rate)
        microphone.start()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            pcm = await self._microphone.read()
        except HalError:
            self.stop()
            raise MediaStreamError from None
        frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        frame.planes[0].update(pcm)
        frame.sample_rate = self._microphone.sample_rate
        frame.pts = self._pts
        frame.time_base = self._time_base
        self._pts += frame.samples
        return frame

    def stop(self) -> None:
        if self.readyState == "live":
            self._microphone.stop()
        super().stop()
