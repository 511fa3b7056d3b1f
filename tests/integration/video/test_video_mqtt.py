"""Live video over a real mosquitto: signed offer and answer, recording, seal, WHEP viewers."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from pathlib import Path

import aiohttp
import av
import pytest
from video_itkit import DOORBELL, TOKEN, eventually, video_site

from ansimi.broker import Mosquitto
from ansimi.mqtt import Session, Settings
from ansimi.privacy import Keyring, load_keyring
from gateway.store import Device
from gateway.video.config import VideoConfig as GatewayVideo
from gateway.video.encrypted import check, decrypt_to
from gateway.video.evidence import SealBroken, verify_seal
from gateway.video.hub import VideoHub
from protocol.clock import wall_ms
from protocol.envelope import seal
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import Rtc, build_message
from protocol.topics import up_topic

HERE = Path(__file__).resolve().parent


def decoded_frames(path: Path, keyring: Keyring) -> int:
    """Frames decoded from the plaintext of an encrypted recording (complete or not)."""
    plain = io.BytesIO()
    decrypt_to(path, keyring, plain)
    plain.seek(0)
    with av.open(plain, format="mp4") as container:
        return sum(1 for _ in container.decode(video=0))


async def test_video_start_records_relays_to_two_viewers_and_seals(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with video_site(tmp_path, mosquitto.host, mosquitto.port) as site:
        hub = site.gateway.video
        assert hub is not None
        site.command("video_start")
        await eventually(lambda: DOORBELL in hub.streams)
        stream = hub.streams[DOORBELL]
        await eventually(lambda: stream.frames >= 5)
        assert stream.codec == "H264"

        # the API's bearer tokens guard the WHEP route
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{site.api}/whep/{DOORBELL}",
                data="v=0\r\n",
                headers={"Content-Type": "application/sdp", "Authorization": "Bearer wrong"},
            ) as resp,
        ):
            assert resp.status == 401
        (one, _), (two, location) = await site.watch(), await site.watch()
        try:
            await eventually(lambda: one.frames >= 5 and two.frames >= 5)
        finally:
            await one.close()
            async with (
                aiohttp.ClientSession() as http,
                http.delete(
                    f"{site.api}{location}", headers={"Authorization": f"Bearer {TOKEN}"}
                ) as resp,
            ):
                assert resp.status == 200
            await two.close()

        site.command("video_stop")
        await eventually(lambda: len(hub.sealed) == 1)
        (path,) = hub.sealed
        assert decoded_frames(path, site.keyring) > 0
        facts = verify_seal(path, lambda kid: site.gateway_signer.public_key, site.keyring)
        assert facts["device"] == DOORBELL
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
        with pytest.raises(SealBroken):
            verify_seal(path, lambda kid: site.gateway_signer.public_key, site.keyring)


async def test_doorbell_emergency_press_starts_video(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with video_site(tmp_path, mosquitto.host, mosquitto.port) as site:
        hub = site.gateway.video
        assert hub is not None
        site.inputs.press("emergency")
        site.inputs.release("emergency")
        await eventually(lambda: DOORBELL in hub.streams and hub.streams[DOORBELL].frames > 0)
        session = site.agent.video.session if site.agent.video else None
        assert session is not None and session.reason.startswith("emergency")


async def test_offers_from_unknown_or_revoked_devices_never_reach_the_hub(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with video_site(tmp_path, mosquitto.host, mosquitto.port) as site:
        hub = site.gateway.video
        assert hub is not None
        revoked_key = generate_key()
        await site.gateway.store.add_device(
            Device(
                "doorbell-0009", public_key_to_b64(revoked_key.public_key()), "doorbell", "mapo"
            ),
            now_ms=0,
        )
        await site.gateway.store.revoke("doorbell-0009", 0)
        await site.gateway.registry.reload()
        intruder = Session(
            Settings(host=mosquitto.host, port=mosquitto.port, client_id="intruder"),
            lambda m: None,
        )
        runner = asyncio.ensure_future(intruder.run())
        try:
            await intruder.wait_connected(5)
            sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
            for device_id, key in (
                ("doorbell-0404", generate_key()),
                ("doorbell-0009", revoked_key),
            ):
                message = build_message(
                    Rtc(kind="offer", session="intruder-session", sdp=sdp),
                    device=device_id,
                    seq=1,
                    ts=wall_ms(),
                )
                await intruder.publish(
                    up_topic(device_id, "rtc"), seal(message, Signer(device_id, key)).encode()
                )
            rejected = site.gateway.metrics.rejected
            await eventually(
                lambda: (
                    rejected.labels("unknown_device")._value.get() >= 1
                    and rejected.labels("revoked")._value.get() >= 1
                )
            )
            # the doorbell's own stream still works, and the hub never saw the intruders
            site.command("video_start")
            await eventually(lambda: DOORBELL in hub.streams and hub.streams[DOORBELL].frames > 0)
            assert set(hub.streams) == {DOORBELL}
            assert hub.refused == {}
        finally:
            await intruder.close()
            runner.cancel()


async def test_a_killed_recording_stays_decryptable_and_playable(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "video_itkit.py"),
        str(tmp_path),
        str(mosquitto.port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
        # run as a program, the kit finds the shared test kit only through this
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(HERE.parents[1]), os.environ.get("PYTHONPATH")) if p
            ),
        },
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        path = Path(line.decode().strip())
        # a few more fragments on disk (one a second), then a crash with no chance to finish
        size = path.stat().st_size
        await eventually(lambda: path.stat().st_size > size + 3_000, timeout_s=20)
        os.kill(child.pid, signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 5)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == -signal.SIGKILL
    keyring = load_keyring(tmp_path / "gateway" / "privacy.key")
    opened = check(path, keyring)
    assert not opened.complete and opened.chunks >= 2
    assert decoded_frames(path, keyring) > 10
    # the next start seals what the crash left, as far as it reads
    restarted = Signer("gw-test", generate_key())
    hub = VideoHub(
        GatewayVideo(recordings_dir=path.parent.parent),
        lambda device, rtc: None,
        restarted,
        keyring=keyring,
    )
    assert hub.seal_orphans() == [path]
    assert verify_seal(path, lambda kid: restarted.public_key, keyring)["complete"] is False
    assert hub.seal_orphans() == []
