"""Any viewer on any instance: two gateway instances share one store; the device streams to
one, and a WHEP viewer on either sees its video (the other relays it), hears the door and,
with talk-back, is heard at the door."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from video_rig import (
    DEVICE,
    Rig,
    Watcher,
    eventually,
    listen,
    loudness,
    rig,
    viewer_with_microphone,
)

from ansimi.broker import free_port
from device.hal.audio import FakeAudioOutput, FakeMicrophone
from device.video.config import VideoConfig as DeviceVideo
from gateway.store import SqliteStore
from gateway.video import audit
from gateway.video.config import VideoConfig
from gateway.video.hub import VideoHub
from gateway.video.whep import bearer, whep_app
from protocol.jws import Signer
from protocol.keys import generate_key

TOKEN = "viewer-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
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


@dataclass
class TwoInstances:
    a: Rig  # the device streams to A
    hub_b: VideoHub
    store_b: SqliteStore
    url_a: str
    url_b: str


@contextlib.asynccontextmanager
async def two_instances(tmp_path: Path, **device: Any) -> AsyncIterator[TwoInstances]:
    """A (the rig's hub, holding the stream once started) and B, each serving WHEP, one
    store; `device` goes to the rig (the device's video config, speaker, microphone)."""
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
    try:
        async with (
            rig(tmp_path, gateway=config_a, holders=store_a, **device) as r,
            serve(r.hub, port_a),
            serve(hub_b, port_b),
        ):
            r.command("video_start")
            # the hub lists the stream before its claim is written: wait for the claim
            await eventually(lambda: store_b.database.stream_holder(DEVICE) == url_a)
            yield TwoInstances(r, hub_b, store_b, url_a, url_b)
    finally:
        await hub_b.close()
        await store_a.close()
        await store_b.close()


async def post_offer(base: str, offer: str, **headers: str) -> tuple[str, str]:
    """A WHEP offer to `base`: (the answer, its Location)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/whep/{DEVICE}",
            data=offer,
            headers={"Content-Type": "application/sdp", **AUTH, **headers},
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        return await resp.text(), resp.headers["Location"]


async def watch(base: str) -> tuple[Watcher, str]:
    watcher = Watcher()
    answer, location = await post_offer(base, await watcher.offer())
    await watcher.answer(answer)
    return watcher, location


async def with_microphone(base: str, **headers: str) -> tuple[RTCPeerConnection, str]:
    """A viewer whose microphone sends a tone, connected through `base`."""
    pc, offer = await viewer_with_microphone()
    answer, location = await post_offer(base, offer, **headers)
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return pc, location


async def press(url: str, on: bool = True) -> int:
    body = {"on": on, "operator": "kim", "reason": "warn the visitor"}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=AUTH) as resp:
        return resp.status


async def test_a_viewer_on_either_instance_sees_the_stream(tmp_path: Path) -> None:
    viewers: list[Watcher] = []
    try:
        async with two_instances(tmp_path) as two:
            on_a, _ = await watch(two.url_a)
            on_b, location_b = await watch(two.url_b)
            viewers += [on_a, on_b]
            await eventually(lambda: on_a.frames >= 3, timeout_s=FIRST_FRAME_S)
            await eventually(lambda: on_b.frames >= 3, timeout_s=FIRST_FRAME_S)
            # B relays: one upstream viewer on A, B's own viewer on B; B records nothing
            assert two.hub_b.streams[DEVICE].relayed_from is not None
            assert two.a.hub.stats()["viewers"] == 2 and two.hub_b.stats()["viewers"] == 1
            # this device has talk-back off: the holder says so, through the relay too
            assert await press(f"{two.url_b}{location_b}/talk") == 409
            assert audit.read(tmp_path / "a") == audit.read(tmp_path / "b") == []
            # the last viewer on B leaving ends the relay and its upstream session on A
            async with (
                aiohttp.ClientSession() as http,
                http.delete(f"{two.url_b}{location_b}", headers=AUTH) as resp,
            ):
                assert resp.status == 200
            assert DEVICE not in two.hub_b.streams
            await eventually(lambda: two.a.hub.stats()["viewers"] == 1)
            # the device's stream ends: the claim goes with it
            two.a.command("video_stop")
            await eventually(lambda: two.store_b.database.stream_holder(DEVICE) is None)
            assert not list((tmp_path / "b").glob("**/*.enc"))
    finally:
        for viewer in viewers:
            await viewer.close()


async def test_an_operator_on_the_instance_without_the_stream_talks_to_the_door(
    tmp_path: Path,
) -> None:
    speaker = FakeAudioOutput()
    device = DeviceVideo(talkback=True)
    async with two_instances(tmp_path, device=device, speaker=speaker) as two:
        pc, location = await with_microphone(two.url_b)
        try:
            assert two.hub_b.streams[DEVICE].relayed_from is not None
            # until the press the door hears nothing
            await eventually(lambda: len(speaker.played) >= 25, timeout_s=10)
            assert max(loudness(p) for p in speaker.played) == 0.0
            assert await press(f"{two.url_b}{location}/talk") == 200
            await eventually(lambda: any(loudness(p) > 1000 for p in speaker.played), timeout_s=10)
            # audited where the operator pressed and where the device's stream is
            for instance in ("a", "b"):
                (entry,) = audit.read(tmp_path / instance)
                assert (entry["action"], entry["operator"]) == ("talkback", "kim")
                assert entry["device"] == DEVICE and entry["reason"] == "warn the visitor"
        finally:
            await pc.close()


async def test_the_door_is_heard_on_the_instance_without_the_stream(tmp_path: Path) -> None:
    heard: list[float] = []
    device = DeviceVideo(microphone=True)
    async with two_instances(tmp_path, device=device, microphone=FakeMicrophone()) as two:
        await eventually(lambda: two.a.hub.streams[DEVICE].door_audio)
        pc, _ = await with_microphone(two.url_b, **{"X-Ansimi-Operator": "kim"})
        listening = [
            asyncio.ensure_future(listen(r.track, heard))
            for r in pc.getReceivers()
            if r.track.kind == "audio"
        ]
        try:
            await eventually(lambda: sum(1 for x in heard if x > 1000) >= 10, timeout_s=10)
            # who listens is audited on both instances
            for instance in ("a", "b"):
                (entry,) = audit.read(tmp_path / instance)
                assert (entry["action"], entry["operator"]) == ("listen", "kim")
        finally:
            await pc.close()
            for task in listening:
                task.cancel()


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
