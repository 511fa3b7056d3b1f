"""The centre gets exactly what the device signed, whoever wrote the device.

A device built on another JOSE library (joserfc here) may leave out the fields our model
has defaults for. The gateway verifies it, keeps it and acks it; the centre, which checks
the device's signature over what it is told, must accept it too.
"""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path

from ansimi_testkit import eventually
from joserfc import jws as jose_jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import OKPKey
from trust_kit import (
    bell,
    console_centre,
    gateway_config,
    new_gateway,
    payload,
    register,
    running_gateway,
)

from ansimi.broker import Mosquitto, free_port

DEVICE = "bell-jose-01"


def jose_token(key: OKPKey, message: bytes) -> str:
    with warnings.catch_warnings():
        # joserfc calls "EdDSA" superseded by "Ed25519" (RFC 9864); our profile still uses it
        warnings.simplefilter("ignore", SecurityWarning)
        return jose_jws.serialize_compact(
            {"alg": "EdDSA", "kid": DEVICE}, message, key, algorithms=["EdDSA"]
        )


async def test_an_alert_without_its_defaulted_fields_reaches_a_real_console(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    key = OKPKey.generate_key("Ed25519")
    port = free_port()
    gateway = new_gateway(gateway_config(tmp_path, mosquitto, port))
    await register(gateway, DEVICE, key.public_key)  # type: ignore[arg-type]
    # no silent, urgent, presses or linked_to: the defaults are the receiver's business
    signed_body = {"trigger": "press", "bell": "emergency"}
    alert_id = uuid.uuid4().hex
    token = jose_token(key, payload(DEVICE, 1, "alert", signed_body, alert_id))
    async with (
        console_centre(tmp_path, gateway, port) as receiver,
        running_gateway(gateway),
        bell(mosquitto, DEVICE, gateway.signer.public_key) as the_bell,
    ):
        await the_bell.publish("alert", token)
        await eventually(lambda: the_bell.stage("delivered") == {alert_id})
        kept = receiver.events.get(alert_id)
        assert kept is not None
        assert kept.body == signed_body  # what the device signed, nothing filled in
        assert kept.jws == token
        assert receiver.refused == 0
        assert the_bell.stage("received") == {alert_id}
