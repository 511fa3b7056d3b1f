"""Talk-back audio: the operator's voice, gated, towards the doorbell's speaker.

`TalkTrack` is the audio track the gateway sends to a doorbell. It always sends, one
20 ms frame at a time paced by the clock: the operator's frames while someone holds the
push-to-talk (`offer`), silence otherwise, so the device's speaker path and the RTP
timing never stop and start. Frames are the opus decoder's (48 kHz stereo s16): aiortc
re-encodes them as opus for the device, which costs little for one voice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
# frames waiting for the encoder at most (0.5 s): a slow device drops the oldest, not the loop
QUEUE_FRAMES = 25


def silence() -> av.AudioFrame:
    frame = av.AudioFrame(format="s16", layout="stereo", samples=FRAME_SAMPLES)
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    frame.sample_rate = SAMPLE_RATE
    return frame


class TalkTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: asyncio.Queue[av.AudioFrame] = asyncio.Queue(QUEUE_FRAMES)
        self._start: float | None = None
        self._pts = 0
        self.voiced = 0  # frames of the operator's voice sent

    def offer(self, frame: av.AudioFrame) -> None:
        """Queue one frame of the operator's voice; the oldest goes if the queue is full."""
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
        self._queue.put_nowait(frame)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        deadline = self._start + self._pts / SAMPLE_RATE
        frame: av.AudioFrame | None = None
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic()) + 0.02):
                frame = await self._queue.get()
        except TimeoutError:
            frame = None
        if frame is None or (frame.format.name, frame.layout.name, frame.sample_rate) != (
            "s16",
            "stereo",
            SAMPLE_RATE,
        ):
            frame = silence()
        else:
            self.voiced += 1
        wait = deadline - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += frame.samples
        return frame
