"""HardwareConfig validation and build_hardware's choice of adapters."""

from __future__ import annotations

import asyncio
import sys

import pytest
from gpiozero.pins.mock import MockFactory
from pydantic import ValidationError

from device.hal import Hardware, HardwareConfig, build_hardware
from device.hal.camera import SyntheticCamera
from device.hal.fakes import FakeIndicator, FakeInputs, FakeModem
from device.hal.gpio import GpiozeroIndicator, GpiozeroInputs
from device.hal.modem import SerialModem


def test_defaults_are_the_reference_bell() -> None:
    config = HardwareConfig()
    assert config.driver == "gpiozero"
    assert config.emergency_pin == 17
    assert config.doorbell_pin is None and config.buzzer_pin is None
    assert config.modem_port is None


def test_clashing_pins_name_both_keys() -> None:
    with pytest.raises(ValidationError) as caught:
        HardwareConfig(emergency_pin=17, buzzer_pin=17)
    message = str(caught.value)
    assert "emergency_pin and buzzer_pin are both GPIO17" in message


@pytest.mark.parametrize("pin", [-1, 28, 40])
def test_pins_outside_the_header_are_refused(pin: int) -> None:
    with pytest.raises(ValidationError, match="tamper_pin"):
        HardwareConfig(tamper_pin=pin)


def test_rgb_pins_go_together() -> None:
    with pytest.raises(ValidationError, match="all three or none"):
        HardwareConfig(led_red_pin=5, led_green_pin=6)
    with pytest.raises(ValidationError, match="either led_pin"):
        HardwareConfig(led_pin=12, led_red_pin=5, led_green_pin=6, led_blue_pin=13)


def test_unknown_keys_and_changes_are_refused() -> None:
    with pytest.raises(ValidationError, match="buzer_pin"):
        HardwareConfig.model_validate({"buzer_pin": 26})
    config = HardwareConfig()
    with pytest.raises(ValidationError):
        config.emergency_pin = 4  # type: ignore[misc]


def test_odd_camera_size_is_refused() -> None:
    with pytest.raises(ValidationError, match="camera_width"):
        HardwareConfig(camera_width=641)


async def test_fake_driver_builds_fakes_without_gpiozero_or_serial(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The simulator must not need the hardware libraries at all.
    for name in ("gpiozero", "serial", "picamera2"):
        monkeypatch.setitem(sys.modules, name, None)
    config = HardwareConfig(driver="fake", camera="synthetic", modem_port="fake0")
    hardware = build_hardware(config, asyncio.get_running_loop())
    assert isinstance(hardware.inputs, FakeInputs)
    assert isinstance(hardware.indicator, FakeIndicator)
    assert isinstance(hardware.camera, SyntheticCamera)
    assert isinstance(hardware.modem, FakeModem)
    await hardware.aclose()


async def test_fake_driver_without_camera_or_modem() -> None:
    config = HardwareConfig(driver="fake", camera="none")
    hardware = build_hardware(config, asyncio.get_running_loop())
    assert hardware.camera is None and hardware.modem is None


async def test_gpiozero_driver_builds_real_adapters(mock_factory: MockFactory) -> None:
    config = HardwareConfig(
        led_pin=12, buzzer_pin=26, camera="synthetic", modem_port="/dev/ttyANSIMI-none"
    )
    hardware = build_hardware(config, asyncio.get_running_loop(), pin_factory=mock_factory)
    try:
        assert isinstance(hardware, Hardware)
        assert isinstance(hardware.inputs, GpiozeroInputs)
        assert isinstance(hardware.indicator, GpiozeroIndicator)
        assert isinstance(hardware.camera, SyntheticCamera)
        # Built but not opened: the port is touched only by the first command.
        assert isinstance(hardware.modem, SerialModem)
    finally:
        await hardware.aclose()
    # Closing released the pins for someone else.
    build_hardware(
        config.model_copy(update={"modem_port": None}),
        asyncio.get_running_loop(),
        pin_factory=mock_factory,
    ).inputs.close()


async def test_failing_indicator_releases_the_inputs(mock_factory: MockFactory) -> None:
    loop = asyncio.get_running_loop()
    squatter = GpiozeroIndicator(HardwareConfig(buzzer_pin=26), pin_factory=mock_factory)
    try:
        with pytest.raises(OSError, match="buzzer_pin"):
            build_hardware(
                HardwareConfig(buzzer_pin=26, camera="none"), loop, pin_factory=mock_factory
            )
        GpiozeroInputs(HardwareConfig(), loop, pin_factory=mock_factory).close()
    finally:
        squatter.close()
