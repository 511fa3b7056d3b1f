"""The doorbell's speaker and microphone: ALSA on the Pi, or fakes (one records what it would
play, one hums a tone).

pyalsaaudio is not a dependency (it needs ALSA's headers to build): on the Pi install
`python3-alsaaudio` from apt (venv with `--system-site-packages`) or `pip install
pyalsaaudio`. It is imported only when the speaker is opened, so a desk or a simulator
never needs it. Talk-back and the microphone are off unless `[video] talkback` /
`[video] microphone` are true; a store bell never has them (device/config.py refuses).
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from typing import Any

from device.hal.ports import AudioOutput, AudioUnavailable

log = logging.getLogger(__name__)

ALSA_FIX = (
    "install pyalsaaudio (`sudo apt install python3-alsaaudio` with a venv made with "
    "`--system-site-packages`, or `pip install pyalsaaudio`), or set talkback = false"
)


class AlsaAudioOutput:
    """Plays 16-bit PCM on an ALSA device (`default`, or `plughw:1,0` for a USB speaker)."""

    def __init__(self, device: str = "default") -> None:
        self.name = f"alsa:{device}"
        self._device = device
        self._pcm: Any = None

    def start(self, sample_rate: int, channels: int) -> None:
        try:
            import alsaaudio  # type: ignore[import-not-found]  # only on the device
        except ImportError:
            raise AudioUnavailable(f"no ALSA bindings for {self.name}: {ALSA_FIX}") from None
        try:
            # non-blocking: a full buffer drops audio instead of stalling the event loop
            self._pcm = alsaaudio.PCM(
                type=alsaaudio.PCM_PLAYBACK,
                mode=alsaaudio.PCM_NONBLOCK,
                device=self._device,
                channels=channels,
                rate=sample_rate,
                format=alsaaudio.PCM_FORMAT_S16_LE,
                periodsize=sample_rate // 50,
            )
        except alsaaudio.ALSAAudioError as exc:
            raise AudioUnavailable(
                f"cannot open {self.name} ({exc}): check `aplay -L` for the device name"
            ) from None

    def play(self, pcm: bytes) -> None:
        if self._pcm is not None:
            self._pcm.write(pcm)

    def stop(self) -> None:
        if self._pcm is not None:
            self._pcm.close()
            self._pcm = None


class FakeAudioOutput:
    """Records what a speaker would play, for tests and the simulator."""

    def __init__(self) -> None:
        self.name = "fake"
        self.sample_rate = 0
        self.channels = 0
        self.played: list[bytes] = []
        self.running = False

    def start(self, sample_rate: int, channels: int) -> None:
        self.sample_rate, self.channels, self.running = sample_rate, channels, True

    def play(self, pcm: bytes) -> None:
        self.played.append(pcm)

    def stop(self) -> None:
        self.running = False


def open_audio_output(mode: str) -> AudioOutput:
    """`alsa[:DEVICE]` or `fake`."""
    if mode == "fake":
        return FakeAudioOutput()
    kind, _, device = mode.partition(":")
    if kind != "alsa":
        raise AudioUnavailable(f"unknown audio output {mode!r}: use alsa[:DEVICE] or fake")
    return AlsaAudioOutput(device or "default")


class AlsaMicrophone:
    """Captures 16-bit mono PCM from an ALSA device; reads in a thread (ALSA blocks)."""

    def __init__(self, device: str = "default", sample_rate: int = 48_000) -> None:
        self.name = f"alsa:{device}"
        self.sample_rate = sample_rate
        self._device = device
        self._pcm: Any = None

    def start(self) -> None:
        try:
            import alsaaudio
        except ImportError:
            raise AudioUnavailable(f"no ALSA bindings for {self.name}: {ALSA_FIX}") from None
        try:
            self._pcm = alsaaudio.PCM(
                type=alsaaudio.PCM_CAPTURE,
                device=self._device,
                channels=1,
                rate=self.sample_rate,
                format=alsaaudio.PCM_FORMAT_S16_LE,
                periodsize=self.sample_rate // 50,
            )
        except alsaaudio.ALSAAudioError as exc:
            raise AudioUnavailable(
                f"cannot open {self.name} ({exc}): check `arecord -L` for the device name"
            ) from None

    async def read(self) -> bytes:
        if self._pcm is None:
            raise AudioUnavailable(f"{self.name} is not started")
        _, data = await asyncio.to_thread(self._pcm.read)
        return bytes(data)

    def stop(self) -> None:
        if self._pcm is not None:
            self._pcm.close()
            self._pcm = None


class FakeMicrophone:
    """A 440 Hz hum at the door, paced in real time, for tests and the simulator."""

    def __init__(self, sample_rate: int = 48_000) -> None:
        self.name = "fake"
        self.sample_rate = sample_rate
        self._n = 0
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.monotonic()

    async def read(self) -> bytes:
        if self._start is None:
            self.start()
        assert self._start is not None
        per = self.sample_rate // 50
        wait = self._start + self._n / self.sample_rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        samples = [
            int(8000 * math.sin(2 * math.pi * 440 * (self._n + i) / self.sample_rate))
            for i in range(per)
        ]
        self._n += per
        return struct.pack(f"<{per}h", *samples)

    def stop(self) -> None:
        self._start = None


__all__ = [
    "AlsaAudioOutput",
    "AlsaMicrophone",
    "FakeAudioOutput",
    "FakeMicrophone",
    "open_audio_output",
]
