"""An id belongs to one device: a bell cannot cancel, link to or take over another bell's
alert, through the real broker and gateway to a real console."""

from __future__ import annotations

from pathlib import Path

from ansimi_testkit import eventually
from trust_kit import (
    alert,
    bell,
    console_centre,
    gateway_config,
    new_gateway,
    now_ms,
    register,
    running_gateway,
)

from ansimi.broker import Mosquitto, free_port
from gateway.service import Gateway
from protocol.envelope import seal
from protocol.jws import Signer
from protocol.keys import generate_key
from protocol.messages import Alert, Cancel, build_message

VICTIM = "bell-owner-01"
OTHER = "bell-other-01"


def rejected(gateway: Gateway, reason: str) -> float:
    registry = gateway.metrics.registry
    return registry.get_sample_value("ansimi_rejected_total", {"reason": reason}) or 0.0


async def two_bells(tmp_path: Path, mosquitto: Mosquitto) -> tuple[int, Gateway, Signer, Signer]:
    """A gateway (its centre on the port returned) with two bells, each with its own key."""
    port = free_port()
    gateway = new_gateway(gateway_config(tmp_path, mosquitto, port))
    victim, other = Signer(VICTIM, generate_key()), Signer(OTHER, generate_key())
    await register(gateway, VICTIM, victim.public_key)
    await register(gateway, OTHER, other.public_key)
    return port, gateway, victim, other


async def test_one_bell_cannot_cancel_link_to_or_reuse_another_bells_alert(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    port, gateway, victim, other = await two_bells(tmp_path, mosquitto)
    alert_id, token = alert(VICTIM, victim, 1)

    def signed_by_other(body: Alert | Cancel, seq: int, id: str | None = None) -> tuple[str, str]:
        message = build_message(body, device=OTHER, seq=seq, ts=now_ms(), id=id)
        return message.id, seal(message, other)

    cancel_id, cancel = signed_by_other(Cancel(alert_id=alert_id), 1)
    duress = Alert(bell="emergency", trigger="duress", linked_to=alert_id)
    linked_id, linked = signed_by_other(duress, 2)
    _, reused = signed_by_other(Alert(bell="emergency", trigger="press"), 3, id=alert_id)
    async with (
        console_centre(tmp_path, gateway, port) as receiver,
        running_gateway(gateway),
        bell(mosquitto, VICTIM, gateway.signer.public_key) as victims_bell,
        bell(mosquitto, OTHER, gateway.signer.public_key) as others_bell,
    ):
        await victims_bell.publish("alert", token)
        await eventually(lambda: victims_bell.stage("delivered") == {alert_id})
        await others_bell.publish("cancel", cancel)
        await others_bell.publish("alert", linked)
        await others_bell.publish("alert", reused)
        await eventually(lambda: rejected(gateway, "foreign_ref") == 2)
        await eventually(lambda: rejected(gateway, "foreign_id") == 1)
        # the owner's own cancel still goes through, after the others' in the same queue
        own_cancel = build_message(Cancel(alert_id=alert_id), device=VICTIM, seq=2, ts=now_ms())
        await victims_bell.publish("cancel", seal(own_cancel, victim))
        await eventually(lambda: receiver.events.get(own_cancel.id) is not None)
        assert others_bell.acks == []  # nothing acked: not kept, not forwarded
        assert receiver.events.ids() == [alert_id, own_cancel.id]
        kept = gateway.store.database.event(alert_id)
        assert kept is not None and kept.device_id == VICTIM
        for event_id in (cancel_id, linked_id):
            assert gateway.store.database.event(event_id) is None
        assert receiver.refused == 0


async def test_an_id_named_by_a_cancel_that_overtook_its_alert_stays_its_bells(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    port, gateway, victim, other = await two_bells(tmp_path, mosquitto)
    # the bell's cancel reaches the gateway before the alert it names has been kept
    alert_id, token = alert(VICTIM, victim, 2)
    early = build_message(Cancel(alert_id=alert_id), device=VICTIM, seq=1, ts=now_ms())
    press = Alert(bell="emergency", trigger="press")
    taken = build_message(press, device=OTHER, seq=1, ts=now_ms(), id=alert_id)
    async with (
        console_centre(tmp_path, gateway, port) as receiver,
        running_gateway(gateway),
        bell(mosquitto, VICTIM, gateway.signer.public_key) as victims_bell,
        bell(mosquitto, OTHER, gateway.signer.public_key) as others_bell,
    ):
        await victims_bell.publish("cancel", seal(early, victim))
        await eventually(lambda: receiver.events.get(early.id) is not None)
        await others_bell.publish("alert", seal(taken, other))
        await eventually(lambda: rejected(gateway, "foreign_id") == 1)
        await victims_bell.publish("alert", token)
        await eventually(lambda: victims_bell.stage("delivered") == {alert_id})
        assert others_bell.acks == []
        assert receiver.events.ids() == [early.id, alert_id]
        kept = receiver.events.get(alert_id)
        assert kept is not None and kept.device_id == VICTIM
