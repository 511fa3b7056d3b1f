"""In-memory video rig: a device's VideoManager and a gateway VideoHub, signalling directly.

The same classes run over MQTT in tests/integration/video; here the signed transport is
replaced by direct calls, so each test needs no broker and takes about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ansimi_testkit import eventually

from ansimi.privacy import DataKey, Keyring
from ansimi.webrtc import Watcher, enable_loopback_candidates
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
__all__ = ["DEVICE", "Rig", "Watcher", "eventually", "plaintext", "rig"]


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
