"""A rollout end to end: mosquitto, the gateway (API, releases, rollouts) and three real
agents, each started again by a stand-in for systemd and the launcher. A good release is
downloaded from the gateway, installed and committed on every bell; a release whose
self-test fails rolls back on every bell by itself, and the rollout pauses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
from ansimi_testkit import eventually, nowhere_centre, running
from release_kit import make_bundle, release_signer

from ansimi.broker import Mosquitto, free_port
from device.hal.ports import InputEvent
from gateway.config import ApiConfig, ApiToken, GatewayConfig, MqttConfig, UpdatesConfig
from gateway.service import Gateway
from gateway.store import Device
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64
from simulator.updates import UpdatingBell, probe_bundle, running_version, under_systemd

ADMIN = "admin-token-0123456789abc"
OPERATOR = "operator-token-0123456789"
# three bells in CI; the full size by command: ANSIMI_ROLLOUT_BELLS=200 pytest this file
BELLS = tuple(
    f"bell-{n:04d}" for n in range(1, int(os.environ.get("ANSIMI_ROLLOUT_BELLS", "3")) + 1)
)
# waits grow with the fleet: every bell downloads, installs and restarts twice
WAIT_S = 60 + len(BELLS) * 0.5


async def test_a_rollout_updates_a_district_and_a_broken_release_rolls_back_everywhere(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    release = release_signer()
    good = make_bundle(tmp_path / "good", release, "2.0", min_version="1.0")
    bad = probe_bundle(tmp_path / "bad", release, "3.0", min_version="1.0", selftest_fails=True)
    port = free_port()
    gateway_signer = Signer("gw-test", generate_key())
    config = GatewayConfig(
        id="gw-test",
        database=tmp_path / "gateway" / "gateway.db",
        mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port),
        centres=[nowhere_centre()],
        api=ApiConfig(
            enabled=True,
            port=port,
            tokens=[
                ApiToken(name="installer", role="admin", token=ADMIN),
                ApiToken(name="desk", role="operator", token=OPERATOR),
            ],
        ),
        updates=UpdatesConfig(
            release_public_key=public_key_to_b64(release.public_key),
            dir=tmp_path / "gateway" / "releases",
            public_url=f"http://127.0.0.1:{port}",
            # pauses once all three failed: the last one waits for its incident first
            pause_failed_pct=100.0,
        ),
    )
    gateway = Gateway(config, signer=gateway_signer)
    bells = {d: UpdatingBell.at(tmp_path / d, Signer(d, generate_key()), "1.0") for d in BELLS}
    for device_id, bell in bells.items():
        public = public_key_to_b64(bell.signer.public_key)
        await gateway.store.add_device(Device(device_id, public, "bell", "mapo"), now_ms=0)
    await gateway.registry.reload()
    base = f"http://127.0.0.1:{port}"

    async def admin(
        session: aiohttp.ClientSession, method: str, path: str, token: str = ADMIN, **kw: Any
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.request(method, base + path, headers=headers, **kw) as response:
            body = await response.json()
            assert response.status < 300, body
            return body

    broker = (mosquitto.host, mosquitto.port)
    lives = [
        under_systemd(b, broker=broker, gateway=gateway_signer, release_key=release.public_key)
        for b in bells.values()
    ]
    async with running(gateway.run(), *lives), aiohttp.ClientSession() as session:
        await eventually(lambda: gateway.ready.is_set() and gateway.api.port is not None, 15)
        for bundle in (good, bad):
            await admin(session, "POST", "/admin/releases", data=bundle.read_bytes())

        # a good release: on every bell, proven, committed
        await admin(
            session,
            "POST",
            "/admin/rollouts",
            json={"version": "2.0", "district": "mapo", "percent": 100},
        )
        status: dict[str, Any] = {}

        async def rollout_is(state: str) -> bool:
            status.update(await admin(session, "GET", "/admin/rollouts"))
            return status["current"]["state"] == state

        await _until(lambda: rollout_is("done"), WAIT_S)
        assert {p["state"] for p in status["current"]["devices"].values()} == {"installed"}
        await eventually(
            lambda: not any((b.root / "update.json").exists() for b in bells.values()), WAIT_S
        )
        assert {running_version(b.root) for b in bells.values()} == {"2.0"}
        assert all(b.starts == 2 for b in bells.values())  # one restart into 2.0 each

        # a release whose self-test fails, while bell-0001 has an alert open: the others roll
        # back by themselves; bell-0001 is offered nothing until its incident is closed
        first = bells["bell-0001"].agent
        assert first is not None
        first.on_input(InputEvent("emergency", "pressed"))
        first.on_input(InputEvent("emergency", "released", 0.2))
        await eventually(lambda: not first.outbox.pending(), 15)  # kept by the gateway
        await admin(
            session,
            "POST",
            "/admin/rollouts",
            json={"version": "3.0", "district": "mapo", "percent": 100},
        )
        await _until(lambda: _others_are(status, session, admin, "failed"), WAIT_S)
        assert status["current"]["devices"]["bell-0001"]["state"] == "pending"
        assert status["current"]["state"] == "running"
        assert running_version(bells["bell-0001"].root) == "2.0"
        assert bells["bell-0001"].starts == 2
        (alert,) = (await admin(session, "GET", "/alerts", token=OPERATOR))["alerts"]
        assert alert["device_id"] == "bell-0001"  # the press during the rollout arrived
        await admin(session, "POST", f"/alerts/{alert['event_id']}/closed", token=OPERATOR)
        await _until(lambda: rollout_is("paused"), WAIT_S)
        await eventually(
            lambda: all(
                running_version(b.root) == "2.0" and not (b.root / "update.json").exists()
                for b in bells.values()
            ),
            WAIT_S,
        )
        devices = status["current"]["devices"].values()
        assert all(p["state"] == "failed" and "rolled_back" in p["reason"] for p in devices)
        for b in bells.values():
            assert sorted(p.name for p in (b.root / "versions").iterdir()) == ["1.0", "2.0"]
        assert all(b.starts == 4 for b in bells.values())  # into 3.0, and back to 2.0


async def _others_are(
    status: dict[str, Any], session: aiohttp.ClientSession, admin: Any, wanted: str
) -> bool:
    """Every bell but bell-0001 has reached the state `wanted`."""
    status.update(await admin(session, "GET", "/admin/rollouts"))
    devices = status["current"]["devices"]
    return all(devices[d]["state"] == wanted for d in BELLS[1:])


async def _until(check: Any, timeout_s: float) -> None:
    import asyncio

    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.2)
