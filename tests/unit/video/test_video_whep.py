"""WHEP over real HTTP on loopback: a viewer posts an offer and gets the device's video."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from video_rig import DEVICE, Rig, Watcher, eventually, rig

from ansimi.broker import free_port
from gateway.video.whep import bearer, whep_app

TOKEN = "viewer-token-for-tests"
SDP = {"Content-Type": "application/sdp"}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Rig, str]]:
    async with rig(tmp_path) as r:
        runner = web.AppRunner(whep_app(r.hub, bearer([TOKEN])))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield r, f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


async def test_whep_viewer_gets_frames_and_can_leave(served: tuple[Rig, str]) -> None:
    r, base = served
    r.command("video_start")
    await eventually(lambda: DEVICE in r.hub.streams)
    w = Watcher()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/whep/{DEVICE}", data=await w.offer(), headers={**SDP, **auth}
            ) as resp:
                assert resp.status == 201
                assert resp.content_type == "application/sdp"
                location = resp.headers["Location"]
                await w.answer(await resp.text())
            await eventually(lambda: w.frames >= 3)
            assert r.hub.stats()["viewers"] == 1
            async with http.delete(f"{base}{location}", headers=auth) as resp:
                assert resp.status == 200
            assert r.hub.stats()["viewers"] == 0
            async with http.delete(f"{base}{location}", headers=auth) as resp:
                assert resp.status == 404
    finally:
        await w.close()


async def test_whep_errors(served: tuple[Rig, str]) -> None:
    r, base = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    w = Watcher()
    try:
        offer = await w.offer()
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                async with http.post(
                    f"{base}/whep/{DEVICE}", data=offer, headers={**SDP, **headers}
                ) as resp:
                    assert resp.status == 401
                    assert resp.headers["WWW-Authenticate"] == "Bearer"
            async with http.post(
                f"{base}/whep/{DEVICE}", data=offer, headers={**SDP, **auth}
            ) as resp:
                assert resp.status == 404
                assert "not streaming" in await resp.text()
            r.command("video_start")
            await eventually(lambda: DEVICE in r.hub.streams)
            async with http.post(
                f"{base}/whep/{DEVICE}", data=offer, headers={"Content-Type": "text/plain", **auth}
            ) as resp:
                assert resp.status == 415
            async with http.post(
                f"{base}/whep/{DEVICE}", data="v=0\r\ngarbage", headers={**SDP, **auth}
            ) as resp:
                assert resp.status == 400
            async with http.post(
                f"{base}/whep/NOT_AN_ID", data=offer, headers={**SDP, **auth}
            ) as resp:
                assert resp.status == 404
            # none of that disturbed the stream
            stream = r.hub.streams[DEVICE]
            before = stream.frames
            await eventually(lambda: stream.frames > before + 3)
            assert r.hub.stats()["viewers"] == 0
    finally:
        await w.close()
