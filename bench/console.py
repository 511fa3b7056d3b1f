"""Console: press to alert on the operator's page, and press to the first video frame.

The same real site as the browser tests (tests/e2e/console_kit.py): mosquitto, the
Gateway, device Agents on fake hardware (a bell, a doorbell with a synthetic camera), the
console app, and Debian's headless Chromium signed in. Times are wall-clock milliseconds
on one machine: the press is stamped in Python, the page stamps the card it renders
(`data-shown-ms`) and the first decoded video frame (`data-first-frame-ms`).

Each alert round closes its alert through the page's console API so the next press is a
new incident (presses during an open incident are folded into it). Each video round stops
the doorbell's stream first, so every round measures a cold start: alert, device offer,
gateway answer, WHEP through the console, first frame.

Baselines: press to the console's webhook arrival (what the page adds on top of the
gateway's forwarding), and press to the gateway hub's first frame from the device.
Goals (issue 8): alert on the page p50/p95 <= 200 ms; first frame <= 1.0 s.

Run: .venv/bin/python bench/console.py [--alerts 20] [--videos 5]  (last line: one JSON)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's own directory leads sys.path, and this file (also named
# "console") would shadow the package it measures.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
# the site wiring is shared with the browser tests, which keep it next to them
sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "tests")]

from console_kit import (  # noqa: E402
    BELL,
    DOORBELL,
    ConsoleSite,
    chromium,
    console_site,
    eventually,
    now_ms,
    signed_in_page,
)
from playwright.async_api import Page  # noqa: E402

from ansimi.broker import Mosquitto, MosquittoConfig  # noqa: E402
from protocol.messages import Command  # noqa: E402

ALERT_GOAL_MS = 200
VIDEO_GOAL_MS = 1000
TOTAL_LIMIT_S = 300  # bounded, whatever happens


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def new_event(site: ConsoleSite, known: set[str], device_id: str) -> str:
    def fresh() -> bool:
        return any(
            e not in known and site.console.receiver.events.get(e) is not None
            for e in site.received_ms
        )

    await eventually(fresh, 20)
    for event_id in site.received_ms:
        event = site.console.receiver.events.get(event_id)
        if event_id not in known and event is not None and event.device_id == device_id:
            return event_id
    raise AssertionError(f"no new event from {device_id}")


async def close_alert(page: Page, site: ConsoleSite, event_id: str, device_id: str) -> None:
    card = page.locator(f".alert[data-event-id='{event_id}']")
    await card.locator("button.close").click()
    await card.locator(".outcome select").select_option("test")  # closing asks why
    await card.locator("button.confirm-close").click()
    await card.wait_for(state="detached", timeout=20_000)
    agent = site.bells[device_id].agent
    await eventually(lambda: agent.behaviour.state.value in ("idle", "cleared"), 20)


async def alert_round(page: Page, site: ConsoleSite) -> tuple[float, float]:
    known = set(site.received_ms)
    pressed = site.bells[BELL].press()
    event_id = await new_event(site, known, BELL)
    card = page.locator(f".alert[data-event-id='{event_id}']")
    await card.wait_for(timeout=20_000)
    shown = int(await card.get_attribute("data-shown-ms") or 0)
    arrived = site.received_ms[event_id]
    await close_alert(page, site, event_id, BELL)
    return shown - pressed, arrived - pressed


async def hub_first_frame(site: ConsoleSite) -> int:
    """When the gateway's hub has the doorbell's first frame (wall clock), polled."""
    hub = site.gateway.video
    assert hub is not None
    while True:
        stream = hub.streams.get(DOORBELL)
        if stream is not None and stream.first_frame.is_set():
            return now_ms()
        await asyncio.sleep(0.005)


async def video_round(page: Page, site: ConsoleSite) -> tuple[float, float]:
    hub = site.gateway.video
    assert hub is not None, "the gateway runs without video"
    known = set(site.received_ms)
    pressed = site.bells[DOORBELL].press()
    at_hub = asyncio.create_task(hub_first_frame(site))
    event_id = await new_event(site, known, DOORBELL)
    card = page.locator(f".alert[data-event-id='{event_id}']")
    await card.wait_for(timeout=20_000)
    # the operator's click, as soon as the alert is there
    await card.locator("button.watch").click()
    # the page stamps the first decoded frame itself; this wait only collects it
    playing = page.locator("#video[data-first-frame-ms]")
    await playing.wait_for(state="attached", timeout=30_000)
    first = await playing.get_attribute("data-first-frame-ms") or "0"
    hub_ms = await asyncio.wait_for(at_hub, 30)
    await page.click("#video-close")
    await close_alert(page, site, event_id, DOORBELL)
    # a cold start next round: stop the device's stream and wait until it is gone
    site.gateway.downlink.send(DOORBELL, Command(name="video_stop"))
    await eventually(lambda: DOORBELL not in hub.streams, 20)
    return int(first) - pressed, hub_ms - pressed


async def run(alerts: int, videos: int) -> dict[str, Any]:
    page_ms: list[float] = []
    receiver_ms: list[float] = []
    video_ms: list[float] = []
    hub_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ansimi-bench-console-") as tmp:
        state = Path(tmp)
        with Mosquitto(MosquittoConfig(state_dir=state / "broker")) as broker:
            async with console_site(state, broker.port) as site, chromium() as browser:
                page = await signed_in_page(browser, site.url)
                async with asyncio.timeout(TOTAL_LIMIT_S):
                    await alert_round(page, site)  # warm-up: imports, first paint
                    for _ in range(alerts):
                        shown, arrived = await alert_round(page, site)
                        page_ms.append(shown)
                        receiver_ms.append(arrived)
                    if site.video:
                        for _ in range(videos):
                            first, hub_first = await video_round(page, site)
                            video_ms.append(first)
                            hub_ms.append(hub_first)
    return {
        "page": page_ms,
        "receiver": receiver_ms,
        "video": video_ms,
        "hub": hub_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alerts", type=int, default=20)
    parser.add_argument("--videos", type=int, default=5)
    args = parser.parse_args()
    started = time.monotonic()
    r = asyncio.run(run(args.alerts, args.videos))
    alert_p50, alert_p95 = pct(r["page"], 50), pct(r["page"], 95)
    video_p50, video_p95 = pct(r["video"], 50), pct(r["video"], 95)
    arrive_p50, arrive_p95 = pct(r["receiver"], 50), pct(r["receiver"], 95)
    print(
        f"press -> alert on the page   p50 {alert_p50:6.0f} ms  p95 {alert_p95:6.0f} ms"
        f"  (goal {ALERT_GOAL_MS} ms, n={len(r['page'])})"
    )
    print(f"press -> webhook arrival     p50 {arrive_p50:6.0f} ms  p95 {arrive_p95:6.0f} ms")
    print(
        f"press -> first video frame   p50 {video_p50:6.0f} ms  p95 {video_p95:6.0f} ms"
        f"  (goal {VIDEO_GOAL_MS} ms, n={len(r['video'])})"
    )
    print(f"press -> hub's first frame   p50 {pct(r['hub'], 50):6.0f} ms")
    print(f"took {time.monotonic() - started:.1f} s")
    print(
        json.dumps(
            {
                "bench": "console",
                "figures": {
                    "alert_page_p50_ms": round(alert_p50, 1),
                    "alert_page_p95_ms": round(alert_p95, 1),
                    "video_first_frame_p50_ms": round(video_p50, 1),
                    "video_first_frame_p95_ms": round(video_p95, 1),
                    "alerts": len(r["page"]),
                    "videos": len(r["video"]),
                    "alert_goal_ms": ALERT_GOAL_MS,
                    "video_goal_ms": VIDEO_GOAL_MS,
                },
                "baseline": {
                    "press_to_receiver_p50_ms": round(arrive_p50, 1),
                    "press_to_receiver_p95_ms": round(arrive_p95, 1),
                    "press_to_hub_first_frame_p50_ms": round(pct(r["hub"], 50), 1),
                },
                # what the console and the browser add on top of the webhook's arrival
                "ratio": round(alert_p50 / arrive_p50, 3) if arrive_p50 else None,
            }
        )
    )


if __name__ == "__main__":
    main()
