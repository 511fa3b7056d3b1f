"""The real gpiozero input adapter, driven through gpiozero's MockFactory."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest
from gpiozero.pins.mock import MockFactory

from device.hal.config import HardwareConfig
from device.hal.gpio import GpiozeroInputs
from device.hal.ports import InputEvent, PinError

HOLD_REPEAT_S = 0.1
WAIT_S = 2.0  # upper bound for anything to arrive; normally it takes milliseconds


class Recorder:
    """A sink that remembers each event and the thread it ran on."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[InputEvent] = asyncio.Queue()
        self.threads: set[int] = set()

    def __call__(self, event: InputEvent) -> None:
        self.threads.add(threading.get_ident())
        self.queue.put_nowait(event)

    async def next(self) -> InputEvent:
        return await asyncio.wait_for(self.queue.get(), WAIT_S)

    async def nothing_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.queue.get(), seconds)
        except TimeoutError:
            return True
        return False


@pytest.fixture
async def wired(mock_factory: MockFactory) -> AsyncIterator[tuple[GpiozeroInputs, Recorder]]:
    config = HardwareConfig(
        emergency_pin=17,
        doorbell_pin=27,
        tamper_pin=22,
        power_sense_pin=23,
        hold_repeat_s=HOLD_REPEAT_S,
    )
    inputs = GpiozeroInputs(config, asyncio.get_running_loop(), pin_factory=mock_factory)
    recorder = Recorder()
    inputs.start(recorder)
    yield inputs, recorder
    inputs.close()


async def test_press_arrives_on_the_loop_thread(
    wired: tuple[GpiozeroInputs, Recorder], mock_factory: MockFactory
) -> None:
    _, recorder = wired
    mock_factory.pin(17).drive_low()
    event = await recorder.next()
    assert event == InputEvent("emergency", "pressed")
    assert recorder.threads == {threading.get_ident()}


async def test_edge_from_another_thread_is_bridged_to_the_loop(
    wired: tuple[GpiozeroInputs, Recorder], mock_factory: MockFactory
) -> None:
    # On a Pi the edge callback runs on gpiozero's thread; with the mock it runs in whichever
    # thread drives the pin. Drive it from a worker thread to prove the hop onto the loop.
    _, recorder = wired
    await asyncio.to_thread(mock_factory.pin(27).drive_low)
    assert await recorder.next() == InputEvent("doorbell", "pressed")
    assert recorder.threads == {threading.get_ident()}


async def test_holding_ticks_held_then_released_with_duration(
    wired: tuple[GpiozeroInputs, Recorder], mock_factory: MockFactory
) -> None:
    _, recorder = wired
    pin = mock_factory.pin(17)
    pin.drive_low()
    assert (await recorder.next()).kind == "pressed"
    held = [await recorder.next() for _ in range(3)]
    # when_held fires on gpiozero's hold thread; the sink still ran on the loop thread.
    assert recorder.threads == {threading.get_ident()}
    assert [e.kind for e in held] == ["held"] * 3
    assert [e.input for e in held] == ["emergency"] * 3
    durations = [e.held_for for e in held]
    assert durations == sorted(durations)
    assert durations[0] >= HOLD_REPEAT_S * 0.9
    assert durations[2] >= 3 * HOLD_REPEAT_S * 0.9
    pin.drive_high()
    # Drain any tick that raced the release, then expect the release.
    event = await recorder.next()
    while event.kind == "held":
        event = await recorder.next()
    assert event.kind == "released"
    assert event.input == "emergency"
    assert event.held_for >= durations[-1]
    assert await recorder.nothing_within(3 * HOLD_REPEAT_S)


async def test_short_press_has_no_held(
    wired: tuple[GpiozeroInputs, Recorder], mock_factory: MockFactory
) -> None:
    _, recorder = wired
    pin = mock_factory.pin(17)
    pin.drive_low()
    pin.drive_high()
    assert (await recorder.next()).kind == "pressed"
    released = await recorder.next()
    assert released.kind == "released"
    assert 0.0 <= released.held_for < HOLD_REPEAT_S
    assert await recorder.nothing_within(2 * HOLD_REPEAT_S)


async def test_tamper_edges_and_level(
    wired: tuple[GpiozeroInputs, Recorder], mock_factory: MockFactory
) -> None:
    inputs, recorder = wired
    pin = mock_factory.pin(22)
    # Pulled up and nothing closing the switch: the case reads as open (a cut wire too).
    assert inputs.tamper_open()
    pin.drive_low()
    assert await recorder.next() == InputEvent("tamper", "closed")
    assert not inputs.tamper_open()
    pin.drive_high()
    assert await recorder.next() == InputEvent("tamper", "opened")
    assert inputs.tamper_open()


async def test_power_sense_edges_and_level(
    wired: tuple[GpiozeroInputs, Recorder], mock_factory: MockFactory
) -> None:
    inputs, recorder = wired
    pin = mock_factory.pin(23)
    # Active high, pulled down: no voltage on the sense pin means no mains.
    assert not inputs.power_on_mains()
    pin.drive_high()
    assert await recorder.next() == InputEvent("power", "power_restored")
    assert inputs.power_on_mains()
    pin.drive_low()
    assert await recorder.next() == InputEvent("power", "power_lost")
    assert not inputs.power_on_mains()


async def test_nothing_before_start_and_after_close(mock_factory: MockFactory) -> None:
    config = HardwareConfig(emergency_pin=17, hold_repeat_s=HOLD_REPEAT_S)
    inputs = GpiozeroInputs(config, asyncio.get_running_loop(), pin_factory=mock_factory)
    recorder = Recorder()
    pin = mock_factory.pin(17)
    pin.drive_low()
    pin.drive_high()
    inputs.start(recorder)
    assert await recorder.nothing_within(0.05)
    inputs.close()
    pin.drive_low()
    assert await recorder.nothing_within(2 * HOLD_REPEAT_S)


async def test_unwired_inputs_report_safe_levels(mock_factory: MockFactory) -> None:
    config = HardwareConfig(emergency_pin=17)
    inputs = GpiozeroInputs(config, asyncio.get_running_loop(), pin_factory=mock_factory)
    try:
        assert inputs.power_on_mains()
        assert not inputs.tamper_open()
    finally:
        inputs.close()


async def test_pin_in_use_names_the_key_and_pin(mock_factory: MockFactory) -> None:
    loop = asyncio.get_running_loop()
    config = HardwareConfig(emergency_pin=17)
    first = GpiozeroInputs(config, loop, pin_factory=mock_factory)
    try:
        with pytest.raises(PinError) as caught:
            GpiozeroInputs(config, loop, pin_factory=mock_factory)
        assert isinstance(caught.value, OSError)
        assert caught.value.key == "emergency_pin"
        assert caught.value.pin == 17
        assert "emergency_pin (GPIO17)" in str(caught.value)
    finally:
        first.close()


async def test_failed_setup_releases_the_pins_it_took(mock_factory: MockFactory) -> None:
    loop = asyncio.get_running_loop()
    blocker = GpiozeroInputs(HardwareConfig(emergency_pin=22), loop, pin_factory=mock_factory)
    try:
        with pytest.raises(PinError, match="tamper_pin"):
            GpiozeroInputs(
                HardwareConfig(emergency_pin=17, tamper_pin=22), loop, pin_factory=mock_factory
            )
        # GPIO17 was taken before the failure; it must be free again.
        GpiozeroInputs(HardwareConfig(emergency_pin=17), loop, pin_factory=mock_factory).close()
    finally:
        blocker.close()
