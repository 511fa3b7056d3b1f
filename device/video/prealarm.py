"""The pre-alarm buffer: the seconds before a press, kept so that the recording has them.

With `prealarm_s > 0` the camera runs all the time and its frames are encoded to H.264 by
our own encoder (`h264_v4l2m2m` is the Pi's hardware encoder; `libx264` costs ~5 % of a
core at 640x480 15 fps). The last `prealarm_s` seconds, from a keyframe on, are kept in
memory (~100 KB a second), never on disk. A session's track first yields those frames,
then the live ones; aiortc sends the encoded packets as they are (no second encode), with
their original timestamps, so the gateway's recording starts before the alarm.

Pass-through means aiortc cannot make a keyframe when a viewer asks for one: the encoder
makes one every second instead, so a viewer waits at most that long.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging

import av

from ansimi.webrtc import VIDEO_TIME_BASE, EncodedFrame, EncodedTrack, is_keyframe
from device.hal.ports import Camera, CameraUnavailable, Frame
from device.video.track import to_video_frame

log = logging.getLogger(__name__)


class H264Encoder:
    """Frames in, Annex B access units out, a keyframe every second."""

    def __init__(
        self, width: int, height: int, fps: int, *, codec: str = "libx264", bitrate: int = 800_000
    ) -> None:
        ctx = av.CodecContext.create(codec, "w")
        assert isinstance(ctx, av.VideoCodecContext)
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.time_base = VIDEO_TIME_BASE
        ctx.framerate = fractions.Fraction(fps, 1)
        ctx.gop_size = fps
        ctx.bit_rate = bitrate
        if codec == "libx264":
            ctx.profile = "Baseline"
            ctx.options = {"tune": "zerolatency", "level": "31"}
        self._ctx = ctx
        self._t0: float | None = None

    def encode(self, frame: Frame) -> list[EncodedFrame]:
        if self._t0 is None:
            self._t0 = frame.timestamp
        video = to_video_frame(frame)
        video.pts = int((frame.timestamp - self._t0) / VIDEO_TIME_BASE)
        video.time_base = VIDEO_TIME_BASE
        out = []
        for packet in self._ctx.encode(video):
            data = bytes(packet)
            ts = int(packet.pts) if packet.pts is not None else video.pts
            out.append(EncodedFrame("H264", data, ts, is_keyframe("H264", data)))
        return out


class Prealarm:
    """Runs the camera and encoder continuously; hands out tracks that start in the past."""

    def __init__(self, camera: Camera, seconds: float, *, encoder: str = "libx264") -> None:
        self._camera = camera
        self._span = int(seconds / VIDEO_TIME_BASE)
        self._encoder_name = encoder
        self._frames: collections.deque[EncodedFrame] = collections.deque()
        self._tracks: set[EncodedTrack] = set()
        # the buffer plus a few seconds of live video may queue in a track before sending
        self._queue = int(seconds * camera.fps) + 4 * camera.fps
        self.running = asyncio.Event()

    @property
    def buffered_s(self) -> float:
        if not self._frames:
            return 0.0
        return float((self._frames[-1].timestamp - self._frames[0].timestamp) * VIDEO_TIME_BASE)

    def track(self) -> EncodedTrack:
        """A track that yields the buffered seconds at once, then live frames."""
        track = EncodedTrack(max_queue=self._queue)
        for frame in self._frames:
            track.push(frame)
        self._tracks.add(track)
        return track

    def _keep(self, frame: EncodedFrame) -> None:
        self._frames.append(frame)
        # drop whole keyframe intervals that lie entirely before the window
        cutoff = frame.timestamp - self._span
        while True:
            later_key = next((i for i, f in enumerate(self._frames) if i > 0 and f.keyframe), None)
            if later_key is None or self._frames[later_key].timestamp > cutoff:
                break
            for _ in range(later_key):
                self._frames.popleft()

    async def run(self) -> None:
        cam = self._camera
        encoder = H264Encoder(cam.width, cam.height, cam.fps, codec=self._encoder_name)
        cam.start()
        self.running.set()
        try:
            while True:
                try:
                    frame = await cam.capture()
                except CameraUnavailable as exc:
                    log.error("video: pre-alarm buffer stopped: %s", exc)
                    return
                # encoding takes milliseconds: off the loop, which serves the alarm path
                for encoded in await asyncio.to_thread(encoder.encode, frame):
                    self._keep(encoded)
                    for track in list(self._tracks):
                        if track.readyState == "live":
                            track.push(encoded)
                        else:
                            self._tracks.discard(track)
        finally:
            self.running.clear()
            cam.stop()
