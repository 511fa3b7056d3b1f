"""Playback on the desk: an alert's recordings and timeline, its districts only, every
playback audited with operator and reason, the video byte-exact as recorded."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from test_video_recorder import encoded_clip

from ansimi.privacy import DataKey, Keyring
from gateway.api import Api
from gateway.config import ApiToken
from gateway.downlink import Downlink
from gateway.intake import Registry
from gateway.metrics import Metrics
from gateway.store import Device, Incoming, SqliteDatabase, SqliteStore
from gateway.video import audit
from gateway.video.encrypted import decrypt_to
from gateway.video.evidence import seal_recording
from gateway.video.playback import Playback, api_routes
from gateway.video.recorder import Recorder
from protocol.jws import Signer
from protocol.keys import generate_key

DOORBELL = "doorbell-0001"  # in mapo
EVENT = "0f8fad5bd9cb469fa16570867728950e"
MAPO = "mapo-desk-token-01234567"
GANGNAM = "gangnam-desk-token-0123"
TOKENS = [
    ApiToken(name="mapo-desk", role="operator", token=MAPO, districts=["mapo"]),
    ApiToken(name="gangnam-desk", role="operator", token=GANGNAM, districts=["gangnam"]),
]
SIGNER = Signer("gw-test", generate_key())
KEYRING = Keyring([DataKey.generate()])

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[tuple[Client, Path, str]]:
    now = time.time()
    database = SqliteDatabase(":memory:")
    database.add_device(Device(DOORBELL, "k" * 43, "doorbell", "mapo"), now_ms=0)
    database.add_event(
        Incoming(EVENT, DOORBELL, 1, "alert", int(now * 1000), "{}", "a.b.c", ()), now_ms=0
    )
    database.set_stage(EVENT, "acknowledged", int(now * 1000) + 4000, "mapo-desk")
    recorder = Recorder(tmp_path / DOORBELL / "rec", KEYRING)
    for frame in await encoded_clip("H264", 30):
        recorder.write(frame)
    path = recorder.close()
    assert path is not None
    seal_recording(path, SIGNER, KEYRING, device=DOORBELL, started=now - 2, ended=now + 2)
    plain = path.with_name("plain")
    with plain.open("wb") as f:
        decrypt_to(path, KEYRING, f)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    plain.unlink()

    async def publish(topic: str, payload: bytes) -> None:
        return None

    store = SqliteStore(database)  # the gateway's async store over it
    api = Api(store, Registry(store), Downlink(SIGNER, publish), Metrics(), TOKENS)
    playback = Playback(tmp_path, KEYRING, lambda kid: SIGNER.public_key, store.event, store.stages)
    api.add_routes(api_routes(playback))
    async with TestClient(TestServer(api.app())) as client:
        yield client, tmp_path, digest
    await store.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_desk_lists_recordings_and_timeline(desk: tuple[Client, Path, str]) -> None:
    client, _, _ = desk
    async with client.get(f"/video/events/{EVENT}/recordings", headers=auth(MAPO)) as resp:
        assert resp.status == 200
        body = await resp.json()
    (recording,) = body["recordings"]
    assert recording["complete"] and recording["codec"] == "H264"
    assert [t["what"] for t in body["timeline"]] == ["alert", "acknowledged"]


async def test_playback_is_audited_and_byte_exact(desk: tuple[Client, Path, str]) -> None:
    client, root, digest = desk
    query = {"operator": "kim", "reason": "review of the press"}
    url = f"/video/events/{EVENT}/play"
    async with client.get(url, params=query, headers=auth(MAPO)) as resp:
        assert resp.status == 200 and resp.content_type == "video/mp4"
        assert hashlib.sha256(await resp.read()).hexdigest() == digest
    (entry,) = audit.read(root)
    assert entry["action"] == "playback" and entry["operator"] == "kim"
    assert entry["token"] == "mapo-desk" and entry["event"] == EVENT


async def test_no_reason_no_video(desk: tuple[Client, Path, str]) -> None:
    client, root, _ = desk
    url = f"/video/events/{EVENT}/play"
    async with client.get(url, params={"operator": "kim"}, headers=auth(MAPO)) as resp:
        assert resp.status == 400
    assert audit.read(root) == []


async def test_another_district_sees_nothing(desk: tuple[Client, Path, str]) -> None:
    client, root, _ = desk
    query = {"operator": "lee", "reason": "curious"}
    for url in (f"/video/events/{EVENT}/recordings", f"/video/events/{EVENT}/play"):
        async with client.get(url, params=query, headers=auth(GANGNAM)) as resp:
            assert resp.status == 404
    assert audit.read(root) == []
