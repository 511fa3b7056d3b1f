"""Any viewer on any instance: two gateway instances share one store; the device streams to
one, and a WHEP viewer on either sees its video (the other relays it) and, with talk-back,
is heard at the door."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from aiortc import RTCSessionDescription
from video_rig import DEVICE, Watcher, eventually, loudness, rig, viewer_with_microphone

from ansimi.broker import free_port
from device.hal.audio import FakeAudioOutput
from device.video.config import VideoConfig as DeviceVideo
from gateway.store import SqliteStore
from gateway.video import audit
from gateway.video.config import VideoConfig
from gateway.video.hub import VideoHub
from gateway.video.whep import bearer, whep_app
from protocol.jws import Signer
from protocol.keys import generate_key

TOKEN = "viewer-token-for-tests"
FIRST_FRAME_S = 10.0  # one bound for a viewer on either instance


@contextlib.asynccontextmanager
async def serve(hub: VideoHub, port: int) -> AsyncIterator[str]:
    runner = web.AppRunner(whep_app(hub, bearer([TOKEN])))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def watch(base: str) -> tuple[Watcher, str]:
    watcher = Watcher()
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/whep/{DEVICE}", data=await watcher.offer(), headers=headers) as resp,
    ):
        assert resp.status == 201, await resp.text()
        await watcher.answer(await resp.text())
        return watcher, resp.headers["Location"]


async def test_a_viewer_on_either_instance_sees_the_stream(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    store_a, store_b = SqliteStore(db), SqliteStore(db)  # two instances, one shared store
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    config_a = VideoConfig(recordings_dir=tmp_path / "a", public_url=url_a, watch_report_s=0.2)
    hub_b = VideoHub(
        VideoConfig(recordings_dir=tmp_path / "b", public_url=url_b, loopback_candidates=True),
        lambda device, rtc: None,
        Signer("gw-test", generate_key()),
        holders=store_b,
    )
    viewers: list[Watcher] = []
    try:
        async with (
            rig(tmp_path, gateway=config_a, holders=store_a) as r,
            serve(r.hub, port_a),
            serve(hub_b, port_b),
        ):
            r.command("video_start")
            # the hub lists the stream before its claim is written: wait for the claim
            await eventually(lambda: store_b.database.stream_holder(DEVICE) == url_a)
            on_a, _ = await watch(url_a)
            on_b, location_b = await watch(url_b)
            viewers += [on_a, on_b]
            await eventually(lambda: on_a.frames >= 3, timeout_s=FIRST_FRAME_S)
            await eventually(lambda: on_b.frames >= 3, timeout_s=FIRST_FRAME_S)
            # B relays: one upstream viewer on A, B's own viewer on B; B records nothing
            assert hub_b.streams[DEVICE].relayed_from is not None
            assert r.hub.stats()["viewers"] == 2 and hub_b.stats()["viewers"] == 1
            # this device has talk-back off: the holder says so, through the relay too
            press = {"on": True, "operator": "kim", "reason": "warn"}
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{url_b}{location_b}/talk",
                    json=press,
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as resp,
            ):
                assert resp.status == 409
            assert audit.read(tmp_path / "a") == audit.read(tmp_path / "b") == []
            # the last viewer on B leaving ends the relay and its upstream session on A
            async with (
                aiohttp.ClientSession() as http,
                http.delete(
                    f"{url_b}{location_b}", headers={"Authorization": f"Bearer {TOKEN}"}
                ) as resp,
            ):
                assert resp.status == 200
            assert DEVICE not in hub_b.streams
            await eventually(lambda: r.hub.stats()["viewers"] == 1)
            # the device's stream ends: the claim goes with it
            r.command("video_stop")
            await eventually(lambda: store_b.database.stream_holder(DEVICE) is None)
            assert not list((tmp_path / "b").glob("**/*.enc"))
    finally:
        for viewer in viewers:
            await viewer.close()
        await hub_b.close()
        await store_a.close()
        await store_b.close()


async def test_an_operator_on_the_instance_without_the_stream_talks_to_the_door(
    tmp_path: Path,
) -> None:
    db = tmp_path / "gateway.db"
    store_a, store_b = SqliteStore(db), SqliteStore(db)
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    config_a = VideoConfig(recordings_dir=tmp_path / "a", public_url=url_a, watch_report_s=0.2)
    hub_b = VideoHub(
        VideoConfig(recordings_dir=tmp_path / "b", public_url=url_b, loopback_candidates=True),
        lambda device, rtc: None,
        Signer("gw-test", generate_key()),
        holders=store_b,
    )
    speaker = FakeAudioOutput()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    pc, offer = await viewer_with_microphone()
    try:
        async with (
            rig(
                tmp_path,
                device=DeviceVideo(talkback=True),
                gateway=config_a,
                holders=store_a,
                speaker=speaker,
            ) as r,
            serve(r.hub, port_a),
            serve(hub_b, port_b),
            aiohttp.ClientSession() as http,
        ):
            r.command("video_start")
            await eventually(lambda: store_b.database.stream_holder(DEVICE) == url_a)
            headers = {"Content-Type": "application/sdp", **auth}
            async with http.post(f"{url_b}/whep/{DEVICE}", data=offer, headers=headers) as resp:
                assert resp.status == 201, await resp.text()
                answer, location = await resp.text(), resp.headers["Location"]
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            assert hub_b.streams[DEVICE].relayed_from is not None
            # until the press the door hears nothing
            await eventually(lambda: len(speaker.played) >= 25, timeout_s=10)
            assert max(loudness(p) for p in speaker.played) == 0.0
            press = {"on": True, "operator": "kim", "reason": "warn the visitor"}
            async with http.post(f"{url_b}{location}/talk", json=press, headers=auth) as resp:
                assert resp.status == 200, await resp.text()
            await eventually(lambda: any(loudness(p) > 1000 for p in speaker.played), timeout_s=10)
            # audited where the operator pressed and where the device's stream is
            for instance in ("a", "b"):
                (entry,) = audit.read(tmp_path / instance)
                assert (entry["action"], entry["operator"]) == ("talkback", "kim")
                assert entry["device"] == DEVICE and entry["reason"] == "warn the visitor"
    finally:
        await pc.close()
        await hub_b.close()
        await store_a.close()
        await store_b.close()


async def test_a_claim_left_by_a_dead_instance_is_cleared_at_its_restart(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "gateway.db")
    await store.claim_stream(DEVICE, "http://127.0.0.1:1", "s-1", now_ms=0)
    hub = VideoHub(
        VideoConfig(recordings_dir=tmp_path, public_url="http://127.0.0.1:1/"),
        lambda device, rtc: None,
        Signer("gw-test", generate_key()),
        holders=store,
    )
    running = asyncio.create_task(hub.run())
    try:
        await eventually(lambda: store.database.stream_holder(DEVICE) is None)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await store.close()
