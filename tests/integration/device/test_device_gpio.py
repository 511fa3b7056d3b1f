"""The agent on the real gpiozero adapters, its pins driven through gpiozero's MockFactory.

Buttons are pressed by driving mock pins; `when_held` fires on gpiozero's own thread, so
every wait is on observable state with a bound. Acks come from the test, signed with the
gateway's key, over a real mosquitto. Hold lengths are short, and each test spaces its
thresholds so that a slow, shared machine cannot turn one gesture into the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ansimi_testkit import eventually
from device_testkit import DEVICE_ID, WAIT_S, Keys, Spy, down_token, running, spying
from gpiozero.pins.mock import MockFactory, MockPWMPin

from ansimi.broker import Mosquitto
from ansimi.mqtt import Session
from device.agent import Agent
from device.behaviour import State
from device.config import DeviceConfig
from device.hal import build_hardware
from device.hal.config import HardwareConfig
from device.hal.ports import Pattern
from protocol.keys import public_key_to_b64
from protocol.messages import Ack, AckStage, AlertMessage, CancelMessage
from protocol.topics import down_topic

BUTTON, LED, BUZZER, DISCREET = 17, 24, 18, 12


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    factory = MockFactory(pin_class=MockPWMPin)  # PWM for the discreet LED
    yield factory
    factory.close()
    factory.reset()


@dataclass
class Rig:
    agent: Agent
    factory: MockFactory
    spy: Spy
    session: Session
    keys: Keys

    def pin(self, number: int) -> MockPWMPin:
        pin: MockPWMPin = self.factory.pin(number)
        return pin

    def down(self) -> None:
        self.pin(BUTTON).drive_low()  # pull-up: pressed pulls the pin to ground

    def up(self) -> None:
        self.pin(BUTTON).drive_high()

    def tap(self) -> None:
        self.down()
        self.up()

    def alerts(self) -> list[AlertMessage]:
        return [m for m in self.spy.of_type("alert") if isinstance(m, AlertMessage)]

    def alert_ids(self) -> list[str]:
        # resends repeat ids; the order of first sight is the order of sending
        return list(dict.fromkeys(m.id for m in self.alerts()))

    async def next_alert(self, before: int) -> AlertMessage:
        await eventually(lambda: len(self.alert_ids()) > before)
        wanted = self.alert_ids()[before]
        return next(m for m in self.alerts() if m.id == wanted)

    async def ack(self, ref: str, stage: AckStage) -> None:
        token = down_token(self.keys.gateway, Ack(ref=ref, stage=stage), time.time_ns() // 1000)
        await self.session.publish(down_topic(DEVICE_ID, "ack"), token)

    def lit_ever(self, number: int) -> bool:
        return any(state.state for state in self.pin(number).states)

    @property
    def shown(self) -> list[Pattern]:
        indicator = self.agent.hardware.indicator
        return list(getattr(indicator, "shown", []))


@dataclass
class Recording:
    """Wraps the real gpiozero indicator to note which patterns the agent asked for."""

    inner: object
    shown: list[Pattern]

    def show(self, pattern: Pattern, *, silent: bool, discreet_led: bool = False) -> None:
        self.shown.append(pattern)
        self.inner.show(pattern, silent=silent, discreet_led=discreet_led)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]


@pytest.fixture
def rules() -> dict[str, float]:
    return {"long_press_s": 0.3, "cancel_hold_s": 0.6, "duress_hold_s": 30.0}


@pytest.fixture
def kind() -> str:
    return "bell"


@pytest.fixture
async def rig(
    tmp_path: Path,
    mosquitto: Mosquitto,
    factory: MockFactory,
    rules: dict[str, float],
    kind: str,
) -> AsyncIterator[Rig]:
    keys = Keys.new()
    hw = HardwareConfig(
        driver="gpiozero",
        emergency_pin=BUTTON,
        led_pin=LED,
        buzzer_pin=BUZZER,
        discreet_led_pin=DISCREET,
        hold_repeat_s=0.1,
        bounce_s=0,
        camera="none",
    )
    config = DeviceConfig.model_validate(
        {
            "device": {"id": DEVICE_ID, "kind": kind, "state_dir": tmp_path / "device"},
            "gateway": {
                "id": keys.gateway.kid,
                "public_key": public_key_to_b64(keys.gateway.public_key),
            },
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "heartbeat_s": 3600},
            "outbox": {"resend_min_s": 5.0, "resend_max_s": 10.0},
            "behaviour": rules,
            "hardware": hw,
        }
    )
    hardware = build_hardware(hw, asyncio.get_running_loop(), pin_factory=factory)
    hardware.indicator = Recording(hardware.indicator, [])  # type: ignore[assignment]
    agent = Agent(
        config, signer=keys.device, gateway_key=keys.gateway.public_key, hardware=hardware
    )
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        await asyncio.wait_for(agent.ready.wait(), WAIT_S)
        yield Rig(agent, factory, spy, session, keys)


async def test_every_stage_of_an_incident_on_real_pins(rig: Rig) -> None:
    agent = rig.agent
    before = len(rig.shown)  # the link coming up showed OFF already
    rig.tap()
    first = await rig.next_alert(0)
    assert first.body.trigger == "press" and not first.body.silent
    assert agent.behaviour.state is State.SENT
    for stage in ("received", "delivered", "acknowledged", "dispatched"):
        await rig.ack(first.id, stage)  # type: ignore[arg-type]
        await eventually(lambda stage=stage: agent.behaviour.state == State(stage))
    await eventually(lambda: agent.outbox.depth() == 0)
    # dispatched is a steady LED: on now, with no blink thread to race
    await eventually(lambda: rig.pin(LED).state == 1)
    assert rig.lit_ever(BUZZER)
    assert not rig.lit_ever(DISCREET)  # audible mode: the discreet LED stays dark
    await rig.ack(first.id, "closed")
    await eventually(lambda: agent.behaviour.state is State.CLEARED)
    await eventually(lambda: rig.pin(LED).state == 0)
    rig.tap()
    second = await rig.next_alert(1)
    assert second.id != first.id and second.body.linked_to is None
    assert agent.behaviour.state is State.SENT
    assert rig.shown[before : before + 7] == [
        Pattern.SENDING,
        Pattern.RECEIVED,
        Pattern.DELIVERED,
        Pattern.ACKNOWLEDGED,
        Pattern.DISPATCHED,
        Pattern.OFF,
        Pattern.SENDING,
    ]


async def test_more_presses_on_real_pins_coalesce(rig: Rig) -> None:
    rig.tap()
    first = await rig.next_alert(0)
    for _ in range(3):
        rig.tap()
    await eventually(lambda: rig.agent.behaviour.incident is not None)
    await eventually(lambda: rig.agent.behaviour.incident.presses == 4)  # type: ignore[union-attr]
    assert len(rig.alert_ids()) == 1  # nothing new until the first alert is received
    await rig.ack(first.id, "received")
    update = await rig.next_alert(1)
    assert (update.body.presses, update.body.linked_to) == (4, first.id)


async def test_holding_the_opening_press_on_real_pins_marks_urgent(rig: Rig) -> None:
    rig.down()
    first = await rig.next_alert(0)
    await rig.ack(first.id, "received")
    # when_held ticks on gpiozero's thread; the urgent update follows the 0.3 s tick
    update = await rig.next_alert(1)
    rig.up()
    assert update.body.urgent and update.body.trigger == "long_press"
    assert update.body.linked_to == first.id
    assert rig.agent.behaviour.state is State.RECEIVED


async def test_cancel_gesture_on_real_pins(rig: Rig) -> None:
    rig.tap()
    first = await rig.next_alert(0)
    await rig.ack(first.id, "received")
    await eventually(lambda: rig.agent.behaviour.state is State.RECEIVED)
    rig.down()
    await eventually(lambda: Pattern.CANCELLED in rig.shown)  # the 0.6 s tick
    rig.up()  # long before the 30 s duress hold
    await eventually(lambda: len(rig.spy.of_type("cancel")) == 1)
    (cancel,) = rig.spy.of_type("cancel")
    assert isinstance(cancel, CancelMessage) and cancel.body.alert_id == first.id
    assert rig.agent.behaviour.state is State.CLEARED
    assert len(rig.alert_ids()) == 1  # the cancel hold was not counted as a press


@pytest.mark.parametrize(
    "rules", [{"long_press_s": 0.2, "cancel_hold_s": 0.4, "duress_hold_s": 0.8}]
)
async def test_duress_on_real_pins_looks_like_cancel(rig: Rig) -> None:
    rig.tap()
    first = await rig.next_alert(0)
    await rig.ack(first.id, "received")
    await eventually(lambda: rig.agent.behaviour.state is State.RECEIVED)
    before = len(rig.shown)
    rig.down()
    duress = await rig.next_alert(1)  # sent at the 0.8 s tick, while still held
    rig.up()
    assert duress.body.trigger == "duress" and duress.body.linked_to == first.id
    assert duress.body.silent and duress.body.urgent
    assert rig.spy.of_type("cancel") == []
    await rig.ack(duress.id, "received")
    await rig.ack(duress.id, "delivered")
    await eventually(lambda: rig.agent.outbox.depth() == 0)
    assert rig.shown[before:] == [Pattern.CANCELLED]  # as a cancel, and nothing after
    assert rig.agent.behaviour.state is State.CLEARED


@pytest.mark.parametrize("kind", ["store"])
async def test_silent_store_bell_lights_and_sounds_nothing_on_real_pins(rig: Rig) -> None:
    rig.tap()
    first = await rig.next_alert(0)
    assert first.body.bell == "store" and first.body.silent
    for stage in ("received", "delivered", "acknowledged", "dispatched"):
        await rig.ack(first.id, stage)  # type: ignore[arg-type]
        await eventually(lambda stage=stage: rig.agent.behaviour.state == State(stage))
    await eventually(lambda: len(rig.shown) >= 5)
    for pin in (LED, BUZZER, DISCREET):
        assert not rig.lit_ever(pin), pin
