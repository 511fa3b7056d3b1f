"""Incidents with the real gateway process: a bell's presses are one incident, nobody
acknowledges it, and the gateway escalates it by itself, also after being SIGKILLed."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ansimi_testkit import centre, eventually
from gw_itkit import TOKEN, Fleet, GatewayProcess, agents_running, centre_alerts
from pg_testkit import PgServer

from ansimi.broker import Mosquitto, free_port
from device.hal.fakes import FakeIndicator
from device.hal.ports import Pattern


def centre_escalations(tmp_path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(tmp_path / "centre.db")) as db:
        rows = db.execute("SELECT event_id FROM events WHERE type = 'escalation'")
        return [str(r[0]) for r in rows]


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_an_unacknowledged_incident_escalates_in_the_gateway(
    tmp_path: Path, mosquitto: Mosquitto, engine: str, request: pytest.FixtureRequest
) -> None:
    fleet = Fleet.create(tmp_path, mosquitto, 1)
    if engine == "postgresql":
        server: PgServer = request.getfixturevalue("postgres")
        await fleet.move_to(server.new_database())
    (agent,) = fleet.agents
    indicator = agent.hardware.indicator
    assert isinstance(indicator, FakeIndicator)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        centre(tmp_path) as (_receiver, url),
        agents_running(fleet),
        aiohttp.ClientSession() as http,
    ):
        api_port = free_port()
        config = fleet.write_config("gw-a", url, api_port)
        # two steps, both to the one centre here, 2 s apart
        config.write_text(
            config.read_text()
            + '[incidents]\nescalation = ["central", "central"]\n'
            + "escalate_after_s = { default = 2.0 }\n"
        )
        gateway = GatewayProcess(config, api_port)
        base = f"http://127.0.0.1:{api_port}"

        async def incidents() -> list[dict[str, Any]]:
            async with http.get(f"{base}/incidents", headers=auth) as r:
                assert r.status == 200
                return list((await r.json())["incidents"])

        gateway.start()
        try:
            await gateway.ready()
            fleet.press_all()
            await eventually(lambda: len(centre_alerts(tmp_path)) == 1)
            fleet.press_all()
            await eventually(lambda: len(centre_alerts(tmp_path)) == 2)
            (incident,) = await incidents()
            assert incident["events"] == 2  # two presses, one incident
            await eventually(lambda: len(centre_escalations(tmp_path)) >= 1)
            # a crash between the steps: the restarted gateway takes the second, once
            gateway.kill()
            gateway.start()
            await gateway.ready()
            await eventually(lambda: len(centre_escalations(tmp_path)) == 2)
            # the restarted process took the second step itself
            assert 'ansimi_incident_escalations_total{centre="central"} 1.0' in (
                gateway.metrics_text()
            )
            (incident,) = await incidents()
            assert (incident["escalation_level"], incident["escalated_to"]) == (
                2,
                ["central", "central"],
            )
            # acknowledged over the incident: the bell shows it
            path = f"{base}/incidents/{incident['id']}/acknowledged"
            async with http.post(path, headers=auth) as r:
                assert r.status == 200
            await eventually(lambda: indicator.history[-1][0] == Pattern.ACKNOWLEDGED)
        finally:
            gateway.stop()
    assert len(centre_escalations(tmp_path)) == 2
