"""The fleet page in a real headless Chromium, against a real site (see console_kit.py):
every bell of the operator's districts, sortable, filterable by district, with the reasons
it needs a visit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from console_kit import BELL, DOORBELL, ConsoleSite, chromium, console_site, screenshot
from console_kit import signed_in_page as desk_page
from playwright.async_api import BrowserContext, Page

from ansimi.broker import Mosquitto
from gateway.store import Device
from protocol.keys import generate_key, public_key_to_b64

pytestmark = pytest.mark.slow

ELSEWHERE = "bell-0900"  # registered in another district, never heard from


@pytest.fixture
async def site(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[ConsoleSite]:
    async with console_site(tmp_path, mosquitto.port) as s:
        key = public_key_to_b64(generate_key().public_key())
        await s.gateway.store.add_device(Device(ELSEWHERE, key, "bell", "gangnam"), 0)
        await s.gateway.registry.reload()
        yield s


@pytest.fixture
async def browser() -> AsyncIterator[BrowserContext]:
    if not Path("/usr/bin/chromium").exists():
        pytest.fail("Debian's chromium is missing: `apt-get install -y chromium` (.ci/run does)")
    async with chromium() as b:
        yield b


async def rows(page: Page) -> list[str]:
    return await page.locator("#fleet-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.device)"
    )


async def test_the_fleet_page_sorts_filters_and_says_who_needs_a_visit(
    site: ConsoleSite, browser: BrowserContext
) -> None:
    page = await desk_page(browser, site.url)  # signed in, English chosen
    await site.silence(BELL)  # no more heartbeats: offline after the supervision timeout
    await page.goto(site.url + "/fleet")
    await page.wait_for_function("document.querySelectorAll('#fleet-table tbody tr').length == 3")
    assert await page.locator("h1").inner_text() == "Fleet"
    assert sorted(await rows(page)) == sorted([BELL, DOORBELL, ELSEWHERE])
    # the bell silenced is offline: once the gateway says so, it needs a visit
    bell_row = page.locator(f"tr[data-device='{BELL}']")
    for _ in range(40):
        if "offline" in await bell_row.locator("td").last.inner_text():
            break
        await page.wait_for_timeout(500)
        await page.reload()
        await page.wait_for_selector(f"tr[data-device='{BELL}']")
    assert "offline" in await bell_row.locator("td").last.inner_text()
    # sorted by the visits first (the default), then by device id when its header is clicked
    assert (await rows(page))[0] == BELL
    await page.click("th[data-key='device_id']")
    assert await rows(page) == sorted([BELL, DOORBELL, ELSEWHERE])
    await page.click("th[data-key='device_id']")
    assert await rows(page) == sorted([BELL, DOORBELL, ELSEWHERE], reverse=True)
    # one district only, then only what needs a visit
    await page.select_option("#district", "gangnam")
    assert await rows(page) == [ELSEWHERE]
    await page.select_option("#district", "mapo")
    await page.check("#visits-only")
    assert await rows(page) == [BELL]
    await screenshot(page, "fleet")
