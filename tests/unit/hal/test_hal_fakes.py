"""The thread-free fakes: inputs, indicator and in-memory modem."""

from __future__ import annotations

import asyncio

import pytest

from device.hal.fakes import FakeIndicator, FakeInputs, FakeModem, SentSms
from device.hal.indicator import PATTERNS
from device.hal.ports import (
    InputEvent,
    InvalidPhoneNumber,
    ModemInfo,
    ModemRejected,
    ModemTimeout,
    Pattern,
)

REPEAT = 0.05


def recording(inputs: FakeInputs) -> list[InputEvent]:
    events: list[InputEvent] = []
    inputs.start(events.append)
    return events


async def test_hold_emits_pressed_held_ticks_released() -> None:
    inputs = FakeInputs(hold_repeat_s=REPEAT)
    events = recording(inputs)
    await inputs.hold("emergency", 3.5 * REPEAT)
    assert [e.kind for e in events] == ["pressed", "held", "held", "held", "released"]
    assert {e.input for e in events} == {"emergency"}
    assert [e.held_for for e in events[1:4]] == pytest.approx([REPEAT, 2 * REPEAT, 3 * REPEAT])
    assert events[-1].held_for == pytest.approx(3.5 * REPEAT, abs=0.02)
    assert not inputs.is_down("emergency")


async def test_hold_for_an_exact_multiple_gives_that_many_ticks() -> None:
    inputs = FakeInputs(hold_repeat_s=REPEAT)
    events = recording(inputs)
    await inputs.hold("doorbell", 3 * REPEAT)
    assert [e.kind for e in events] == ["pressed", "held", "held", "held", "released"]


async def test_hold_follows_the_loop_clock_not_the_wall_clock() -> None:
    # A long hold in a simulator should not need long: the ticks come from loop timers.
    inputs = FakeInputs(hold_repeat_s=1.0)
    events = recording(inputs)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await inputs.hold("emergency", 0.0)
    assert loop.time() - started < 0.5
    assert [e.kind for e in events] == ["pressed", "released"]


async def test_manual_press_ticks_until_release() -> None:
    inputs = FakeInputs(hold_repeat_s=REPEAT)
    events = recording(inputs)
    inputs.press("emergency")
    inputs.press("emergency")  # no second edge while down
    await asyncio.sleep(2.5 * REPEAT)
    inputs.release("emergency")
    inputs.release("emergency")
    await asyncio.sleep(2 * REPEAT)
    assert [e.kind for e in events] == ["pressed", "held", "held", "released"]


async def test_levels_change_before_start_but_events_wait_for_it() -> None:
    inputs = FakeInputs()
    inputs.lose_power()
    inputs.open_tamper()
    assert not inputs.power_on_mains()
    assert inputs.tamper_open()
    events = recording(inputs)
    assert events == []
    inputs.restore_power()
    inputs.restore_power()  # already on mains: no edge
    inputs.close_tamper()
    inputs.open_tamper()
    inputs.lose_power()
    assert events == [
        InputEvent("power", "power_restored"),
        InputEvent("tamper", "closed"),
        InputEvent("tamper", "opened"),
        InputEvent("power", "power_lost"),
    ]


async def test_close_stops_ticks() -> None:
    inputs = FakeInputs(hold_repeat_s=REPEAT)
    events = recording(inputs)
    inputs.press("emergency")
    inputs.close()
    await asyncio.sleep(3 * REPEAT)
    assert [e.kind for e in events] == ["pressed"]


def test_fake_indicator_records_and_applies_the_silent_rule() -> None:
    indicator = FakeIndicator()
    assert not indicator.led_lit
    indicator.show(Pattern.SENDING, silent=False)
    assert indicator.led_lit and indicator.buzzer_sounding and not indicator.discreet_lit
    indicator.show(Pattern.SENDING, silent=True)
    assert not indicator.led_lit and not indicator.buzzer_sounding
    indicator.show(Pattern.DISPATCHED, silent=True, discreet_led=True)
    assert indicator.led_lit and indicator.discreet_lit and not indicator.buzzer_sounding
    indicator.show(Pattern.LINK_DOWN, silent=True, discreet_led=True)
    assert not indicator.led_lit  # the discreet LED never reveals link trouble
    assert indicator.history == [
        (Pattern.SENDING, False),
        (Pattern.SENDING, True),
        (Pattern.DISPATCHED, True),
        (Pattern.LINK_DOWN, True),
    ]


@pytest.mark.parametrize("pattern", list(Pattern))
def test_fake_indicator_is_silent_when_silent(pattern: Pattern) -> None:
    with_discreet = FakeIndicator(has_discreet_led=True)
    without = FakeIndicator(has_discreet_led=False)
    with_discreet.show(pattern, silent=True)
    without.show(pattern, silent=True, discreet_led=True)
    for indicator in (with_discreet, without):
        assert not indicator.led_lit
        assert not indicator.buzzer_sounding
    audible = FakeIndicator()
    audible.show(pattern, silent=False)
    assert audible.led_lit == (PATTERNS[pattern].led is not None)
    assert audible.buzzer_sounding == (PATTERNS[pattern].beep is not None)


async def test_fake_modem_records_and_fails_on_request() -> None:
    modem = FakeModem(signal=17)
    assert await modem.probe() == ModemInfo("FAKE-MODEM", True, 17, "ready", True)
    assert await modem.signal_quality() == 17
    modem.fail_next(2, "rejected", cms_error=500)
    modem.fail_next(1, "timeout")
    for _ in range(2):
        with pytest.raises(ModemRejected) as caught:
            await modem.send_sms("+821012345678", "help")
        assert caught.value.cms_error == 500
    with pytest.raises(ModemTimeout):
        await modem.send_sms("+821012345678", "help")
    assert modem.sent == []
    assert await modem.send_sms("+821012345678", "help " * 40) == 1
    assert modem.sent == [SentSms("+821012345678", ("help " * 40)[:157] + "...", 1)]
    with pytest.raises(InvalidPhoneNumber):
        await modem.send_sms("not a number", "help")
    await modem.close()
    assert modem.closed
