"""A whole site for browser tests and the console benchmark, with real parts only.

A real mosquitto (given), the real Gateway (intake, store, forwarding, operator API, video
hub), real device Agents on fake hardware (a bell and a doorbell with a synthetic camera),
the real console app on a loopback port, and Debian's headless Chromium driven by
Playwright. A plain module (not conftest), so `bench/console.py` can use it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from ansimi_testkit import eventually
from playwright.async_api import BrowserContext, Page, async_playwright

from ansimi.privacy import load_or_create
from console.directory import Directory
from console.gateway_client import GatewayClient
from console.operators import Operators
from console.receiver import EventLog, Receiver
from console.web import ConsoleApp
from device.agent import Agent
from device.config import DeviceConfig, DeviceSection, GatewaySection, MqttSection
from device.hal import Hardware
from device.hal.audio import FakeAudioOutput
from device.hal.camera import SyntheticCamera
from device.hal.fakes import FakeIndicator, FakeInputs
from device.video.config import VideoConfig as DeviceVideo
from gateway.config import (
    ApiConfig,
    ApiToken,
    Centre,
    GatewayConfig,
    IncidentsConfig,
    MqttConfig,
    PrivacyConfig,
    SuperviseConfig,
)
from gateway.service import Gateway
from gateway.store import Device
from gateway.video.config import VideoConfig as GatewayVideo
from protocol.clock import wall_ms
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64

SECRET = "centre-secret-for-browser-tests"
TOKEN = "console-operator-token-for-e2e"
OPERATOR = "kim"
PASSWORD = "a long operator password"
BELL = "bell-0001"
DOORBELL = "doorbell-0001"
CHROMIUM = "/usr/bin/chromium"
# FIELD-NOTES (Browser): quiet on this machine; the last two let WebRTC use loopback
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    # a fake microphone (a beep) and no permission prompt: push-to-talk in a test
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]
# short, so an offline device is noticed within seconds in a test
HEARTBEAT_S = 1.0
OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "e2e"


def now_ms() -> int:
    return wall_ms()


@dataclass
class Bell:
    agent: Agent
    inputs: FakeInputs
    indicator: FakeIndicator
    speaker: FakeAudioOutput | None = None  # the doorbell's, with talk-back on

    def press(self) -> int:
        """Press and release the emergency button; the wall-clock time of the press."""
        pressed = now_ms()
        self.inputs.press("emergency")
        self.inputs.release("emergency")
        return pressed


@dataclass
class ConsoleSite:
    gateway: Gateway
    console: ConsoleApp
    url: str
    bells: dict[str, Bell]
    received_ms: dict[str, int]  # event id -> when the console's webhook kept it
    tasks: dict[str, asyncio.Task[None]]

    async def silence(self, device_id: str) -> None:
        """Stop a device's agent, as if its power and battery died: no more heartbeats."""
        task = self.tasks[device_id]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @property
    def video(self) -> bool:
        return any(r.path == "/whep/{device_id}" for r in self.gateway.api.routes)


def _agent(
    state: Path, device_id: str, kind: str, gateway_signer: Signer, mqtt_port: int
) -> tuple[Bell, str]:
    key = generate_key()
    camera = SyntheticCamera(320, 240, 15) if kind == "doorbell" else None
    # the doorbell has a speaker and talk-back on, as a stalking victim's would
    speaker = FakeAudioOutput() if kind == "doorbell" else None
    hardware = Hardware(FakeInputs(), FakeIndicator(), camera, None, speaker)
    agent = Agent(
        DeviceConfig(
            device=DeviceSection(id=device_id, kind=kind, state_dir=state / device_id),
            gateway=GatewaySection(
                id=gateway_signer.kid, public_key=public_key_to_b64(gateway_signer.public_key)
            ),
            mqtt=MqttSection(host="127.0.0.1", port=mqtt_port, heartbeat_s=HEARTBEAT_S),
            video=DeviceVideo(loopback_candidates=True, talkback=speaker is not None),
        ),
        signer=Signer(device_id, key),
        gateway_key=gateway_signer.public_key,
        hardware=hardware,
    )
    assert isinstance(hardware.inputs, FakeInputs)
    assert isinstance(hardware.indicator, FakeIndicator)
    bell = Bell(agent, hardware.inputs, hardware.indicator, speaker)
    return bell, public_key_to_b64(key.public_key())


@contextlib.asynccontextmanager
async def console_site(
    state: Path, mqtt_port: int, incidents: IncidentsConfig | None = None
) -> AsyncIterator[ConsoleSite]:
    """The site; `incidents`: the gateway's [incidents] (the bench escalates to the console)."""
    gateway_signer = Signer("gw-e2e", generate_key())
    db = state / "console.db"
    # The console is bound first, on port 0, so its real port goes into the gateway's
    # config: no window in which another process could take a port picked in advance.
    # Its gateway client learns the API's port once the gateway listens.
    client = GatewayClient("http://127.0.0.1:0", TOKEN)
    directory = Directory(db, client.devices, gateway_keys={"gw-e2e": gateway_signer.public_key})
    receiver = Receiver(SECRET, EventLog(db), directory=directory)
    operators = Operators(db)
    operators.add(OPERATOR, PASSWORD)
    console = ConsoleApp(receiver, operators, directory=directory, gateway=client)
    received: dict[str, int] = {}
    receiver.listeners.append(lambda e: received.__setitem__(e.event_id, now_ms()))
    runner = web.AppRunner(console.app(), shutdown_timeout=1.0)
    await runner.setup()
    tasks: list[asyncio.Task[None]] = []
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        console_port = int(runner.addresses[0][1])
        # recordings exist only under a data key
        key_file = state / "gateway" / "privacy.key"
        load_or_create(key_file)
        config = GatewayConfig(
            id="gw-e2e",
            privacy=PrivacyConfig(key_file=key_file),
            database=state / "gateway" / "gateway.db",
            mqtt=MqttConfig(host="127.0.0.1", port=mqtt_port),
            api=ApiConfig(
                enabled=True,
                port=0,
                tokens=[ApiToken(name="console", role="operator", token=TOKEN)],
            ),
            video=GatewayVideo(recordings_dir=state / "recordings", loopback_candidates=True),
            supervise=SuperviseConfig(heartbeat_s=HEARTBEAT_S, missed=3, tick_s=0.2),
            incidents=incidents or IncidentsConfig(),
            centres=[
                Centre(name="central", url=f"http://127.0.0.1:{console_port}/events", secret=SECRET)
            ],
        )
        gateway = Gateway(config, signer=gateway_signer)
        bells: dict[str, Bell] = {}
        for device_id, kind, label in (
            (BELL, "bell", "Mapo flat 3"),
            (DOORBELL, "doorbell", "Mapo flat 3 door"),
        ):
            bell, key_b64 = _agent(state, device_id, kind, gateway_signer, mqtt_port)
            bells[device_id] = bell
            await gateway.store.add_device(
                Device(device_id, key_b64, kind, "mapo", label), now_ms=0
            )  # type: ignore[arg-type]
        await gateway.registry.reload()
        agent_tasks = {d: asyncio.create_task(b.agent.run()) for d, b in bells.items()}
        tasks = [asyncio.create_task(gateway.run()), *agent_tasks.values()]
        await asyncio.wait_for(gateway.ready.wait(), 20)
        await eventually(lambda: gateway.api.port is not None)
        client.base_url = f"http://127.0.0.1:{gateway.api.port}"
        assert await directory.sync(), directory.last_error
        for bell in bells.values():
            await asyncio.wait_for(bell.agent.ready.wait(), 20)
        url = f"http://127.0.0.1:{console_port}"
        yield ConsoleSite(gateway, console, url, bells, received, agent_tasks)
    finally:
        await runner.cleanup()
        await client.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        receiver.events.close()
        operators.close()
        directory.close()


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[BrowserContext]:
    """Debian's Chromium with a fresh profile; never a downloaded browser."""
    with tempfile.TemporaryDirectory(prefix="ansimi-chromium-") as profile:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            try:
                yield context
            finally:
                await context.close()


async def signed_in_page(browser: BrowserContext, url: str, *, english: bool = True) -> Page:
    """Signed in, live. In English by default (Korean needs fonts-noto-cjk, which
    scripts/system-deps.sh installs; test_console_desk.py takes the Korean screenshot)."""
    page: Page = await browser.new_page()
    await page.goto(url)
    await page.fill("#login-name", OPERATOR)
    await page.fill("#login-password", PASSWORD)
    await page.click("#login-button")
    # the stream is open once the page has had its hello
    await page.wait_for_selector("body[data-live='1']", timeout=20_000)
    if english:
        await page.click("#lang")
    return page


async def screenshot(page: Page, name: str) -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
