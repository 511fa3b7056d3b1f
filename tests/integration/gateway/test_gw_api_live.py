"""The operator path end to end: a press reaches the centre, an operator acknowledges,
dispatches and closes it over the gateway's HTTP API, and the bell shows each stage."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from ansimi_testkit import centre, eventually
from gw_itkit import TOKEN, Fleet, agents_running, centre_alerts, gateway_running

from ansimi.broker import Mosquitto
from device.hal.fakes import FakeIndicator
from device.hal.ports import Pattern


async def test_operator_stages_reach_the_bell(tmp_path: Path, mosquitto: Mosquitto) -> None:
    fleet = Fleet.create(tmp_path, mosquitto, 1)
    (agent,) = fleet.agents
    indicator = agent.hardware.indicator
    assert isinstance(indicator, FakeIndicator)
    async with (
        centre(tmp_path) as (_receiver, url),
        gateway_running(fleet.config("gw-a", url)) as gateway,
        agents_running(fleet),
        aiohttp.ClientSession() as http,
    ):
        await eventually(lambda: gateway.api.port is not None)
        base = f"http://127.0.0.1:{gateway.api.port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        fleet.press_all()
        await eventually(lambda: len(centre_alerts(tmp_path)) == 1)
        ((event_id, _),) = centre_alerts(tmp_path)
        await eventually(lambda: indicator.history[-1][0] == Pattern.DELIVERED)

        for stage, shown in (
            ("acknowledged", Pattern.ACKNOWLEDGED),
            ("dispatched", Pattern.DISPATCHED),
            ("closed", Pattern.OFF),
        ):
            async with http.post(f"{base}/alerts/{event_id}/{stage}", headers=auth) as r:
                assert r.status == 200
                assert (await r.json())["state"] == stage
            await eventually(
                lambda shown=shown: indicator.history[-1][0] == shown  # type: ignore[misc]
            )
        async with http.post(f"{base}/alerts/{event_id}/closed") as r:
            assert r.status == 401  # and nobody without a token
