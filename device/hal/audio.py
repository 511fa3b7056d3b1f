"""The doorbell's speaker: ALSA on the Pi, or a fake that records what it would play.

pyalsaaudio is not a dependency (it needs ALSA's headers to build): on the Pi install
`python3-alsaaudio` from apt (venv with `--system-site-packages`) or `pip install
pyalsaaudio`. It is imported only when the speaker is opened, so a desk or a simulator
never needs it. Talk-back is off unless `[video] talkback = true`; a store bell never has
it (device/config.py refuses the setting).
"""

from __future__ import annotations

import logging
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
