"""`ansimi demo` as a newcomer meets it: the printed sign-in works in a real browser, an
alert arrives, and a doorbell's camera plays in the page."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from pathlib import Path

import pytest
from console_kit import chromium, screenshot

from ansimi.broker import free_port, mosquitto_path

pytestmark = pytest.mark.slow


async def _printed_password(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(60):
        while line := (await process.stdout.readline()).decode():
            found = re.search(r"sign in as demo / (\S+)", line)
            if found:
                return found.group(1)
    raise AssertionError("the demo ended before printing the sign-in")


async def _drain(stream: asyncio.StreamReader) -> None:
    # keep reading, so the demo never blocks on a full pipe
    while await stream.readline():
        pass


async def test_the_demo_console_shows_an_alert_and_a_doorbells_video(tmp_path: Path) -> None:
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: `apt-get install -y mosquitto`")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "ansimi_edge", "demo", "--duration", "60"),
        *("--devices", "3", "--press-every", "1.5", "--console-port", str(port)),
        *("--broker", "mosquitto", "--state-dir", str(tmp_path / "demo")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    drain: asyncio.Task[None] | None = None
    try:
        password = await _printed_password(process)
        drain = asyncio.create_task(_drain(process.stdout))
        async with chromium() as browser:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}/")
            await page.fill("#login-name", "demo")
            await page.fill("#login-password", password)
            await page.click("#login-button")
            await page.click("#lang")  # English, as the other browser tests
            # the third simulated device is a doorbell (bell, store, doorbell, ...)
            card = page.locator(".alert[data-device-id='doorbell-0003']").first
            await card.wait_for(timeout=40_000)
            # nobody acknowledges: the demo's chain escalates the first card by itself
            escalated = page.locator(".alert .escalation:not([hidden])").first
            await escalated.wait_for(timeout=45_000)
            await card.locator("button.watch").click()
            async with asyncio.timeout(30):
                while not await page.evaluate("document.getElementById('video').videoWidth"):
                    await asyncio.sleep(0.1)
            # the demo's bells have made-up places: the incident is on the map too
            await page.locator("#map path.marker").first.wait_for(timeout=20_000)
            await screenshot(page, "demo-doorbell")
    finally:
        process.terminate()  # the demo stops its gateway and console on SIGTERM
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
        if drain is not None:
            # the pipe ends with the process: read to its end, so its transport closes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drain, 10)
