"""No personal data in any log line at any level, over a whole flow.

The flow: an installer seals a bell's SMS numbers (device CLI) and records the home's
address, floor, phones and notes (admin API); the bell's alert goes by SMS through the
real modem driver to a fake modem while the link is down, then reaches the gateway; the
gateway forwards it to a centre that may have the address and to one that may not;
operators read the personal data (one of them refused, by district), move the alert
through its stages, and send a malformed update; a doorbell streams video to the hub and
an operator watches it. Every logger is at DEBUG; everything logged (records, their
arguments, stderr) is searched for the fixture's address, floor, numbers, names and notes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from gw_testkit import ADMIN, ALERT, CENTRAL, GANGNAM, make_env
from gw_testkit import PRIVACY_TOKENS as TOKENS
from video_rig import DEVICE as DOORBELL
from video_rig import Watcher, eventually, rig

from ansimi.config import load_config
from ansimi.privacy import create_key_file
from device.cli import device
from device.config import DeviceConfig
from device.hal.fakes import PtyModem
from device.hal.modem import SerialModem
from device.outbox import Outbox
from device.private import with_sms_numbers
from device.sms import SmsFallback
from gateway.api import Api
from gateway.config import Centre, ForwardConfig, PrivacyConfig
from gateway.forward import Forwarder
from gateway.private import PrivateRoutes, open_vault
from gateway.transports import HttpsCentre, Transport

NAME = "Choi Seoyeon"
GUARDIAN = "Lee Minjun"
ADDRESS = "23 Worldcup-buk-ro 12-gil"
FLOOR = "7F-701"
NOTES = "spare key under the blue pot"
NUMBERS = ["+821077712345", "+821088823456"]
PRIVATE = {
    "address": ADDRESS,
    "floor": FLOOR,
    "phones": [
        {"role": "victim", "name": NAME, "number": NUMBERS[0]},
        {"role": "guardian", "name": GUARDIAN, "number": NUMBERS[1]},
    ],
    "notes": NOTES,
}
# every piece, and the numbers also without their +, as a formatter might print them
NEEDLES = [NAME, GUARDIAN, ADDRESS, "Worldcup", FLOOR, NOTES, *NUMBERS, *(n[1:] for n in NUMBERS)]


def everything_logged(caplog: pytest.LogCaptureFixture, stderr: str) -> str:
    parts = [caplog.text, stderr]
    for record in caplog.records:
        # the raw arguments too: a handler with another format could print them
        parts.append(repr(record.args))
        parts.append(str(record.msg))
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(repr(record.exc_info[1]))
    return "\n".join(parts)


@pytest.fixture(autouse=True)
def debug_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        logging.getLogger(name).setLevel(logging.DEBUG)


async def device_side(tmp_path: Path) -> None:
    """The installer seals the numbers; the bell sends its alert by SMS, link down."""
    state = tmp_path / "device"
    state.mkdir()
    config_path = tmp_path / "device.toml"
    config_path.write_text(
        f'[device]\nid = "bell-0001"\ndata_key_file = "{state / "privacy.key"}"\n'
        f'state_dir = "{state}"\n[sms]\nafter_s = 1.0\n'
    )
    result = CliRunner().invoke(
        device, ["set-sms-numbers", "--config", str(config_path)], input="\n".join(NUMBERS)
    )
    assert result.exit_code == 0, result.output
    assert not [n for n in NEEDLES if n in result.output]
    config = with_sms_numbers(load_config(config_path, DeviceConfig))
    outbox = Outbox(state / "outbox.db")
    outbox.put("alert-0000001", "alert", ALERT.model_dump_json(), 1_000, sms=True)
    async with PtyModem() as pty:
        modem = SerialModem(pty.port, timeout_s=5)
        sms = SmsFallback(config, modem, outbox, clock_ms=lambda: 5_000)
        await sms.check()
        await modem.close()
        outbox.close()
        # it did send to them (a Korean text goes in two concatenated parts to each)
        assert sorted({r.number for r in pty.received}) == NUMBERS


async def video_side(tmp_path: Path) -> None:
    """A doorbell streams on an operator's video_start; a viewer watches; it stops."""
    async with rig(tmp_path) as r:
        r.command("video_start")
        await eventually(lambda: DOORBELL in r.hub.streams)
        await eventually(lambda: r.hub.streams[DOORBELL].frames >= 5)
        watcher = Watcher()
        try:
            viewer = await r.hub.add_viewer(DOORBELL, await watcher.offer())
            await watcher.answer(viewer.answer)
            await eventually(lambda: watcher.frames >= 3)
        finally:
            await watcher.close()
        r.command("video_stop")
        await eventually(lambda: DOORBELL not in r.hub.streams)


async def test_a_whole_flow_at_debug_logs_no_personal_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    await device_side(tmp_path)

    env = await make_env()
    create_key_file(tmp_path / "privacy.key")
    vault = open_vault(env.store, PrivacyConfig(key_file=tmp_path / "privacy.key"))
    api = Api(env.store, env.registry, env.downlink, env.metrics, TOKENS, clock_ms=env.clock)
    api.add_routes(PrivateRoutes(env.store, vault, clock_ms=env.clock).routes())

    received: list[bytes] = []

    async def centre_endpoint(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"ok": True})

    centre_app = web.Application()
    centre_app.router.add_post("/events", centre_endpoint)
    async with (
        TestServer(centre_app) as centre_server,
        TestClient(TestServer(api.app())) as client,
    ):

        async def call(method: str, path: str, token: str, body: object = None) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            kw = {} if body is None else {"json": body}
            async with client.request(method, path, headers=headers, **kw) as response:  # type: ignore[arg-type]
                await response.read()
                return response.status

        assert await call("POST", "/admin/devices/bell-0001/private", ADMIN, PRIVATE) == 200
        bad = {**PRIVATE, "phones": [{"number": f"{NUMBERS[0]} ({NAME})"}]}
        assert await call("POST", "/admin/devices/bell-0001/private", ADMIN, bad) == 400

        # the alert reaches the gateway, which acks it and forwards it to both centres
        await env.feed(env.message(ALERT, "bell-0001", id="alert-0000001"))
        url = f"http://127.0.0.1:{centre_server.port}/events"
        centres = [
            Centre(name="central", url=url, secret="s" * 16, send_address=True),
            Centre(name="mapo", url=url, secret="s" * 16, districts=["mapo"]),
        ]
        transports: dict[str, Transport] = {
            c.name: HttpsCentre(c, ForwardConfig(), env.clock, vault.address_of) for c in centres
        }
        forwarder = Forwarder(
            env.store,
            centres,
            ForwardConfig(),
            env.metrics,
            district_of=lambda _device: "mapo",
            on_first_delivery=lambda d: env.downlink.ack(d.device_id, d.event_id, "delivered"),
            clock_ms=env.clock,
            transports=transports,
        )
        assert await forwarder.pump() == 2
        await forwarder.aclose()
        assert sum(ADDRESS.encode() in body for body in received) == 1  # central's only

        # operators: read the data (one refused by district), move the alert along
        assert await call("GET", "/devices/bell-0001/private", CENTRAL) == 200
        assert await call("GET", "/devices/bell-0001/private", GANGNAM) == 404
        assert await call("GET", "/alerts", CENTRAL) == 200
        assert await call("GET", "/devices", CENTRAL) == 200
        for stage in ("acknowledged", "dispatched", "closed"):
            assert await call("POST", f"/alerts/alert-0000001/{stage}", CENTRAL) == 200

    assert ("bell-0001", "alert-0000001", "closed") in env.acks()
    await video_side(tmp_path)
    logged = everything_logged(caplog, capfd.readouterr().err)
    assert len(caplog.records) > 10  # the flow did log: the check is not vacuous
    assert "SMS fallback for alert alert-0000001: number 2 of 2 sent" in logged
    assert "read the personal data of bell-0001" in logged
    assert any(r.name.startswith(("gateway.video", "device.video")) for r in caplog.records)
    leaked = [needle for needle in NEEDLES if needle in logged]
    assert leaked == []
