"""The real gateway process hears the bells again after mosquitto restarts with its
persistence (#13 finding 1): the broker brings the gateway's session back but not the
delivery of its shared subscription, unless the gateway's session subscribes again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ansimi_testkit import centre, eventually
from gw_itkit import Fleet, GatewayProcess, agents_running, centre_alerts

from ansimi.broker import Mosquitto, MosquittoConfig, free_port


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_the_gateway_hears_bells_again_after_the_broker_restarts_after_an_autosave(
    tmp_path: Path, stop: str
) -> None:
    broker = Mosquitto(MosquittoConfig(state_dir=tmp_path / "broker", autosave_interval_s=1))
    broker.start()
    fleet = Fleet.create(tmp_path, broker, 4)
    before, after = fleet.agents[:2], fleet.agents[2:]
    port = free_port()
    gateway: GatewayProcess | None = None
    try:
        async with centre(tmp_path) as (_receiver, url), agents_running(fleet):
            # the default shared group: `$share/gateways/...`, what mosquitto forgets
            gateway = GatewayProcess(fleet.write_config("gw-a", url, port), port)
            gateway.start()
            await gateway.ready()
            fleet.press_all(before)
            await eventually(lambda: len(centre_alerts(tmp_path)) == len(before))
            heard_at = time.time()
            db = broker.config.state_dir / "mosquitto.db"
            # after an autosave that holds the gateway's session and subscription
            await eventually(lambda: db.exists() and db.stat().st_mtime > heard_at, timeout_s=15)
            if stop == "sigterm":
                broker.stop()
            else:
                broker.kill()
            broker.start()
            fleet.press_all(after)
            await eventually(lambda: len(centre_alerts(tmp_path)) == len(fleet.agents), 30)
    finally:
        if gateway is not None:
            gateway.stop()
        broker.stop()
    assert gateway is not None
    assert "Traceback" not in gateway.log.read_text()
