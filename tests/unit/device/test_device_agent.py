"""Agent parts that need no broker: resend backoff, heartbeat contents."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from device.agent import Agent
from device.config import DeviceConfig
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs, FakeModem
from device.hal.ports import InputEvent, Pattern
from device.observer import AgentObserver
from device.outbox import Outbox
from device.sms import csq_percent
from device.testpress import BUSY_RETRY_MS
from protocol.jws import Signer
from protocol.keys import generate_key
from protocol.messages import Ack, Command, build_message


def agent(tmp_path: Path, seed: int = 7) -> Agent:
    config = DeviceConfig.model_validate(
        {
            "device": {"id": "bell-0001", "state_dir": tmp_path},
            "outbox": {"resend_min_s": 2, "resend_max_s": 30},
        }
    )
    gateway = Signer("gw-test", generate_key())
    return Agent(
        config,
        signer=Signer("bell-0001", generate_key()),
        gateway_key=gateway.public_key,
        hardware=Hardware(FakeInputs(on_mains=False), FakeIndicator(), None, None),
        rng=random.Random(seed),
        monotonic=iter([100.0, 142.9]).__next__,
    )


def test_resends_back_off_exponentially_with_full_jitter_up_to_the_maximum(
    tmp_path: Path,
) -> None:
    a = agent(tmp_path)
    assert a.resend_delay_ms(0) == 2000  # the first resend: the minimum
    for attempts, ceiling in ((1, 4000), (2, 8000), (3, 16000), (4, 30000), (40, 30000)):
        delays = [a.resend_delay_ms(attempts) for _ in range(200)]
        assert min(delays) >= 2000 and max(delays) <= ceiling
        # jittered: a fleet that lost the gateway together does not come back in step
        assert len(set(delays)) > 150
        assert max(delays) > ceiling * 0.9


def test_heartbeat_reports_battery_uptime_and_outbox_depth(tmp_path: Path) -> None:
    a = agent(tmp_path)
    a.outbox.put("alert-0001", "alert", "{}", 0)
    beat = a.heartbeat()
    assert (beat.power, beat.uptime_s, beat.outbox_depth) == ("battery", 42, 1)
    assert beat.link_quality is None  # no modem, no signal figure


def test_csq_becomes_a_percentage() -> None:
    assert [csq_percent(v) for v in (None, 0, 15, 31)] == [None, 0, 48, 100]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


def sms_agent(
    tmp_path: Path,
    clock: Clock,
    *,
    silent: bool,
    outbox: Outbox | None = None,
    observer: AgentObserver | None = None,
) -> tuple[Agent, FakeModem]:
    config = DeviceConfig.model_validate(
        {
            # a discreet LED allowed: silent mode must still show nothing of the SMS
            "device": {
                "id": "bell-0001",
                "state_dir": tmp_path,
                "silent": silent,
                "discreet_led": True,
            },
            "sms": {"after_s": 15, "numbers": ["+820000000001"]},
        }
    )
    modem = FakeModem()
    hardware = Hardware(FakeInputs(), FakeIndicator(), None, modem)
    gateway = Signer("gw-test", generate_key())
    a = Agent(
        config,
        signer=Signer("bell-0001", generate_key()),
        gateway_key=gateway.public_key,
        hardware=hardware,
        outbox=outbox or Outbox(":memory:"),
        clock_ms=clock,
        observer=observer,
    )
    return a, modem


@pytest.mark.parametrize("silent", [False, True])
async def test_a_press_not_received_in_time_goes_by_sms_and_the_led_says_so(
    tmp_path: Path, silent: bool
) -> None:
    clock = Clock()
    a, modem = sms_agent(tmp_path, clock, silent=silent)
    indicator = a.hardware.indicator
    assert isinstance(indicator, FakeIndicator)
    a.on_input(InputEvent("emergency", "pressed"))
    clock.now += 14_999
    await a.sms.check()
    assert modem.sent == []
    clock.now += 1
    await a.sms.check()
    (sms,) = modem.sent
    (alert_id,) = [e.id for e in a.outbox.pending()]
    assert alert_id in sms.text  # whoever gets the SMS and the alert can tell they are one
    shown = [pattern for pattern, _ in indicator.history]
    assert all(s == silent for _, s in indicator.history)
    if silent:
        # nothing changes: the discreet LED still says "sending", the rest stays dark
        assert shown == [Pattern.SENDING]
        assert indicator.discreet_lit and not indicator.buzzer_sounding
        assert indicator.current.led is None
    else:
        assert shown == [Pattern.SENDING, Pattern.SMS_TRYING, Pattern.SMS_SENT]
        assert indicator.current.led is not None and indicator.buzzer_sounding
    clock.now += 60_000
    await a.sms.check()
    assert len(modem.sent) == 1  # once per alert
    a.outbox.close()


async def test_a_link_that_looks_up_does_not_hold_the_sms_back(tmp_path: Path) -> None:
    # a black-holed link: the session still believes it is connected, nothing passes
    clock = Clock()
    a, modem = sms_agent(tmp_path, clock, silent=False)
    a.link.session._connected.set()
    assert a.link.connected
    a.on_input(InputEvent("emergency", "pressed"))
    clock.now += 15_000  # after_s from the press, the link never reported down
    await a.sms.check()
    assert len(modem.sent) == 1
    a.outbox.close()


async def test_an_agent_restarted_between_received_and_delivered_still_sends_the_sms(
    tmp_path: Path,
) -> None:
    clock = Clock()
    a, _ = sms_agent(tmp_path, clock, silent=False, outbox=Outbox(tmp_path / "outbox.db"))
    a.on_input(InputEvent("emergency", "pressed"))
    (alert_id,) = [e.id for e in a.outbox.pending()]
    a._on_down(build_message(Ack(ref=alert_id, stage="received"), device="bell-0001", seq=1, ts=1))
    assert a.outbox.depth() == 0  # the outbox has forgotten it
    a.outbox.close()  # the agent restarts; the centre never gets the alert
    clock.now += 30_000  # undelivered_after_s from the press
    b, modem = sms_agent(tmp_path, clock, silent=False, outbox=Outbox(tmp_path / "outbox.db"))
    await b.sms.check()
    (sms,) = modem.sent
    assert alert_id in sms.text
    b.outbox.close()


def agent_with_test_press(tmp_path: Path, clock: Clock) -> Agent:
    config = DeviceConfig.model_validate(
        {
            "device": {"id": "bell-0001", "state_dir": tmp_path},
            "test_press": {"every_days": 1, "from_hour": 0, "until_hour": 24},
        }
    )
    gateway = Signer("gw-test", generate_key())
    return Agent(
        config,
        signer=Signer("bell-0001", generate_key()),
        gateway_key=gateway.public_key,
        hardware=Hardware(FakeInputs(), FakeIndicator(), None, None),
        outbox=Outbox(":memory:"),
        clock_ms=clock,
    )


async def test_a_scheduled_test_press_is_kept_sent_and_proven_by_delivered(
    tmp_path: Path,
) -> None:
    clock = Clock()
    a = agent_with_test_press(tmp_path, clock)
    due = a.test_presses.next_at_ms
    assert due is not None and clock.now < due <= clock.now + 86_400_000
    clock.now = due - 1
    a.test_presses.tick()
    assert a.outbox.pending() == []
    clock.now = due
    a.test_presses.tick()
    (entry,) = a.outbox.pending()
    assert json.loads(entry.body_json)["trigger"] == "test" and a.behaviour.incident is None
    assert a.test_presses.next_at_ms == due + 86_400_000  # the next day's slot
    a.test_presses.on_ack(Ack(ref=entry.id, stage="received"))
    assert a.test_presses.in_flight == entry.id
    a.test_presses.on_ack(Ack(ref=entry.id, stage="delivered"))
    assert a.test_presses.in_flight is None
    a.outbox.close()


async def test_a_test_press_waits_while_an_incident_is_open(tmp_path: Path) -> None:
    clock = Clock()
    a = agent_with_test_press(tmp_path, clock)
    a.on_input(InputEvent("emergency", "pressed"))
    (press,) = a.outbox.pending()
    a.on_command(Command(name="test_press"))  # asked for by the gateway: not now either
    due = a.test_presses.next_at_ms
    assert due is not None
    clock.now = due
    a.test_presses.tick()
    assert [e.id for e in a.outbox.pending()] == [press.id]
    assert a.test_presses.next_at_ms == due + BUSY_RETRY_MS
    a.outbox.close()


async def test_a_test_press_asked_for_by_command_goes_at_once(tmp_path: Path) -> None:
    clock = Clock()
    a = agent_with_test_press(tmp_path, clock)
    a.on_command(Command(name="test_press"))
    (entry,) = a.outbox.pending()
    assert entry.id == a.test_presses.in_flight
    body = json.loads(entry.body_json)
    assert (body["bell"], body["trigger"]) == ("emergency", "test")
    a.outbox.close()


async def test_a_rollback_returns_to_the_good_broker_even_past_two_trials(tmp_path: Path) -> None:
    clock = Clock()
    config = DeviceConfig.model_validate(
        {
            "device": {"id": "bell-0001", "state_dir": tmp_path},
            "mqtt": {"host": "127.0.0.1", "port": 8883},
            "remote_config": {"confirm_within_s": 60},
        }
    )
    a = Agent(
        config,
        signer=Signer("bell-0001", generate_key()),
        gateway_key=Signer("gw-test", generate_key()).public_key,
        hardware=Hardware(FakeInputs(), FakeIndicator(), None, None),
        outbox=Outbox(":memory:"),
        clock_ms=clock,
    )
    # trial one moves the broker; trial two, before one is proven, keeps that broker
    a.set_config({"mqtt": {"port": 9883}})
    a.set_config({"mqtt": {"port": 9883}, "behaviour": {"ring_link_s": 5.0}})
    assert a.link.session.address == ("127.0.0.1", 9883)
    clock.now += 60_000
    assert a.check_config_trial() is None
    # undone to the good config's broker, not left on the one the trials moved to
    assert a.link.session.address == ("127.0.0.1", 8883)
    assert a.config.behaviour.ring_link_s == 120.0 and a.remote.good == {}
    await a.link.close()


async def test_a_config_sent_during_an_open_incident_is_not_tried(tmp_path: Path) -> None:
    clock = Clock()
    a = agent_with_test_press(tmp_path, clock)
    address = a.link.session.address
    a.on_input(InputEvent("emergency", "pressed"))
    assert a.behaviour.incident is not None
    # a new broker now would cut the link the open incident's messages travel on
    a.set_config({"mqtt": {"port": 9883}, "behaviour": {"ring_link_s": 5.0}})
    assert a.remote.trial is None and a.remote.good == {}
    assert a.link.session.address == address
    assert a.config.behaviour.ring_link_s == 120.0
    await a.link.close()
    a.outbox.close()
