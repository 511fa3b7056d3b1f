"""The real gpiozero indicator on mock pins, and the fake's agreement with it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
from gpiozero.pins.mock import MockFactory, MockPin

from device.hal.config import HardwareConfig
from device.hal.fakes import FakeIndicator
from device.hal.gpio import GpiozeroIndicator
from device.hal.indicator import PATTERNS, STEADY
from device.hal.ports import Pattern

RED, GREEN, BLUE, DISCREET, BUZZER, LED = 5, 6, 13, 19, 26, 12
RGB_PINS = (RED, GREEN, BLUE)
OUTPUTS = (*RGB_PINS, DISCREET, BUZZER)
LEVEL = 0.1

RGB_CONFIG = HardwareConfig(
    emergency_pin=17,
    led_red_pin=RED,
    led_green_pin=GREEN,
    led_blue_pin=BLUE,
    discreet_led_pin=DISCREET,
    discreet_led_level=LEVEL,
    buzzer_pin=BUZZER,
)


@pytest.fixture
def indicator(pwm_factory: MockFactory) -> Iterator[GpiozeroIndicator]:
    ind = GpiozeroIndicator(RGB_CONFIG, pin_factory=pwm_factory)
    yield ind
    ind.close()


def pins(factory: MockFactory, numbers: tuple[int, ...] = OUTPUTS) -> dict[int, MockPin]:
    return {n: factory.pin(n) for n in numbers}


def ever_on(pin: MockPin) -> bool:
    return any(s.state for s in pin.states) or bool(pin.state)


def max_level(pin: MockPin) -> float:
    return max([float(s.state) for s in pin.states] + [float(pin.state)])


def clear(factory: MockFactory) -> None:
    for pin in pins(factory).values():
        pin.clear_states()


async def until(predicate: Callable[[], object], within_s: float = 1.0) -> bool:
    """Poll a condition that a gpiozero thread will make true; bounded, not a fixed sleep."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.005)
    return bool(predicate())


@pytest.mark.parametrize("pattern", list(Pattern))
async def test_audible_pattern_drives_its_colour_and_buzzer(
    indicator: GpiozeroIndicator, pwm_factory: MockFactory, pattern: Pattern
) -> None:
    look = PATTERNS[pattern]
    out = pins(pwm_factory)
    indicator.show(pattern, silent=False)
    if look.led is not None:
        lit = [pin for pin, on in zip(RGB_PINS, look.colour, strict=True) if on]
        assert await until(lambda: all(ever_on(out[p]) for p in lit)), pattern
    if look.beep is not None:
        assert await until(lambda: ever_on(out[BUZZER])), pattern
    await asyncio.sleep(0.05)
    dark = [pin for pin, on in zip(RGB_PINS, look.colour, strict=True) if not on]
    if look.led is None:
        dark = list(RGB_PINS)
    if look.beep is None:
        dark.append(BUZZER)
    # The discreet LED belongs to silent mode only.
    dark.append(DISCREET)
    assert not [p for p in dark if ever_on(out[p])], pattern


async def test_steady_pattern_stays_on(
    indicator: GpiozeroIndicator, pwm_factory: MockFactory
) -> None:
    assert PATTERNS[Pattern.DISPATCHED].led == STEADY
    indicator.show(Pattern.DISPATCHED, silent=False)
    green = pwm_factory.pin(GREEN)
    await asyncio.sleep(0.3)
    assert green.state
    assert [bool(s.state) for s in green.states] == [False, True]


async def test_single_colour_led_follows_the_timing(mock_factory: MockFactory) -> None:
    config = HardwareConfig(emergency_pin=17, led_pin=LED, buzzer_pin=BUZZER)
    indicator = GpiozeroIndicator(config, pin_factory=mock_factory)
    try:
        led = mock_factory.pin(LED)
        indicator.show(Pattern.SENDING, silent=False)  # 0.25 s on, 0.25 s off
        assert await until(lambda: [bool(s.state) for s in led.states][:4] == [0, 1, 0, 1])
        indicator.show(Pattern.OFF, silent=False)
        assert not led.state
    finally:
        indicator.close()


async def test_silent_leaves_every_output_low_for_every_pattern(
    indicator: GpiozeroIndicator, pwm_factory: MockFactory
) -> None:
    out = pins(pwm_factory)
    for pattern in Pattern:
        indicator.show(pattern, silent=True)
    # Long enough for every pattern's first "on" phase, had anything been started.
    await asyncio.sleep(0.3)
    for number, pin in out.items():
        assert not pin.state, number
        assert not ever_on(pin), (number, pin.states)


async def test_silent_darkens_a_running_pattern_at_once(
    indicator: GpiozeroIndicator, pwm_factory: MockFactory
) -> None:
    out = pins(pwm_factory)
    indicator.show(Pattern.DISPATCHED, silent=False)  # green steady, long beep
    assert await until(lambda: out[GREEN].state and out[BUZZER].state)
    indicator.show(Pattern.DISPATCHED, silent=True)
    assert not any(pin.state for pin in out.values())
    clear(pwm_factory)
    await asyncio.sleep(0.3)
    assert not any(ever_on(pin) for pin in out.values())


@pytest.mark.parametrize("pattern", list(Pattern))
async def test_discreet_lights_only_the_discreet_led_dimly(
    indicator: GpiozeroIndicator, pwm_factory: MockFactory, pattern: Pattern
) -> None:
    out = pins(pwm_factory)
    indicator.show(pattern, silent=True, discreet_led=True)
    discreet = out[DISCREET]
    if PATTERNS[pattern].discreet is None:
        await asyncio.sleep(0.1)
        assert not ever_on(discreet)
    else:
        assert await until(lambda: ever_on(discreet)), pattern
        await asyncio.sleep(0.05)
        assert max_level(discreet) == pytest.approx(LEVEL)
    assert not [n for n in (*RGB_PINS, BUZZER) if ever_on(out[n])]


async def test_discreet_blink_dims_and_turns_off(
    indicator: GpiozeroIndicator, pwm_factory: MockFactory
) -> None:
    discreet = pwm_factory.pin(DISCREET)
    # CANCELLED: 0.1 s on, 0.3 s off, twice, then dark.
    indicator.show(Pattern.CANCELLED, silent=True, discreet_led=True)
    assert await until(lambda: [s.state for s in discreet.states][1:] == [LEVEL, 0, LEVEL, 0])
    await asyncio.sleep(0.3)
    assert discreet.state == 0


async def test_no_discreet_led_fitted_means_dark(pwm_factory: MockFactory) -> None:
    config = HardwareConfig(emergency_pin=17, led_pin=LED, buzzer_pin=BUZZER)
    indicator = GpiozeroIndicator(config, pin_factory=pwm_factory)
    try:
        indicator.show(Pattern.DISPATCHED, silent=True, discreet_led=True)
        await asyncio.sleep(0.1)
        assert not ever_on(pwm_factory.pin(LED))
        assert not ever_on(pwm_factory.pin(BUZZER))
    finally:
        indicator.close()


@pytest.mark.parametrize("silent", [False, True])
@pytest.mark.parametrize("discreet_led", [False, True])
async def test_fake_indicator_agrees_with_the_real_one(
    indicator: GpiozeroIndicator, pwm_factory: MockFactory, silent: bool, discreet_led: bool
) -> None:
    out = pins(pwm_factory)
    fake = FakeIndicator(has_discreet_led=True)
    lights = (*RGB_PINS, DISCREET)
    for pattern in Pattern:
        indicator.show(Pattern.OFF, silent=False)
        clear(pwm_factory)
        indicator.show(pattern, silent=silent, discreet_led=discreet_led)
        fake.show(pattern, silent=silent, discreet_led=discreet_led)
        if fake.led_lit:
            assert await until(lambda: any(ever_on(out[n]) for n in lights)), pattern
        if fake.buzzer_sounding:
            assert await until(lambda: ever_on(out[BUZZER])), pattern
        await asyncio.sleep(0.03)
        assert fake.led_lit == any(ever_on(out[n]) for n in lights), pattern
        assert fake.buzzer_sounding == ever_on(out[BUZZER]), pattern
        assert fake.discreet_lit == ever_on(out[DISCREET]), pattern
    assert fake.history == [(p, silent) for p in Pattern]


def test_every_pattern_looks_or_sounds_different() -> None:
    looks = {p: (PATTERNS[p].colour, PATTERNS[p].led, PATTERNS[p].beep) for p in Pattern}
    assert len(set(looks.values())) == len(looks)
    # a single-colour LED shows only the timing: the SMS fallback's patterns must differ there
    # from every pattern an incident can show
    for sms in (Pattern.SMS_TRYING, Pattern.SMS_SENT):
        others = [p for p in Pattern if p is not sms]
        assert all(PATTERNS[sms].led != PATTERNS[p].led for p in others), sms
