"""A doorbell and a gateway over a real mosquitto, with video on, for the video tests.

Also run as a script by the killed-recording test: `python video_itkit.py <dir> <port>`
runs a site against the broker at 127.0.0.1:<port>, starts video, prints the recording's
path once it has frames, and keeps recording until it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from ansimi_testkit import eventually, nowhere_centre

from ansimi.privacy import Keyring, load_or_create
from ansimi.webrtc import Watcher
from device.agent import Agent
from device.config import DeviceConfig, DeviceSection, GatewaySection, MqttSection
from device.hal import Hardware
from device.hal.camera import SyntheticCamera
from device.hal.fakes import FakeIndicator, FakeInputs
from device.video.config import VideoConfig as DeviceVideo
from gateway.config import ApiConfig, ApiToken, GatewayConfig, MqttConfig, PrivacyConfig
from gateway.service import Gateway
from gateway.store import Device
from gateway.video.config import VideoConfig as GatewayVideo
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import Command

DOORBELL = "doorbell-0001"
TOKEN = "operator-token-for-video-tests"


@dataclass
class VideoSite:
    gateway: Gateway
    agent: Agent
    inputs: FakeInputs
    gateway_signer: Signer
    keyring: Keyring

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.gateway.api.port}"

    def command(self, name: str) -> None:
        self.gateway.downlink.send(DOORBELL, Command(name=name))  # type: ignore[arg-type]

    async def watch(self, *, decode: bool = True) -> tuple[Watcher, str]:
        """A viewer through the API's WHEP route; returns it and its Location."""
        watcher = Watcher(decode=decode)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{self.api}/whep/{DOORBELL}",
                data=await watcher.offer(),
                headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {TOKEN}"},
            ) as resp,
        ):
            assert resp.status == 201, await resp.text()
            await watcher.answer(await resp.text())
            return watcher, resp.headers["Location"]


@contextlib.asynccontextmanager
async def video_site(
    state: Path, host: str, port: int, *, device: DeviceVideo | None = None
) -> AsyncIterator[VideoSite]:
    gateway_signer = Signer("gw-test", generate_key())
    # recordings exist only under a data key; the killed-recording test reads this one back
    key_file = state / "gateway" / "privacy.key"
    keyring = load_or_create(key_file)
    config = GatewayConfig(
        privacy=PrivacyConfig(key_file=key_file),
        centres=[nowhere_centre()],
        id="gw-test",
        database=state / "gateway" / "gateway.db",
        mqtt=MqttConfig(host=host, port=port),
        api=ApiConfig(
            enabled=True, port=0, tokens=[ApiToken(name="desk", role="operator", token=TOKEN)]
        ),
        video=GatewayVideo(recordings_dir=state / "recordings", loopback_candidates=True),
    )
    gateway = Gateway(config, signer=gateway_signer)
    device_key = generate_key()
    inputs = FakeInputs()
    agent = Agent(
        DeviceConfig(
            device=DeviceSection(id=DOORBELL, kind="doorbell", state_dir=state / "device"),
            gateway=GatewaySection(
                id=gateway_signer.kid, public_key=public_key_to_b64(gateway_signer.public_key)
            ),
            mqtt=MqttSection(host=host, port=port, heartbeat_s=5),
            video=device or DeviceVideo(loopback_candidates=True),
        ),
        signer=Signer(DOORBELL, device_key),
        gateway_key=gateway_signer.public_key,
        hardware=Hardware(
            inputs=inputs,
            indicator=FakeIndicator(),
            camera=SyntheticCamera(320, 240, 15),
            modem=None,
        ),
    )
    await gateway.store.add_device(
        Device(DOORBELL, public_key_to_b64(device_key.public_key()), "doorbell", "mapo"),
        now_ms=0,
    )
    await gateway.registry.reload()
    tasks = [asyncio.ensure_future(gateway.run()), asyncio.ensure_future(agent.run())]
    try:
        await asyncio.wait_for(gateway.ready.wait(), 10)
        await asyncio.wait_for(agent.ready.wait(), 10)
        await eventually(lambda: gateway.api.port is not None)
        yield VideoSite(gateway, agent, inputs, gateway_signer, keyring)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _record_until_killed(state: Path, port: int) -> None:
    async with video_site(state, "127.0.0.1", port) as site:
        hub = site.gateway.video
        assert hub is not None
        site.command("video_start")
        await eventually(lambda: DOORBELL in hub.streams and hub.streams[DOORBELL].frames > 20)
        print(hub.streams[DOORBELL].recorder.path, flush=True)
        await asyncio.sleep(60)  # the test kills us long before this


if __name__ == "__main__":
    asyncio.run(_record_until_killed(Path(sys.argv[1]), int(sys.argv[2])))
