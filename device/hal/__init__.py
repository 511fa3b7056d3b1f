"""Hardware ports (buttons, indicator, camera, modem) with real and fake adapters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from device.hal.config import HardwareConfig
from device.hal.ports import (
    AudioInput,
    AudioOutput,
    ButtonName,
    Camera,
    CameraUnavailable,
    Frame,
    HalError,
    Indicator,
    InputEvent,
    InputName,
    Inputs,
    InputSink,
    InvalidPhoneNumber,
    Modem,
    ModemError,
    ModemInfo,
    ModemRejected,
    ModemTimeout,
    Pattern,
    PinError,
)

__all__ = [
    "AudioInput",
    "AudioOutput",
    "ButtonName",
    "Camera",
    "CameraUnavailable",
    "Frame",
    "HalError",
    "Hardware",
    "HardwareConfig",
    "Indicator",
    "InputEvent",
    "InputName",
    "InputSink",
    "Inputs",
    "InvalidPhoneNumber",
    "Modem",
    "ModemError",
    "ModemInfo",
    "ModemRejected",
    "ModemTimeout",
    "Pattern",
    "PinError",
    "build_hardware",
]


@dataclass
class Hardware:
    """Everything the agent may touch, behind the ports."""

    inputs: Inputs
    indicator: Indicator
    camera: Camera | None
    modem: Modem | None
    speaker: AudioOutput | None = None
    microphone: AudioInput | None = None

    async def aclose(self) -> None:
        """Release everything (stop the camera, close modem, outputs and inputs)."""
        if self.camera is not None:
            self.camera.stop()
        if self.modem is not None:
            await self.modem.close()
        self.indicator.close()
        self.inputs.close()


def build_hardware(
    config: HardwareConfig,
    loop: asyncio.AbstractEventLoop,
    *,
    pin_factory: object | None = None,
) -> Hardware:
    """Real adapters for `driver = "gpiozero"`, fakes for `driver = "fake"`.

    Adapter modules are imported here, not at the top, so that the simulator never imports
    gpiozero or pyserial, and a Pi never imports the fakes.
    """
    if config.driver == "fake":
        return _build_fakes(config)

    from device.hal.gpio import GpiozeroIndicator, GpiozeroInputs
    from device.hal.modem import SerialModem

    inputs = GpiozeroInputs(config, loop, pin_factory)
    try:
        indicator = GpiozeroIndicator(config, pin_factory)
    except BaseException:
        inputs.close()
        raise
    try:
        camera = None
        if config.camera != "none":
            from device.hal.camera import open_camera

            camera = open_camera(
                config.camera, config.camera_width, config.camera_height, config.camera_fps
            )
    except BaseException:
        indicator.close()
        inputs.close()
        raise
    modem = (
        None
        if config.modem_port is None
        else SerialModem(
            config.modem_port,
            config.modem_baudrate,
            timeout_s=config.modem_timeout_s,
            rs485=config.modem_rs485,
            sms_timeout_s=config.modem_sms_timeout_s,
        )
    )
    speaker = None
    if config.speaker == "alsa":
        from device.hal.audio import AlsaAudioOutput

        speaker = AlsaAudioOutput(config.speaker_device)
    microphone = None
    if config.microphone == "alsa":
        from device.hal.audio import AlsaMicrophone

        microphone = AlsaMicrophone(config.microphone_device)
    return Hardware(
        inputs=inputs,
        indicator=indicator,
        camera=camera,
        modem=modem,
        speaker=speaker,
        microphone=microphone,
    )


def _build_fakes(config: HardwareConfig) -> Hardware:
    from device.hal.audio import FakeAudioOutput, FakeMicrophone
    from device.hal.fakes import FakeIndicator, FakeInputs, FakeModem

    camera = None
    if config.camera != "none":
        from device.hal.camera import SyntheticCamera

        camera = SyntheticCamera(config.camera_width, config.camera_height, config.camera_fps)
    return Hardware(
        inputs=FakeInputs(config.hold_repeat_s),
        indicator=FakeIndicator(has_discreet_led=config.discreet_led_pin is not None),
        camera=camera,
        modem=None if config.modem_port is None else FakeModem(port=config.modem_port),
        speaker=None if config.speaker == "none" else FakeAudioOutput(),
        microphone=None if config.microphone == "none" else FakeMicrophone(),
    )
