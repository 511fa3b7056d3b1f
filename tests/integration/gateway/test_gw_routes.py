"""No alert waits for nobody: what a centre refuses becomes visible and is sent again once
fixed; what was kept for a centre that no longer exists goes to the centres now in force."""

from __future__ import annotations

from pathlib import Path

import pytest
from ansimi_testkit import eventually
from trust_kit import (
    alert,
    bell,
    console_centre,
    gateway_config,
    new_gateway,
    register,
    running_gateway,
)

from ansimi.broker import Mosquitto, free_port
from protocol.jws import Signer
from protocol.keys import generate_key

DEVICE = "bell-route-01"


async def test_an_alert_kept_for_a_centre_since_renamed_is_delivered_after_the_restart(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    device = Signer(DEVICE, generate_key())
    before = new_gateway(gateway_config(tmp_path, mosquitto, port, name="old-central"))
    await register(before, DEVICE, device.public_key)
    alert_id, token = alert(DEVICE, device, 1)
    async with bell(mosquitto, DEVICE, before.signer.public_key) as the_bell:
        async with running_gateway(before):
            await the_bell.publish("alert", token)
            await eventually(lambda: the_bell.stage("received") == {alert_id})
        # the installer renames the centre (its deliveries were made for the old name)
        after = new_gateway(gateway_config(tmp_path, mosquitto, port), before.signer)
        async with console_centre(tmp_path, after, port) as receiver, running_gateway(after):
            await eventually(lambda: the_bell.stage("delivered") == {alert_id})
            assert receiver.events.ids() == [alert_id]
    # the old name's delivery is kept, and the log says nobody will send it
    assert "centres no longer in the config: old-central (1)" in caplog.text


async def test_a_refused_delivery_is_parked_visible_and_delivered_after_the_fix(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    port = free_port()
    device = Signer(DEVICE, generate_key())
    wrong = new_gateway(gateway_config(tmp_path, mosquitto, port, secret="not-the-centres-secret"))
    await register(wrong, DEVICE, device.public_key)
    alert_id, token = alert(DEVICE, device, 1)
    async with (
        bell(mosquitto, DEVICE, wrong.signer.public_key) as the_bell,
        console_centre(tmp_path, wrong, port) as receiver,
    ):
        async with running_gateway(wrong):
            await the_bell.publish("alert", token)
            await eventually(lambda: bool(wrong.store.database.waiting(10, refused=True)))
            (parked,) = wrong.store.database.waiting(10, refused=True)
            assert parked.event_id == alert_id
            assert parked.last_error == "HTTP 401: bad signature"  # the centre's words
            refused = wrong.metrics.registry.get_sample_value(
                "ansimi_forward_refused_total", {"centre": "central"}
            )
            assert refused == 1
            # (that it is not sent again on a timer: test_gw_forward.py, with a fake clock)
        assert the_bell.stage("delivered") == set()
        # the installer fixes the secret and restarts: the parked delivery goes again
        fixed = new_gateway(gateway_config(tmp_path, mosquitto, port), wrong.signer)
        async with running_gateway(fixed):
            await eventually(lambda: the_bell.stage("delivered") == {alert_id})
        assert receiver.events.ids() == [alert_id]
