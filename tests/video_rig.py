"""In-memory video rig: a device's VideoManager and a gateway VideoHub, signalling directly.

The same classes run over MQTT in tests/integration/video; here the signed transport is
replaced by direct calls, so each test needs no broker and takes about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import io
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from ansimi_testkit import eventually

from ansimi.privacy import DataKey, Keyring
from ansimi.webrtc import Watcher, enable_loopback_candidates, rtc_configuration
from device.hal.camera import SyntheticCamera
from device.hal.ports import AudioInput, AudioOutput
from device.video.config import VideoConfig as DeviceVideo
from device.video.session import VideoManager
from gateway.video.config import VideoConfig as GatewayVideo
from gateway.video.encrypted import decrypt_to
from gateway.video.hub import StreamHolders, VideoHub
from protocol.jws import Signer
from protocol.keys import generate_key
from protocol.messages import Command, Rtc, build_message

DEVICE = "doorbell-0001"
__all__ = [
    "DEVICE",
    "Rig",
    "Tone",
    "Watcher",
    "eventually",
    "listen",
    "loudness",
    "plaintext",
    "rig",
    "viewer_with_microphone",
]


def plaintext(path: Path, keyring: Keyring) -> io.BytesIO:
    """The decrypted recording at `path`, as a file PyAV can open (format="mp4")."""
    plain = io.BytesIO()
    decrypt_to(path, keyring, plain)
    plain.seek(0)
    return plain


@dataclass
class Rig:
    manager: VideoManager
    hub: VideoHub
    signer: Signer
    keyring: Keyring
    to_device: list[Rtc] = field(default_factory=list)
    to_gateway: list[Rtc] = field(default_factory=list)
    seq: int = 0

    def command(self, name: str) -> None:
        self.seq += 1
        msg = build_message(Command(name=name), device=DEVICE, seq=self.seq, ts=0)  # type: ignore[arg-type]
        self.manager.on_down(msg)


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path,
    device: DeviceVideo | None = None,
    gateway: GatewayVideo | None = None,
    clock: Callable[[], float] | None = None,
    holders: StreamHolders | None = None,
    speaker: AudioOutput | None = None,
    microphone: AudioInput | None = None,
) -> AsyncIterator[Rig]:
    enable_loopback_candidates()
    signer = Signer("gw-test", generate_key())
    keyring = Keyring([DataKey.generate()])
    camera = SyntheticCamera(320, 240, 15)
    box: list[Rig] = []

    def to_gateway(rtc: Rtc) -> None:
        box[0].to_gateway.append(rtc)
        box[0].hub.on_rtc(DEVICE, rtc)

    def to_device(device_id: str, rtc: Rtc) -> None:
        r = box[0]
        r.to_device.append(rtc)
        if device_id != DEVICE:
            return  # another device: only recorded
        r.seq += 1
        r.manager.on_down(build_message(rtc, device=device_id, seq=r.seq, ts=0))

    extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
    if speaker is not None:
        extra["speaker"] = speaker
    if microphone is not None and (device or DeviceVideo()).microphone:
        extra["microphone"] = microphone
    manager = VideoManager(device or DeviceVideo(), camera, to_gateway, **extra)
    hub = VideoHub(
        gateway or GatewayVideo(recordings_dir=tmp_path / "recordings", watch_report_s=0.2),
        to_device,
        signer,
        keyring=keyring,
        holders=holders,
    )
    box.append(Rig(manager, hub, signer, keyring))
    tasks = [asyncio.ensure_future(manager.run()), asyncio.ensure_future(hub.run())]
    try:
        yield box[0]
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ---- talk-back: an operator's microphone, and how loud the door's speaker played ----


class Tone(MediaStreamTrack):
    """A 440 Hz tone, as a browser's fake microphone sends it (48 kHz stereo, 20 ms)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pts / 48_000 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (self._pts + np.arange(960)) / 48_000
        wave = (8000 * np.sin(2 * math.pi * 440 * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(
            np.repeat(wave, 2).reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = 48_000
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, 48_000)
        self._pts += 960
        return frame


def loudness(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


async def viewer_with_microphone() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(rtc_configuration([]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTrack(Tone())
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def listen(track: MediaStreamTrack, heard: list[float]) -> None:
    """Append the loudness of each audio frame `track` brings until it ends."""
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            heard.append(loudness(frame.to_ndarray().tobytes()))  # type: ignore[union-attr]
