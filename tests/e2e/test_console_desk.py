"""The operator's desk (issue 17) in a real headless Chromium: incidents as the gateway
groups them (docs/incidents.md), on the console test kit's FakeGateway, which serves the
incident routes as the contract says (the real gateway's side is built on its own branch;
test_console_browser.py drives the real gateway, whose events the console groups itself).

Screenshots, one Korean and one English, land in test-output/e2e/, and the desk's layout is
compared with a stored reference (tests/e2e/reference/): a fixed viewport, fixed data,
what changes by itself masked (timers, times, "last heard"), animations off, and a tolerance for
antialiasing. The reference holds for one Chromium and one set of fonts (Debian's chromium
and fonts-noto-cjk, as scripts/system-deps.sh installs them); after a deliberate change of
the layout, or of either package, delete the reference and run the test once: it writes a
new one (and fails, so the new picture is looked at before it is committed).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from console_kit import CHROMIUM, OUTPUT, chromium, screenshot
from playwright.async_api import BrowserContext, Page

# the console's own test kit (FakeGateway with the incident routes, signed deliveries):
# one kit for the unit and the browser tests of the desk
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "console"))
from console_testkit import (
    GATEWAY_KEY,
    PASSWORD,
    PRESS,
    Desk,
    FakeGateway,
    delivery,
    desk,
    now_ms,
    registry_entry,
)

from protocol.messages import Alert, Status

pytestmark = pytest.mark.slow

BELL, STORE, DOOR, FAR = "bell-0001", "store-0001", "door-0001", "bell-0009"
STALKING = "inc-stalking-000000001"
ROBBERY = "inc-robbery-0000000002"
RING = "inc-ring-0000000000003"
GANGNAM = "inc-gangnam-0000000004"
ROBBERY_ALERT = Alert(bell="store", trigger="press", silent=True)
RING_ALERT = Alert(bell="doorbell", trigger="doorbell_ring")


def site_gateway() -> FakeGateway:
    gateway = FakeGateway(
        devices=[
            # markup in a label is text wherever the page shows it (the map's labels too)
            registry_entry(BELL, label="Mapo flat 3 <b id='injected'>!</b>"),
            registry_entry(STORE, kind="store", label="Mapo corner shop"),
            registry_entry(DOOR, kind="doorbell", label="Mapo flat 5 door"),
            registry_entry(FAR, district="gangnam", label="Gangnam flat 1"),
        ],
        private={
            BELL: {
                "address": "17 Seongmisan-ro 5-gil, Mapo-gu",
                "floor": "15",
                "phones": [
                    {"role": "guardian", "name": "Park", "number": "+821066698765"},
                    {"role": "victim", "name": "Kim", "number": "+821055512345"},
                ],
                "notes": "door code 7391",
                "location": {"lat": 37.5638, "lon": 126.9084},
            }
        },
    )
    # opened in this order, a millisecond apart: the queue's age order is not left to chance
    at = now_ms()
    gateway.open_incident(STALKING, BELL, "stalking", 4, opened_ms=at)
    gateway.open_incident(ROBBERY, STORE, "store_robbery", 2, opened_ms=at + 1)
    gateway.open_incident(RING, DOOR, "doorbell_ring", 9, opened_ms=at + 2)
    gateway.open_incident(GANGNAM, FAR, "stalking", 4, district="gangnam", opened_ms=at + 3)
    return gateway


async def deliver_all(d: Desk) -> None:
    """Three presses of one stalking incident, a silent robbery, a doorbell ring."""
    for seq in (1, 2, 3):
        await d.deliver(delivery(PRESS, device=BELL, seq=seq, incident=(STALKING, "stalking", 4)))
    robbery = (ROBBERY, "store_robbery", 2)
    await d.deliver(delivery(ROBBERY_ALERT, device=STORE, incident=robbery))
    await d.deliver(delivery(RING_ALERT, device=DOOR, incident=(RING, "doorbell_ring", 9)))
    far = (GANGNAM, "stalking", 4)
    await d.deliver(delivery(PRESS, device=FAR, district="gangnam", incident=far))


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Desk]:
    # the console's sync with the gateway runs as in service, often
    async with desk(
        tmp_path, site_gateway(), districts={"lee": ["gangnam"]}, gateway_sync_s=0.5
    ) as d:
        yield d


@pytest.fixture
async def browser() -> AsyncIterator[BrowserContext]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `apt-get install -y chromium` (.ci/run does)")
    async with chromium() as b:
        yield b


async def open_desk(
    browser: BrowserContext, d: Desk, name: str = "kim", *, english: bool = True
) -> Page:
    page = await browser.new_page()
    await page.goto(str(d.client.make_url("/")))
    if english:
        await page.evaluate("localStorage.setItem('ansimi.lang', 'en')")
        await page.reload()
    await page.fill("#login-name", name)
    await page.fill("#login-password", PASSWORD)
    await page.click("#login-button")
    await page.wait_for_selector("body[data-live='1']", timeout=20_000)
    return page


async def cards(page: Page) -> list[str]:
    return [str(await c.get_attribute("data-id")) for c in await page.locator(".incident").all()]


async def test_one_card_per_incident_in_priority_order_with_timer_escalation_and_shortcut(
    site: Desk, browser: BrowserContext
) -> None:
    page = await open_desk(browser, site)
    await deliver_all(site)
    await page.locator(f".incident[data-id='{RING}']").wait_for(timeout=20_000)
    # one card per incident, the most urgent first (kim sees every district)
    async with asyncio.timeout(20):
        while await cards(page) != [ROBBERY, STALKING, GANGNAM, RING]:
            await asyncio.sleep(0.1)
    stalking = page.locator(f".incident[data-id='{STALKING}']")
    assert "3 presses" in await stalking.locator(".what").inner_text()
    # each kind told apart without colour: its own icon and words
    icons = {await c.locator(".icon").inner_text() for c in await page.locator(".incident").all()}
    assert icons == {"◆", "△", "⌂"}
    assert "Store robbery (silent)" in await page.locator(".k-store_robbery .what").inner_text()
    assert re.fullmatch(r"\d\d:\d\d", await stalking.locator(".timer").inner_text())
    # the card holds what the operator needs: a floor as a floor, the victim's number first
    await stalking.locator(".phones li").first.wait_for(timeout=10_000)
    address = await stalking.locator(".address").inner_text()
    assert address == "17 Seongmisan-ro 5-gil, Mapo-gu (floor 15)"
    assert await stalking.locator(".phones li").first.inner_text() == "victim Kim +821055512345"
    # the gateway escalated it to another centre: no event reaches this console, the
    # console's sync with the gateway pushes the card and the mark shows
    site.gateway.incidents[STALKING].update(escalation_level=1, escalated_to=["police"])
    mark = stalking.locator(".escalation")
    await mark.wait_for(state="visible", timeout=20_000)
    assert "police" in await mark.inner_text()
    # its history is fetched again (it has the step now) and the card drawn with it
    await stalking.locator(".procedure li").first.wait_for(timeout=10_000)
    # Acknowledge is the first button, the largest, and the key A presses it for the top card
    first = stalking.locator(".actions button").first
    assert await first.get_attribute("data-stage") == "acknowledged"
    sizes = [
        (await b.bounding_box() or {"width": 0})["width"]
        for b in await stalking.locator(".actions button.act").all()
    ]
    assert sizes[0] == max(sizes)
    assert await page.locator("body").get_attribute("data-alarm") == "critical"
    await screenshot(page, "desk-en")
    await page.keyboard.press("a")
    await page.locator(f".incident[data-id='{ROBBERY}'][data-stage='acknowledged']").wait_for()
    assert (ROBBERY, "acknowledged", "kim", None) in site.gateway.incident_calls
    # the next unacknowledged one now sets the sound: a lower priority, a lower alarm
    async with asyncio.timeout(10):
        while await page.locator("body").get_attribute("data-alarm") != "high":
            await asyncio.sleep(0.1)


async def test_checklist_ticks_and_the_outcome_are_in_the_audit_csv(
    site: Desk, browser: BrowserContext
) -> None:
    page = await open_desk(browser, site)
    await deliver_all(site)
    card = page.locator(f".incident[data-id='{STALKING}']")
    step = card.locator(".procedure li[data-step='call_victim'] input")
    await step.wait_for(timeout=20_000)
    await step.check()
    await card.locator(".procedure li[data-step='call_victim'] small").wait_for(timeout=10_000)
    assert await step.is_disabled()  # ticked once, by whom and when
    await card.locator("button.close").click()
    await card.locator(".outcome select").select_option("false_alarm")
    await card.locator("button.confirm-close").click()
    await card.wait_for(state="detached", timeout=20_000)
    response = await page.request.get(str(site.client.make_url("/api/audit.csv")))
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    ticks = [r for r in rows if r["action"] == "procedure_step" and r["target"] == STALKING]
    assert [(r["operator"], '"step": "call_victim"' in r["detail"]) for r in ticks] == [
        ("kim", True)
    ]
    assert ticks[0]["at_utc"]  # with its time
    closes = [r for r in rows if r["action"] == "closed" and r["target"] == STALKING]
    assert len(closes) == 1 and '"outcome": "false_alarm"' in closes[0]["detail"]
    assert (STALKING, "closed", "kim", "false_alarm") in site.gateway.incident_calls


async def test_the_chosen_outcome_survives_the_desk_redrawing_itself(
    site: Desk, browser: BrowserContext
) -> None:
    """The desk redraws every card when anything arrives (a detail, a bell's state, another
    incident): an outcome chosen just before must still close the incident."""
    page = await open_desk(browser, site)
    await deliver_all(site)
    card = page.locator(f".incident[data-id='{RING}']")
    await card.locator("button.close").click()
    await card.locator(".outcome select").select_option("false_alarm")
    await page.evaluate("renderIncidents()")  # as an answer arriving now would
    await card.locator("button.confirm-close").click()
    await card.wait_for(state="detached", timeout=20_000)
    assert (RING, "closed", "kim", "false_alarm") in site.gateway.incident_calls


async def test_a_card_is_built_again_only_when_what_it_shows_changed(
    site: Desk, browser: BrowserContext
) -> None:
    """Rebuilding every card, and fetching the whole desk, for each arrival kept a desk of
    200 seconds behind."""
    page = await open_desk(browser, site)
    await deliver_all(site)
    await page.wait_for_function(
        "() => document.querySelectorAll('.incident .procedure li').length >= 8"
    )
    mark = "(id) => { document.querySelector(`.incident[data-id='${id}']`).marked = id; }"
    for incident_id in (ROBBERY, STALKING):
        await page.evaluate(mark, incident_id)
    # the whole desk is not fetched again for an event: the console pushes its incident
    lists: list[str] = []
    page.on("request", lambda r: lists.append(r.url) if r.url.endswith("/api/incidents") else None)
    # another press of the stalking bell: its card changes, the robbery's does not
    await site.deliver(delivery(PRESS, device=BELL, seq=4, incident=(STALKING, "stalking", 4)))
    stalking = page.locator(f".incident[data-id='{STALKING}']")
    await stalking.locator(".what", has_text="4 presses").wait_for(timeout=20_000)
    assert lists == []
    marked = "(id) => document.querySelector(`.incident[data-id='${id}']`).marked ?? null"
    assert await page.evaluate(marked, ROBBERY) == ROBBERY
    assert await page.evaluate(marked, STALKING) is None


async def test_an_operator_sees_their_districts_incidents_only(
    site: Desk, browser: BrowserContext
) -> None:
    page = await open_desk(browser, site, "lee")
    await deliver_all(site)
    await page.locator(f".incident[data-id='{GANGNAM}']").wait_for(timeout=20_000)
    await asyncio.sleep(0.5)  # the mapo deliveries came first: nothing more arrives
    assert await cards(page) == [GANGNAM]


async def test_the_map_shows_an_incident_over_the_district_outlines(
    site: Desk, browser: BrowserContext
) -> None:
    page = await open_desk(browser, site)
    await deliver_all(site)
    # no tile server configured: the 25 districts' outlines, shipped with the page
    await page.locator("#map[data-fallback='1']").wait_for(timeout=20_000)
    assert await page.locator("#map path.district-outline").count() == 25
    marker = page.locator("#map path.marker.k-stalking")
    await marker.wait_for(timeout=20_000)
    label = page.locator("#map .marker-label", has_text="Mapo flat 3")
    assert "Stalking bell" in await label.inner_text()
    assert "<b id='injected'>" in await label.inner_text()
    assert await page.locator("#injected").count() == 0
    # the districts with an open incident stand out, with or without a location
    assert await page.locator("#map path.district-outline.hot").count() == 2  # mapo, gangnam


async def test_an_incident_in_jung_gu_lights_jung_gu_not_jungnang_gu(
    tmp_path: Path, browser: BrowserContext
) -> None:
    # a district's code is a whole name: "jung" is no prefix of Jungnang-gu's
    gateway = FakeGateway(devices=[registry_entry(BELL, district="jung", label="Jung flat 1")])
    jung = "inc-jung-0000000000006"
    gateway.open_incident(jung, BELL, "stalking", 4, district="jung")
    async with desk(tmp_path, gateway) as d:
        page = await open_desk(browser, d)
        await d.deliver(
            delivery(PRESS, device=BELL, district="jung", incident=(jung, "stalking", 4))
        )
        await page.locator("#map[data-fallback='1']").wait_for(timeout=20_000)
        hot = page.locator("#map path.district-outline.hot")
        await hot.first.wait_for(timeout=20_000)
        assert await hot.count() == 1


async def test_a_test_press_shows_as_a_test_not_as_an_incident(
    site: Desk, browser: BrowserContext
) -> None:
    page = await open_desk(browser, site)
    await deliver_all(site)
    # the gateway opens no incident for a test press (docs/incidents.md): none on it
    await site.deliver(delivery(Alert(bell="emergency", trigger="test"), device=FAR, seq=2))
    test = page.locator(f"#events li.test[data-device-id='{FAR}']")
    await test.wait_for(timeout=20_000)
    assert (await test.locator(".what").inner_text()).startswith("Test press")
    await page.locator(f".incident[data-id='{RING}']").wait_for(timeout=20_000)
    assert await cards(page) == [ROBBERY, STALKING, GANGNAM, RING]


async def test_a_district_outage_card_shows_no_ones_personal_data(
    tmp_path: Path, browser: BrowserContext
) -> None:
    """The outage is told about its district's first bell, but it is the district's: the
    card shows no one's address nor phones (an operator would call that bell's victim about
    a district gone dark), and no view of them is fetched, nor audited."""
    gateway = site_gateway()
    outage = "inc-outage-00000000005"
    gateway.open_incident(outage, BELL, "district_outage", 8, procedure=("check_district",))
    async with desk(tmp_path, gateway) as d:
        page = await open_desk(browser, d)
        told = Status(state="district_outage", district="mapo", count=2, offline=[BELL, STORE])
        incident = (outage, "district_outage", 8)
        await d.deliver(delivery(told, key=GATEWAY_KEY, kid="gw-test", incident=incident))
        card = page.locator(f".incident[data-id='{outage}']")
        await card.locator(".procedure li").first.wait_for(timeout=20_000)
        assert await card.locator(".address").inner_text() == (
            "District outage (many bells offline) · mapo"
        )
        assert await card.locator(".phones li").count() == 0
        response = await page.request.get(str(d.client.make_url("/api/audit.csv")))
        rows = list(csv.DictReader(io.StringIO(await response.text())))
        assert [r for r in rows if r["action"] == "view_personal_data"] == []


REFERENCE = Path(__file__).resolve().parent / "reference"
VIEWPORT = {"width": 1280, "height": 1000}
# a pixel differs when a channel moves by more than this; the page differs when more than
# this share of its pixels do (antialiasing moves a few edge pixels between runs)
PIXEL_TOLERANCE = 48
SHARE_TOLERANCE = 0.005
# compared in a blank page (no CSP): the share of pixels that differ, or the sizes
_COMPARE = """async ([a, b, tolerance]) => {
    const load = (src) => new Promise((ok, bad) => {
        const image = new Image();
        image.onload = () => ok(image);
        image.onerror = bad;
        image.src = src;
    });
    const [x, y] = await Promise.all([load(a), load(b)]);
    if (x.width !== y.width || x.height !== y.height) {
        return { sizes: [x.width, x.height, y.width, y.height] };
    }
    const pixels = (image) => {
        const canvas = document.createElement("canvas");
        canvas.width = image.width;
        canvas.height = image.height;
        const g = canvas.getContext("2d");
        g.drawImage(image, 0, 0);
        return g.getImageData(0, 0, image.width, image.height).data;
    };
    const p = pixels(x), q = pixels(y);
    let differ = 0;
    for (let k = 0; k < p.length; k += 4) {
        if (Math.abs(p[k] - q[k]) > tolerance || Math.abs(p[k + 1] - q[k + 1]) > tolerance
            || Math.abs(p[k + 2] - q[k + 2]) > tolerance) differ++;
    }
    return { share: differ / (p.length / 4) };
}"""


async def layout_shot(page: Page, name: str) -> bytes:
    """The desk at a fixed size, with what changes by itself masked, once every card has
    its checklist and the bell its address (the page has stopped fetching)."""
    await page.set_viewport_size(VIEWPORT)
    await page.wait_for_function(
        "() => document.querySelectorAll('.incident .procedure li').length >= 8"
    )
    await page.locator(f".incident[data-id='{STALKING}'] .phones li").first.wait_for()
    await page.evaluate("() => new Promise((done) => setTimeout(done, 200))")  # last render
    shot = await page.screenshot(
        animations="disabled",
        caret="hide",
        # the timers, the times, and the bell's "last heard" (a time in its words)
        mask=[page.locator(s) for s in (".timer", "time", ".now", "#events")],
        mask_color="#ff00ff",
    )
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / f"{name}.png").write_bytes(shot)
    return shot


async def matches_reference(browser: BrowserContext, shot: bytes, name: str) -> None:
    reference = REFERENCE / f"{name}.png"
    if not reference.exists():
        REFERENCE.mkdir(exist_ok=True)
        reference.write_bytes(shot)
        pytest.fail(f"no reference {reference}: written from this run; look at it, commit it")
    blank = await browser.new_page()
    try:
        urls = [
            "data:image/png;base64," + base64.b64encode(b).decode()
            for b in (shot, reference.read_bytes())
        ]
        result = await blank.evaluate(_COMPARE, [*urls, PIXEL_TOLERANCE])
    finally:
        await blank.close()
    assert "sizes" not in result, f"{name}: size changed {result['sizes']}"
    assert result["share"] <= SHARE_TOLERANCE, (
        f"{name}: {result['share']:.2%} of the pixels differ from {reference};"
        f" this run's is {OUTPUT / name}.png"
    )


@pytest.mark.parametrize("lang", ["en", "ko"])
async def test_the_desks_layout_matches_its_reference(
    site: Desk, browser: BrowserContext, lang: str
) -> None:
    page = await open_desk(browser, site, english=lang == "en")
    await deliver_all(site)
    await page.locator(f".incident[data-id='{RING}']").wait_for(timeout=20_000)
    shot = await layout_shot(page, f"desk-layout-{lang}")
    await matches_reference(browser, shot, f"desk-layout-{lang}")


async def test_the_korean_desk_renders_in_korean(site: Desk, browser: BrowserContext) -> None:
    page = await open_desk(browser, site, english=False)
    await deliver_all(site)
    card = page.locator(f".incident[data-id='{ROBBERY}']")
    await card.wait_for(timeout=20_000)
    assert await page.locator("html").get_attribute("lang") == "ko"
    assert await card.locator(".what").inner_text() == "매장 강도 (무음)"
    assert await card.locator("button.ack span").inner_text() == "접수"
    await page.locator(f".incident[data-id='{STALKING}'] .phones li").first.wait_for()
    await screenshot(page, "desk-ko")
